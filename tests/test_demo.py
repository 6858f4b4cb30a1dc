"""The headline demo: its calibrated replay cannot be moved by slow steps, its table and figure read right."""

from __future__ import annotations

import dataclasses
import io
import random
import time

import matplotlib.colors as mcolors
import pytest
from rich.console import Console

from minidisagg.course.claims import HostLoad
from minidisagg.demo import DemoSettings, calibrated_runs, retimed, run_demo
from minidisagg.demo_report import CALIBRATED, WALL, demo_claims, demo_table
from minidisagg.engine.clock import SimulatedClock
from minidisagg.engine.llm_engine import LLMEngine
from minidisagg.engine.replay import replay
from minidisagg.engine.step_cost import StepCostModel
from minidisagg.plots import DECODE_COLOR, itl_timeline_figure
from minidisagg.stages.decode import DecodeStage
from minidisagg.stages.prefill import PrefillStage
from minidisagg.workload import Scenario

SMALL = DemoSettings(Scenario(num_decodes=2, decode_prompt_len=8, num_long=2, long_prompt_len=128, long_output_len=2,
                              token_budget=32), long_every_steps=10, calibration_repeats=1)
# A prefill costs 0.5 ms a token, a decode step 10 ms: the long prompt is worth six decode steps.
COSTS = StepCostModel(prefill_fixed_s=0.0, prefill_per_token_s=0.0005, prefill_per_pair_s=0.0,
                      decode_batch_sizes=(1, 2, 3), decode_s=(0.010, 0.010, 0.010))
# A step's fixed cost dominates (a small model on a GPU): a chunk costs nearly what the whole prompt does.
FIXED_COSTS = dataclasses.replace(COSTS, prefill_fixed_s=0.1, prefill_per_token_s=0.00005)
SCHEDULE = SMALL.schedule(COSTS)
QUIET = HostLoad(0.0, 2)


def _token_times(runs):
    return {key: [o.timeline.token_times_s for o in run.decodes + run.longs] for key, run in runs.items()}


@pytest.fixture(scope="module")
def quiet_runs(tiny_loaded):
    return calibrated_runs(tiny_loaded, SMALL, COSTS, SCHEDULE.workload)


def _slow_down(monkeypatch, delay_s: float) -> None:
    """Every stage run sleeps ``delay_s`` more (prefills three times that), as a busy host would make it."""
    for stage, factor in ((PrefillStage, 3), (DecodeStage, 1)):
        original = stage.run

        def slow(self, work, _original=original, _delay_s=factor * delay_s):
            result = _original(self, work)
            time.sleep(_delay_s)
            result.elapsed_s += _delay_s
            return result

        monkeypatch.setattr(stage, "run", slow)


def test_calibrated_claims_hold_and_slow_steps_change_nothing(tiny_loaded, quiet_runs, monkeypatch):
    claims = demo_claims(quiet_runs, "CPU", QUIET, SCHEDULE.predicted_tail_ratio)
    assert SCHEDULE.predicted_tail_ratio > 2
    assert [c.held for c in claims] == [True, True, True], [c.line() for c in claims]
    workload = SCHEDULE.workload
    _slow_down(monkeypatch, 0.02)  # twice what a decode step is charged
    slow = calibrated_runs(tiny_loaded, SMALL, COSTS, workload)
    assert _token_times(slow) == _token_times(quiet_runs)  # the very same timeline, token for token
    assert [c.held for c in demo_claims(slow, "CPU", QUIET, SCHEDULE.predicted_tail_ratio)] == [c.held for c in claims]
    # a replay that charges measured time instead sees every slowed step: the check above could fail
    uncalibrated = LLMEngine(tiny_loaded, SMALL.engine_config("prefill_first", workload), clock=SimulatedClock())
    outs = replay(uncalibrated, workload)
    assert min(gap for o in outs for gap in o.metrics.itl_s) >= 0.02
    assert min(quiet_runs["prefill_first, calibrated"].decode_itl_s) == pytest.approx(0.010)


def test_where_a_chunk_costs_as_much_as_the_prompt_the_claim_turns(tiny_loaded):
    schedule = SMALL.schedule(FIXED_COSTS)
    assert schedule.predicted_tail_ratio < 2
    runs = calibrated_runs(tiny_loaded, SMALL, FIXED_COSTS, schedule.workload)
    claims = demo_claims(runs, "NVIDIA H100", QUIET, schedule.predicted_tail_ratio)
    assert "less than 2x" in claims[0].statement and claims[0].held, claims[0].line()
    assert all(c.held for c in claims), [c.line() for c in claims]


def test_every_long_prompt_arrives_while_the_decodes_run(quiet_runs):
    for run in quiet_runs.values():
        last_decode_token_s = min(o.timeline.token_times_s[-1] for o in run.decodes)
        assert all(o.timeline.arrival_s < last_decode_token_s for o in run.longs)
        assert [len(o.token_ids) for o in run.decodes] == [SCHEDULE.decode_output_len] * SMALL.scenario.num_decodes


class _WideRow:
    """A wall-clock row at its widest: a very busy host's latencies (ITL 99 s, TTFT 15 min), a GPU's throughput."""

    clock = WALL

    def row(self) -> list[str]:
        return ["disagg 1P1D", WALL, "99999", "99999", "99999", "999.9", "99999", "9999.9", "99.99"]


def test_table_fits_80_columns_without_a_terminal(quiet_runs):
    runs = {**quiet_runs, "wide": _WideRow()}
    out = io.StringIO()
    Console(file=out, width=80).print(demo_table(runs, "2 steady decodes while 2 prompts of 128 tokens arrive"))
    text = out.getvalue()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    for run in runs.values():
        for cell in run.row():
            assert cell in text
    assert "p99 ms" in text and "max ms" in text and "GB/s" in text and CALIBRATED in text


def test_figure_panels_have_their_own_time_axes_and_true_legend_colours(quiet_runs):
    runs = list(quiet_runs.values())
    short_end_s = runs[0].decodes[0].timeline.token_times_s[-1] / 4
    panels = [(r.key, [o.timeline for o in r.decodes], [o.timeline for o in r.longs], 0.0) for r in runs]
    panels.append(("a quarter as long", [_truncated(o.timeline, short_end_s) for o in runs[0].decodes], [], 0.0))
    fig = itl_timeline_figure(panels, share_latency=True)
    axes = fig.axes
    ends = [ax.get_xlim()[1] for ax in axes]
    assert not axes[0].get_shared_x_axes().joined(axes[0], axes[2])
    assert ends[2] < ends[0] / 2  # the short run fills its own panel's width
    for ax, run in zip(axes, runs):
        last_s = max(o.timeline.token_times_s[-1] for o in run.decodes + run.longs)
        assert last_s <= ax.get_xlim()[1] <= 1.05 * last_s
    for ax in axes:
        legend = {t.get_text(): h for t, h in zip(ax.get_legend().get_texts(), ax.get_legend().legend_handles)}
        want = mcolors.to_rgba(legend["decode requests"].get_color())
        assert all(mcolors.to_rgba(line.get_color()) == want for line in ax.get_lines() if line.get_linestyle() == "-")
        assert want == mcolors.to_rgba(DECODE_COLOR)


def _truncated(timeline, end_s):
    import dataclasses

    return dataclasses.replace(timeline, token_times_s=[t for t in timeline.token_times_s if t <= end_s])


def test_demo_runs_calibrated_wall_and_disaggregated(tmp_path):
    settings = DemoSettings(Scenario(num_decodes=2, decode_prompt_len=8, num_long=2, long_prompt_len=96, long_output_len=2,
                                     token_budget=32), long_every_steps=6, calibration_repeats=1)
    console = Console(record=True, width=80, file=io.StringIO())
    report = run_demo(model="tiny", device="cpu", out_dir=tmp_path, settings=settings, console=console)
    assert list(report.runs) == ["prefill_first, calibrated", "chunked, calibrated", "prefill_first, wall",
                                 "chunked, wall", "disagg 1P1D, wall"]
    for run in report.runs.values():
        assert len({len(o.token_ids) for o in run.decodes}) == 1 and len(run.decodes) == 2
        assert [len(o.token_ids) for o in run.longs] == [2, 2]
    assert all(o.metrics.kv_transfer_bytes > 0 and o.metrics.kv_send_s > 0
               for o in report.runs["disagg 1P1D, wall"].decodes)
    text = console.export_text()
    assert "p99 ms" in text and "GB/s" in text and "pinned to one core" in text and "…" not in text
    assert text.count("CLAIM ") == len(report.claims) == 5
    assert f"load {report.load_before.load_1min:.1f}" in text
    png = tmp_path / "minidisagg-demo-itl.png"
    assert png.exists() and png.stat().st_size > 10_000


def test_the_decodes_outlast_every_arrival_even_without_a_stall():
    decode_s = COSTS.decode_cost_s(SMALL.scenario.num_decodes, SMALL.scenario.decode_prompt_len)
    last_arrival_s = max(r.arrival_s for r in SCHEDULE.workload)
    assert SCHEDULE.decode_output_len * decode_s >= last_arrival_s + SCHEDULE.period_s / 2 - 1e-9


def test_wall_runs_are_retimed_to_the_measured_decode_step():
    rng = random.Random()
    speedup = rng.uniform(1.1, 3.0)
    faster = retimed(SCHEDULE.workload, 0.010 / speedup, 0.010)
    assert [r.arrival_s for r in faster] == pytest.approx([r.arrival_s / speedup for r in SCHEDULE.workload])
    assert [(r.prompt_len, r.output_len) for r in faster] == [(r.prompt_len, r.output_len) for r in SCHEDULE.workload]
    clamped = retimed(SCHEDULE.workload, 1.0, 0.010)  # a first call 100x slower moves nothing more than 4x
    assert [r.arrival_s for r in clamped] == pytest.approx([4 * r.arrival_s for r in SCHEDULE.workload])


def _failed(out, error):
    return dataclasses.replace(out, metrics=None, finish_reason="error", error=error)


def test_failed_requests_are_counted_apart_and_never_crash_the_report(quiet_runs):
    rng = random.Random()
    runs = {key: dataclasses.replace(run) for key, run in quiet_runs.items()}
    key = rng.choice(list(runs))
    run = runs[key]
    lost = rng.randrange(len(run.decodes))
    reason = f"decode worker d{rng.randrange(9)} died: connection reset"
    run.decodes = [_failed(o, reason) if i == lost else o for i, o in enumerate(run.decodes)]
    run.longs = [_failed(run.longs[0], "no result within request_timeout_s=5"), *run.longs[1:]]
    assert run.num_failed == 2 and run.failures == {reason: 1, "no result within request_timeout_s=5": 1}
    finished = quiet_runs[key]
    assert len(run.decode_itl_s) == len(finished.decode_itl_s) - len(finished.decodes[lost].metrics.itl_s)
    out = io.StringIO()
    Console(file=out, width=80).print(demo_table(runs, "with failures"))
    assert f"{run.label}* " in out.getvalue() and "…" not in out.getvalue(), out.getvalue()
    from minidisagg.demo_report import failure_notes

    (note,) = failure_notes(runs)
    assert note.startswith(f"* {key}: 2 of {len(run.decodes) + len(run.longs)} requests failed") and reason in note
    claims = demo_claims(runs, "cpu", QUIET, SCHEDULE.predicted_tail_ratio)
    assert len(claims) == 3
    # every request failed: NaN latencies, "-" cells, still a row
    run.decodes = [_failed(o, reason) for o in run.decodes]
    run.longs = [_failed(o, reason) for o in run.longs]
    assert run.row()[2:6] == ["-", "-", "-", "-"]
    demo_claims(runs, "cpu", QUIET, SCHEDULE.predicted_tail_ratio)


def test_a_warm_up_without_gaps_keeps_the_calibrated_arrivals():
    import math

    same = retimed(SCHEDULE.workload, math.nan, 0.010)
    assert [r.arrival_s for r in same] == [r.arrival_s for r in SCHEDULE.workload]
