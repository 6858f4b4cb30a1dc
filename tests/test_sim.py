"""The fleet simulator: the engine's scheduler on a cost model, its fast path, links, router, determinism."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from minidisagg.config import CacheConfig, EngineConfig
from minidisagg.disagg.router import Router
from minidisagg.engine.clock import SimulatedClock
from minidisagg.engine.llm_engine import LLMEngine
from minidisagg.engine.replay import replay
from minidisagg.engine.step_cost import DECODE, StepCostModel, StepShape
from minidisagg.sim import FleetSpec, InstanceConfig, LinkSpec, SharedLink, Trace, simulate
from minidisagg.engine.sampling import SamplingParams
from minidisagg.engine.scheduler import Scheduler, StepBudget
from minidisagg.engine.sequence import Sequence
from minidisagg.kv.block_manager import BlockManager
from minidisagg.metrics import RequestTimeline
from minidisagg.sim.events import EventLoop
from minidisagg.sim.prefill import plan_hand_off_prefill
from minidisagg.sim.router import InstancePicker
from minidisagg.stages.modelled import use_modelled_stages
from minidisagg.workload import TimedRequest


def _costs(rng: random.Random) -> StepCostModel:
    fixed_s = rng.uniform(1e-3, 5e-3)
    costs = StepCostModel(fixed_s, rng.uniform(1e-5, 5e-5), rng.uniform(0, 1e-8), (1, 4, 16, 64),
                          tuple(sorted(rng.uniform(5e-3, 3e-2) for _ in range(4))), rng.uniform(0, 1e-6),
                          rng.choice([0, 32]))
    # about half the models charge each KV commit on a decode instance (from drawn values: the draws stay as they were)
    costs = dataclasses.replace(costs, decode_commit_s=fixed_s / 4) if fixed_s > 3e-3 else costs
    # ... and about half (another half) host work per decoding sequence and step
    return dataclasses.replace(costs, decode_per_seq_s=costs.decode_s[0] / 32) if costs.decode_context_s > 5e-7 else costs


def _trace(rng: random.Random, n: int, rate_rps: float, max_prompt: int = 300, max_out: int = 60) -> Trace:
    t, reqs = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate_rps)
        reqs.append(TimedRequest(t, rng.randint(1, max_prompt), rng.randint(1, max_out)))
    return Trace.of(reqs)


def _spec(rng: random.Random, disagg: bool, policy: str) -> FleetSpec:
    inst = InstanceConfig(policy, max_num_seqs=rng.choice([4, 16, 64]), max_num_batched_tokens=rng.choice([64, 512]),
                          num_blocks=rng.choice([100, 400]), block_size=rng.choice([4, 16]))
    link = LinkSpec("l", rng.uniform(0.001, 1.0), rng.uniform(0, 1e-3))
    # some fleets hand requests over late and make reservations cross the link (from drawn values, as above)
    link = dataclasses.replace(link, control_rtt_s=4 * link.latency_s) if link.latency_s > 5e-4 else link
    submit_s = 2e-3 if inst.max_num_seqs == 16 else 0.0
    if disagg:
        return FleetSpec(rng.randint(1, 3), rng.randint(1, 3), inst, routing=rng.choice(["round_robin", "least_loaded"]),
                         link=link, kv_bytes_per_token=rng.choice([1000, 100000]), messages_per_transfer=rng.randint(1, 4),
                         submit_s=submit_s)
    return FleetSpec(rng.randint(1, 3), 0, inst, routing=rng.choice(["round_robin", "least_loaded"]), submit_s=submit_s)


def _all_blocks_back(res) -> bool:
    return all(i.blocks.num_free_blocks == i.blocks.num_blocks and not i.blocks.owners() for i in res.instances)


@pytest.mark.parametrize("case", range(12))
def test_the_fast_path_gives_the_step_by_step_timelines_bit_for_bit(case):
    rng = random.Random(1000 + case)
    disagg = case % 3 == 2
    spec = _spec(rng, disagg, ["chunked", "prefill_first", "decode_first"][case % 3])
    costs, trace = _costs(rng), _trace(rng, 150, rng.choice([20.0, 200.0]))
    fast = simulate(spec, costs, trace, fast=True, keep_timelines=True)
    slow = simulate(spec, costs, trace, fast=False, keep_timelines=True)
    assert sum(i.stats.fast_steps for i in fast.instances) > 0  # the fast path did take over steps
    assert sum(i.stats.fast_steps for i in slow.instances) == 0
    for a, b in zip(fast.timelines, slow.timelines):
        assert a.token_times_s == b.token_times_s and a.finish_s == b.finish_s
        assert (a.transfer_start_s, a.transfer_end_s) == (b.transfer_start_s, b.transfer_end_s)
    for name in ("ttft_s", "tpot_s", "e2e_s", "num_output_tokens", "instance"):
        assert np.array_equal(getattr(fast, name), getattr(slow, name)), name
    assert _all_blocks_back(fast) and _all_blocks_back(slow)


@pytest.mark.parametrize("case", range(6))
def test_prefill_steps_planned_without_the_scheduler_are_bit_for_bit_under_block_pressure(case):
    """Disaggregated fleets whose prefill pools often cannot hold every waiting prompt: the fast plan and the
    scheduler's plan alternate there; the run equals step by step (which always asks the scheduler)."""
    rng = random.Random(2000 + case)
    spec = _spec(rng, True, "chunked")
    prefill = InstanceConfig("prefill_first", max_num_seqs=rng.choice([2, 8]), max_num_batched_tokens=rng.choice([256, 1024]),
                             num_blocks=rng.choice([100, 150]), block_size=4)
    # a slow link: KV waiting to leave holds the prefill pools' blocks
    spec = dataclasses.replace(spec, prefill_instance=prefill, link=LinkSpec("l", rng.uniform(0.02, 0.1), 1e-4),
                               kv_bytes_per_token=100000)
    costs, trace = _costs(rng), _trace(rng, 150, 300.0)
    fast = simulate(spec, costs, trace, fast=True, keep_timelines=True)
    slow = simulate(spec, costs, trace, fast=False, keep_timelines=True)
    pre = fast.instances[:spec.num_prefill]
    assert sum(i.stats.fast_steps for i in pre) > 0 and sum(i.stats.scheduled_steps for i in pre) > 0
    for a, b in zip(fast.timelines, slow.timelines):
        assert a.token_times_s == b.token_times_s and a.finish_s == b.finish_s
        assert (a.prefill_start_s, a.prefill_end_s, a.transfer_start_s, a.transfer_end_s) == \
            (b.prefill_start_s, b.prefill_end_s, b.transfer_start_s, b.transfer_end_s)
    for name in ("ttft_s", "tpot_s", "e2e_s", "num_output_tokens", "instance"):
        assert np.array_equal(getattr(fast, name), getattr(slow, name)), name
    assert _all_blocks_back(fast) and _all_blocks_back(slow)


@pytest.mark.parametrize("seed", range(30))
def test_the_hand_off_prefill_plan_is_the_schedulers_plan_or_none(seed):
    """On random queues and pools: the same chunks, blocks and free count as ``Scheduler.schedule``, or no change."""
    rng = random.Random(seed)
    bs, num_blocks = rng.choice([1, 4, 16]), rng.randint(4, 200)
    budget = StepBudget(rng.randint(1, 6), rng.randint(1, 400))
    pools = [BlockManager(num_blocks, bs) for _ in range(2)]
    for j in range(rng.randint(0, 3)):  # blocks held elsewhere (reservations, hand-offs in flight)
        n = rng.randint(1, num_blocks * bs // 4)
        for pool in pools:
            pool.grow(("held", j), n)
    queues = [Scheduler("prefill_first", budget, pool) for pool in pools]
    for i in range(rng.randint(1, 8)):
        prompt, params = [7] * rng.randint(1, 200), SamplingParams(max_tokens=rng.randint(1, 4), ignore_eos=True)
        for sched in queues:
            sched.add(Sequence(i, str(i), list(prompt), params, RequestTimeline(0.0)))
    if rng.random() < 0.2:  # a recompute: a waiting sequence that holds KV already
        victim = queues[0].waiting[-1]
        if pools[0].can_grow(victim.seq_id, 1):
            for sched in queues:
                seq = sched.waiting[-1]
                sched.blocks.grow(seq.seq_id, 1)
                seq.num_computed_tokens = 1
    before = pools[0].num_free_blocks
    plan = plan_hand_off_prefill(queues[0])
    expected = queues[1].schedule()
    if plan is None:
        assert pools[0].num_free_blocks == before and all(s.num_cached_tokens is None for s in queues[0].waiting)
        return
    assert [(c.seq.seq_id, c.num_tokens) for c in plan.prefills] == [(c.seq.seq_id, c.num_tokens) for c in expected.prefills]
    assert not plan.decodes and not expected.decodes and plan.prefill_before_decode
    assert pools[0].num_free_blocks == pools[1].num_free_blocks
    for c in plan.prefills:
        assert pools[0].block_table(c.seq.seq_id) == pools[1].block_table(c.seq.seq_id)
        assert c.seq.num_cached_tokens == 0


@pytest.mark.parametrize("disagg", [False, True])
def test_a_seed_gives_the_same_run_bit_for_bit_and_every_request_finishes_once(disagg):
    runs = []
    for _ in range(2):
        rng = random.Random(7)
        spec, costs, trace = _spec(rng, disagg, "chunked"), _costs(rng), _trace(rng, 300, 100.0)
        runs.append((simulate(spec, costs, trace), trace))
    (a, trace), (b, _) = runs
    for name in ("ttft_s", "tpot_s", "e2e_s", "num_output_tokens", "instance"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert np.array_equal(a.num_output_tokens, trace.output_len)  # each request got exactly its tokens, once
    assert np.all(a.ttft_s > 0) and np.all(a.e2e_s >= a.ttft_s)
    assert _all_blocks_back(a)


def test_compact_and_full_timelines_give_the_same_figures():
    rng = random.Random(3)
    spec, costs, trace = _spec(rng, True, "chunked"), _costs(rng), _trace(rng, 200, 50.0)
    full, compact = simulate(spec, costs, trace, keep_timelines=True), simulate(spec, costs, trace)
    ms = full.metrics()
    assert np.array_equal(compact.ttft_s, [m.ttft_s for m in ms])
    assert np.array_equal(compact.tpot_s, [m.tpot_s for m in ms])
    assert np.array_equal(compact.e2e_s, [m.e2e_s for m in ms])


HAND_COSTS = StepCostModel(1.0, 0.1, 0.0, (1,), (0.5,))  # prefill of n tokens: 1 + 0.1 n s; decode: 0.5 s


def test_one_request_colocated_has_the_hand_computed_latencies():
    res = simulate(FleetSpec(1), HAND_COSTS, Trace.of([TimedRequest(1.0, 10, 3)]), keep_timelines=True)
    assert res.timelines[0].token_times_s == [3.0, 3.5, 4.0]  # prefill 2.0 s from 1.0, then two 0.5 s decodes
    assert (res.ttft_s[0], res.tpot_s[0], res.e2e_s[0]) == (2.0, 0.5, 3.0)


def test_one_request_disaggregated_adds_the_link_time():
    link = LinkSpec("slow", 1e-5, 0.25)  # 10 kB/s: 10 tokens x 1000 B take 1 s, then 0.25 s latency
    spec = FleetSpec(1, 1, link=link, kv_bytes_per_token=1000)
    res = simulate(spec, HAND_COSTS, Trace.of([TimedRequest(1.0, 10, 3)]), keep_timelines=True)
    tl = res.timelines[0]
    # the decode instance is idle when the KV lands at 4.25: adopted at once, its first token leaves then
    assert tl.token_times_s == [4.25, 4.75, 5.25] and tl.finish_s == 5.25
    assert (tl.transfer_start_s, tl.transfer_end_s, tl.kv_transfer_bytes) == (3.0, 4.25, 10000)
    assert (res.ttft_s[0], res.e2e_s[0]) == (3.25, 4.25)


@pytest.mark.parametrize("fast", [True, False])
def test_a_1p1d_first_token_waits_for_the_decode_step_boundary_and_pays_the_commit(fast):
    """As the decode worker does it: KV that lands mid-step is adopted at the step's end, each adoption costs
    ``decode_commit_s``, the first token leaves then; a reservation asked for mid-step gets in at the step's end."""
    costs = StepCostModel(1.0, 0.1, 0.0, (1, 2), (0.5, 0.5), decode_commit_s=0.125)  # prefill of 10 tokens: 2 s
    spec = FleetSpec(1, 1, link=LinkSpec("slow", 1e-5, 0.25), kv_bytes_per_token=1000)  # 10 tokens' KV: 1.25 s
    reqs = [TimedRequest(0.0, 10, 10), TimedRequest(2.5, 10, 2), TimedRequest(4.6, 10, 2)]
    res = simulate(spec, costs, Trace.of(reqs), fast=fast, keep_timelines=True)
    a, b, c = res.timelines
    # A: prefill 0-2, lands 3.25 at an idle decode instance: commit 0.125, first token 3.375, steps of 0.5 from there
    assert a.token_times_s[:6] == pytest.approx([3.375, 3.875, 4.375, 4.875, 5.375, 5.875])
    # B: reserved at 2.5 (decode idle), prefill 2.5-4.5, lands 5.75 inside the step 5.375-5.875: adopted at 5.875,
    # first token after its commit at 6.0 (not 4.5, the prefill's end; not 5.875, the landing plus the commit)
    assert b.token_times_s == pytest.approx([6.0, 6.5]) and res.ttft_s[1] == pytest.approx(3.5)
    assert a.token_times_s[6:] == pytest.approx([6.5, 7.0, 7.5, 8.0])  # the step after B's adoption starts at 6.0
    # C: asks for blocks at 4.6, inside the decode step 4.375-4.875: reserved at 4.875, prefill 4.875-6.875, lands
    # 8.125 at an idle decode instance (A ended at 8.0): first token 8.25
    assert c.transfer_start_s == pytest.approx(6.875) and c.token_times_s == pytest.approx([8.25, 8.75])
    assert res.ttft_s[2] == pytest.approx(8.25 - 4.6)


@pytest.mark.parametrize("fast", [True, False])
def test_the_hand_over_the_reservation_round_trip_and_per_sequence_work_have_the_hand_computed_times(fast):
    """Router hand-over 0.25 s, reservation round trip 0.5 s (0.25 s each way), 0.25 s per decoding sequence."""
    costs = StepCostModel(1.0, 0.1, 0.0, (1, 2), (0.5, 0.5), decode_commit_s=0.125, decode_per_seq_s=0.25)
    spec = FleetSpec(1, 1, link=LinkSpec("slow", 1e-5, 0.25, control_rtt_s=0.5), kv_bytes_per_token=1000, submit_s=0.25)
    res = simulate(spec, costs, Trace.of([TimedRequest(0.0, 10, 3), TimedRequest(4.2, 10, 2)]), fast=fast,
                   keep_timelines=True)
    a, b = res.timelines
    # A: at the prefill instance at 0.25; its ask reaches the idle decode instance at 0.5, the answer is back at 0.75;
    # prefill 0.75-2.75; KV lands 4.0 (1 s + 0.25 s); commit 0.125: first token 4.125; decode steps 0.5 + 0.25 x 1
    assert a.prefill_start_s == pytest.approx(0.75) and a.transfer_start_s == pytest.approx(2.75)
    assert a.token_times_s == pytest.approx([4.125, 4.875, 5.625])
    # B: at the prefill instance at 4.45; its ask reaches the decode instance at 4.7, inside the step 4.125-4.875:
    # reserved at 4.875, answer back at 5.125; prefill 5.125-7.125; lands 8.375 at an idle instance: first token 8.5
    assert b.prefill_start_s == pytest.approx(5.125) and b.token_times_s == pytest.approx([8.5, 9.25])
    colo = simulate(FleetSpec(1, submit_s=0.25), dataclasses.replace(HAND_COSTS, decode_per_seq_s=0.25),
                    Trace.of([TimedRequest(1.0, 10, 3)]), fast=fast, keep_timelines=True)
    assert colo.timelines[0].token_times_s == pytest.approx([3.25, 4.0, 4.75])  # at 1.25; prefill 2 s; steps 0.75 s


def test_the_new_serving_costs_are_refused_below_zero_and_saved(tmp_path):
    from minidisagg.sim.costs import load_costs, save_costs

    with pytest.raises(ValueError, match="decode_per_seq_s"):
        dataclasses.replace(HAND_COSTS, decode_per_seq_s=-1e-6)
    with pytest.raises(ValueError, match="control_rtt_s"):
        LinkSpec("l", 1.0, 0.0, control_rtt_s=-1.0)
    with pytest.raises(ValueError, match="submit_s"):
        FleetSpec(1, submit_s=float("nan"))
    costs = dataclasses.replace(HAND_COSTS, decode_per_seq_s=3e-5)
    assert costs.decode_cost_s(4, 0) == pytest.approx(4 * 0.5 + 4 * 3e-5)  # one point: decode scales with the batch
    assert "30.0 us per sequence" in costs.describe()
    assert load_costs(save_costs(costs, tmp_path / "c.json")).decode_per_seq_s == 3e-5


def test_transfers_sharing_a_link_share_its_bandwidth():
    loop, landed = EventLoop(), {}
    link = SharedLink(LinkSpec("l", 1e-6, 0.0), loop)  # 1000 B/s
    link.send(0.0, 1000, 1, lambda t, p: landed.__setitem__(p, t), "a")
    link.send(0.0, 1000, 1, lambda t, p: landed.__setitem__(p, t), "b")
    loop.push(0.5, 1, lambda t, p: link.send(t, 250, 1, lambda t2, q: landed.__setitem__(q, t2), "c"))
    loop.run()
    # a, b at 500 B/s each until 0.5 s (250 B each sent); three share 333 B/s: c's 250 B are through at 1.25 s,
    # when a and b have 500 B left each, which at 500 B/s take 1 s more: all 2250 B in 2.25 s at 1000 B/s
    assert landed["c"] == pytest.approx(1.25) and landed["a"] == pytest.approx(2.25) and landed["b"] == pytest.approx(2.25)
    assert link.num_active == 0 and link.max_concurrent == 3


@pytest.mark.parametrize("policy", ["round_robin", "least_loaded"])
def test_the_picker_chooses_as_the_real_router(policy):
    rng = random.Random(5)
    router, picker = Router(1, 7, policy), InstancePicker(7, policy)
    live: list[int] = []
    for _ in range(500):
        if live and rng.random() < 0.45:
            picker.done(live.pop(rng.randrange(len(live))))
            continue
        expected = router.pick([0], list(picker.loads))[1]
        live.append(picker.pick())
        assert live[-1] == expected


def test_vectorised_decode_costs_equal_cost_s_bit_for_bit():
    rng = random.Random(11)
    for _ in range(20):
        costs, b = _costs(rng), rng.randint(1, 100)
        pairs = np.array([float(rng.randint(0, 10**6)) for _ in range(50)])
        expected = [costs.cost_s(StepShape(DECODE, b, b, float(p))) for p in pairs]
        assert costs.decode_costs_s(b, pairs).tolist() == expected


def test_an_instance_keeps_the_timelines_of_the_engine_replay_with_modelled_stages(tiny_loaded):
    """The simulator's instance and ``LLMEngine`` with modelled stages step alike: same token times, bit for bit."""
    rng = random.Random(2)
    costs = _costs(rng)
    workload = [TimedRequest(r.arrival_s, r.prompt_len, r.output_len)
                for r in [TimedRequest(rng.uniform(0, 0.3), rng.randint(1, 90), rng.randint(1, 25)) for _ in range(30)]]
    workload.sort(key=lambda r: r.arrival_s)
    for policy in ("chunked", "prefill_first"):
        cfg = EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, policy=policy,
                           cache=CacheConfig(block_size=16, num_blocks=60))
        engine = LLMEngine(tiny_loaded, cfg, clock=SimulatedClock(cost_model=costs))
        use_modelled_stages(engine, costs)
        outs = replay(engine, workload)
        inst = InstanceConfig(policy, 8, 64, 60, 16, engine.max_model_len)
        res = simulate(FleetSpec(1, instance=inst), costs, Trace.of(workload), keep_timelines=True)
        assert [o.timeline.token_times_s for o in outs] == [tl.token_times_s for tl in res.timelines]
        assert [o.timeline.finish_s for o in outs] == [tl.finish_s for tl in res.timelines]


def test_bad_inputs_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="non-decreasing"):
        Trace(np.array([1.0, 0.5]), np.array([1, 1]), np.array([1, 1]))
    with pytest.raises(ValueError, match="bandwidth"):
        LinkSpec("x", 0.0)
    with pytest.raises(ValueError, match="num_decode"):
        FleetSpec(0)
    with pytest.raises(ValueError, match="raise num_blocks"):
        simulate(FleetSpec(1, instance=InstanceConfig(num_blocks=2, block_size=4)), HAND_COSTS,
                 Trace.of([TimedRequest(0.0, 10, 3)]))
    with pytest.raises(ValueError, match="routing policy"):
        InstancePicker(2, "random")


def test_the_planner_sweeps_every_split_and_ranks_them_by_goodput_per_gpu():
    from minidisagg.metrics import SLO, goodput
    from minidisagg.sim.plan import plan_splits
    from minidisagg.workload import Uniform, poisson_workload

    costs = StepCostModel(5e-3, 6e-5, 1e-10, (1, 8, 32), (7e-3, 7.5e-3, 9e-3))
    base = FleetSpec(1, instance=InstanceConfig("chunked", 64, 512, 4096))
    slo = SLO(ttft_s=0.3, tpot_s=0.012)
    trace_at = lambda rate: Trace.of(poisson_workload(rate, 120, Uniform(64, 512), Uniform(8, 64), seed=1))  # noqa: E731
    plans = plan_splits(3, base, costs, trace_at, [2.0, 8.0, 32.0], slo)
    assert sorted(p.label for p in plans) == ["1P2D", "2P1D", "colocated x3"]
    per_gpu = [p.goodput_per_gpu_rps for p in plans]
    assert per_gpu == sorted(per_gpu, reverse=True)
    for p in plans:
        assert p.rates_rps == (6.0, 24.0, 96.0)
        assert p.goodput_rps == goodput(p.rates_rps, p.attainments, 0.9)
        assert p.attainments[0] >= p.attainments[-1]  # 16x the load cannot serve more of the requests in SLO
    assert [p.attainments for p in plan_splits(3, base, costs, trace_at, [2.0, 8.0, 32.0], slo)] == \
        [p.attainments for p in plans]  # deterministic


def test_the_sim_command_plans_from_a_saved_cost_model_and_refuses_bad_counts(tmp_path, capsys):
    from minidisagg.cli import main
    from minidisagg.sim.costs import load_costs, save_costs

    path = save_costs(HAND_COSTS, tmp_path / "costs.json", model="hand")
    assert load_costs(path) == HAND_COSTS
    assert main(["sim", "plan", "--costs", str(path), "--gpus", "2", "--rates-per-gpu", "0.01,0.05",
                 "--slo-ttft-ms", "60000", "--slo-tpot-ms", "1000", "--prompt-mean", "16", "--output-mean", "4",
                 "--requests-per-gpu", "5"]) == 0
    out = capsys.readouterr().out
    assert "1P1D" in out and "colocated x2" in out
    assert main(["sim", "plan", "--costs", str(path), "--gpus", "two", "--slo-ttft-ms", "1", "--slo-tpot-ms", "1"]) == 2
    assert "--gpus" in capsys.readouterr().out



def test_links_fitted_to_the_committed_transport_measurements_reproduce_them():
    from pathlib import Path

    from minidisagg.sim.link import links_from_transport_json

    path = Path(__file__).parent.parent / "benchmarks" / "results" / "transport-2026-11-27.json"
    specs = links_from_transport_json(path)
    tcp = specs["raw TCP sendall/recv_into"]
    assert 0.5 < tcp.bandwidth_GBps < 20 and tcp.latency_s >= 0
    with pytest.raises(ValueError, match="bench transport"):
        links_from_transport_json(Path(__file__))  # not JSON rows at all -> refused


def test_a_pool_held_by_partly_prefilled_prompts_preempts_one_and_everything_finishes():
    """Chunked prefill can give a small pool away to several half-prefilled prompts. The scheduler then
    preempts the newest of them (nothing is running), so the fleet never stalls and, stepped one by one or
    in stretches, every request finishes with the same timelines."""
    rng = random.Random(5051)
    spec = _spec(rng, False, "chunked")
    costs, trace = _costs(rng), _trace(rng, 200, rng.choice([10.0, 100.0, 1000.0]))
    fast, slow = simulate(spec, costs, trace), simulate(spec, costs, trace, fast=False)
    fast.check_complete()
    assert (fast.num_output_tokens > 0).all() and fast.num_output_tokens.tolist() == slow.num_output_tokens.tolist()
    assert fast.ttft_s.tolist() == slow.ttft_s.tolist()


def _pressure_case(case: int) -> tuple[FleetSpec, StepCostModel, Trace]:
    """xPyD with decode pools of 60 or 120 small blocks under 100 to 400 requests/s."""
    rng = random.Random(2000 + case)
    inst = InstanceConfig("chunked", max_num_seqs=rng.choice([8, 32]), max_num_batched_tokens=rng.choice([64, 256]),
                          num_blocks=rng.choice([60, 120]), block_size=rng.choice([4, 8]))
    spec = FleetSpec(rng.randint(1, 2), rng.randint(1, 3), inst, routing=rng.choice(["round_robin", "least_loaded"]),
                     link=LinkSpec("l", rng.uniform(0.01, 1.0), rng.uniform(0, 1e-3)), kv_bytes_per_token=1000)
    return spec, _costs(rng), _trace(rng, 250, rng.choice([100.0, 400.0]), max_prompt=150, max_out=80)


@pytest.mark.parametrize("case", range(6))
def test_lazy_decode_batches_under_block_pressure_match_step_by_step_bit_for_bit(case):
    """Decode pools so small that reservations shorten planned segments, adoptions join running ones and the
    scheduler preempts: the lazily advanced batches give the step-by-step timelines, blocks and all."""
    spec, costs, trace = _pressure_case(case)
    fast = simulate(spec, costs, trace, fast=True, keep_timelines=True)
    slow = simulate(spec, costs, trace, fast=False, keep_timelines=True)
    for a, b in zip(fast.timelines, slow.timelines):
        assert a.token_times_s == b.token_times_s and a.finish_s == b.finish_s
        assert (a.transfer_start_s, a.transfer_end_s) == (b.transfer_start_s, b.transfer_end_s)
    assert np.array_equal(fast.instance, slow.instance)
    decode = fast.instances[spec.num_prefill:]
    assert sum(i.stats.fast_steps for i in decode) > 0 and sum(i.stats.extra.get("joined", 0) for i in decode) > 0
    assert _all_blocks_back(fast) and _all_blocks_back(slow)


def test_lazy_batches_shorten_segments_and_meet_preemption_somewhere():
    """Over the block-pressure cases above, every new path of the lazy batch is taken at least once."""
    shortened = preempted = 0
    for case in range(6):
        spec, costs, trace = _pressure_case(case)
        res = simulate(spec, costs, trace)
        shortened += sum(i.stats.extra.get("shortened", 0) for i in res.instances)
        preempted += sum(i.scheduler.num_preemptions for i in res.instances[spec.num_prefill:])
    assert shortened > 0 and preempted > 0


def test_a_run_leaves_no_reference_cycles_per_request():
    """The fleet pauses Python's cyclic collector while it runs: that is safe only if requests leave no cycles."""
    import gc

    def cyclic_garbage(num_requests: int) -> int:
        rng = random.Random(9)
        spec, costs = _spec(rng, True, "chunked"), _costs(rng)
        simulate(spec, costs, _trace(rng, num_requests, 200.0))
        return gc.collect()

    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        few, many = cyclic_garbage(100), cyclic_garbage(1100)
    finally:
        if enabled:
            gc.enable()
    assert many - few < 100, f"{many - few} more objects in cycles for 1000 more requests"
    assert gc.isenabled() == enabled


def test_fast_and_step_by_step_agree_over_random_fleets_at_the_edges():
    """40 random fleets at the edges (block size 1, two sequences a step, pools of 40 blocks, one-token outputs):
    wherever step-by-step simulation completes, the fast path gives its timelines bit for bit."""
    compared = 0
    for case in range(40):
        rng = random.Random(3000 + case)
        inst = InstanceConfig(rng.choice(["chunked", "prefill_first", "decode_first"]), rng.choice([2, 4, 8, 32]),
                              rng.choice([32, 64, 256]), rng.choice([40, 60, 120, 400]), rng.choice([1, 2, 4, 8, 16]))
        num_prefill = rng.randint(1, 3) if rng.random() < 0.7 else 0
        link = LinkSpec("l", rng.uniform(0.01, 1.0), rng.uniform(0, 1e-3))
        link = dataclasses.replace(link, control_rtt_s=4 * link.latency_s) if link.latency_s > 5e-4 else link
        spec = FleetSpec(rng.randint(1, 3), num_prefill, inst, routing=rng.choice(["round_robin", "least_loaded"]),
                         link=link, kv_bytes_per_token=1000, submit_s=1e-3 if inst.max_num_seqs == 4 else 0.0)
        costs = _costs(rng)
        trace = _trace(rng, 100, rng.choice([50.0, 200.0, 800.0]), max_prompt=120, max_out=rng.choice([5, 40, 80]))
        try:
            slow = simulate(spec, costs, trace, fast=False, keep_timelines=True)
        except (RuntimeError, ValueError):
            continue  # a pool too small for some prompt: refused either way
        fast = simulate(spec, costs, trace, fast=True, keep_timelines=True)
        assert [tl.token_times_s for tl in fast.timelines] == [tl.token_times_s for tl in slow.timelines], case
        assert [tl.finish_s for tl in fast.timelines] == [tl.finish_s for tl in slow.timelines], case
        assert np.array_equal(fast.instance, slow.instance) and _all_blocks_back(fast), case
        compared += 1
    assert compared >= 30


def test_the_commit_cost_is_a_saved_field_and_refused_below_zero(tmp_path):
    from minidisagg.sim.costs import load_costs, save_costs

    costs = dataclasses.replace(HAND_COSTS, decode_commit_s=0.002)
    assert load_costs(save_costs(costs, tmp_path / "c.json")).decode_commit_s == 0.002
    assert "2.0 ms per KV commit" in costs.describe()
    with pytest.raises(ValueError, match="KV commit must be >= 0"):
        dataclasses.replace(HAND_COSTS, decode_commit_s=-1e-3)
