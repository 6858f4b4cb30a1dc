"""The calibrated step cost model and the simulated clock that charges it: replays load cannot bend."""

from __future__ import annotations

import random

import pytest

from minidisagg.config import CacheConfig, EngineConfig
from minidisagg.engine.calibrate import CalibrationPlan, calibrate_step_costs
from minidisagg.engine.clock import SimulatedClock, WallClock
from minidisagg.engine.llm_engine import LLMEngine
from minidisagg.engine.replay import replay
from minidisagg.engine.step_cost import DECODE, PREFILL, StepCostModel, StepShape, fit_prefill, interpolate
from minidisagg.workload import interference_workload


def _model(**kw) -> StepCostModel:
    base = dict(prefill_fixed_s=0.005, prefill_per_token_s=3e-4, prefill_per_pair_s=1e-7, decode_batch_sizes=(1, 4),
                decode_s=(0.02, 0.03), decode_context_s=1e-6, decode_reference_context=32)
    base.update(kw)
    return StepCostModel(**base)


def test_interpolate_hits_points_and_extends_by_the_end_slopes():
    xs, ys = [1.0, 3.0, 7.0], [2.0, 4.0, 12.0]
    for x, y in zip(xs, ys):
        assert interpolate(xs, ys, x) == pytest.approx(y)
    assert interpolate(xs, ys, 2.0) == pytest.approx(3.0)
    assert interpolate(xs, ys, 9.0) == pytest.approx(16.0)  # slope 2 past the last point
    assert interpolate(xs, ys, 0.0) == pytest.approx(1.0)


def test_cost_grows_with_tokens_context_and_batch():
    m = _model()
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 600)
        c = rng.randint(0, 2000)
        assert m.prefill_cost_s(n + 10, c) > m.prefill_cost_s(n, c)
        assert m.prefill_cost_s(n, c + 100) > m.prefill_cost_s(n, c)
    assert m.prefill_cost_s(64) == pytest.approx(0.005 + 64 * 3e-4 + 64 * 65 / 2 * 1e-7)
    assert m.decode_cost_s(4, 32) == pytest.approx(0.03)
    assert m.decode_cost_s(4, 132) == pytest.approx(0.03 + 4 * 100 * 1e-6)


@pytest.mark.parametrize("bad", [dict(decode_batch_sizes=(4, 1)), dict(decode_s=(0.02, 0.0)), dict(decode_context_s=-1.0),
                                 dict(decode_s=(0.1,)), dict(prefill_per_pair_s=-1e-9),
                                 dict(prefill_fixed_s=0.0, prefill_per_token_s=0.0)])
def test_bad_calibrations_are_refused(bad):
    with pytest.raises(ValueError, match="StepCostModel"):
        _model(**bad)


def test_the_prefill_fit_recovers_a_known_line_and_never_goes_negative():
    rng = random.Random(1)
    for _ in range(20):
        fixed, per_token, per_pair = rng.uniform(1e-3, 1e-2), rng.uniform(1e-5, 1e-3), rng.uniform(0, 1e-7)
        points = [(n, n * (n + 1) / 2 + off * n, fixed + per_token * n + per_pair * (n * (n + 1) / 2 + off * n))
                  for n in (16, 32, 64, 128, 256, 512) for off in (0, 512)]
        got = fit_prefill(points)
        assert got == pytest.approx((fixed, per_token, per_pair), rel=1e-6, abs=1e-12)
    # times that fall with size (pure noise) fit without a negative term
    assert min(fit_prefill([(16, 136.0, 0.05), (64, 2080.0, 0.02), (256, 32896.0, 0.03)])) >= 0


def test_shape_of_work_counts_attention_pairs():
    from types import SimpleNamespace as NS

    from minidisagg.engine.batch import PrefillChunk

    chunks = [PrefillChunk(NS(num_computed_tokens=32, num_prefill_tokens_left=16), 16),
              PrefillChunk(NS(num_computed_tokens=0, num_prefill_tokens_left=40), 8)]
    shape = StepShape.of_work(PREFILL, chunks)
    assert (shape.phase, shape.num_seqs, shape.num_tokens) == (PREFILL, 2, 24)
    assert shape.attention_pairs == pytest.approx(16 * (32 + 8.5) + 8 * 4.5)
    seqs = [NS(num_tokens=10), NS(num_tokens=30)]
    assert StepShape.of_work(DECODE, seqs) == StepShape(DECODE, 2, 2, 40.0)


def test_a_calibrated_replay_ignores_wall_time(tiny_loaded, monkeypatch):
    """The same workload replayed twice, once with every stage made 50 ms slower: same timeline."""
    workload = interference_workload(2, 16, 6, 1, 96, 1.0, 2, 0.01)
    costs = _model()

    def run():
        engine = LLMEngine(tiny_loaded, EngineConfig(max_num_batched_tokens=32, policy="chunked",
                                                     cache=CacheConfig(num_blocks=64)),
                           clock=SimulatedClock(cost_model=costs))
        outs = replay(engine, workload)
        return [o.timeline.token_times_s for o in outs], engine.stats.steps

    quiet, steps = run()
    import minidisagg.stages.base as base

    real = base.Stage.execute_timed
    monkeypatch.setattr(base.Stage, "execute_timed",
                        lambda self, items, seqs: (lambda r: (r[0], r[1] + 0.05))(real(self, items, seqs)))
    loaded_run, loaded_steps = run()
    assert loaded_run == quiet
    assert all(s.measured_s > 0.05 for s in loaded_steps)
    assert [s.elapsed_s for s in loaded_steps] == [s.elapsed_s for s in steps]  # charged: the model's, not wall time


def test_wall_clock_charges_what_was_measured():
    assert WallClock().charge(StepShape(DECODE, 1, 1, 10.0), 0.123) == 0.123
    clock = SimulatedClock()
    assert clock.charge(StepShape(DECODE, 1, 1, 10.0), 0.5) == 0.5 and clock.now() == 0.5


def test_calibration_on_the_tiny_model_is_positive_and_monotone_in_prefill(tiny_loaded):
    costs = calibrate_step_costs(tiny_loaded, CalibrationPlan.covering(128, 4, 256, repeats=2), progress=False)
    assert [p[0] for p in costs.prefill_points][:4] == [16, 32, 64, 128] and costs.decode_batch_sizes == (1, 2, 4)
    assert all(t > 0 for t in costs.decode_s) and all(p[2] > 0 for p in costs.prefill_points)
    assert costs.prefill_cost_s(128) >= costs.prefill_cost_s(16) > 0
    assert costs.prefill_cost_s(64, 192) >= costs.prefill_cost_s(64, 0)
    with pytest.raises(ValueError):
        CalibrationPlan.covering(0, 4)


def test_a_modelled_replay_keeps_the_timeline_of_one_that_runs_the_model(tiny_loaded):
    """Stages that charge calibrated costs without a forward pass give the same token times as running the model."""
    from minidisagg.course.interference_lab import Scenario, make_engine

    costs = _model()
    scenario = Scenario(num_decodes=3, decode_prompt_len=16, decode_output_len=10, num_long=2, long_prompt_len=100,
                        long_every_s=0.05, start_long_s=0.02, token_budget=32)
    timelines = {}
    for run_model in (False, True):
        engine = make_engine(tiny_loaded, "chunked", scenario.token_budget, scenario.workload(), costs=costs,
                             run_model=run_model)
        outs = replay(engine, scenario.workload())
        timelines[run_model] = [(o.timeline.arrival_s, o.timeline.token_times_s, len(o.token_ids)) for o in outs]
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks  # every block came back
    assert timelines[False] == timelines[True]
