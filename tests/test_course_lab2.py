"""Lab 2 checks: PASS for functions built from the engine, a precise FAIL for subtly wrong ones."""

from __future__ import annotations

import math

import pytest
import torch

from minidisagg.config import ModelConfig
from minidisagg.course import check
from minidisagg.course.checking import CheckFailed
from minidisagg.course.kv_lab import (DecodeTimer, attention_inputs, attention_outputs, causal_attention,
                                      decode_with_engine_cache, embed, engine_logits, final_logits)
from minidisagg.engine.batch import BatchItem
from minidisagg.engine.runner import ModelRunner
from minidisagg.kv.block_manager import BlockManager
from minidisagg.kv.cache import PagedKVCache
from minidisagg.roofline import dtype_bytes


# --- Task 1: KV bytes per token ---

def _engine_kv_bytes_per_token(num_layers, num_kv_heads, head_dim, dtype):
    cfg = ModelConfig("t", num_layers, num_kv_heads * head_dim, num_kv_heads, num_kv_heads, head_dim, 8, 8)
    return cfg.kv_bytes_per_token(dtype_bytes(dtype))


def test_task1_passes_with_the_model_config_formula(module_seed):
    assert check.lab2.task1(_engine_kv_bytes_per_token, seed=module_seed).passed, f"seed {module_seed}"


@pytest.mark.parametrize(
    "wrong",
    [
        lambda L, kh, d, dt: L * kh * d * dtype_bytes(dt),  # keys only
        lambda L, kh, d, dt: 2 * L * kh * d * 2,  # always two bytes per element
        lambda L, kh, d, dt: 2 * kh * d * dtype_bytes(dt),  # one layer
    ],
    ids=["keys-only", "bf16-always", "one-layer"],
)
def test_task1_fails_a_subtly_wrong_formula(wrong, module_seed):
    with pytest.raises(CheckFailed) as info:
        check.lab2.task1(wrong, seed=module_seed)
    message = str(info.value)
    assert "Lab 2, Task 1" in message and "kv_bytes_per_token(num_layers=" in message
    assert "the engine stores" in message, message


def test_task1_reports_not_implemented():
    def stub(num_layers, num_kv_heads, head_dim, dtype):
        raise NotImplementedError("Lab 2, Task 1: count K and V")

    with pytest.raises(CheckFailed, match="Lab 2, Task 1: not implemented yet"):
        check.lab2.task1(stub)


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


# --- Task 3: slot mapping ---

def _engine_slot_mapping(block_table, positions, block_size):
    """BlockManager.slot_mapping, for a sequence that owns exactly ``block_table``."""
    manager = BlockManager(max(block_table) + 1, block_size)
    manager._tables["seq"] = list(block_table)  # adopt the given table as this sequence's
    return [manager.slot_mapping("seq", p, p + 1)[0] for p in positions]


def test_task3_passes_with_the_block_manager(module_seed):
    result = check.lab2.task3(_engine_slot_mapping, seed=module_seed)
    assert result.passed and "every slot equals BlockManager.slot_mapping" in result.detail, f"seed {module_seed}"


@pytest.mark.parametrize(
    "wrong",
    [
        lambda table, positions, bs: [table[p // bs] + p % bs for p in positions],  # block id not scaled
        lambda table, positions, bs: [(p // bs) * bs + p % bs for p in positions],  # table ignored
        lambda table, positions, bs: [table[p // bs] * bs + p % bs for p in positions][:-1],  # one short
    ],
    ids=["unscaled-block", "no-table", "one-short"],
)
def test_task3_fails_a_subtly_wrong_mapping(wrong, module_seed):
    with pytest.raises(CheckFailed) as info:
        check.lab2.task3(wrong, seed=module_seed)
    message = str(info.value)
    assert "Lab 2, Task 3" in message and "slot_mapping([" in message, message
    assert "should be slot" in message or "slots for" in message, message


def test_task3_reports_not_implemented_and_refuses_a_non_function():
    def stub(block_table, positions, block_size):
        raise NotImplementedError("Lab 2, Task 3: map through the table")

    with pytest.raises(CheckFailed, match="Lab 2, Task 3: not implemented yet"):
        check.lab2.task3(stub)
    with pytest.raises(CheckFailed, match="pass your function itself"):
        check.lab2.task3([0, 1, 2])


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


def _ceil_block_index(block_table, positions, block_size):
    """Plausible: the block index as ceil(p / block_size) - 1, right inside a block, wrong on its first token."""
    return [block_table[max(0, math.ceil(p / block_size) - 1)] * block_size + p % block_size for p in positions]


def test_task3_fails_on_the_first_token_of_a_block(module_seed):
    with pytest.raises(CheckFailed) as info:
        check.lab2.task3(_ceil_block_index, seed=module_seed)
    message = str(info.value)
    assert message.startswith("FAIL  Lab 2, Task 3: slot_mapping("), message
    position = int(message.split(": position ")[1].split()[0])
    block_size = int(message.split("block_size=")[1].split(")")[0])
    assert position % block_size == 0 and position > 0, message
