"""The serving-path costs read from a GPU validation result: medians, held-out fits, errors, and applying them."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest

from minidisagg.engine.step_cost import StepCostModel
from minidisagg.sim import FleetSpec, LinkSpec
from minidisagg.sim.serving import (REQUIRED, VALUES, apply_serving_costs, fit_decode_terms, load_serving_costs,
                                    read_serving_fits)

RESULTS = Path(__file__).parent.parent / "benchmarks" / "results"


def _fits(rng: random.Random, card: str, stems: list[str]) -> dict[str, dict]:
    """One fit per stem, each made on the card's other stems, with random values."""
    return {s: {**{k: rng.uniform(1e-4, 1e-2) for k in VALUES}, "fitted_on": [o for o in stems if o != s]}
            for s in stems}


def _write(path: Path, fits: dict) -> Path:
    path.write_text(json.dumps({"benchmark": "sim_gpu_validation", "commit_fit": {"decode_commit_s": 0.001,
                                                                                  "serving_fits": fits}}))
    return path


def test_the_median_of_a_cards_fits_and_the_held_out_fit_come_back(tmp_path):
    rng = random.Random()
    h100 = [f"disagg-h100-2026-0{i}-01" for i in range(1, 5)]
    fits = {**_fits(rng, "h100", h100), **_fits(rng, "h200", ["disagg-h200-2026-02-01", "disagg-h200-2026-02-02"])}
    _write(tmp_path / "sim-validation-gpu-2026-03-01.json", fits)
    got = load_serving_costs("H100", tmp_path)
    for k in VALUES:
        assert getattr(got, k) == pytest.approx(statistics.median(fits[s][k] for s in h100))
    assert got.card == "h100" and got.num_fits == 4 and got.source.name == "sim-validation-gpu-2026-03-01.json"
    assert set(got.fitted_on) == set(h100)
    held = load_serving_costs("h100", tmp_path, exclude=f"{h100[2]}.json")
    assert {k: getattr(held, k) for k in VALUES} == {k: fits[h100[2]][k] for k in VALUES}
    assert held.num_fits == 1 and h100[2] not in held.fitted_on and h100[2] not in held.describe().split(" in ")[0]
    # a sweep no fit saw: every fit qualifies
    assert load_serving_costs("h100", tmp_path, exclude="disagg-h100-2027-01-01").num_fits == 4
    # the newest file (date, then tag) wins; one without serving fits is passed over
    newer = _fits(rng, "h100", h100[:2])
    _write(tmp_path / "sim-validation-gpu-2026-03-01b.json", newer)
    (tmp_path / "sim-validation-gpu-2026-04-01.json").write_text(json.dumps({"commit_fit": {"decode_commit_s": 0.0}}))
    got = load_serving_costs("h100", tmp_path)
    assert got.source.name.endswith("01b.json")
    assert got.submit_s == pytest.approx(statistics.median(newer[s]["submit_s"] for s in h100[:2]))
    assert load_serving_costs("h200", tmp_path).source.name == "sim-validation-gpu-2026-03-01.json"


def test_a_missing_card_file_or_value_and_a_corrupt_file_are_refused_with_a_reason(tmp_path):
    with pytest.raises(ValueError, match="no sim-validation-gpu"):
        load_serving_costs("h100", tmp_path)
    stems = ["disagg-h100-2026-01-01", "disagg-h100-2026-01-02"]
    fits = _fits(random.Random(), "h100", stems)
    path = _write(tmp_path / "sim-validation-gpu-2026-01-03.json", fits)
    with pytest.raises(ValueError, match=r"card 'a100' .*fits for: h100"):
        load_serving_costs("a100", tmp_path)
    only = {stems[0]: {**fits[stems[0]], "fitted_on": stems}}
    _write(path, only)
    with pytest.raises(ValueError, match="none can predict it held out"):
        load_serving_costs("h100", tmp_path, exclude=stems[1])
    _write(path, {stems[0]: {k: v for k, v in fits[stems[0]].items() if k != "control_rtt_s"}})
    with pytest.raises(ValueError, match="lacks a value >= 0 for control_rtt_s"):
        load_serving_costs("h100", tmp_path)
    path.write_text('{"commit_fit": {"serving_fits": {')
    with pytest.raises(ValueError, match="cannot read a GPU validation result"):
        load_serving_costs("h100", tmp_path)
    path.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="no 'commit_fit'"):
        read_serving_fits(path)


def test_applying_serving_costs_sets_the_four_mechanisms_and_nothing_else(tmp_path):
    rng = random.Random()
    stems = ["disagg-h200-2026-01-01", "disagg-h200-2026-01-02"]
    _write(tmp_path / "sim-validation-gpu-2026-01-03.json", _fits(rng, "h200", stems))
    serving = load_serving_costs("h200", tmp_path)
    fleet = FleetSpec(3, 2, link=LinkSpec("nic", rng.uniform(10, 400)), kv_bytes_per_token=rng.choice([32768, 131072]))
    costs = StepCostModel(0.02, 1e-5, 1e-9, (1, 64), (0.005, 0.009), decode_context_s=rng.uniform(1e-8, 1e-7))
    new_fleet, new_costs = apply_serving_costs(serving, fleet, costs)
    assert new_costs.decode_context_s == costs.decode_context_s * (1 + serving.decode_context_extra)
    assert serving.decode_context_extra > 0 and new_costs.decode_context_s > costs.decode_context_s
    assert (new_fleet.submit_s, new_fleet.link.control_rtt_s) == (serving.submit_s, serving.control_rtt_s)
    assert (new_costs.decode_commit_s, new_costs.decode_per_seq_s) == (serving.decode_commit_s, serving.decode_per_seq_s)
    assert (new_fleet.num_decode, new_fleet.num_prefill, new_fleet.link.bandwidth_GBps, new_fleet.kv_bytes_per_token) == \
        (3, 2, fleet.link.bandwidth_GBps, fleet.kv_bytes_per_token)
    assert (new_costs.prefill_fixed_s, new_costs.decode_s) == (costs.prefill_fixed_s, costs.decode_s)
    assert fleet.submit_s == 0.0 and costs.decode_commit_s == 0.0  # the inputs are not changed


def test_a_file_without_the_decode_context_extra_loads_it_as_zero_and_a_negative_one_is_refused(tmp_path):
    rng = random.Random()
    stems = ["disagg-h100-2026-01-01", "disagg-h100-2026-01-02", "disagg-h100-2026-01-03"]
    old = {s: {k: v for k, v in f.items() if k in REQUIRED or k == "fitted_on"} for s, f in _fits(rng, "h100", stems).items()}
    path = _write(tmp_path / "sim-validation-gpu-2026-01-04.json", old)
    got = load_serving_costs("h100", tmp_path)
    assert got.decode_context_extra == 0.0 and "context" not in got.describe()
    assert got.decode_per_seq_s == pytest.approx(statistics.median(f["decode_per_seq_s"] for f in old.values()))
    costs = StepCostModel(0.02, 1e-5, 1e-9, (1, 64), (0.005, 0.009), decode_context_s=4e-8)
    assert apply_serving_costs(got, FleetSpec(1, 1), costs)[1].decode_context_s == 4e-8
    _write(path, {**old, stems[0]: {**old[stems[0]], "decode_context_extra": -0.5}})
    with pytest.raises(ValueError, match="lacks a value >= 0 for decode_context_extra"):
        load_serving_costs("h100", tmp_path)
    _write(path, {s: {**f, "decode_context_extra": 0.25 * i} for i, (s, f) in enumerate(old.items())})
    got = load_serving_costs("h100", tmp_path)
    assert got.decode_context_extra == 0.25 and "decode context cost +25%" in got.describe()


def test_the_decode_terms_fit_recovers_exact_points_and_keeps_both_terms_non_negative():
    rng = random.Random()
    per_seq, extra = rng.uniform(2e-5, 2e-4), rng.uniform(0.1, 2.0)
    points = []
    for _ in range(rng.randint(3, 12)):
        b, c = rng.uniform(1, 30), rng.uniform(1e-5, 3e-3)
        points.append((b, c, per_seq * b + extra * c))
    got = fit_decode_terms(points)
    assert got == pytest.approx((per_seq, extra), rel=1e-6)
    # by hand: unconstrained a + e = 0 and a = 1 give e = -1; a alone: (0 + 1) / 2 = 0.5 (error 0.5 < 1 for e alone)
    assert fit_decode_terms([(1.0, 1.0, 0.0), (1.0, 0.0, 1.0)]) == (0.5, 0.0)
    # residuals all below zero: nothing fits better than no extra cost
    assert fit_decode_terms([(2.0, 1e-3, -1e-4), (5.0, 2e-3, -3e-4)]) == (0.0, 0.0)
    # the per-sequence term alone would go negative: the context term alone, by hand 2 / 1 = 2
    assert fit_decode_terms([(1.0, 1.0, 2.0), (1.0, 0.0, -1.0)]) == (0.0, 2.0)
    with pytest.raises(ValueError, match="no .*points"):
        fit_decode_terms([])


def test_the_committed_validation_has_serving_costs_for_h100_and_h200():
    for card in ("h100", "h200"):
        serving = load_serving_costs(card, RESULTS)
        assert serving.num_fits >= 2 and all(f.startswith(f"disagg-{card}-") for f in serving.fitted_on)
        assert 0 < serving.submit_s < 0.1 and 0 < serving.control_rtt_s < 0.1 and 0 < serving.decode_per_seq_s < 1e-2
        assert 0 <= serving.decode_context_extra < 5  # the decode KV read: at most a few times the rows' roofline
        data = json.loads(serving.source.read_text())["commit_fit"]["serving_fits"]
        mine = [f for stem, f in data.items() if stem.startswith(f"disagg-{card}-")]
        assert serving.control_rtt_s == pytest.approx(statistics.median(f["control_rtt_s"] for f in mine))
