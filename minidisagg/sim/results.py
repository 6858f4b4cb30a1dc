"""What a simulation takes in (a trace of requests) and gives back (per-request latencies in the engine's terms).

A ``SimResult`` holds, per request, the figures ``metrics.RequestMetrics`` defines (TTFT, TPOT, E2E,
number of output tokens) as arrays, computed with the same arithmetic as ``RequestMetrics.from_timeline``.
With ``keep_timelines`` every request also keeps its full ``RequestTimeline`` (every token's time), so
``metrics`` gives ``RequestMetrics`` and ITL percentiles pool every gap as ``metrics.summarize`` does;
without it a ``CompactTimeline`` keeps only the first and last token times, which is what a million
requests can afford.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from minidisagg.metrics import SLO, RequestMetrics, RequestTimeline, percentile, summarize, Summary
from minidisagg.workload import TimedRequest


@dataclass(frozen=True)
class Trace:
    """Requests as arrays: arrival seconds (non-decreasing), prompt and output tokens."""

    arrival_s: np.ndarray
    prompt_len: np.ndarray
    output_len: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        if len(self.prompt_len) != n or len(self.output_len) != n:
            raise ValueError("Trace: arrival_s, prompt_len and output_len must have one entry per request")
        if n and (np.any(np.diff(self.arrival_s) < 0) or not np.all(np.isfinite(self.arrival_s)) or self.arrival_s[0] < 0):
            raise ValueError("Trace: arrival times must be finite, >= 0 and non-decreasing (sort the requests)")
        if n and (self.prompt_len.min() < 1 or self.output_len.min() < 1):
            raise ValueError("Trace: every request needs prompt_len >= 1 and output_len >= 1")

    def __len__(self) -> int:
        """Number of requests."""
        return len(self.arrival_s)

    @classmethod
    def of(cls, workload: Sequence[TimedRequest]) -> "Trace":
        """The trace of a ``workload.py`` workload (stably sorted by arrival)."""
        reqs = sorted(workload, key=lambda r: r.arrival_s)
        return cls(np.array([r.arrival_s for r in reqs], dtype=np.float64),
                   np.array([r.prompt_len for r in reqs], dtype=np.int64),
                   np.array([r.output_len for r in reqs], dtype=np.int64))


class CompactTimeline(RequestTimeline):
    """A ``RequestTimeline`` that keeps only its first and last token times and their count."""

    def __init__(self, arrival_s: float) -> None:
        super().__init__(arrival_s)
        self.first_token_s = math.nan
        self.last_token_s = math.nan
        self.num_tokens = 0

    def record_token(self, t_s: float) -> None:
        """Count one more token at ``t_s``."""
        if self.num_tokens == 0:
            if t_s < self.arrival_s:
                raise ValueError(f"token time {t_s} is before the request's arrival {self.arrival_s}")
            self.first_token_s = t_s
        elif t_s < self.last_token_s:
            raise ValueError(f"token times must not decrease: {t_s} after {self.last_token_s}")
        self.last_token_s = t_s
        self.num_tokens += 1

    def clear_tokens(self) -> None:
        """Forget the tokens counted so far."""
        self.first_token_s = self.last_token_s = math.nan
        self.num_tokens = 0

    def record_tokens(self, times_s: list[float]) -> None:
        """Count tokens at increasing ``times_s``, all after the last one."""
        if times_s:
            if self.num_tokens == 0:
                self.first_token_s = times_s[0]
            self.last_token_s = times_s[-1]
            self.num_tokens += len(times_s)


@dataclass
class SimResult:
    """Per-request figures of one simulation, in trace order, and the run's counters."""

    arrival_s: np.ndarray
    ttft_s: np.ndarray
    tpot_s: np.ndarray
    e2e_s: np.ndarray
    num_output_tokens: np.ndarray
    instance: np.ndarray  # where it finished
    timelines: Optional[list[Optional[RequestTimeline]]] = None
    num_events: int = 0
    instances: list[Any] = field(default_factory=list)

    @classmethod
    def empty(cls, trace: Trace, keep_timelines: bool) -> "SimResult":
        """Room for every request of ``trace``."""
        n = len(trace)
        nan = lambda: np.full(n, np.nan)  # noqa: E731
        return cls(trace.arrival_s.astype(np.float64), nan(), nan(), nan(), np.zeros(n, np.int64),
                   np.full(n, -1, np.int64), [None] * n if keep_timelines else None)

    def record(self, i: int, seq: Any, instance: int) -> None:
        """Take a finished request's figures from its timeline, with ``RequestMetrics.from_timeline``'s arithmetic."""
        tl = seq.timeline
        if isinstance(tl, CompactTimeline):
            first, last, n = tl.first_token_s, tl.last_token_s, tl.num_tokens
        else:
            first, last, n = tl.token_times_s[0], tl.token_times_s[-1], len(tl.token_times_s)
        if self.num_output_tokens[i]:
            raise RuntimeError(f"request {i} finished twice")
        self.ttft_s[i] = first - tl.arrival_s
        self.tpot_s[i] = (last - first) / (n - 1) if n > 1 else 0.0
        self.e2e_s[i] = tl.finish_s - tl.arrival_s
        self.num_output_tokens[i] = n
        self.instance[i] = instance

    def check_complete(self) -> None:
        """Every request finished exactly once, with at least one token."""
        missing = np.flatnonzero(self.num_output_tokens == 0)
        if missing.size:
            raise RuntimeError(f"{missing.size} requests never finished (first: {missing[:5].tolist()}); "
                               f"the fleet stalled, e.g. a prompt that no pool can hold")

    def metrics(self) -> list[RequestMetrics]:
        """``RequestMetrics`` of every request (needs ``keep_timelines``)."""
        if self.timelines is None:
            raise ValueError("metrics() needs the full timelines: simulate with keep_timelines=True")
        return [RequestMetrics.from_timeline(tl) for tl in self.timelines]

    def summary(self) -> Summary:
        """``metrics.summarize`` of the run (ITL percentiles only with ``keep_timelines``)."""
        duration = float(np.nanmax(self.arrival_s + self.e2e_s) - self.arrival_s.min()) if len(self.arrival_s) else 0.0
        if self.timelines is not None:
            return summarize(self.metrics(), max(duration, 1e-12))
        raise ValueError("summary() pools every inter-token gap: simulate with keep_timelines=True, "
                         "or use ttft/tpot percentiles and attainment()")

    def attainment(self, slo: SLO) -> float:
        """Fraction of requests meeting ``slo`` (TTFT and TPOT), as ``metrics.slo_attainment``."""
        return float(np.mean((self.ttft_s <= slo.ttft_s) & (self.tpot_s <= slo.tpot_s)))

    def percentile(self, name: str, q: float) -> float:
        """``metrics.percentile`` of a per-request figure (``ttft_s``, ``tpot_s``, ``e2e_s``)."""
        return percentile(getattr(self, name), q)
