"""Fitting step-cost models to recorded step timings, measured links, and bad calibration files."""

from __future__ import annotations

import json
import random

import pytest

from minidisagg.engine.step_cost import DECODE, PREFILL, StepCostModel, StepShape
from minidisagg.sim.costs import RecordingClock, fit_costs, load_costs, save_costs
from minidisagg.sim.link import links_from_transport_rows


def _prefill(n: int, context: int = 0) -> StepShape:
    return StepShape(PREFILL, 1, n, n * (context + (n + 1) / 2))


def _decode(b: int, context_per_seq: float) -> StepShape:
    return StepShape(DECODE, b, b, b * context_per_seq)


def _synthetic(rng: random.Random, truth: StepCostModel, noise: float, spikes: float) -> list[tuple[StepShape, float]]:
    """Runs whose times are ``truth``'s, times (1 + noise) jitter, with a fraction ``spikes`` of them stalled 5x."""
    shapes = [_prefill(rng.choice([32, 64, 128, 256, 512]), rng.choice([0, 128, 256])) for _ in range(60)]
    shapes += [_decode(rng.randint(1, 6), rng.uniform(32, 600)) for _ in range(400)]
    timings = []
    for shape in shapes:
        t = truth.cost_s(shape) * (1 + rng.uniform(-noise, noise))
        timings.append((shape, 5 * t if rng.random() < spikes else t))
    rng.shuffle(timings)
    return timings


def _truth(rng: random.Random) -> StepCostModel:
    sizes = (1, 2, 3, 4, 5, 6)
    base = rng.uniform(0.02, 0.08)
    return StepCostModel(rng.uniform(0.005, 0.05), rng.uniform(1e-3, 5e-3), rng.uniform(1e-9, 8e-9), sizes,
                         tuple(base * (1 + 0.2 * (b - 1)) * rng.uniform(0.9, 1.1) for b in sizes),
                         decode_context_s=rng.uniform(2e-5, 1e-4), decode_reference_context=32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_recovers_known_coefficients_exactly_without_noise(seed):
    rng = random.Random(seed)
    truth = _truth(rng)
    fitted = fit_costs(_synthetic(rng, truth, 0.0, 0.0), decode_reference_context=32)
    assert fitted.prefill_fixed_s == pytest.approx(truth.prefill_fixed_s, rel=1e-6)
    assert fitted.prefill_per_token_s == pytest.approx(truth.prefill_per_token_s, rel=1e-6)
    assert fitted.prefill_per_pair_s == pytest.approx(truth.prefill_per_pair_s, rel=1e-6)
    assert fitted.decode_context_s == pytest.approx(truth.decode_context_s, rel=1e-6)
    assert fitted.decode_s == pytest.approx(truth.decode_s, rel=1e-6)


@pytest.mark.parametrize("seed", [3, 4])
def test_fit_is_robust_to_noise_and_load_spikes(seed):
    rng = random.Random(seed)
    truth = _truth(rng)
    fitted = fit_costs(_synthetic(rng, truth, 0.05, 0.1), decode_reference_context=32)
    for shape in (_prefill(512), _prefill(128, 384), _decode(1, 32), _decode(4, 300), _decode(6, 500)):
        assert fitted.cost_s(shape) == pytest.approx(truth.cost_s(shape), rel=0.08), shape
    # a least-squares mean would be pulled up by the 5x stalls; the medians are not
    spiky = fit_costs(_synthetic(rng, truth, 0.0, 0.3), decode_reference_context=32)
    assert spiky.decode_cost_s(4, 32) == pytest.approx(truth.decode_cost_s(4, 32), rel=0.05)  # a mean: +120%


def test_fit_needs_both_phases_and_sane_times():
    rng = random.Random(5)
    timings = _synthetic(rng, _truth(rng), 0.0, 0.0)
    with pytest.raises(ValueError, match="no decode steps"):
        fit_costs([t for t in timings if t[0].phase == PREFILL])
    with pytest.raises(ValueError, match="no prefill steps"):
        fit_costs([t for t in timings if t[0].phase == DECODE])
    with pytest.raises(ValueError, match="positive and finite"):
        fit_costs(timings + [(_decode(2, 40), -1.0)])
    with pytest.raises(ValueError, match="StepShape"):
        fit_costs(timings + [((2, 40), 0.1)])


def test_recording_clock_counts_host_time_between_runs_but_not_waits():
    clock = RecordingClock()
    clock.wait_until(clock.now() + 0.05)  # idle: not a run's overhead
    clock.charge(_decode(1, 32), 0.001)
    busy_until = clock.now() + 0.03
    while clock.now() < busy_until:  # host work between two runs
        pass
    clock.charge(_decode(1, 33), 0.002)
    (_, first), (_, second) = clock.timings
    assert first < 0.02  # the sleep before it is not counted
    assert 0.03 <= second < 0.2
    bare = RecordingClock(host_overhead=False)
    bare.charge(_decode(1, 32), 0.004)
    assert bare.timings[0][1] == 0.004


def test_load_costs_round_trip_and_clear_errors(tmp_path):
    rng = random.Random(6)
    truth = _truth(rng)
    path = save_costs(truth, tmp_path / "costs.json", model="x")
    assert load_costs(path) == truth
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON.*minidisagg sim calibrate"):
        load_costs(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="no such step-cost file"):
        load_costs(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="no 'step_costs' object"):
        load_costs(tmp_path / "other.json")
    data = json.loads(path.read_text())
    data["step_costs"]["decode_s"] = [0.01, -0.02, 0.03, 0.04, 0.05, 0.06]
    (tmp_path / "negative.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="decode times must be > 0"):
        load_costs(tmp_path / "negative.json")
    data["step_costs"] = {"prefill_fixed_s": 0.1, "speed": 3}
    (tmp_path / "unknown.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unknown field"):
        load_costs(tmp_path / "unknown.json")


def test_links_from_rows_recover_latency_and_bandwidth():
    rng = random.Random(7)
    gbps, latency_s = rng.uniform(0.5, 4.0), rng.uniform(1e-5, 1e-3)
    rows = []
    for size in (65536, 1 << 20, 16 << 20):
        seconds = latency_s + size / (gbps * 1e9)
        rows.append({"transport": "socket", "message_bytes": size, "GBps": size / seconds / 1e9,
                     "GBps_best": 2 * size / seconds / 1e9})
    median = links_from_transport_rows(rows, gbps_key="GBps")["socket"]
    assert median.bandwidth_GBps == pytest.approx(gbps, rel=1e-6)
    assert median.latency_s == pytest.approx(latency_s, rel=1e-6)
    assert links_from_transport_rows(rows)["socket"].bandwidth_GBps == pytest.approx(2 * gbps, rel=1e-6)
    with pytest.raises(ValueError, match="no rows with transport"):
        links_from_transport_rows([{"transport": "socket"}])


def test_costs_from_gpu_rows_reads_prefill_decode_and_bandwidth(tmp_path):
    from minidisagg.sim.costs import costs_from_gpu_rows

    rng = random.Random(8)
    fixed, per_token, per_pair = rng.uniform(1e-3, 8e-3), rng.uniform(5e-6, 3e-5), rng.uniform(5e-10, 3e-9)
    rows = [{"name": f"prefill llama-8b {n}", "value": 1e3 * (fixed + per_token * n + per_pair * n * (n + 1) / 2),
             "unit": "ms"} for n in (512, 2048, 8192)]
    decode = {1: rng.uniform(5, 7), 8: 7.5, 32: 8.0}
    rows += [{"name": f"decode llama-8b bs{b}", "value": ms, "unit": "ms"} for b, ms in decode.items()]
    rows += [{"name": "decode llama-8b bs1 eager", "value": 99.0, "unit": "ms"},  # not a CUDA-graph step
             {"name": "prefill llama-1b 512", "value": 1.0, "unit": "ms"}]  # another model
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"card": "test card", "read_GBps": 2500.0, "prompt_len": 128, "new_tokens": 48,
                                "rows": rows}))
    costs = costs_from_gpu_rows(path, "llama-8b", 131072)
    assert costs.prefill_fixed_s == pytest.approx(fixed, rel=1e-6)
    assert costs.prefill_per_token_s == pytest.approx(per_token, rel=1e-6)
    assert costs.prefill_per_pair_s == pytest.approx(per_pair, rel=1e-6)
    assert costs.decode_batch_sizes == (1, 8, 32)
    assert costs.decode_s == pytest.approx(tuple(ms / 1e3 for ms in decode.values()))
    assert costs.decode_reference_context == 152
    assert costs.decode_context_s == pytest.approx(131072 / 2500e9)
    with pytest.raises(ValueError, match="'prefill llama-1b N' rows"):
        costs_from_gpu_rows(path, "llama-1b", 32768)


@pytest.mark.parametrize("seed", [5, 6])
def test_a_calibration_point_keeps_the_median_or_the_fastest_of_its_runs(seed):
    from minidisagg.engine.calibrate import kept_s

    rng = random.Random(seed)
    times = [rng.uniform(1e-3, 1e-2) for _ in range(rng.choice([3, 4, 5]))]
    ordered = sorted(times)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    assert kept_s(times, "median") == pytest.approx(median) and kept_s(times) == ordered[0]
    with pytest.raises(ValueError, match="keep must be one of"):
        kept_s(times, "mean")


def test_sim_calibrate_keeps_the_median_as_fit_costs_does(monkeypatch):
    import minidisagg.engine.calibrate as calibrate
    import minidisagg.models.registry as registry
    from minidisagg.sim.costs import calibrate_costs

    asked = {}
    monkeypatch.setattr(registry, "load_model", lambda *a, **k: "loaded")
    monkeypatch.setattr(calibrate, "calibrate_step_costs", lambda loaded, plan, progress, keep: asked.update(keep=keep))
    calibrate_costs("tiny", repeats=3)
    assert asked == {"keep": "median"}


def test_the_validation_report_counts_crossings_and_signs_by_hand(tmp_path):
    from minidisagg.sim.validation_report import KEYS, SERVING, errors, signs, write

    rng = random.Random()
    scale = rng.uniform(0.5, 2.0)  # goodputs scaled alike: the relative errors and the signs do not change

    def sweep(config: str, measured: float, simulated: float, att: tuple[float, float]) -> dict:
        model = {"attainment": [att[0] + 0.05, att[1] - 0.1], "goodput_rps": simulated * scale,
                 "ttft_p50_s": [0.1, 0.2], "tpot_p50_s": [0.01, 0.02], "mean_decode_batch": [1.0, 2.0]}
        return {"config": config, "workload": "chat", "rates_rps": [1.0, 2.0], "measured": list(att),
                "measured_goodput_rps": measured * scale, "sweep_file": "disagg-h100-2026-01-01.json", "card": "h100",
                "model": "llama-8b", "rows_file": "gpu-h100-2026-01-01.json",
                "anchor_scales": {"prefill_scale": 1.0, "decode_scale": 1.0, "decode_commit_s": 0.0},
                "measured_breakdown_median_s": [None, None], "measured_ttft_p50_s": [0.1, 0.2],
                "measured_tpot_p50_s": [0.01, 0.02], **{k: dict(model) for k in KEYS}}
    results = [sweep("colocated-prefill_first", 4.0, 5.0, (1.0, 0.5)),  # +25%: outside the goal
               sweep("disagg-overlap", 6.0, 6.6, (1.0, 0.8)),  # +10%: inside
               sweep("disagg-no-overlap", 0.0, 1.0, (0.5, 0.2))]  # never reached 0.9: not compared
    e = errors(results, SERVING)
    assert e["crossings_compared"] == 2 and e["crossings_within_goal"] == 1 and e["sweeps_without_measured_crossing"] == 1
    assert e["crossing_median_abs_rel_error"] == pytest.approx((0.25 + 0.1) / 2)
    assert e["attainment_mean_abs_error"] == pytest.approx((0.05 + 0.1) * 3 / 6)
    (row,) = signs(results, SERVING)
    assert row["measured_disagg_minus_colocated_per_gpu_rps"] == pytest.approx((6.0 - 4.0) * scale / 2)
    assert row["simulated_disagg_minus_colocated_per_gpu_rps"] == pytest.approx((6.6 - 5.0) * scale / 2)
    assert row["decided"] and row["sign_agrees"] and not row["within_run_spread"]  # gap 2 > 25% of the best, 6
    fits = {"disagg-h100-2026-01-01": {"decode_commit_s": 1e-3, "submit_s": 2e-3, "control_rtt_s": 5e-3,
                                       "decode_per_seq_s": 5e-5, "decode_context_extra": 0.5, "fitted_on": ["x"]}}
    md = write(results, str(tmp_path), {"decode_commit_s": 1e-3, "residuals_s": {}, "serving_fits": fits}, "fitted so", "z")
    data = json.loads(md.with_suffix(".json").read_text())
    assert data["summary"][SERVING]["crossings_within_goal"] == 1 and md.name.endswith("z.md")
    assert "| 50.0 | +50% |" in md.read_text() and "fitted so" in md.read_text()
