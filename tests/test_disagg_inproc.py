"""Disaggregated serving in one process: the equivalence oracle, flow control, faults, no leaks."""

from __future__ import annotations

import random
import time

import pytest

from conftest import make_engine, run_all
from minidisagg.config import CacheConfig, EngineConfig
from minidisagg.disagg.cluster import DisaggCluster
from minidisagg.engine.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def colocated(loaded, prompts, params=GREEDY):
    engine = make_engine(loaded, batch_invariant=True)
    ids = [engine.add_request({"prompt_token_ids": p}, params) for p in prompts]
    done = run_all(engine)
    return [done[i].token_ids for i in ids]


def serve(cluster: DisaggCluster, prompts, params=GREEDY, timeout_s: float = 120.0):
    ids = [cluster.add_request({"prompt_token_ids": p}, params) for p in prompts]
    done = {}
    deadline = time.monotonic() + timeout_s
    while cluster.has_unfinished():
        assert time.monotonic() < deadline, "cluster did not finish"
        for out in cluster.step():
            if out.finished:
                done[out.request_id] = out
    return [done[i] for i in ids]


def assert_no_leaks(cluster: DisaggCluster) -> None:
    time.sleep(0.2)  # let the workers reap their last acknowledgements
    for _ in range(50):
        pending = [w.name for w in cluster.prefill_workers + cluster.decode_workers
                   if w.engine.blocks.num_free_blocks != w.engine.blocks.num_blocks]
        if not pending:
            return
        time.sleep(0.1)
    raise AssertionError(f"KV blocks leaked on {pending}")


@pytest.fixture
def rng():
    seed = random.SystemRandom().randrange(1 << 30)
    return random.Random(seed), seed


def prompts_for(rng: random.Random, n: int, lo: int = 3, hi: int = 70) -> list[list[int]]:
    return [[rng.randrange(100, 49000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.mark.parametrize("num_prefill, num_decode, routing, overlap, async_scheduling", [
    (1, 1, "round_robin", True, False), (1, 1, "round_robin", False, False), (2, 3, "least_loaded", True, False),
    (1, 2, "round_robin", False, True),  # decode workers queue each step ahead, and reserve blocks meanwhile
])
def test_disagg_equals_colocated(tiny_loaded, rng, num_prefill, num_decode, routing, overlap, async_scheduling):
    r, seed = rng
    prompts = prompts_for(r, 8)
    ref = colocated(tiny_loaded, prompts)
    config = EngineConfig(batch_invariant=True, async_scheduling=async_scheduling)
    cluster = DisaggCluster(tiny_loaded, config, num_prefill=num_prefill,
                            num_decode=num_decode, routing=routing, overlap=overlap)
    try:
        outs = serve(cluster, prompts)
        assert [o.token_ids for o in outs] == ref, f"seed {seed}"
        if async_scheduling:
            assert any(w.engine.decode_stage.lookahead.used for w in cluster.decode_workers)
        layout_bytes = cluster.decode_workers[0].layout.request_nbytes
        for o, p in zip(outs, prompts):
            m = o.metrics
            assert m.kv_transfer_bytes == layout_bytes(-(-len(p) // 16)), "KV bytes moved != the request's pages"
            assert m.transfer_s is not None and m.transfer_s >= 0 and m.decode_queue_s >= 0
            tl = o.timeline
            assert tl.prefill_end_s <= tl.transfer_end_s <= tl.token_times_s[0] <= tl.decode_start_s
        assert_no_leaks(cluster)
    finally:
        cluster.shutdown()


def test_kv_overlap_is_off_by_default(tiny_loaded, rng):
    """Sending after the prefill is the measured faster choice: LLM and DisaggCluster do it unless asked."""
    from minidisagg.llm import LLM

    r, seed = rng
    prompts = prompts_for(r, 4, 20, 60)
    cluster = DisaggCluster(tiny_loaded, EngineConfig(batch_invariant=True))
    try:
        assert [w.overlap for w in cluster.prefill_workers] == [False]
        outs = serve(cluster, prompts)
        assert [o.token_ids for o in outs] == colocated(tiny_loaded, prompts), f"seed {seed}"
        for o in outs:  # no layer left before its prefill ended
            assert o.timeline.transfer_start_s >= o.timeline.prefill_end_s, f"seed {seed}"
    finally:
        cluster.shutdown()
    with LLM("tiny", device="cpu", mode="disagg", transport="inproc") as llm:
        assert [w.overlap for w in llm.engine.prefill_workers] == [False]
    with LLM("tiny", device="cpu", mode="disagg", transport="inproc", kv_overlap=True) as llm:
        assert [w.overlap for w in llm.engine.prefill_workers] == [True]


def test_real_model_disagg_equals_colocated(smollm2_loaded):
    tok = smollm2_loaded.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": c}])
               for c in ("What is the capital of France?", "Name three colours.")]
    params = SamplingParams(temperature=0, max_tokens=16)
    ref = colocated(smollm2_loaded, prompts, params)
    cluster = DisaggCluster(smollm2_loaded, EngineConfig(batch_invariant=True))
    try:
        outs = serve(cluster, prompts, params)
        assert [o.token_ids for o in outs] == ref
        assert outs[0].text == "The capital of France is Paris."
    finally:
        cluster.shutdown()


def test_full_decode_pool_applies_backpressure(tiny_loaded, rng):
    """Decode can hold ~2 requests at once: prefill must wait for credit, and everything still finishes."""
    r, seed = rng
    prompts = prompts_for(r, 8, 20, 30)
    ref = colocated(tiny_loaded, prompts)
    config = EngineConfig(batch_invariant=True, cache=CacheConfig(block_size=16, num_blocks=6))
    cluster = DisaggCluster(tiny_loaded, config)
    try:
        outs = serve(cluster, prompts)
        assert [o.token_ids for o in outs] == ref, f"seed {seed}"
        assert_no_leaks(cluster)
    finally:
        cluster.shutdown()


def test_seeded_sampling_continues_across_the_handoff(tiny_loaded):
    params = SamplingParams(temperature=0.8, top_k=40, max_tokens=12, seed=7, ignore_eos=True)
    ref = colocated(tiny_loaded, [[5, 6, 7, 8]], params)
    cluster = DisaggCluster(tiny_loaded, EngineConfig(batch_invariant=True))
    try:
        assert [o.token_ids for o in serve(cluster, [[5, 6, 7, 8]], params)] == ref
    finally:
        cluster.shutdown()


@pytest.mark.parametrize("policy", ["fail", "recompute"])
def test_dead_decode_worker(tiny_loaded, rng, policy):
    """A decode worker that crashes takes only its own requests; the rest finish; nothing hangs or leaks."""
    r, seed = rng
    prompts = prompts_for(r, 6)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ref = colocated(tiny_loaded, prompts, params)
    cluster = DisaggCluster(tiny_loaded, EngineConfig(batch_invariant=True), num_decode=2, kv_failure_policy=policy)
    victim = cluster.decode_workers[1]

    def crash(*_args, **_kwargs):
        raise RuntimeError("injected crash")

    try:
        ids = [cluster.add_request({"prompt_token_ids": p}, params) for p in prompts]
        victim.engine.step = crash  # its next step kills the worker thread
        done = {}
        deadline = time.monotonic() + 120
        while cluster.has_unfinished():
            assert time.monotonic() < deadline, "hung after a worker died"
            for out in cluster.step():
                if out.finished:
                    done[out.request_id] = out
        on_victim = [i for i, rid in enumerate(ids) if i % 2 == 1]
        for i, rid in enumerate(ids):
            out = done[rid]
            if i in on_victim and policy == "fail":
                assert out.finish_reason == "error" and "died" in out.error
            else:
                assert out.token_ids == ref[i], f"seed {seed}, request {i}"
        survivors = cluster.prefill_workers + [cluster.decode_workers[0]]
        for w in survivors:
            assert w.engine.blocks.num_free_blocks == w.engine.blocks.num_blocks
    finally:
        cluster.shutdown()


def test_request_timeout_fails_cleanly(tiny_loaded):
    cluster = DisaggCluster(tiny_loaded, EngineConfig(), request_timeout_s=0.3)
    try:
        cluster.decode_workers[0].stop()  # nobody decodes: the deadline must fire
        out = serve(cluster, [[5, 6, 7]], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))[0]
        assert out.finish_reason == "error" and "request_timeout_s" in out.error
    finally:
        cluster.shutdown()


def test_bad_arguments(tiny_loaded):
    with pytest.raises(ValueError, match="transport"):
        DisaggCluster(tiny_loaded, EngineConfig(), transport="carrier-pigeon")
    with pytest.raises(ValueError, match="kv_failure_policy"):
        DisaggCluster(tiny_loaded, EngineConfig(), kv_failure_policy="pray")
    with pytest.raises(ValueError, match="routing policy"):
        DisaggCluster(tiny_loaded, EngineConfig(), routing="random")
    cluster = DisaggCluster(tiny_loaded, EngineConfig())
    try:
        with pytest.raises(ValueError, match="empty"):
            cluster.add_request({"prompt_token_ids": []})
        assert not cluster.has_unfinished()
    finally:
        cluster.shutdown()


def test_transfer_ids_differ_between_prefill_workers_of_one_name(tiny_loaded):
    from minidisagg.disagg.prefill_worker import PrefillWorker
    from minidisagg.engine.clock import SimulatedClock

    config = EngineConfig(cache=CacheConfig(num_blocks=8))
    workers = [PrefillWorker("prefill", tiny_loaded, config, SimulatedClock(), {}, lambda item: None)
               for _ in range(2)]  # as two `minidisagg serve prefill` processes are both named
    ids = [[worker.next_transfer_id() for _ in range(50)] for worker in workers]
    assert all(tid.startswith("prefill-") for tid in ids[0] + ids[1])
    assert len(set(ids[0]) | set(ids[1])) == 100
