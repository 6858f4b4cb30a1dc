"""Tests for minidisagg.metrics: per-request figures, percentiles, SLOs, goodput, summaries."""

from __future__ import annotations

import math
import random
import secrets
from dataclasses import dataclass

import numpy as np
import pytest

from minidisagg.metrics import (
    SLO,
    RequestMetrics,
    RequestTimeline,
    goodput,
    percentile,
    count_failures,
    failure_reason,
    slo_attainment,
    summarize,
    summarize_outputs,
)


def timeline(arrival: float, tokens: list[float], finish: float | None = None, **kw: float) -> RequestTimeline:
    """A finished timeline with the given token times (finish defaults to the last token)."""
    tl = RequestTimeline(arrival_s=arrival, **kw)
    for t in tokens:
        tl.record_token(t)
    tl.finish_s = finish if finish is not None else (tokens[-1] if tokens else None)
    return tl


def metrics(ttft: float, tpot: float, n: int = 3) -> RequestMetrics:
    """A RequestMetrics with the given TTFT and TPOT (evenly spaced tokens after arrival 0)."""
    tokens = [ttft + i * tpot for i in range(n)]
    return RequestMetrics.from_timeline(timeline(0.0, tokens))


def test_known_timeline() -> None:
    tl = timeline(0.0, [1.0, 1.5, 2.5], finish=2.6, scheduled_s=0.2, prefill_start_s=0.3, prefill_end_s=0.9)
    m = RequestMetrics.from_timeline(tl)
    assert m.ttft_s == pytest.approx(1.0)
    assert m.itl_s == pytest.approx((0.5, 1.0))
    assert m.tpot_s == pytest.approx(0.75)
    assert m.e2e_s == pytest.approx(2.6)
    assert m.queue_s == pytest.approx(0.2)
    assert m.prefill_s == pytest.approx(0.6)
    assert m.num_output_tokens == 3
    assert m.transfer_s is None and m.decode_queue_s is None


def test_offset_arrival_and_disagg_breakdown() -> None:
    tl = timeline(
        10.0, [11.0, 11.25], finish=11.5, prefill_start_s=10.5, prefill_end_s=10.75,
        transfer_start_s=10.75, transfer_end_s=10.875, decode_start_s=11.0,
    )
    m = RequestMetrics.from_timeline(tl)
    assert m.ttft_s == pytest.approx(1.0)
    assert m.queue_s == pytest.approx(0.5)  # falls back to prefill start
    assert m.transfer_s == pytest.approx(0.125)
    assert m.decode_queue_s == pytest.approx(0.125)
    assert m.e2e_s == pytest.approx(1.5)


def test_single_token_and_missing_stamps() -> None:
    m = RequestMetrics.from_timeline(timeline(0.0, [0.4]))
    assert m.tpot_s == 0.0 and m.itl_s == () and m.num_output_tokens == 1
    assert math.isnan(m.queue_s) and math.isnan(m.prefill_s)


def test_as_dict() -> None:
    d = metrics(1.0, 0.5).as_dict()
    assert d["itl_s"] == [0.5, 0.5]
    assert d["num_output_tokens"] == 3 and d["transfer_s"] is None
    assert set(d) == {
        "ttft_s", "tpot_s", "itl_s", "e2e_s", "queue_s", "prefill_s",
        "num_output_tokens", "transfer_s", "decode_queue_s", "decode_s", "kv_transfer_bytes", "kv_send_s", "kv_move_s",
        "kv_reused_tokens",
    }
    assert d["kv_move_s"] is None


def test_kv_move_spans_ready_to_landed_even_before_the_prefill_ends() -> None:
    """The data path is timed from the pages being complete to their landing, apart from the hand-off."""
    tl = RequestTimeline(arrival_s=0.0, prefill_start_s=0.1, prefill_end_s=0.5, transfer_start_s=0.5,
                         transfer_end_s=0.9, kv_ready_s=0.45, kv_landed_s=0.7, finish_s=2.0)
    tl.record_token(0.9)
    tl.record_token(1.0)
    m = RequestMetrics.from_timeline(tl)
    assert m.kv_move_s == pytest.approx(0.25) and m.transfer_s == pytest.approx(0.4)


def test_timeline_errors() -> None:
    with pytest.raises(ValueError, match="no output token"):
        RequestMetrics.from_timeline(RequestTimeline(arrival_s=0.0, finish_s=1.0))
    tl = RequestTimeline(arrival_s=0.0)
    tl.record_token(1.0)
    with pytest.raises(ValueError, match="finish"):
        RequestMetrics.from_timeline(tl)
    with pytest.raises(ValueError, match="decrease"):
        tl.record_token(0.5)
    with pytest.raises(ValueError, match="before"):
        RequestTimeline(arrival_s=2.0).record_token(1.0)
    tl.finish_s = 0.9
    with pytest.raises(ValueError, match="finish time"):
        RequestMetrics.from_timeline(tl)


def test_percentile_matches_numpy() -> None:
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    for _ in range(50):
        values = rng.standard_normal(int(rng.integers(1, 200))) * 10
        for q in [0.0, 100.0, 50.0, 99.0, *rng.uniform(0, 100, size=5)]:
            got = percentile(values.tolist(), float(q))
            want = float(np.percentile(values, q))
            assert got == pytest.approx(want, rel=1e-12, abs=1e-12), f"seed={seed} n={values.size} q={q}"


def test_percentile_errors() -> None:
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    for q in (-0.1, 100.5):
        with pytest.raises(ValueError, match=r"\[0, 100\]"):
            percentile([1.0], q)
    with pytest.raises(ValueError, match="NaN"):
        percentile([1.0, math.nan], 50)


def test_slo_attainment_mixture() -> None:
    slo = SLO(ttft_s=1.0, tpot_s=0.1)
    ms = [
        metrics(0.5, 0.05),  # meets both
        metrics(1.0, 0.1),  # exactly on both bounds: meets
        metrics(1.5, 0.05),  # TTFT too slow
        metrics(0.5, 0.2),  # TPOT too slow
        metrics(0.2, 0.5, n=1),  # one token: TPOT 0.0, meets
    ]
    assert [slo.met_by(m) for m in ms] == [True, True, False, False, True]
    assert slo_attainment(ms, slo) == pytest.approx(0.6)
    assert slo_attainment(ms[:2], slo) == 1.0
    assert slo_attainment(ms[2:4], slo) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        slo_attainment([], slo)
    with pytest.raises(ValueError, match="tpot_s"):
        SLO(ttft_s=1.0, tpot_s=0.0)


@pytest.mark.parametrize(
    "rates, atts, want",
    [
        ([1.0, 2.0, 4.0], [1.0, 0.95, 0.92], 4.0),  # all pass: the highest rate
        ([1.0, 2.0], [0.5, 0.2], 0.0),  # none passes
        ([1.0, 2.0, 3.0], [1.0, 1.0, 0.8], 2.5),  # crossing halfway between 2 and 3
        ([2.0, 1.0, 3.0], [1.0, 0.95, 0.8], 2.5),  # unsorted input
        ([1.0, 2.0, 3.0], [0.95, 0.5, 0.95], 1.0 + 0.05 / 0.45),  # late recovery ignored
        ([1.0, 2.0], [0.9, 0.7], 1.0),  # exactly on target passes
        ([3.0], [0.95], 3.0),
    ],
)
def test_goodput(rates: list[float], atts: list[float], want: float) -> None:
    assert goodput(rates, atts, target=0.9) == pytest.approx(want)


def test_goodput_target_and_errors() -> None:
    assert goodput([1.0, 2.0], [1.0, 0.0], target=0.5) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="length"):
        goodput([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        goodput([], [])
    with pytest.raises(ValueError, match="target"):
        goodput([1.0], [1.0], target=0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        goodput([1.0], [1.5])
    with pytest.raises(ValueError, match="positive"):
        goodput([-1.0], [1.0])
    with pytest.raises(ValueError, match="only once"):
        goodput([1.0, 1.0], [1.0, 0.5])


def test_summarize() -> None:
    ms = [
        RequestMetrics.from_timeline(timeline(0.0, [1.0, 1.5, 2.5], finish=3.0)),
        RequestMetrics.from_timeline(timeline(1.0, [3.0, 3.25])),
        RequestMetrics.from_timeline(timeline(2.0, [2.5])),
    ]
    s = summarize(ms, duration_s=4.0)
    itl = [0.5, 1.0, 0.25]
    assert s.num_requests == 3 and s.duration_s == 4.0
    assert s.ttft_p50_s == pytest.approx(np.percentile([1.0, 2.0, 0.5], 50))
    assert s.ttft_p99_s == pytest.approx(np.percentile([1.0, 2.0, 0.5], 99))
    assert s.itl_p50_s == pytest.approx(np.percentile(itl, 50))
    assert s.itl_p99_s == pytest.approx(np.percentile(itl, 99))
    assert s.tpot_p50_s == pytest.approx(np.percentile([0.75, 0.25], 50))  # one-token request left out
    assert s.tpot_p99_s == pytest.approx(np.percentile([0.75, 0.25], 99))
    assert s.e2e_p50_s == pytest.approx(np.percentile([3.0, 2.25, 0.5], 50))
    assert s.e2e_p99_s == pytest.approx(np.percentile([3.0, 2.25, 0.5], 99))
    assert s.output_tokens_per_s == pytest.approx(6 / 4.0)
    assert s.requests_per_s == pytest.approx(3 / 4.0)
    d = s.as_dict()
    assert d["num_requests"] == 3 and len(d) == 14
    assert s.num_failed == 0 and s.failures == {} and s.failure_note() == ""


def test_summarize_single_tokens_and_errors() -> None:
    s = summarize([metrics(0.5, 0.0, n=1), metrics(0.7, 0.0, n=1)], duration_s=1.0)
    for name in ("itl_p50_s", "itl_p99_s", "tpot_p50_s", "tpot_p99_s"):
        assert math.isnan(getattr(s, name))
    assert s.ttft_p50_s == pytest.approx(0.6)
    with pytest.raises(ValueError, match="at least one"):
        summarize([], 1.0)
    with pytest.raises(ValueError, match="duration_s"):
        summarize([metrics(0.5, 0.1)], 0.0)


@dataclass
class FakeOutput:
    """The fields of ``RequestOutput`` that the failure accounting reads."""

    metrics: RequestMetrics | None
    finished: bool = True
    finish_reason: str | None = "length"
    error: str | None = None


def test_summarize_counts_failed_requests_apart() -> None:
    rng = random.Random(secrets.randbelow(1 << 30))
    good = [metrics(rng.uniform(0.1, 2.0), rng.uniform(0.01, 0.2), n=rng.randint(1, 6)) for _ in range(rng.randint(1, 8))]
    bad = [None, FakeOutput(None, finish_reason="error", error="decode worker d0 died"),
           FakeOutput(None, finish_reason="error", error="no result within request_timeout_s=5"),
           FakeOutput(None, finish_reason="abort"), FakeOutput(None, finished=False), FakeOutput(None)]
    bad = rng.sample(bad, rng.randint(1, len(bad)))
    outputs = [FakeOutput(m) for m in good] + bad
    rng.shuffle(outputs)
    duration = rng.uniform(1.0, 10.0)
    s = summarize_outputs(outputs, duration)
    want = summarize(good, duration)
    for name in ("ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s", "e2e_p50_s", "e2e_p99_s",
                 "output_tokens_per_s", "requests_per_s"):
        a, b = getattr(s, name), getattr(want, name)
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b), name
    assert s.num_requests == len(good) and s.num_failed == len(bad) == sum(s.failures.values())
    assert s.failures == count_failures(bad)
    note = s.failure_note()
    assert note.startswith(f"{len(bad)} of {len(outputs)} request")
    for reason in s.failures:
        assert reason in note
    assert all(failure_reason(o) is None for o in outputs if o not in bad)
    d = s.as_dict()
    assert d["num_failed"] == len(bad) and d["failures"] == s.failures


def test_summarize_metrics_with_gaps_and_only_failures() -> None:
    s = summarize([metrics(0.5, 0.1), None, None], 2.0)  # a request that ended without metrics
    assert s.num_requests == 1 and s.num_failed == 2 and sum(s.failures.values()) == 2
    only = summarize_outputs([None, FakeOutput(None, finish_reason="error", error="boom")], 1.0)
    assert only.num_requests == 0 and only.num_failed == 2 and only.failures == {
        "no result before the deadline": 1, "boom": 1}
    assert math.isnan(only.ttft_p50_s) and only.requests_per_s == 0.0
    with pytest.raises(ValueError, match="at least one"):
        summarize_outputs([], 1.0)
