"""Serving metrics: per-request timelines, latency figures, SLO attainment and goodput.

All times are seconds on the engine clock. The definitions follow the usual serving
benchmarks (vLLM's ``benchmark_serving``, DistServe):

- TTFT (time to first token) = first token time - arrival time.
- ITL (inter-token latency) = each gap between two consecutive output tokens.
- TPOT (time per output token) = (last token time - first token time) / (n_tokens - 1),
  the mean ITL of one request; 0.0 for a request with a single output token.
- E2E (end-to-end latency) = finish time - arrival time.

This module sits at the bottom of the import graph: numpy, the standard library and ``failures`` only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from minidisagg.failures import NO_OUTPUT_TOKEN, count_failures, failure_note, failure_reason

__all__ = [
    "RequestTimeline",
    "RequestMetrics",
    "percentile",
    "SLO",
    "slo_attainment",
    "goodput",
    "Summary",
    "summarize",
    "summarize_outputs",
    "failure_reason",
    "count_failures",
    "failure_note",
]


@dataclass
class RequestTimeline:
    """Timestamps (seconds on the engine clock) of one request's life."""

    arrival_s: float
    scheduled_s: float | None = None  # first time the scheduler picked it
    prefill_start_s: float | None = None
    prefill_end_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)  # token 0 = the first token
    finish_s: float | None = None
    # Disaggregation breakdown, filled only when the KV cache moves between workers.
    transfer_start_s: float | None = None
    transfer_end_s: float | None = None
    decode_start_s: float | None = None
    kv_transfer_bytes: int = 0
    kv_send_s: float = 0.0  # time spent actually sending pages (excludes waiting for layers to be computed)
    kv_ready_s: float | None = None  # the pages were complete on the prefill device (announced transfers)
    kv_landed_s: float | None = None  # ... and in the decode worker's pool
    kv_reused_tokens: int = 0  # prompt tokens whose KV the decode worker's prefix cache held: not sent

    def record_token(self, t_s: float) -> None:
        """Record that one more output token became available at time ``t_s``."""
        if t_s < self.arrival_s:
            raise ValueError(f"token time {t_s} is before the request's arrival {self.arrival_s}")
        if self.token_times_s and t_s < self.token_times_s[-1]:
            raise ValueError(
                f"token times must not decrease: {t_s} after {self.token_times_s[-1]}"
            )
        self.token_times_s.append(float(t_s))


def _span(start: float | None, end: float | None) -> float | None:
    """``end - start`` when both are known, else None."""
    if start is None or end is None:
        return None
    return end - start


@dataclass(frozen=True)
class RequestMetrics:
    """Per-request latency figures derived from a timeline.

    ``queue_s`` is (scheduled time, or prefill start if never recorded) - arrival and
    ``prefill_s`` is prefill end - prefill start; either is NaN when its timestamps were
    not recorded. ``transfer_s`` (transfer end - start) and ``decode_queue_s`` (decode
    start - transfer end) and ``decode_s`` (finish - decode start) are None for a colocated
    request; ``kv_transfer_bytes`` is then 0. ``transfer_s`` is what the hand-off adds after the
    prefill ends (pages still in flight, DONE, adoption); ``kv_move_s`` (pages complete on the
    prefill device -> in the decode pool, both read off device events) is the data path alone,
    the figure to hold against a link's bandwidth. It is known for announced transfers only
    (``transport/dist.py``) and may start before the prefill ends. ``kv_reused_tokens``: prompt
    tokens whose KV the decode worker's prefix cache already held, so their pages never moved.
    """

    ttft_s: float
    tpot_s: float
    itl_s: tuple[float, ...]
    e2e_s: float
    queue_s: float
    prefill_s: float
    num_output_tokens: int
    transfer_s: float | None = None
    decode_queue_s: float | None = None
    decode_s: float | None = None
    kv_transfer_bytes: int = 0
    kv_send_s: float = 0.0
    kv_move_s: float | None = None
    kv_reused_tokens: int = 0

    @property
    def kv_transfer_s(self) -> float | None:
        """Time the request's KV pages took to move (same as ``transfer_s``)."""
        return self.transfer_s

    @classmethod
    def from_timeline(cls, tl: RequestTimeline) -> RequestMetrics:
        """Compute the figures of a finished request; ValueError if it is unfinished or tokenless."""
        times = tl.token_times_s
        if not times:
            raise ValueError("the request produced no output token; its latencies are undefined")
        if tl.finish_s is None:
            raise ValueError("the request has no finish time; record finish_s before computing metrics")
        if times[0] < tl.arrival_s:
            raise ValueError(f"first token time {times[0]} is before arrival {tl.arrival_s}")
        if any(b < a for a, b in zip(times, times[1:])):
            raise ValueError("token_times_s must be non-decreasing")
        if tl.finish_s < times[-1]:
            raise ValueError(f"finish time {tl.finish_s} is before the last token time {times[-1]}")
        n = len(times)
        itl = tuple(b - a for a, b in zip(times, times[1:]))
        queue_from = tl.scheduled_s if tl.scheduled_s is not None else tl.prefill_start_s
        queue = _span(tl.arrival_s, queue_from)
        prefill = _span(tl.prefill_start_s, tl.prefill_end_s)
        return cls(
            ttft_s=times[0] - tl.arrival_s,
            tpot_s=(times[-1] - times[0]) / (n - 1) if n > 1 else 0.0,
            itl_s=itl,
            e2e_s=tl.finish_s - tl.arrival_s,
            queue_s=math.nan if queue is None else queue,
            prefill_s=math.nan if prefill is None else prefill,
            num_output_tokens=n,
            transfer_s=_span(tl.transfer_start_s, tl.transfer_end_s),
            decode_queue_s=_span(tl.transfer_end_s, tl.decode_start_s),
            decode_s=_span(tl.decode_start_s, tl.finish_s),
            kv_transfer_bytes=tl.kv_transfer_bytes,
            kv_send_s=tl.kv_send_s,
            kv_move_s=_span(tl.kv_ready_s, tl.kv_landed_s),
            kv_reused_tokens=tl.kv_reused_tokens,
        )

    def as_dict(self) -> dict[str, float | int | list[float] | None]:
        """The figures as a JSON-friendly dict (``itl_s`` becomes a list)."""
        d = asdict(self)
        d["itl_s"] = list(self.itl_s)
        return d


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (q in [0, 100]) with linear interpolation between order statistics.

    With the values sorted as v[0] <= ... <= v[n-1], the percentile sits at fractional rank
    r = q / 100 * (n - 1) and equals v[floor(r)] + (r - floor(r)) * (v[ceil(r)] - v[floor(r)]).
    This is numpy's default (``method="linear"``).
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if v.size == 0:
        raise ValueError("percentile of an empty sequence is undefined")
    if np.isnan(v).any():
        raise ValueError("percentile input contains NaN")
    rank = q / 100.0 * (v.size - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, v.size - 1)
    frac = rank - lo
    return float(v[lo] + frac * (v[hi] - v[lo]))


@dataclass(frozen=True)
class SLO:
    """A latency service-level objective: a request meets it when TTFT <= ttft_s and TPOT <= tpot_s."""

    ttft_s: float
    tpot_s: float

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"SLO.{name} must be > 0, got {value}")

    def met_by(self, m: RequestMetrics) -> bool:
        """Whether one request meets both latency targets."""
        return m.ttft_s <= self.ttft_s and m.tpot_s <= self.tpot_s


def slo_attainment(metrics: Sequence[RequestMetrics], slo: SLO) -> float:
    """SLO attainment: the fraction of requests (in [0, 1]) that meet ``slo``."""
    if len(metrics) == 0:
        raise ValueError("slo_attainment needs at least one request")
    return sum(slo.met_by(m) for m in metrics) / len(metrics)


def goodput(rates_rps: Sequence[float], attainments: Sequence[float], target: float = 0.9) -> float:
    """Goodput: the highest request rate whose SLO attainment is still >= ``target`` (DistServe).

    The measured points are sorted by rate and walked upwards until the first rate whose
    attainment falls below ``target``; attainment is assumed to fall with load, so a rate
    that passes again after that is treated as noise and ignored.

    - every rate passes: the highest measured rate;
    - the lowest rate already fails: 0.0;
    - otherwise the crossing is interpolated linearly between the last passing point
      (r_p, a_p) and the first failing one (r_f, a_f):
      r_p + (r_f - r_p) * (a_p - target) / (a_p - a_f).
    """
    if len(rates_rps) != len(attainments):
        raise ValueError(
            f"rates_rps and attainments differ in length ({len(rates_rps)} vs {len(attainments)})"
        )
    if len(rates_rps) == 0:
        raise ValueError("goodput needs at least one measured rate")
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target attainment must be in (0, 1], got {target}")
    for r, a in zip(rates_rps, attainments):
        if not r > 0 or not math.isfinite(r):
            raise ValueError(f"request rates must be positive and finite, got {r}")
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"attainments must be in [0, 1], got {a}")
    points = sorted(zip(map(float, rates_rps), map(float, attainments)))
    if len({r for r, _ in points}) != len(points):
        raise ValueError("each request rate may be measured only once")
    last_pass: tuple[float, float] | None = None
    for rate, att in points:
        if att >= target:
            last_pass = (rate, att)
            continue
        if last_pass is None:
            return 0.0
        r_p, a_p = last_pass
        return r_p + (rate - r_p) * (a_p - target) / (a_p - att)
    return points[-1][0]


@dataclass(frozen=True)
class Summary:
    """Aggregate figures of one run (percentiles as defined by ``percentile``).

    Latencies and throughputs cover the ``num_requests`` requests that finished with at least
    one token; the ``num_failed`` others (an error, an abort, a timeout, no output token) are
    counted apart, ``failures`` mapping each reason to how many requests it stopped.
    """

    num_requests: int
    duration_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    itl_p50_s: float
    itl_p99_s: float
    tpot_p50_s: float
    tpot_p99_s: float
    e2e_p50_s: float
    e2e_p99_s: float
    output_tokens_per_s: float
    requests_per_s: float
    num_failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float | int | dict[str, int]]:
        """The figures as a dict (``failures`` stays a reason -> count dict)."""
        return asdict(self)

    def failure_note(self) -> str:
        """``2 of 10 requests failed: <reason> (1), <reason> (1)``, or "" when none did."""
        return failure_note(self.num_requests + self.num_failed, self.failures)


def _p50_p99(values: Sequence[float]) -> tuple[float, float]:
    """Median and 99th percentile, or (NaN, NaN) for no values."""
    if len(values) == 0:
        return math.nan, math.nan
    return percentile(values, 50.0), percentile(values, 99.0)


def summarize(metrics: Sequence[RequestMetrics | None], duration_s: float,
              failures: dict[str, int] | None = None) -> Summary:
    """Aggregate one run's requests, served over ``duration_s`` seconds, into a Summary.

    A None entry is a request that ended without metrics (no output token): it is counted as
    failed, not summarised; ``failures`` adds requests that failed for a known reason (see
    ``summarize_outputs``, which fills it from request outputs). TTFT and E2E percentiles are
    over finished requests. ITL percentiles pool every gap of every request. TPOT percentiles
    are over requests with more than one output token (a single-token request has no
    inter-token time). Latency fields are NaN when no request finished, ITL and TPOT fields
    also when none produced more than one token. Throughputs are the finished requests'
    totals divided by ``duration_s``.
    """
    failed = dict(failures or {})
    finished = [m for m in metrics if m is not None]
    if len(metrics) > len(finished):
        failed[NO_OUTPUT_TOKEN] = failed.get(NO_OUTPUT_TOKEN, 0) + len(metrics) - len(finished)
    if not finished and not failed:
        raise ValueError("summarize needs at least one request")
    if not duration_s > 0 or not math.isfinite(duration_s):
        raise ValueError(f"duration_s must be positive and finite, got {duration_s}")
    ttft = _p50_p99([m.ttft_s for m in finished])
    itl = _p50_p99([gap for m in finished for gap in m.itl_s])
    tpot = _p50_p99([m.tpot_s for m in finished if m.num_output_tokens > 1])
    e2e = _p50_p99([m.e2e_s for m in finished])
    total_tokens = sum(m.num_output_tokens for m in finished)
    return Summary(
        num_requests=len(finished),
        duration_s=float(duration_s),
        ttft_p50_s=ttft[0],
        ttft_p99_s=ttft[1],
        itl_p50_s=itl[0],
        itl_p99_s=itl[1],
        tpot_p50_s=tpot[0],
        tpot_p99_s=tpot[1],
        e2e_p50_s=e2e[0],
        e2e_p99_s=e2e[1],
        output_tokens_per_s=total_tokens / duration_s,
        requests_per_s=len(finished) / duration_s,
        num_failed=sum(failed.values()),
        failures=failed,
    )


def summarize_outputs(outputs: Sequence[object], duration_s: float) -> Summary:
    """``summarize`` over request outputs (``RequestOutput``-shaped, or None for no result): the
    finished ones are summarised, the others counted as failed with their reasons."""
    finished = [getattr(o, "metrics") for o in outputs if failure_reason(o) is None]
    return summarize(finished, duration_s, count_failures(outputs))
