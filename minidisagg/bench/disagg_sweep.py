"""Workloads, SLOs and the rate sweep of ``minidisagg bench disagg`` (see ``bench.disagg``).

One point = a Poisson workload at one rate replayed on a running deployment (anything with
the engine's steppable surface: ``ReplicaCluster`` or ``DisaggCluster``), every request
greedy with EOS ignored, and every request recorded: unfinished ones at the deadline count
as SLO misses. Each point stores every request's (TTFT, TPOT), so attainment can be
recomputed later for any other SLO (they are written to the result's per-request file,
``disagg_result.split_requests``, not to the summary that is committed).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from minidisagg.engine.replay import SYNTHETIC_TOKEN_RANGE
from minidisagg.engine.sampling import SamplingParams
from minidisagg.metrics import SLO, RequestMetrics, count_failures, failure_note, failure_reason, goodput, percentile
from minidisagg.workload import LengthDist, LogNormal, TimedRequest, poisson_workload

STOP_BELOW_ATTAINMENT = 0.5  # a sweep stops at the first rate whose attainment falls below this
GOODPUT_TARGET = 0.9  # the attainment that goodput is read at
MIN_BRACKET_RATIO = 1.15  # a passing and a failing rate closer than this are not split further
LOWEST_RATE_DIVISOR = 4  # refinement goes at most this far below the lowest grid rate
ASSUMED_DECODE_BATCH = 16  # for the rough capacity estimate that places the rate grid


@dataclass(frozen=True)
class WorkloadSpec:
    """A named pair of prompt and output length distributions."""

    name: str
    prompt_len: LengthDist
    output_len: LengthDist
    mean_prompt: int
    mean_output: int


def workloads(smoke: bool) -> list[WorkloadSpec]:
    """chat (prompts ~1k, outputs ~250) and summarization (prompts ~4k, outputs ~100); tiny ones in smoke mode."""
    if smoke:
        return [WorkloadSpec("chat", LogNormal(48, 0.3, 8, 96), LogNormal(8, 0.3, 2, 16), 48, 8),
                WorkloadSpec("summarization", LogNormal(160, 0.2, 64, 256), LogNormal(4, 0.3, 2, 8), 160, 4)]
    return [WorkloadSpec("chat", LogNormal(1024, 0.5, 64, 3072), LogNormal(250, 0.5, 16, 1024), 1024, 250),
            WorkloadSpec("summarization", LogNormal(4096, 0.25, 1024, 7168), LogNormal(100, 0.5, 16, 400), 4096, 100)]


@dataclass(frozen=True)
class Calibration:
    """Unloaded latencies of one colocated replica: TTFT of a mean prompt, TPOT of a lone request."""

    ttft_s: float
    tpot_s: float


def choose_slo(cal: Calibration, ttft_scale: float, tpot_scale: float) -> SLO:
    """SLO as multiples of the unloaded latencies (DistServe's "SLO scale")."""
    return SLO(ttft_s=ttft_scale * cal.ttft_s, tpot_s=tpot_scale * cal.tpot_s)


def rate_grid(cal: Calibration, spec: WorkloadSpec, num_gpus: int, multipliers: Sequence[float]) -> list[float]:
    """Rates around a rough capacity estimate: each GPU prefills, and decodes ``ASSUMED_DECODE_BATCH`` at a time."""
    per_request_s = cal.ttft_s + spec.mean_output * cal.tpot_s / ASSUMED_DECODE_BATCH
    capacity_rps = num_gpus / per_request_s
    return [float(f"{m * capacity_rps:.3g}") for m in multipliers]


def run_requests(engine: Any, requests: Sequence[TimedRequest], deadline_s: float, seed: int) -> dict[str, Any]:
    """Replay ``requests`` (arrivals relative to now) and wait for all until ``deadline_s`` after the last arrival."""
    rng = np.random.default_rng(seed)
    low, high = SYNTHETIC_TOKEN_RANGE
    high = min(high, engine.model_config.vocab_size)
    prompts = [rng.integers(low, high, size=r.prompt_len).tolist() for r in requests]  # before the clock starts
    start_s = engine.clock.now() + 0.1 + 0.002 * len(requests)  # every request is queued before it arrives
    ids = [engine.add_request({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=r.output_len,
                                                                          ignore_eos=True),
                              arrival_time=start_s + r.arrival_s) for prompt, r in zip(prompts, requests)]
    done: dict[str, Any] = {}
    wall_deadline = time.monotonic() + (start_s + requests[-1].arrival_s - engine.clock.now()) + deadline_s
    while len(done) < len(ids) and engine.has_unfinished() and time.monotonic() < wall_deadline:
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    unfinished = [rid for rid in ids if rid not in done]
    for rid in unfinished:
        engine.abort(rid)
    outs = [done.get(rid) for rid in ids]
    return {"outputs": outs, "start_s": start_s, "num_unfinished": len(unfinished)}


def _median(values: list[float]) -> Optional[float]:
    return float(np.median(values)) if values else None


def summarize_point(rate_rps: float, outs: list[Any], slo: SLO, start_s: float) -> dict[str, Any]:
    """Attainment, latency percentiles, the TTFT breakdown and KV figures of one point.

    Latencies cover the finished requests; the others (failed, aborted, unfinished at the deadline: a
    None in ``outs``) are counted in ``num_failed``, with ``failures`` mapping each reason to a count.
    """
    metrics: list[Optional[RequestMetrics]] = [o.metrics if failure_reason(o) is None else None for o in outs]
    good = [m for m in metrics if m is not None]
    met = sum(1 for m in good if slo.met_by(m))
    itl = [g for m in good for g in m.itl_s]
    point: dict[str, Any] = {
        "rate_rps": rate_rps, "num_requests": len(outs), "num_finished": len(good),
        "num_failed": len(outs) - len(good), "failures": count_failures(outs),  # failed requests count as misses
        "attainment": met / len(outs) if outs else 0.0,
        "requests_ttft_tpot_s": [[m.ttft_s, m.tpot_s] if m else None for m in metrics],
    }
    for name, values in (("ttft", [m.ttft_s for m in good]), ("itl", itl),
                         ("tpot", [m.tpot_s for m in good if m.num_output_tokens > 1])):
        point[f"{name}_p50_s"] = percentile(values, 50) if values else None
        point[f"{name}_p99_s"] = percentile(values, 99) if values else None
    point["breakdown_median_s"] = breakdown([o for o, m in zip(outs, metrics) if m is not None])
    kv = [m.kv_transfer_bytes for m in good if m.kv_transfer_bytes]
    point["kv_bytes_per_request_median"] = _median([float(b) for b in kv])
    ratios = [(o.timeline.transfer_end_s - o.timeline.transfer_start_s) / m.ttft_s
              for o, m in zip(outs, metrics) if m is not None and m.transfer_s is not None and m.ttft_s > 0]
    point["transfer_over_ttft_median"] = _median(ratios)
    return point


def breakdown(outs: list[Any]) -> dict[str, Optional[float]]:
    """Median TTFT parts: queue (arrival -> prefill start), prefill, transfer (prefill end -> first token on
    the decode side), and decode queue (first token -> first decode step, disaggregated only)."""
    parts: dict[str, list[float]] = {"queue_s": [], "prefill_s": [], "transfer_s": [], "decode_queue_s": []}
    for o in outs:
        tl = o.timeline
        if tl.prefill_start_s is None or tl.prefill_end_s is None or not tl.token_times_s:
            continue
        parts["queue_s"].append(tl.prefill_start_s - tl.arrival_s)
        parts["prefill_s"].append(tl.prefill_end_s - tl.prefill_start_s)
        parts["transfer_s"].append(max(0.0, tl.token_times_s[0] - tl.prefill_end_s))
        parts["decode_queue_s"].append(max(0.0, tl.decode_start_s - tl.token_times_s[0]) if tl.decode_start_s else 0.0)
    return {k: _median(v) for k, v in parts.items()}


def timeline_records(outs: list[Any], start_s: float, limit: int, assignment: Optional[dict[str, int]] = None
                     ) -> list[dict[str, Any]]:
    """Timelines (relative to ``start_s``) of finished requests, for the ITL timeline plot."""
    records = []
    for o in outs:
        if o is None or o.metrics is None or len(records) >= limit:
            continue
        tl = o.timeline
        rel = lambda t: None if t is None else t - start_s  # noqa: E731
        records.append({"arrival_s": rel(tl.arrival_s), "prefill_start_s": rel(tl.prefill_start_s),
                        "prefill_end_s": rel(tl.prefill_end_s), "token_times_s": [t - start_s for t in tl.token_times_s],
                        "replica": (assignment or {}).get(o.request_id)})
    return records


def refinement_rate(points: Sequence[dict[str, Any]], floor_rps: float, target: float = GOODPUT_TARGET,
                    min_bracket_ratio: float = MIN_BRACKET_RATIO) -> Optional[float]:
    """The next rate to measure to pin down where attainment crosses ``target``, or None if none is worth it.

    Goodput is read where attainment crosses ``target`` (``metrics.goodput``), and on a grid that
    doubles from its lowest rate one coarse step can decide a comparison. So after the grid:

    - if even the lowest measured rate misses ``target``: half of it, down to ``floor_rps``
      (a set-up that meets its SLOs only at lower load gets a goodput instead of 0);
    - if a passing rate r_p and the first failing rate above it r_f are further apart than
      ``min_bracket_ratio``: their geometric mean (bisection on a log scale; the crossing is
      then interpolated inside a narrower bracket);
    - if every measured rate passes: None (the grid already ended at its top).
    """
    ordered = sorted(points, key=lambda p: p["rate_rps"])
    if not ordered:
        return None
    last_pass: Optional[float] = None
    for point in ordered:
        if point["attainment"] >= target:
            last_pass = point["rate_rps"]
            continue
        if last_pass is None:
            lower = float(f"{point['rate_rps'] / 2:.3g}")
            return lower if lower >= floor_rps else None
        if point["rate_rps"] / last_pass <= min_bracket_ratio:
            return None
        middle = float(f"{math.sqrt(last_pass * point['rate_rps']):.3g}")
        return middle if last_pass < middle < point["rate_rps"] else None
    return None


def point_goodput(points: list[dict[str, Any]], target: float = GOODPUT_TARGET) -> float:
    """``metrics.goodput`` over a sweep's measured points."""
    if not points:
        return 0.0
    return goodput([p["rate_rps"] for p in points], [p["attainment"] for p in points], target)


@dataclass
class Sweep:
    """A rate sweep of one configuration on one workload, trimmed by time allowance and attainment."""

    config: str
    workload: WorkloadSpec
    slo: SLO
    rates_rps: list[float]
    window_s: float
    min_requests: int
    max_requests: int
    drain_s: float  # deadline after the last arrival; requests unfinished by then count as misses
    expected_tail_s: float  # what a request takes unloaded (for planning against the time allowance)
    seed: int = 0
    refine_points: int = 0  # extra rates measured after the grid, chosen by ``refinement_rate``

    def requests_at(self, rate_rps: float) -> list[TimedRequest]:
        """The workload at one rate (same seed per rate, so every configuration sees the same requests)."""
        n = int(min(self.max_requests, max(self.min_requests, round(rate_rps * self.window_s))))
        return poisson_workload(rate_rps, n, self.workload.prompt_len, self.workload.output_len,
                                seed=self.seed + int(rate_rps * 1000))

    def run(self, engine: Any, allowance_s: float, fixed_rate_rps: Optional[float] = None,
            timeline_limit: int = 0, assignment: Optional[Callable[[], dict[str, int]]] = None,
            log: Callable[[str], None] = print) -> dict[str, Any]:
        """Measure rates upwards until attainment collapses, the grid ends or the allowance would be overrun;
        then up to ``refine_points`` rates chosen by ``refinement_rate``, as the allowance permits.

        The returned points are sorted by rate; refinement points carry ``"refinement": True``.
        """
        t0 = time.monotonic()
        points: list[dict[str, Any]] = []
        timelines: list[dict[str, Any]] = []
        skipped: list[float] = []

        def fits(requests: list[TimedRequest]) -> bool:
            estimate_s = requests[-1].arrival_s + 2 * self.expected_tail_s
            return not points or time.monotonic() - t0 + estimate_s <= allowance_s

        def measure(rate: float, requests: list[TimedRequest]) -> tuple[dict[str, Any], bool]:
            """One point; the flag says the deployment hit the deadline (and was let settle)."""
            nonlocal timelines
            run = run_requests(engine, requests, self.drain_s, self.seed)
            point = summarize_point(rate, run["outputs"], self.slo, run["start_s"])
            points.append(point)
            log(f"  {self.config:>28} {self.workload.name:>13} {rate:7.3g} rps: attainment {point['attainment']:.2f} "
                f"({point['num_finished']}/{point['num_requests']} finished)"
                + (f"; {failure_note(point['num_requests'], point['failures'])}" if point.get("failures") else ""))
            if fixed_rate_rps is not None and math.isclose(rate, fixed_rate_rps) and timeline_limit:
                timelines = timeline_records(run["outputs"], run["start_s"], timeline_limit,
                                             assignment() if assignment else None)
            if run["num_unfinished"]:  # aborted requests may still hold the deployment: let it settle
                point["deadline_hit"] = True
                wait_idle = getattr(engine, "wait_idle", None)
                point["settled"] = wait_idle(self.drain_s) if wait_idle else time.sleep(min(self.drain_s, 10.0))
                return point, True
            return point, False

        for rate in self.rates_rps:
            requests = self.requests_at(rate)
            if not fits(requests):
                skipped = [r for r in self.rates_rps if r >= rate]
                break
            point, deadline_hit = measure(rate, requests)
            if deadline_hit or point["attainment"] < STOP_BELOW_ATTAINMENT:
                skipped = [r for r in self.rates_rps if r > rate]
                break
        floor_rps = min(self.rates_rps) / LOWEST_RATE_DIVISOR
        for _ in range(self.refine_points):
            rate = refinement_rate(points, floor_rps)
            if rate is None or any(math.isclose(rate, p["rate_rps"]) for p in points):
                break
            requests = self.requests_at(rate)
            if not fits(requests):
                break
            measure(rate, requests)[0]["refinement"] = True
        points.sort(key=lambda p: p["rate_rps"])
        return {"config": self.config, "workload": self.workload.name, "points": points, "skipped_rates_rps": skipped,
                "goodput_rps": point_goodput(points), "timelines": timelines, "elapsed_s": time.monotonic() - t0,
                "slo": {"ttft_s": self.slo.ttft_s, "tpot_s": self.slo.tpot_s}}


def calibrate(engine: Any, spec: WorkloadSpec, seed: int, repeats: int = 3, output_len: int = 32) -> Calibration:
    """Unloaded TTFT of a mean-length prompt and TPOT of a lone request, one request at a time (medians)."""
    ttft, tpot = [], []
    for i in range(repeats):
        run = run_requests(engine, [TimedRequest(0.0, spec.mean_prompt, min(output_len, 4 * spec.mean_output))],
                           120.0, seed + i)
        out = run["outputs"][0]
        if out is None or out.metrics is None:
            raise RuntimeError(f"calibration request failed: {getattr(out, 'error', 'no output before the deadline')}")
        ttft.append(out.metrics.ttft_s)
        tpot.append(out.metrics.tpot_s)
    return Calibration(float(np.median(ttft)), float(np.median(tpot)))


def attainment_of(point: dict[str, Any], slo: SLO) -> float:
    """Recompute a point's attainment for another SLO from its per-request (TTFT, TPOT).

    A point read from a committed summary lacks them: ``disagg_result.join_requests`` puts them back
    from the per-request file.
    """
    pairs = point["requests_ttft_tpot_s"]
    return sum(1 for p in pairs if p is not None and p[0] <= slo.ttft_s and p[1] <= slo.tpot_s) / len(pairs)

