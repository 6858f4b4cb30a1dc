"""Asynchronous scheduling: queuing decode step n+1 before step n's tokens are read changes no output.

On a CPU nothing overlaps, but the bookkeeping is the same as on a GPU: steps queued ahead are
used when the next batch is the same and dropped when it is not, and every block comes back.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from conftest import make_engine, run_all
from minidisagg.engine.clock import SimulatedClock
from minidisagg.engine.sampling import SamplingParams
from minidisagg.engine.scheduler import POLICIES
from minidisagg.stages.async_decode import AsyncDecodeStage


@pytest.fixture(scope="module")
def seed() -> int:
    return random.SystemRandom().randrange(1 << 30)


def workload(rng: random.Random, vocab: int, n: int, lo: int, hi: int) -> list[tuple[list[int], SamplingParams, float]]:
    """Random prompts, output lengths and arrival times."""
    return [([rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))],
             SamplingParams(temperature=0, max_tokens=rng.randint(1, 30), ignore_eos=True), rng.uniform(0, 0.02))
            for _ in range(n)]


def with_early_stops(rng: random.Random, requests, outputs: list[list[int]]):
    """Make every other request stop on a token it generates midway (found by a first run)."""
    changed = []
    for i, ((prompt, params, t), out) in enumerate(zip(requests, outputs)):
        if i % 2 == 0 and len(out) > 3:
            params = dataclasses.replace(params, stop_token_ids=[out[rng.randrange(1, len(out) - 1)]])
        changed.append((prompt, params, t))
    return changed


def serve(engine, requests) -> dict[str, tuple[list[int], str]]:
    ids = [engine.add_request({"prompt_token_ids": p}, params, arrival_time=t) for p, params, t in requests]
    done = run_all(engine)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks, "KV blocks leaked"
    return {i: (done[i].token_ids, done[i].finish_reason) for i in ids}


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_async_scheduling_equals_sync_under_every_policy(tiny_loaded, seed, policy):
    rng = random.Random(seed)
    requests = workload(rng, tiny_loaded.config.vocab_size, 9, 3, 40)
    limits = dict(policy=policy, max_num_seqs=4, max_num_batched_tokens=48)
    first = serve(make_engine(tiny_loaded, async_scheduling=False, clock=SimulatedClock(), **limits), requests)
    requests = with_early_stops(rng, requests, [ids for ids, _ in first.values()])
    ref = serve(make_engine(tiny_loaded, async_scheduling=False, clock=SimulatedClock(), **limits), requests)
    assert any(reason == "stop" for _, reason in ref.values()), f"no request stopped early; seed {seed}"
    engine = make_engine(tiny_loaded, async_scheduling=True, clock=SimulatedClock(), **limits)
    assert serve(engine, requests) == ref, f"seed {seed}"
    assert engine.decode_stage.lookahead.used > 0, "no decode step ever ran from the queue"


def test_async_scheduling_with_preemption_and_context_limit(tiny_loaded, seed):
    rng = random.Random(seed + 1)
    requests = workload(rng, tiny_loaded.config.vocab_size, 6, 20, 40)
    requests = [(p, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), t) for p, _, t in requests]
    limits = dict(num_blocks=12, block_size=8, max_model_len=64, clock=SimulatedClock())
    ref_engine = make_engine(tiny_loaded, async_scheduling=False, **limits)
    ref = serve(ref_engine, requests)
    engine = make_engine(tiny_loaded, async_scheduling=True, **limits)
    assert serve(engine, requests) == ref, f"seed {seed}"
    assert ref_engine.stats.num_preemptions > 0, "the pool was meant to be too small"
    # (the counts may differ: taking a block a step early can change which sequence is preempted when)
    assert any(reason == "length" and len(ids) < 40 for ids, reason in ref.values()), "none hit the context limit"
    assert engine.decode_stage.lookahead.used > 0


@pytest.mark.parametrize("tight_pool", [False, True])  # True: 12 blocks of 8 tokens, so preemptions and recomputes
def test_seeded_sampling_draws_the_same_tokens_with_async(tiny_loaded, seed, tight_pool):
    """Steps queued ahead sample with copies of the generators, adopted only if the step is used."""
    rng = random.Random(seed + 2)
    lo, hi = (20, 40) if tight_pool else (3, 30)
    requests = []
    for i, (prompt, params, t) in enumerate(workload(rng, tiny_loaded.config.vocab_size, 7, lo, hi)):
        if i % 3:  # mixed batches: greedy rows and sampled rows with top-k and top-p
            params = SamplingParams(temperature=0.8, top_k=rng.choice([-1, 40]), top_p=rng.choice([1.0, 0.9]),
                                    max_tokens=40 if tight_pool else rng.randint(5, 30), seed=rng.randrange(1 << 20),
                                    ignore_eos=True)
        elif tight_pool:
            params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        requests.append((prompt, params, t))
    limits = dict(num_blocks=12, block_size=8) if tight_pool else dict(max_num_seqs=4)
    if not tight_pool:  # early stops make batches change, so queued steps get dropped
        first = serve(make_engine(tiny_loaded, async_scheduling=False, clock=SimulatedClock(), **limits), requests)
        requests = with_early_stops(rng, requests, [ids for ids, _ in first.values()])
    ref_engine = make_engine(tiny_loaded, async_scheduling=False, clock=SimulatedClock(), **limits)
    ref = serve(ref_engine, requests)
    engine = make_engine(tiny_loaded, async_scheduling=True, clock=SimulatedClock(), **limits)
    assert serve(engine, requests) == ref, f"seed {seed}"
    ahead = engine.decode_stage.lookahead
    assert ahead.used > 0, ahead
    if tight_pool:  # (a preemption comes when blocks run out, just when no step could be queued ahead)
        assert ref_engine.stats.num_preemptions > 0, f"the pool was meant to be too small; seed {seed}"
    else:
        assert any(reason == "stop" for _, reason in ref.values()), f"no request stopped early; seed {seed}"


def test_kv_after_async_decode_matches_a_fresh_prefill(tiny_loaded, seed):
    """Dropped steps wrote KV too: what the pool holds must still be the sequence's own KV."""
    rng = random.Random(seed + 3)
    prompt = [rng.randrange(3, tiny_loaded.config.vocab_size) for _ in range(11)]
    engine = make_engine(tiny_loaded, async_scheduling=True, block_size=4)
    rid = engine.add_request({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=14, ignore_eos=True))
    while engine.sequence(rid).num_computed_tokens < len(prompt) + 10:
        engine.step()
    seq = engine.sequence(rid)
    tokens, table = seq.all_token_ids[: seq.num_computed_tokens], list(seq.block_table)
    fresh = make_engine(tiny_loaded, async_scheduling=False, block_size=4)
    other = fresh.add_request({"prompt_token_ids": tokens}, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    fresh.step()
    fresh_table = fresh.sequence(other).block_table
    for layer in range(tiny_loaded.config.num_layers):
        for mine, theirs in zip(engine.kv_cache.layer(layer), fresh.kv_cache.layer(layer)):
            a = mine[table].flatten(0, 1)[: len(tokens)]
            b = theirs[fresh_table].flatten(0, 1)[: len(tokens)]
            assert (a - b).abs().max() < 1e-4, f"layer {layer}, seed {seed}"


def test_reserving_blocks_for_incoming_kv_waits_for_queued_steps(tiny_loaded):
    settled = []

    class Watched(AsyncDecodeStage):
        def settle(self) -> None:
            settled.append(True)
            super().settle()

    from minidisagg.config import EngineConfig
    from minidisagg.engine.llm_engine import LLMEngine

    engine = LLMEngine(tiny_loaded, EngineConfig(async_scheduling=True), decode_stage=Watched)
    assert engine.reserve("incoming", 20) is not None
    assert settled, "reserve() handed blocks over without waiting for steps queued ahead"


def test_async_scheduling_defaults_off_on_cpu_and_rejects_non_booleans(tiny_loaded):
    assert make_engine(tiny_loaded).runner.async_scheduling is False
    from minidisagg import LLM

    with pytest.raises(ValueError, match="async_scheduling must be True, False or None"):
        LLM("tiny", device="cpu", async_scheduling="yes")


def test_a_queued_step_runs_only_if_it_is_exactly_the_next_step(tiny_loaded, seed):
    """If a sequence's last token is not the one the queued step read (here: replaced by hand), it recomputes."""
    rng = random.Random(seed + 4)
    prompt = [rng.randrange(3, tiny_loaded.config.vocab_size) for _ in range(9)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    tokens = []
    for async_scheduling in (True, False):
        engine = make_engine(tiny_loaded, async_scheduling=async_scheduling)
        rid = engine.add_request({"prompt_token_ids": prompt}, params)
        for _ in range(3):  # the prefill, then decode steps (each queuing the next, with async scheduling)
            engine.step()
        seq = engine.sequence(rid)
        seq.output_token_ids[-1] = (seq.output_token_ids[-1] + 1) % tiny_loaded.config.vocab_size
        dropped = engine.decode_stage.lookahead.dropped if async_scheduling else 0
        engine.step()
        tokens.append(seq.output_token_ids[-1])
        if async_scheduling:
            assert engine.decode_stage.lookahead.dropped == dropped + 1, "the stale queued step was used"
    assert tokens[0] == tokens[1], f"seed {seed}"


def test_staggered_sequences_run_from_the_queue_at_every_step(tiny_loaded, seed):
    """Sequences at different offsets into their blocks: the scheduler takes each next block a step early,
    so crossing into a new block does not stop the batch from running one step ahead."""
    rng = random.Random(seed + 5)
    requests = [([rng.randrange(3, tiny_loaded.config.vocab_size) for _ in range(rng.randint(5, 60))],
                 SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), 0.0) for _ in range(8)]
    engine = make_engine(tiny_loaded, async_scheduling=True, max_num_seqs=8, block_size=4, clock=SimulatedClock())
    ref = serve(make_engine(tiny_loaded, async_scheduling=False, max_num_seqs=8, block_size=4, clock=SimulatedClock()),
                requests)
    assert serve(engine, requests) == ref, f"seed {seed}"
    decode_steps = sum(1 for step in engine.stats.steps if step.stage == "decode")
    assert engine.decode_stage.lookahead.used >= decode_steps - 1, (engine.decode_stage.lookahead, decode_steps)
