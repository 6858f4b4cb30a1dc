"""Lab 7: its helpers on the real engine (small), its break-even arithmetic, and its checks (PASS for the
references, FAIL naming the mistake for plausible wrong answers)."""

from __future__ import annotations

import random

import pytest
import torch

from minidisagg.bench.wire_quality import greedy_runs
from minidisagg.course import check
from minidisagg.course import reuse_break_even as rbe
from minidisagg.course import reuse_lab as rl
from minidisagg.course.check.lab5 import reference_break_even
from minidisagg.course.checking import CheckFailed
from minidisagg.course.transfer_lab import LinkModel, PrefillCostModel, kv_layout
from minidisagg.kv.prefix_cache import hash_block, hash_chain
from minidisagg.models.registry import load_model

GRADING = check.lab7.GRADING


@pytest.fixture(scope="module")
def smollm():
    torch.set_num_threads(1)
    return load_model("smollm2-135m", device="cpu", dtype="float32")


def not_done(*args, **kwargs):
    raise NotImplementedError("Lab 7: not done")


# ---------------------------------------------------------------- the helpers, on the real engine


def test_a_chat_finds_its_history_in_the_cache_and_keeps_its_tokens(smollm):
    turns = rl.run_chat(smollm, user_turns=("How do I boil an egg?", "And a soft yolk?"), reply_tokens=4)
    first, second = turns
    assert first.cached_tokens == 0 and first.prompt_tokens == len(first.prompt_ids)
    shared = 0
    while shared < len(first.prompt_ids) and first.prompt_ids[shared] == second.prompt_ids[shared]:
        shared += 1
    assert second.cached_tokens >= shared // 16 * 16 > 0  # every full block the first prompt shares is found
    assert second.cached_tokens % 16 == 0 and second.cached_tokens < second.prompt_tokens
    assert second.hit_rate == second.cached_tokens / second.prompt_tokens
    assert all(t.same_first_token for t in turns)


def test_cache_aware_routing_finds_more_than_round_robin_on_the_engine(smollm):
    prompts = rl.routing_workload(smollm.config.vocab_size, systems=3, system_tokens=32, turns=2, seed=random.randrange(99))
    runs = rl.compare_routing(smollm, prompts, num_blocks=6)  # one 32-token prefix beside a request fits, two do not
    rr, ca = runs["round_robin"], runs["cache_aware"]
    assert ca.hit_rate == pytest.approx(3 * 32 / sum(len(p) for p in prompts))  # each prefix computed once
    assert ca.hit_rate >= rr.hit_rate and rr.predicted_hit_rate is None
    assert ca.predicted_hit_rate == pytest.approx(ca.hit_rate)
    assert ca.first_tokens == rr.first_tokens and len(ca.ttfts_s) == len(prompts)
    assert ca.prompt_tokens_computed == round((1 - ca.hit_rate) * sum(len(p) for p in prompts))


def test_a_decode_worker_holding_the_prefix_receives_only_the_tail(smollm):
    r = random.Random()
    prefix, tail = 16 * r.randint(2, 5), r.randint(1, 15)
    prompts = rl.decode_reuse_prompts(smollm.config.vocab_size, prefix, tail, requests=3, seed=r.randrange(1 << 30))
    assert all(p[:prefix] == prompts[0][:prefix] and len(p) == prefix + tail for p in prompts)
    assert len({p[prefix] for p in prompts}) == 3  # the tails differ from their first token on
    runs = rl.run_decode_reuse(smollm, prompts, block_size=16)
    first, *later = runs
    assert (first.kv_reused_tokens, first.kv_transfer_bytes) == (0, first.full_bytes)
    blocks = prefix // 16 + 1
    assert first.full_bytes > 0 and first.full_bytes % blocks == 0
    for run in later:
        assert run.kv_reused_tokens == prefix and run.full_bytes == first.full_bytes
        assert run.kv_transfer_bytes == run.tail_bytes == first.full_bytes // blocks  # the one partial block
        assert len(run.token_ids) == 2
    with pytest.raises(ValueError, match="tail of at least one token"):
        rl.decode_reuse_prompts(smollm.config.vocab_size, prefix, 0)


def test_greedy_runs_with_an_identity_wire_agree_exactly(smollm):
    prompts = [list(smollm.tokenizer.apply_chat_template([{"role": "user", "content": q}])) for q in ("Hi", "Why?")]
    runs = greedy_runs(smollm, prompts, 16, 4, {"same pages": lambda p: p.clone(), "per head": lambda p: rl.dequantise_per_head(
        *rl.per_head_int8(p), p.dtype)})
    assert runs["same pages"]["token_agreement"] == 1.0 and runs["same pages"]["first_step_max_abs"] == 0.0
    assert runs["same pages"]["tokens"] == runs["none"]["tokens"] and len(runs["none"]["tokens"][0]) == 4
    assert 0 < runs["per head"]["first_step_max_abs"] < 5


def test_wire_bytes_follow_the_formula_on_fresh_pages():
    pages = torch.randn(3, 2, random.randint(1, 5), 16, 3, 64)
    got = rl.wire_bytes(pages)
    assert got["float32"] == 4 * pages.numel() and got["bfloat16"] == 2 * pages.numel()
    assert got["int8"] == got["fp8_e4m3"] == pages.numel() * (1024 + 84) // 1024


def test_per_head_int8_round_trip_is_within_half_a_step():
    pages = torch.randn(2, 4, 16, 3, 8) * torch.tensor([0.01, 1.0, 300.0]).view(3, 1)
    pages[:, 1, :, 2] = 0.0
    values, scales = rl.per_head_int8(pages)
    assert values.dtype == torch.int8 and scales.shape == (2, 4, 3) and int(values.abs().max()) == 127
    assert float(scales[:, 1, 2].abs().max()) == 0.0
    error = (rl.dequantise_per_head(values, scales, torch.float32) - pages).abs()
    assert bool((error <= scales[..., None, :, None] / 2 * (1 + 1e-5)).all())


def test_engine_choose_prefill_is_the_router_score():
    assert rl.engine_choose_prefill([10, 0], [100, 0], 16) == 0  # saves 160 tokens, waits for 100
    assert rl.engine_choose_prefill([10, 0], [200, 0], 16) == 1
    assert rl.engine_choose_prefill([0, 3, 3], [0, 10, 5], 16) == 2
    with pytest.raises(ValueError, match="one entry per worker"):
        rl.engine_choose_prefill([1, 2], [0], 16)


# ---------------------------------------------------------------- the break-even with each trick


def test_the_plain_trick_is_lab5s_break_even_and_each_trick_moves_it_the_right_way():
    rng = random.Random()
    layout = kv_layout("llama-8b", torch.bfloat16)
    prefill = PrefillCostModel(rng.uniform(1e-3, 5e-3), rng.uniform(1e-5, 5e-5), rng.uniform(0, 1e-9))
    hit = rng.uniform(0.3, 0.9)
    cases = {t.name: t for t in rbe.tricks(hit, 0.2705)}
    plain, int8, prefill_side, both_ends, _ = cases.values()
    for gbps in (0.5, 3.0, 20.0):
        link = LinkModel("l", gbps, 1e-5)
        assert rbe.break_even_with(layout, prefill, link, plain) == reference_break_even(layout, prefill, link, rbe.MAX_LEN)
    sweep = rbe.break_even_sweep(layout, prefill, [0.3, 1, 3, 10, 30, 100], cases.values())
    assert rbe.compare_sweeps(sweep[int8.name], sweep[plain.name])[0] == 0
    assert rbe.compare_sweeps(sweep[prefill_side.name], sweep[plain.name])[1] == 0
    assert rbe.compare_sweeps(sweep[prefill_side.name], sweep[plain.name])[0] > 0
    assert rbe.compare_sweeps(sweep[both_ends.name], sweep[plain.name])[0] == 0


def test_a_trick_scales_the_models_as_documented():
    trick = rbe.Trick("t", wire_ratio=0.25, hit_rate=0.5, reuse_at_decode=True)
    assert trick.bytes_factor == pytest.approx(0.125)
    assert trick.prefill(PrefillCostModel(1.0, 2.0, 4.0)) == PrefillCostModel(1.0, 1.0, 2.0)
    assert trick.link(LinkModel("x", 1.0, 0.5)).bandwidth_GBps == pytest.approx(8.0)
    assert rbe.compare_sweeps([None, 5, 3], [4, 5, None]) == (1, 1)
    with pytest.raises(ValueError, match="hit_rate"):
        rbe.Trick("bad", hit_rate=1.0)
    with pytest.raises(ValueError, match="wire_ratio"):
        rbe.Trick("bad", wire_ratio=0.0)


# ---------------------------------------------------------------- the checks


def unchained(token_ids, block_size):
    """Plausible: each block hashed alone."""
    return [hash_block(None, token_ids[i:i + block_size]) for i in range(0, len(token_ids) - block_size + 1, block_size)]


def with_partial_block(token_ids, block_size):
    """Plausible: the tail gets a key too."""
    n = -(-len(token_ids) // block_size)
    return hash_chain(token_ids + [0] * (n * block_size - len(token_ids)), block_size, n)


def affinity_only(overlap_blocks, queued_tokens, block_size):
    """Plausible: the longest cached prefix, whatever waits there."""
    return max(range(len(overlap_blocks)), key=lambda w: overlap_blocks[w])


def least_loaded(overlap_blocks, queued_tokens, block_size):
    """Plausible: the shortest queue, whatever it caches."""
    return min(range(len(queued_tokens)), key=lambda w: queued_tokens[w])


def blocks_as_tokens(overlap_blocks, queued_tokens, block_size):
    """Plausible: a cached block weighed like one queued token."""
    return max(range(len(overlap_blocks)), key=lambda w: overlap_blocks[w] - queued_tokens[w])


def one_scale(pages):
    """Plausible: one scale for the whole tensor."""
    scale = pages.float().abs().max() / 127
    values = torch.round(pages.float() / scale).clamp(-127, 127).to(torch.int8)
    return values, torch.full((*pages.shape[:-3], pages.shape[-2]), float(scale))


def over_128(pages):
    """Plausible: the step from 128 levels a side, so the largest value clips."""
    values, scales = rl.per_head_int8(pages)
    scales = scales * 127 / 128
    x = pages.float() / torch.where(scales > 0, scales, torch.ones_like(scales))[..., None, :, None]
    return torch.round(x).clamp(-127, 127).to(torch.int8), scales


def nan_on_zeros(pages):
    """Plausible: divides by a zero scale."""
    scales = pages.float().abs().amax(dim=(-3, -1)) / 127
    return torch.round(pages.float() / scales[..., None, :, None]).nan_to_num(0).to(torch.int8), scales / scales * scales


@pytest.mark.parametrize("task", ["Lab 7, Task 1", "Lab 7, Task 2", "Lab 7, Task 3"])
def test_references_pass_check_and_hidden_cases(task, capsys):
    graded = GRADING.task(task)
    check_fn = getattr(check.lab7, f"task{task[-1]}")
    assert check_fn(graded.load_reference(), seed=random.randrange(1000))
    assert graded.hidden(graded.load_reference())
    assert capsys.readouterr().out.count("PASS") == 1  # the hidden check does not print


@pytest.mark.parametrize("task, wrong, says", [
    ("Lab 7, Task 1", unchained, "depends on its own tokens only"),
    ("Lab 7, Task 1", with_partial_block, "a partial last block gets no key"),
    ("Lab 7, Task 2", affinity_only, "must compute 240 more tokens"),
    ("Lab 7, Task 2", least_loaded, "a cached block spares 16 tokens"),
    ("Lab 7, Task 2", blocks_as_tokens, "more tokens before this prompt's first token"),
    ("Lab 7, Task 3", one_scale, "the smallest that holds its largest value"),
    ("Lab 7, Task 3", over_128, "so it clips"),
])
def test_wrong_answers_name_the_mistake(task, wrong, says):
    with pytest.raises(CheckFailed, match=says):
        getattr(check.lab7, f"task{task[-1]}")(wrong, seed=0)
    with pytest.raises(CheckFailed, match=task):
        GRADING.task(task).hidden(wrong)


def test_a_nan_scale_and_a_wrong_shape_are_refused():
    with pytest.raises(CheckFailed, match="inf or NaN"):
        check.lab7.task3(nan_on_zeros, seed=0)
    with pytest.raises(CheckFailed, match="one per block and KV head"):
        check.lab7.task3(lambda p: (rl.per_head_int8(p)[0], rl.per_head_int8(p)[1].flatten()), seed=0)
    with pytest.raises(CheckFailed, match="a worker is an index"):
        check.lab7.task2(lambda o, q, b: len(o), seed=0)


@pytest.mark.parametrize("task", ["Lab 7, Task 1", "Lab 7, Task 2", "Lab 7, Task 3"])
def test_a_task_not_done_says_so(task):
    with pytest.raises(CheckFailed, match="not implemented yet"):
        getattr(check.lab7, f"task{task[-1]}")(not_done)
    with pytest.raises(CheckFailed, match="not implemented yet"):
        GRADING.task(task).hidden(not_done)
