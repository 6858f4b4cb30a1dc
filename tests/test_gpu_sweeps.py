"""Lab 6's reading of the two-GPU sweeps, and the calibration its replays charge."""

from __future__ import annotations

import json

import pytest

from minidisagg.course import gpu_sweeps as gs
from minidisagg.course import placement_lab as pl


def sweep(config: str, goodput: float, points: list[tuple[float, float]]) -> dict:
    """One configuration's sweep as ``bench disagg`` writes it (only the fields lab 6 reads)."""
    return {"config": config, "workload": "chat", "goodput_per_gpu_rps": goodput,
            "points": [{"rate_rps": r, "attainment": a, "num_requests": 12, "itl_p50_s": 0.005, "itl_p99_s": 0.01,
                        "ttft_p50_s": 0.05} for r, a in points]}


def write_run(path, date: str, colocated: float, overlap: float, no_overlap: float) -> None:
    path.write_text(json.dumps({
        "date": date, "card": "h200", "machine": {"gpus": ["NVIDIA H200", "NVIDIA H200"]}, "settings": {"window_s": 4.0},
        "models": {"llama-8b": {"calibration": {"chat": {"ttft_s": 0.03, "fixed_rate_rps": 4.0}},
                                "kv_probe": {"achieved_GBps": 200.0, "transfer_over_ttft": 0.02},
                                "sweeps": [sweep(gs.COLOCATED, colocated, [(4.0, 0.95), (8.0, 0.4)]),
                                           sweep(gs.OVERLAP, overlap, [(4.0, 0.92), (8.0, 0.3)]),
                                           sweep(gs.NO_OVERLAP, no_overlap, [(4.0, 1.0), (8.0, 0.6)])]}}}))


def test_verdicts_take_the_best_disaggregated_and_form_no_ratio_from_a_zero(tmp_path):
    write_run(tmp_path / "disagg-h200-2026-01-02.json", "2026-01-02T10:00:00", 2.0, 2.5, 3.0)
    write_run(tmp_path / "disagg-h200-2026-01-01-run1.json", "2026-01-01T10:00:00", 0.0, 1.0, 0.5)
    sweeps = gs.load_sweeps(tmp_path)
    assert gs.runs_of(sweeps) == ["disagg-h200-2026-01-01-run1", "disagg-h200-2026-01-02"]  # by recorded date
    first, second = gs.verdicts(sweeps)
    assert first.ratio is None  # colocated met no rate: the crossing is below the grid
    assert second.best_disagg == gs.NO_OVERLAP and second.ratio == pytest.approx(1.5)
    assert gs.best_ratio_per_run([first, second], "llama-8b") == {"disagg-h200-2026-01-02": pytest.approx(1.5)}
    colocated = gs.find(sweeps, second.run, "llama-8b", "chat", gs.COLOCATED)
    assert colocated.point_at(colocated.fixed_rate_rps)["attainment"] == 0.95
    assert colocated.point_at(5.0) is None
    assert gs.kv_probes(tmp_path)[second.run, "llama-8b"]["transfer_over_ttft"] == 0.02


def test_lower_envelope_caps_a_disturbed_smaller_size_and_keeps_the_rest():
    measured = {1: 0.09, 2: 0.17, 4: 0.07, 8: 0.08, 16: 0.13}  # batch 2 was slowed by another program
    assert pl.lower_envelope(measured) == {1: 0.07, 2: 0.07, 4: 0.07, 8: 0.08, 16: 0.13}
    assert pl.lower_envelope({16: 0.1, 32: 0.2}) == {16: 0.1, 32: 0.2}


class FakeStepCosts:
    """What ``PhaseCosts.from_step_costs`` reads of a calibration: costs by shape (batch 2 disturbed by load)."""

    decode_batch_sizes = (1, 2, 4)
    decode_reference_context = 32

    def prefill_cost_s(self, num_tokens: int, context_tokens: int = 0) -> float:
        return 0.005 + 1e-4 * num_tokens + 1e-7 * num_tokens ** 2

    def decode_cost_s(self, batch_size: int, context_tokens_per_seq: int) -> float:
        return {1: 0.004, 2: 0.015, 4: 0.005}[batch_size]


def test_phase_costs_from_a_step_cost_calibration_are_monotone():
    costs = pl.PhaseCosts.from_step_costs(FakeStepCosts(), (16, 64, 256), kv_bytes_per_token=1000, max_batch=8)
    assert costs.decode_per_seq_s >= 0 and costs.decode_step_s(2) < 0.006  # not the disturbed 15 ms
    assert costs.prefill_s(16) < costs.prefill_s(64) < costs.prefill_s(256)
    assert costs.prefill_s(256) == pytest.approx(FakeStepCosts().prefill_cost_s(256), rel=1e-6)


def test_measure_phase_costs_keeps_every_repeat_and_fits_the_fastest():
    from minidisagg.models.registry import load_model

    tiny = load_model("tiny", device="cpu", dtype="float32", random_weights=True)
    costs, points = pl.measure_phase_costs(tiny, (16, 64), (1, 4), max_batch=4, repeats=2)
    calibration = points["calibration"]
    assert all(len(v) == 2 for v in [*calibration.prefill_samples_s.values(), *calibration.decode_samples_s.values()])
    assert points["prefill_s"][16] <= min(calibration.prefill_samples_s[16])
    assert points["decode_step_s"][1] <= points["decode_step_s"][4] == min(calibration.decode_samples_s[4])
    assert calibration.spread >= 0 and "host load" in calibration.describe()
    with pytest.raises(ValueError):
        pl.measure_phase_costs(tiny, (16, 64), (1, 4), repeats=0)
