"""Fleet planning on the simulator: the split search, the committed GPU cost tables, the ``sim plan`` command."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from minidisagg.engine.step_cost import StepCostModel
from minidisagg.metrics import SLO
from minidisagg.sim import FleetSpec, InstanceConfig, Trace
from minidisagg.sim.cost_table import GpuTable, costs_from_gpu_table, find_gpu_table
from minidisagg.sim.plan import plan_fleet, plan_splits, rate_grid, search_splits
from minidisagg.workload import Fixed, poisson_workload

RESULTS = Path(__file__).parent.parent / "benchmarks" / "results"
PROMPT, OUTPUT = 64, 11
# A prefill costs 40 ms whatever its size and one prompt fits a step; a decode step costs 1 ms at any batch.
# So a decode GPU keeps up with any number of prefill GPUs (hundreds of requests/s), each prefill GPU carries
# at most 25 requests/s, and a 40 ms prefill in a colocated GPU breaks the 2 ms TPOT of every decode it stalls:
# the best split of n GPUs is (n-1)P1D, and goodput per GPU falls with every prefill GPU taken away.
PREFILL_BOUND = StepCostModel(0.040, 0.0, 0.0, (1, 256), (1e-3, 1e-3))
BASE = FleetSpec(1, instance=InstanceConfig("prefill_first", 256, PROMPT, 8192))
SLO_TIGHT_TPOT = SLO(ttft_s=0.25, tpot_s=0.002)


def _trace_for(seed: int):
    def trace_for(num_gpus: int, rate: float) -> Trace:
        return Trace.of(poisson_workload(rate, 40 * num_gpus, Fixed(PROMPT), Fixed(OUTPUT), seed=seed))
    return trace_for


def test_the_planner_picks_the_known_best_split_of_a_prefill_bound_cost_table():
    seed = random.Random().randrange(1000)
    rates = [2.0, 4.0, 6.0, 9.0, 12.0, 15.0, 18.0, 22.0, 27.0, 33.0, 40.0]
    trace_for = _trace_for(seed)
    ranked = plan_splits(4, BASE, PREFILL_BOUND, lambda r: trace_for(4, r), rates, SLO_TIGHT_TPOT)
    by_label = {r.label: r.goodput_per_gpu_rps for r in ranked}
    assert ranked[0].label == "3P1D", (seed, by_label)
    assert by_label["3P1D"] > by_label["2P2D"] > by_label["1P3D"], (seed, by_label)
    assert by_label["3P1D"] > by_label["colocated x4"], (seed, by_label)
    assert ranked[0].attainments[-1] < 0.9  # the grid reaches past its crossing: goodput is a crossing, not the top rate
    # the sampled search agrees with the exhaustive one, on the same sweeps
    searched = search_splits(4, BASE, PREFILL_BOUND, lambda r: trace_for(4, r), rates, SLO_TIGHT_TPOT)
    assert searched[0].label == "3P1D"


def test_the_sampled_search_finds_the_edge_split_of_a_larger_fleet_and_says_what_it_swept():
    seed = random.Random().randrange(1000)
    seen = []
    plan = plan_fleet([16], BASE, PREFILL_BOUND, _trace_for(seed), [4.0, 8.0, 12.0, 16.0, 18.0, 20.0, 22.0, 24.0, 26.0, 28.0, 31.0, 35.0, 40.0], SLO_TIGHT_TPOT,
                      on_result=lambda n, r, planned: seen.append((n, r.label, planned)))
    results = plan.by_gpus[16]
    assert plan.best(16).label == "15P1D", (seed, [(r.label, r.goodput_per_gpu_rps) for r in results])
    assert plan.best(16, disaggregated=False).label == "colocated x16"
    assert len(results) < 15  # sampled, not every split of 16
    assert [label for _, label, _ in seen] == [r.label for r in sorted(results, key=lambda r: seen.index(
        next(s for s in seen if s[1] == r.label)))]  # each split reported once, as it was swept
    assert all(n == 16 and planned >= i + 1 for i, (n, _, planned) in enumerate(seen))


def test_bad_inputs_to_the_planner_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="num_gpus"):
        search_splits(0, BASE, PREFILL_BOUND, lambda r: None, [1.0], SLO_TIGHT_TPOT)
    with pytest.raises(ValueError, match="positive rate"):
        plan_splits(2, BASE, PREFILL_BOUND, lambda r: None, [], SLO_TIGHT_TPOT)
    with pytest.raises(ValueError, match="gpu_counts"):
        plan_fleet([0, 4], BASE, PREFILL_BOUND, _trace_for(0), [1.0], SLO_TIGHT_TPOT)
    with pytest.raises(ValueError, match="capacity"):
        rate_grid(0.0)
    grid = rate_grid(10.0)
    assert grid == sorted(grid) and grid[0] == 1.0 and 22 < grid[-1] <= 30 and all(b / a < 1.3 for a, b in zip(grid, grid[1:]))


def test_costs_from_the_committed_h100_table_reproduce_its_rows_and_say_tp_is_absent():
    path = find_gpu_table("h100", RESULTS)
    table = GpuTable.load(path)
    rows = {r["name"]: r["value"] for r in json.loads(path.read_text())["rows"]}
    costs = costs_from_gpu_table(table, "llama-8b")
    for n in (512, 2048, 8192):  # the prefill line is fitted to three rows: each within 15%
        assert costs.prefill_cost_s(n) == pytest.approx(rows[f"prefill llama-8b {n}"] / 1e3, rel=0.15)
    for b in (1, 8, 32, 128):  # decode points as measured, at the benchmark's context
        assert costs.decode_cost_s(b, table.decode_context_tokens) == pytest.approx(rows[f"decode llama-8b bs{b}"] / 1e3)
    assert costs.decode_cost_s(32, 4096) > costs.decode_cost_s(32, 152)  # longer contexts read more KV
    assert table.tensor_parallel_degrees("llama-8b") == [1]
    assert "not in the cost table" in table.tp_note("llama-8b")
    with pytest.raises(ValueError, match="llama-70b"):
        costs_from_gpu_table(table, "llama-70b")
    with pytest.raises(ValueError, match="no committed GPU cost table for card 'a100'"):
        find_gpu_table("a100", RESULTS)


def test_a_table_with_tp_rows_offers_those_degrees(tmp_path):
    data = {"card": "test", "read_GBps": 3000.0, "prompt_len": 128, "new_tokens": 48, "rows": [
        {"name": "decode llama-8b bs1", "value": 6.0, "unit": "ms"},
        {"name": "decode llama-8b bs8 tp2", "value": 3.5, "unit": "ms"},
        {"name": "prefill llama-8b 512", "value": 17.0, "unit": "ms"},
        {"name": "prefill llama-8b 2048", "value": 52.0, "unit": "ms"}]}
    path = tmp_path / "gpu-test-2026-01-01.json"
    path.write_text(json.dumps(data))
    table = GpuTable.load(path)
    assert table.tensor_parallel_degrees("llama-8b") == [1, 2]
    assert table.decode_ms["llama-8b"] == {1: 6.0}  # TP rows are not mixed into the TP-1 costs


def test_sim_plan_writes_json_and_both_figures_and_refuses_bad_ranges(tmp_path, capsys):
    from minidisagg.cli import main
    from minidisagg.sim.costs import save_costs

    costs = save_costs(PREFILL_BOUND, tmp_path / "costs.json")
    out = tmp_path / "plan" / "fleet.json"
    assert main(["sim", "plan", "--costs", str(costs), "--gpus", "2..4", "--rates-per-gpu", "2,6,12",
                 "--slo-ttft", "250", "--slo-tpot", "2", "--prompt-mean", "64", "--output-mean", "11",
                 "--requests-per-gpu", "20", "--token-budget", "1024", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "2 GPUs" in text and "4 GPUs" in text and "colocated x4" in text
    data = json.loads(out.read_text())
    assert [s["num_gpus"] for s in data["fleet_sizes"]] == [2, 4]
    assert all(s["splits"] and s["best"] == s["splits"][0]["label"] for s in data["fleet_sizes"])
    assert data["serving_costs"] is None and "no --card" in data["serving_costs_note"]  # a --costs file names no card
    for name in ("fleet-attainment.png", "fleet-splits.png"):
        png = out.with_name(name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert main(["sim", "plan", "--costs", str(costs), "--gpus", "64..8", "--slo-ttft", "1", "--slo-tpot", "1"]) == 2
    assert "A <= B" in capsys.readouterr().out
    assert main(["sim", "plan", "--model", "llama-8b", "--card", "h100", "--tp", "2", "--gpus", "8",
                 "--slo-ttft", "1", "--slo-tpot", "1"]) == 2
    assert "not in the cost table" in capsys.readouterr().out
    assert main(["sim", "plan", "--gpus", "8", "--slo-ttft", "1", "--slo-tpot", "1"]) == 2
    assert "--model and --card" in capsys.readouterr().out


def test_lab6_reads_the_newest_cpu_validation_in_either_schema(tmp_path):
    from minidisagg.course.fleet_lab import latest_validation, optimistic_fraction

    errors = {f: random.uniform(-0.5, 0.5) for f in ("TTFT p50", "ITL p99")}
    old = {"rows": [{"rel_error": errors}], "median_abs_rel_error": {f: abs(e) for f, e in errors.items()}}
    (tmp_path / "sim-validation-cpu-2026-12-07.json").write_text(json.dumps(old))
    assert latest_validation(tmp_path)["median_abs_rel_error"] == old["median_abs_rel_error"]
    held = {"held_out": {"TTFT p50": 0.2, "ITL p99": 0.1}, "fit": {"TTFT p50": 0.05, "ITL p99": 0.05}}
    new = {"rows": [{"error_held_out": {"TTFT p50": -0.2, "ITL p99": 0.1}, "error_fit": errors}],
           "median_abs_rel_error": held}
    (tmp_path / "sim-validation-cpu-2026-12-08.json").write_text(json.dumps(new))
    (tmp_path / "sim-validation-cpu-2026-12-08-run2.json").write_text("{}")  # a session's other runs are not read
    (tmp_path / "sim-validation-gpu-2026-12-09.json").write_text("{}")  # nor the GPU sweeps' comparison
    got = latest_validation(tmp_path)
    assert got["path"].name == "sim-validation-cpu-2026-12-08.json"
    assert got["median_abs_rel_error"] == held["held_out"] and optimistic_fraction(got) == 0.5
    (tmp_path / "sim-validation-cpu-2026-12-09.json").write_text(json.dumps({"rows": [{}], "median_abs_rel_error": held}))
    with pytest.raises(ValueError, match="without 'error_held_out'"):
        latest_validation(tmp_path)


@pytest.mark.filterwarnings("ignore:No artists with labels")  # the stand-in plan has no splits to draw
def test_sim_plan_simulates_the_cards_serving_costs_unless_told_not_to(monkeypatch, capsys, tmp_path):
    import minidisagg.sim.plan as plan_module
    from minidisagg.cli import main
    from minidisagg.sim.plan import FleetPlan
    from minidisagg.sim.serving import load_serving_costs

    seen = []

    def planned(gpu_counts, base, costs, trace_for, rates, slo, target=0.9, **kwargs):
        seen.append((base, costs))
        return FleetPlan({}, tuple(rates), slo, target)

    monkeypatch.setattr(plan_module, "plan_fleet", planned)
    card = "h100"  # the only card with a committed bench gpu table (the serving fits cover h200 too)
    argv = ["sim", "plan", "--model", "llama-8b", "--card", card, "--gpus", "4", "--rates-per-gpu", "1,2",
            "--slo-ttft", "500", "--slo-tpot", "10", "--no-progress"]
    out = tmp_path / "plan.json"
    assert main(argv + ["--out", str(out)]) == 0
    with_text = capsys.readouterr().out
    assert main(argv + ["--no-serving-costs"]) == 0
    without_text = capsys.readouterr().out
    serving = load_serving_costs(card, RESULTS)
    (with_base, with_costs), (without_base, without_costs) = seen
    assert (with_base.submit_s, with_base.link.control_rtt_s) == (serving.submit_s, serving.control_rtt_s) != (0.0, 0.0)
    assert (with_costs.decode_commit_s, with_costs.decode_per_seq_s) == (serving.decode_commit_s, serving.decode_per_seq_s)
    assert (without_base.submit_s, without_base.link.control_rtt_s) == (0.0, 0.0)
    assert (without_costs.decode_commit_s, without_costs.decode_per_seq_s) == (0.0, 0.0)
    assert with_costs.decode_s == without_costs.decode_s and with_base.instance == without_base.instance
    assert f"serving costs ({card}, median of {serving.num_fits} fits in {serving.source.name})" in with_text
    assert "serving costs: none (--no-serving-costs)" in without_text
    data = json.loads(out.read_text())
    assert data["serving_costs"]["source"] == serving.source.name and data["serving_costs"]["submit_s"] == serving.submit_s
