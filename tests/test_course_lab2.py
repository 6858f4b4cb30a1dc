"""Lab 2 checks and grading: PASS for the references, a FAIL that names the mistake for plausible wrong answers."""

from __future__ import annotations

import pytest
import torch

from minidisagg.config import PRESETS
from minidisagg.course import check
from minidisagg.course.checking import CheckFailed
from minidisagg.course.kv_lab import Request, blocks_for
from minidisagg.course.profile_lab import breakdown_from_trace
from minidisagg.course.sizing import admit_fcfs, kv_pool_plan
from minidisagg.roofline import dtype_bytes
from minidisagg.course.kv_lab import (DecodeTimer, attention_inputs, attention_outputs, causal_attention,
                                      decode_with_engine_cache, embed, engine_logits, final_logits)
from minidisagg.engine.batch import BatchItem
from minidisagg.engine.runner import ModelRunner
from minidisagg.kv.cache import PagedKVCache


# --- Task 2: a decode loop with a KV cache ---

def _buggy_cached_decode(model, prompt_ids, num_new_tokens, bug):
    """A cached loop built from the lab helpers, with one classic mistake switched on."""
    cfg = model.cfg
    keys = [None] * cfg.num_layers
    values = [None] * cfg.num_layers
    new_ids, cached, tokens, logits = list(prompt_ids), 0, [], []
    for _ in range(num_new_tokens):
        start = 0 if bug == "positions-restart" and cached else cached
        positions = torch.arange(start, start + len(new_ids))
        hidden, residual = embed(model, torch.tensor(new_ids)), None
        for layer in range(cfg.num_layers):
            q, k, v, residual = attention_inputs(model, layer, hidden, residual, positions)
            if bug == "no-cache" and cached:
                keys[layer], values[layer] = k, v
            else:
                keys[layer] = k if keys[layer] is None else torch.cat([keys[layer], k])
                values[layer] = v if values[layer] is None else torch.cat([values[layer], v])
            hidden, residual = attention_outputs(model, layer, causal_attention(q, keys[layer], values[layer]),
                                                 residual)
        cached += len(new_ids)
        step_logits = final_logits(model, hidden, residual)[-1]
        tokens.append(int(step_logits.argmax()))
        logits.append(step_logits)
        new_ids = [tokens[-1]]
    return tokens, torch.stack(logits)


def test_task2_passes_with_the_engines_paged_decode(module_seed):
    result = check.lab2.task2(decode_with_engine_cache, seed=module_seed)
    assert result.passed and "generated tokens equal to full recompute" in result.detail, f"seed {module_seed}"


def test_task2_passes_with_a_correct_contiguous_cache(module_seed):
    assert check.lab2.task2(lambda m, p, n: _buggy_cached_decode(m, p, n, bug=None), seed=module_seed).passed


@pytest.mark.parametrize("bug", ["positions-restart", "no-cache"])
def test_task2_fails_a_classic_cache_mistake(bug, module_seed):
    with pytest.raises(CheckFailed) as info:
        check.lab2.task2(lambda m, p, n: _buggy_cached_decode(m, p, n, bug), seed=module_seed)
    message = str(info.value)
    assert "Lab 2, Task 2" in message and "logits differ from recomputing" in message, message
    assert "a decode step does not" in message, message


def test_task2_fails_a_wrong_return_shape_and_reports_not_implemented():
    with pytest.raises(CheckFailed, match=r"expected \d+ tokens and logits"):
        check.lab2.task2(lambda m, p, n: decode_with_engine_cache(m, p, n - 1) if n > 1 else ([], torch.zeros(0)))
    with pytest.raises(CheckFailed, match=r"must return \(tokens, logits\)"):
        check.lab2.task2(lambda m, p, n: [0] * n)

    def stub(model, prompt_ids, num_new_tokens):
        raise NotImplementedError("Lab 2, Task 2: prefill once, then one token per step")

    with pytest.raises(CheckFailed, match="Lab 2, Task 2: not implemented yet"):
        check.lab2.task2(stub)


def test_engine_logits_is_the_engine_forward(tiny_loaded):
    """The check's reference equals the engine's own runner on the last position."""
    model = tiny_loaded.model
    ids = [5, 900, 31, 4000, 77, 12, 8]
    runner = ModelRunner(model, PagedKVCache(model.cfg, 2, 4, model.dtype, model.device))
    want = runner.execute([BatchItem(ids, 0, [1, 0], True)])[0]
    torch.testing.assert_close(engine_logits(model, ids)[-1], want, rtol=0, atol=1e-5)


# --- the timing helper ---

def test_decode_timer_counts_the_kv_it_reads(tiny_loaded):
    timer = DecodeTimer(tiny_loaded.model, batch=2, max_context=40, block_size=8)
    timing = timer.measure(33, iters=1)
    per_token = tiny_loaded.config.kv_bytes_per_token(4)
    assert timing.kv_bytes == 2 * 33 * per_token and timing.step_s > 0
    with pytest.raises(ValueError, match="context_len must be in 1..40"):
        timer.measure(41)


def _prefill_all_but_last(model, prompt_ids, num_new_tokens):
    """Plausible: cache prompt[:-1] first, then feed the last prompt token as the first decode step.

    Right for every prompt of two or more tokens; a one-token prompt leaves nothing to prefill.
    """
    cfg = model.cfg
    keys, values = [None] * cfg.num_layers, [None] * cfg.num_layers

    def forward(ids, start):
        hidden, residual = embed(model, torch.tensor(ids)), None
        for layer in range(cfg.num_layers):
            q, k, v, residual = attention_inputs(model, layer, hidden, residual, torch.arange(start, start + len(ids)))
            keys[layer] = k if keys[layer] is None else torch.cat([keys[layer], k])
            values[layer] = v if values[layer] is None else torch.cat([values[layer], v])
            hidden, residual = attention_outputs(model, layer, causal_attention(q, keys[layer], values[layer]), residual)
        return final_logits(model, hidden, residual)[-1]

    prefix = prompt_ids[:-1]
    if not prefix:
        raise IndexError("nothing to prefill before the last prompt token")
    forward(prefix, 0)
    tokens, logits, last, pos = [], [], prompt_ids[-1], len(prefix)
    for _ in range(num_new_tokens):
        step = forward([last], pos)
        pos += 1
        tokens.append(int(step.argmax()))
        logits.append(step)
        last = tokens[-1]
    return tokens, torch.stack(logits)


def test_task2_passes_the_engines_cache_on_the_boundaries_first(module_seed):
    result = check.lab2.task2(decode_with_engine_cache, seed=module_seed, num_prompts=2)
    assert result.passed and "a one-token prompt and a single new token included" in result.detail


def test_task2_a_one_token_prompt_comes_first():
    with pytest.raises(CheckFailed) as info:
        check.lab2.task2(_prefill_all_but_last, seed=0)
    message = str(info.value)
    assert message.startswith("FAIL  Lab 2, Task 2: decode_with_kv_cache(model, <prompt of 1 tokens>, "), message
    assert message.endswith("raised IndexError: nothing to prefill before the last prompt token"), message


# --- Task 1: a KV pool for a memory budget ---

def _plan_query_heads(cfg, dtype, memory, block_size, tokens):
    per_token = 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * dtype_bytes(dtype)
    blocks = memory // (per_token * block_size)
    return blocks, blocks // blocks_for(tokens, block_size)


def _plan_tokens_not_blocks(cfg, dtype, memory, block_size, tokens):
    blocks, _ = kv_pool_plan(cfg, dtype, memory, block_size, tokens)
    return blocks, blocks * block_size // tokens


def _plan_keys_only(cfg, dtype, memory, block_size, tokens):
    per_token = cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype_bytes(dtype)
    blocks = memory // (per_token * block_size)
    return blocks, blocks // blocks_for(tokens, block_size)


def test_task1_and_its_hidden_cases_pass_the_reference(module_seed):
    assert check.lab2.task1(kv_pool_plan, seed=module_seed).passed, f"seed {module_seed}"
    assert check.lab2.GRADING.task("Lab 2, Task 1").hidden(kv_pool_plan).passed


@pytest.mark.parametrize("wrong, names", [
    (_plan_query_heads, "per QUERY head"),
    (_plan_tokens_not_blocks, "round its blocks up"),
    (_plan_keys_only, "a key AND a value"),
], ids=["query-heads", "tokens-not-blocks", "keys-only"])
def test_task1_names_the_mistake(wrong, names, module_seed):
    with pytest.raises(CheckFailed) as info:
        check.lab2.task1(wrong, seed=module_seed)
    assert names in str(info.value), f"seed {module_seed}: {info.value}"
    with pytest.raises(CheckFailed, match="hidden"):
        check.lab2.GRADING.task("Lab 2, Task 1").hidden(wrong)


# --- Task 3: admission ---

def _admit_skipping(waiting, running, free, bs):
    budget = free - sum(blocks_for(r.tokens_at_most, bs) - blocks_for(r.tokens_now, bs) for r in running)
    count = 0
    for r in waiting:
        if blocks_for(r.tokens_at_most, bs) <= budget:
            budget -= blocks_for(r.tokens_at_most, bs)
            count += 1
    return count


def _admit_ignoring_running(waiting, running, free, bs):
    return admit_fcfs(waiting, [], free, bs)


def _admit_by_prompt(waiting, running, free, bs):
    return admit_fcfs([Request(r.prompt_len, 0) for r in waiting], running, free, bs)


def test_task3_and_its_hidden_cases_pass_the_reference(module_seed):
    assert check.lab2.task3(admit_fcfs, seed=module_seed).passed, f"seed {module_seed}"
    assert check.lab2.GRADING.task("Lab 2, Task 3").hidden(admit_fcfs).passed


@pytest.mark.parametrize("wrong, names", [
    (_admit_skipping, "first come, first served"),
    (_admit_ignoring_running, "the running requests will still need"),
    (_admit_by_prompt, "prompt alone"),
], ids=["skips-ahead", "ignores-running", "prompt-only"])
def test_task3_names_the_mistake(wrong, names, module_seed):
    with pytest.raises(CheckFailed) as info:
        check.lab2.task3(wrong, seed=module_seed)
    assert names in str(info.value), f"seed {module_seed}: {info.value}"


# --- Task 4: reading a profiled step ---

def _read_self_times(averages, num_steps, wall):
    rows = {e.key: e for e in averages}
    lm, attn, overhead = breakdown_from_trace(averages, num_steps, wall)
    return (rows["lm_head"].self_cpu_time_total / 1e6 / num_steps / wall,
            rows["attention"].self_cpu_time_total / 1e6 / num_steps / wall, overhead)


def _read_total_times(averages, num_steps, wall):
    lm, attn, _ = breakdown_from_trace(averages, num_steps, wall)
    return lm, attn, wall - sum(e.cpu_time_total for e in averages if not e.is_user_annotation) / 1e6 / num_steps


def test_task4_and_its_hidden_trace_pass_the_reference(module_seed):
    result = check.lab2.task4(breakdown_from_trace, seed=module_seed)
    assert result.passed and "from the methods' own timers" in result.detail
    assert check.lab2.GRADING.task("Lab 2, Task 4").hidden(breakdown_from_trace).passed


@pytest.mark.parametrize("wrong, names", [
    (_read_self_times, "own time leaves out the operators"),
    (_read_total_times, "sum the self times"),
], ids=["label-self-time", "operator-total-time"])
def test_task4_names_the_mistake(wrong, names, module_seed):
    with pytest.raises(CheckFailed) as info:
        check.lab2.task4(wrong, seed=module_seed)
    assert names in str(info.value), f"seed {module_seed}: {info.value}"


# --- grading ---

def test_grading_declares_four_tasks_half_of_them_design():
    grading = check.lab2.GRADING
    assert [t.function for t in grading.tasks] == ["plan_kv_pool", "decode_with_kv_cache", "admit", "read_profile"]
    assert sum(t.design for t in grading.tasks) * 2 >= len(grading.tasks)
    assert grading.predictions == ("Lab 2, Q1", "Lab 2, Q2", "Lab 2, Q3") and grading.written == ("W1", "W2")
    for graded in grading.tasks:
        assert callable(graded.load_reference())


@pytest.mark.parametrize("task", ["Lab 2, Task 1", "Lab 2, Task 2", "Lab 2, Task 3", "Lab 2, Task 4"])
def test_a_stub_fails_every_hidden_check(task):
    def stub(*args):
        raise NotImplementedError(f"{task}: not done")

    with pytest.raises((CheckFailed, NotImplementedError)):
        check.lab2.GRADING.task(task).hidden(stub)


def test_task2_hidden_passes_the_engines_cache():
    assert check.lab2.GRADING.task("Lab 2, Task 2").hidden(decode_with_engine_cache).passed


def test_plan_matches_presets_kv_bytes_per_token():
    cfg = PRESETS["llama-8b"]
    blocks, requests = kv_pool_plan(cfg, torch.bfloat16, 65 * 2**30, 16, 4096)
    assert blocks == 65 * 2**30 // (16 * cfg.kv_bytes_per_token(2)) and requests == blocks // 256


def test_the_lab_notebook_names_no_reference():
    """labs/ must not reach a task's reference: neither its name nor a whole-module import of the module holding it."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "labs" / "02_kv_cache.ipynb").read_text()
    for graded in check.lab2.GRADING.tasks:
        module, attribute = graded.reference.split(":")
        parent, leaf = module.rsplit(".", 1)
        assert f"from {parent} import {leaf}" not in text and f"import {module}\\n" not in text, graded.task
        assert attribute not in text, graded.task
    assert "minidisagg.course.sizing" not in text


def test_profiled_decode_steps_table_names_the_step_and_its_operators():
    from minidisagg.course.profile_lab import STEP_LABEL, profile_decode_steps
    from minidisagg.models.registry import load_model

    model = load_model("tiny", device="cpu", dtype="float32").model
    steps = profile_decode_steps(model, batch=2, context_len=20, num_steps=2)
    table = steps.table(row_limit=40)
    assert STEP_LABEL in table and "attention" in table and "Self CPU time total" in table
    assert steps.step_wall_s > 0 and steps.device_share("attention") == 0.0  # no device on a CPU
