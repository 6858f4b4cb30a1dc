"""The colocated engine: greedy output independent of batching, policies and preemption; no leaks."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import make_engine, run_all
from minidisagg.engine.clock import SimulatedClock
from minidisagg.engine.sampling import SamplingParams
from minidisagg.engine.scheduler import POLICIES, PolicyError, StepPlan
from minidisagg.kv.cache import default_pool_layout

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def random_prompts(rng: random.Random, n: int, vocab: int, lo: int = 3, hi: int = 60) -> list[list[int]]:
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def generate(engine, prompts, params=GREEDY, arrivals=None):
    ids = [engine.add_request({"prompt_token_ids": p}, params, arrival_time=None if arrivals is None else arrivals[i])
           for i, p in enumerate(prompts)]
    done = run_all(engine)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks, "KV blocks leaked"
    return [done[i].token_ids for i in ids]


@pytest.fixture(scope="module")
def seed() -> int:
    return random.SystemRandom().randrange(1 << 30)


def test_batched_equals_single_batch_invariant(tiny_loaded, seed):
    rng = random.Random(seed)
    prompts = random_prompts(rng, 6, tiny_loaded.config.vocab_size)
    single = [generate(make_engine(tiny_loaded, batch_invariant=True), [p])[0] for p in prompts]
    batched = generate(make_engine(tiny_loaded, batch_invariant=True), prompts)
    assert batched == single, f"seed {seed}"


@pytest.mark.parametrize("layout", ["layer_major", "block_major"])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_equals_prefill_first(tiny_loaded, seed, policy, layout):
    rng = random.Random(seed + 1)
    prompts = random_prompts(rng, 7, tiny_loaded.config.vocab_size, 5, 80)
    arrivals = sorted(rng.uniform(0, 0.05) for _ in prompts)
    ref = generate(make_engine(tiny_loaded, batch_invariant=True, policy="prefill_first", clock=SimulatedClock()),
                   prompts, arrivals=arrivals)
    # a small token budget forces chunked prefill to split prompts across steps
    engine = make_engine(tiny_loaded, batch_invariant=True, policy=policy, max_num_batched_tokens=24,
                         max_num_seqs=4, clock=SimulatedClock(), layout=layout)
    assert engine.kv_cache.layout == layout
    assert generate(engine, prompts, arrivals=arrivals) == ref, f"seed {seed}"


def test_pool_layout_defaults_by_device(tiny_loaded):
    assert default_pool_layout("cpu") == "layer_major"
    assert default_pool_layout(torch.device("cuda", 1)) == "block_major"
    assert make_engine(tiny_loaded).kv_cache.layout == "layer_major"  # the CPU default: batch-1 decode slices layers
    with pytest.raises(ValueError, match="layout"):
        make_engine(tiny_loaded, layout="head_major")


@pytest.mark.parametrize("layout", ["layer_major", "block_major"])
def test_preemption_recomputes_same_tokens(tiny_loaded, seed, layout):
    rng = random.Random(seed + 2)
    prompts = random_prompts(rng, 6, tiny_loaded.config.vocab_size, 20, 40)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ref = generate(make_engine(tiny_loaded, batch_invariant=True), prompts, params)
    small = make_engine(tiny_loaded, batch_invariant=True, num_blocks=12, block_size=8, layout=layout)
    out = generate(small, prompts, params)
    assert small.scheduler.num_preemptions > 0, "pool was large enough; the test did not preempt"
    assert out == ref, f"seed {seed}"


def test_sequence_alone_larger_than_pool_finishes_with_length(tiny_loaded):
    engine = make_engine(tiny_loaded, num_blocks=2, block_size=4)
    rid = engine.add_request({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    done = run_all(engine)
    assert done[rid].finish_reason == "length"
    # 8 slots: the prompt and the first 5 generated tokens fill them; the 6th is sampled from the last slot
    assert len(done[rid].token_ids) == 8 - 3 + 1
    assert engine.blocks.num_free_blocks == 2


def test_abort_frees_blocks_and_others_finish(tiny_loaded):
    engine = make_engine(tiny_loaded)
    a = engine.add_request({"prompt_token_ids": [5] * 30}, GREEDY)
    b = engine.add_request({"prompt_token_ids": [6] * 30}, GREEDY)
    engine.step()
    engine.abort(a)
    done = run_all(engine)
    assert done[b].finish_reason == "length" and len(done[b].token_ids) == GREEDY.max_tokens
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_timed_arrivals_on_simulated_clock(tiny_loaded):
    engine = make_engine(tiny_loaded, clock=SimulatedClock())
    a = engine.add_request({"prompt_token_ids": [5] * 10}, GREEDY, arrival_time=0.0)
    b = engine.add_request({"prompt_token_ids": [6] * 10}, GREEDY, arrival_time=100.0)
    done = run_all(engine)
    ta, tb = done[a].timeline, done[b].timeline
    assert ta.finish_s < 100.0 <= tb.prefill_start_s, "the late request started before it arrived"
    m = done[b].metrics
    assert m.ttft_s > 0 and m.queue_s >= 0 and len(m.itl_s) == GREEDY.max_tokens - 1
    assert all(x > 0 for x in m.itl_s)
    kinds = {r.stage for r in engine.stats.steps}
    assert kinds == {"prefill", "decode"}


def test_bad_policy_plan_is_rejected(tiny_loaded):
    def broken(waiting, running, budget):
        return StepPlan(decodes=list(waiting))  # decodes for sequences that have not prefilled

    engine = make_engine(tiny_loaded, policy="prefill_first")
    engine.scheduler.policy = broken
    engine.add_request({"prompt_token_ids": [5, 6]}, GREEDY)
    with pytest.raises(PolicyError, match="not running"):
        engine.step()


@pytest.mark.parametrize(
    "prompt, message",
    [
        ({"prompt_token_ids": []}, "empty"),
        ({"prompt_token_ids": [1, 2, 10**9]}, "token ids"),
        ({"prompt_token_ids": [-1]}, "token ids"),
        ({"prompt_token_ids": [5] * 5000}, "context"),
        (3.5, "prompt must be"),
    ],
)
def test_bad_prompts_raise_and_engine_keeps_serving(tiny_loaded, prompt, message):
    engine = make_engine(tiny_loaded, max_model_len=2048)
    good = engine.add_request({"prompt_token_ids": [7, 8, 9]}, GREEDY)
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, GREEDY)
    done = run_all(engine)
    assert len(done[good].token_ids) == GREEDY.max_tokens
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_prompt_larger_than_pool_is_rejected(tiny_loaded):
    engine = make_engine(tiny_loaded, num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="KV pool"):
        engine.add_request({"prompt_token_ids": [5] * 8}, GREEDY)


def test_stop_token_ids_and_max_tokens(tiny_loaded):
    engine = make_engine(tiny_loaded, batch_invariant=True)
    probe = generate(engine, [[11, 12, 13]])[0]
    stop_at = probe[4]
    engine2 = make_engine(tiny_loaded, batch_invariant=True)
    rid = engine2.add_request({"prompt_token_ids": [11, 12, 13]},
                              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_at]))
    out = run_all(engine2)[rid]
    assert out.finish_reason == "stop"
    assert out.token_ids == probe[: probe.index(stop_at) + 1]


def test_seeded_sampling_reproducible(tiny_loaded):
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, max_tokens=10, seed=1234, ignore_eos=True)
    a = generate(make_engine(tiny_loaded), [[3, 4, 5]], params)
    b = generate(make_engine(tiny_loaded), [[3, 4, 5]], params)
    c = generate(make_engine(tiny_loaded), [[3, 4, 5]],
                 SamplingParams(temperature=1.0, max_tokens=10, seed=99, ignore_eos=True))
    assert a == b
    assert a != c


def test_kv_pool_layout_changes_memory_order_only(tiny_loaded, seed):
    """The same requests leave the same pages, bit for bit, in a layer_major and a block_major pool; a block_major
    pool's blocks are contiguous across layers; an unknown layout is refused."""
    from minidisagg.config import CacheConfig
    from minidisagg.kv.cache import PagedKVCache

    prompts = random_prompts(random.Random(seed + 5), 4, tiny_loaded.config.vocab_size, 5, 50)
    pools = {}
    for layout in ("layer_major", "block_major"):
        engine = make_engine(tiny_loaded, batch_invariant=True, num_blocks=40, layout=layout)
        generate(engine, prompts)
        pools[layout] = engine.kv_cache
    assert pools["layer_major"].kv.is_contiguous() and not pools["block_major"].kv.is_contiguous()
    assert pools["block_major"].by_block.is_contiguous()
    assert torch.equal(pools["layer_major"].kv, pools["block_major"].kv), f"seed {seed}"
    with pytest.raises(ValueError, match="layout"):
        CacheConfig(layout="diagonal")
    with pytest.raises(ValueError, match="layout"):
        PagedKVCache(tiny_loaded.config, 4, 16, torch.float32, "cpu", layout="diagonal")


def test_kv_cache_contents_match_a_fresh_prefill(tiny_loaded):
    """The KV written step by step by decode equals the KV a single prefill of the same tokens writes."""
    engine = make_engine(tiny_loaded, batch_invariant=True)
    rid = engine.add_request({"prompt_token_ids": [21, 22, 23, 24]}, SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))
    while True:
        engine.step()
        seq = engine._seqs[rid]
        if seq.num_tokens == 12:
            break
    table, tokens = list(seq.block_table), seq.all_token_ids[:-1]
    decoded_kv = engine.kv_cache.kv[:, :, table].flatten(2, 3)[:, :, : len(tokens)].clone()
    fresh = make_engine(tiny_loaded, batch_invariant=True)
    rid2 = fresh.add_request({"prompt_token_ids": tokens}, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    fresh.step()
    seq2 = fresh._seqs[rid2]
    prefilled_kv = fresh.kv_cache.kv[:, :, seq2.block_table].flatten(2, 3)[:, :, : len(tokens)]
    assert torch.equal(decoded_kv, prefilled_kv)


def test_tiny_greedy_tokens_depend_on_the_context(tiny_loaded, seed):
    """Token-equality tests on ``tiny`` only mean something if its greedy token reads the KV cache: changing
    one early prompt token must change the next token for a good share of prompts (not just echo the last)."""
    rng = random.Random(seed)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    prompts = [[rng.randrange(100, 49152) for _ in range(rng.randrange(8, 48))] for _ in range(24)]
    edited = [[(p[0] + 7) % 49152, *p[1:]] for p in prompts]
    firsts = generate(make_engine(tiny_loaded), [*prompts, *edited], params)
    changed = sum(firsts[i] != firsts[i + len(prompts)] for i in range(len(prompts)))
    echoed = sum(firsts[i] == [p[-1]] for i, p in enumerate(prompts))
    assert changed >= len(prompts) // 4, f"seed {seed}: only {changed}/{len(prompts)} first tokens read the context"
    assert echoed <= len(prompts) // 4, f"seed {seed}: {echoed}/{len(prompts)} prompts echo their last token"


def test_every_steppable_engine_offers_the_steppable_surface(tiny_loaded):
    import inspect

    from minidisagg.config import EngineConfig
    from minidisagg.disagg.cluster import DisaggCluster
    from minidisagg.disagg.replicas import ReplicaCluster
    from minidisagg.engine.llm_engine import LLMEngine
    from minidisagg.engine.steppable import Steppable

    engine = LLMEngine(tiny_loaded, EngineConfig())
    assert isinstance(engine, Steppable)
    wanted = {name for name in dir(Steppable) if not name.startswith("_") and callable(getattr(Steppable, name))}
    assert wanted == {"add_request", "step", "has_unfinished", "abort", "release"}
    for cls in (DisaggCluster, ReplicaCluster):
        for name in wanted:
            ours, theirs = inspect.signature(getattr(Steppable, name)), inspect.signature(getattr(cls, name))
            assert list(ours.parameters) == list(theirs.parameters), f"{cls.__name__}.{name}{theirs}"
