"""Planning a fleet with the simulator: for a GPU count, which split (colocated, or x prefill + y decode) serves
the most requests per second per GPU within an SLO.

For each candidate split the simulator sweeps request rates (``rates_per_gpu`` x GPUs, the same per-GPU load
for every split) and measures SLO attainment at each; goodput is the highest rate whose attainment stays at or
above the target (``metrics.goodput``, DistServe's definition), divided by the GPUs for goodput per GPU.

``plan_splits`` tries every split of one GPU count. ``search_splits`` samples them for large fleets: a coarse
grid of prefill shares (every split up to ``exhaustive_up_to`` GPUs), then halving steps around the best one
down to a resolution of ``resolution`` x GPUs, which assumes goodput per GPU rises and then falls with the
prefill share (too few prefill GPUs: TTFT misses; too few decode GPUs: TPOT misses). ``plan_fleet`` runs
that search over fleet sizes, each starting around the previous size's best share.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

from minidisagg.engine.step_cost import StepCostModel
from minidisagg.metrics import SLO, goodput
from minidisagg.sim.fleet import FleetSpec, simulate
from minidisagg.sim.results import Trace

TraceAtRate = Callable[[float], Trace]  # a workload's trace at a request rate (requests/s)
TraceFor = Callable[[int, float], Trace]  # a workload's trace for a fleet of N GPUs at a request rate
OnResult = Callable[[int, "SplitResult", int], None]  # (GPUs, a split just swept, splits planned so far)


@dataclass(frozen=True)
class SplitResult:
    """One candidate deployment's sweep: attainment at each rate, goodput, and goodput per GPU."""

    num_prefill: int
    num_decode: int
    rates_rps: tuple[float, ...]
    attainments: tuple[float, ...]
    goodput_rps: float

    @property
    def num_gpus(self) -> int:
        """GPUs the split uses (one instance per GPU)."""
        return self.num_prefill + self.num_decode

    @property
    def goodput_per_gpu_rps(self) -> float:
        """Goodput divided by the GPUs."""
        return self.goodput_rps / self.num_gpus

    @property
    def prefill_share(self) -> float:
        """Fraction of the GPUs that prefill (0 for colocated)."""
        return self.num_prefill / self.num_gpus

    @property
    def label(self) -> str:
        """``colocated x8`` or ``3P5D``."""
        return f"colocated x{self.num_decode}" if self.num_prefill == 0 else f"{self.num_prefill}P{self.num_decode}D"


def _ranked(results: Sequence[SplitResult]) -> list[SplitResult]:
    """Best goodput per GPU first; ties go to fewer prefill GPUs."""
    return sorted(results, key=lambda r: (-r.goodput_per_gpu_rps, r.num_prefill))


def sweep_split(base: FleetSpec, num_prefill: int, num_decode: int, costs: StepCostModel, trace_at: TraceAtRate,
                rates_rps: Sequence[float], slo: SLO, target: float = 0.9,
                prefill_costs: Optional[StepCostModel] = None, stop_after_miss: bool = False) -> SplitResult:
    """Simulate ``base`` as ``num_prefill``P``num_decode``D (0 prefill: colocated) at every rate.

    ``stop_after_miss``: stop at the first rate below ``target`` (goodput ignores every rate after it).
    """
    spec = replace(base, num_prefill=num_prefill, num_decode=num_decode)
    swept, attainments = [], []
    for rate in rates_rps:
        attainments.append(simulate(spec, costs, trace_at(rate), prefill_costs=prefill_costs).attainment(slo))
        swept.append(rate)
        if stop_after_miss and attainments[-1] < target:
            break
    return SplitResult(num_prefill, num_decode, tuple(swept), tuple(attainments), goodput(swept, attainments, target))


def _check_rates(num_gpus: int, rates_per_gpu_rps: Sequence[float]) -> list[float]:
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
    if not rates_per_gpu_rps or min(rates_per_gpu_rps) <= 0:
        raise ValueError("rates_per_gpu_rps needs at least one positive rate")
    return [r * num_gpus for r in sorted(rates_per_gpu_rps)]


def plan_splits(num_gpus: int, base: FleetSpec, costs: StepCostModel, trace_at: TraceAtRate,
                rates_per_gpu_rps: Sequence[float], slo: SLO, target: float = 0.9, colocated: bool = True,
                prefill_costs: Optional[StepCostModel] = None) -> list[SplitResult]:
    """Every split of ``num_gpus`` (colocated, 1P..(n-1)P), best goodput per GPU first (ties: fewer prefill)."""
    rates = _check_rates(num_gpus, rates_per_gpu_rps)
    splits = ([(0, num_gpus)] if colocated else []) + [(p, num_gpus - p) for p in range(1, num_gpus)]
    return _ranked([sweep_split(base, p, d, costs, trace_at, rates, slo, target, prefill_costs) for p, d in splits])


def initial_prefill_counts(num_gpus: int, exhaustive_up_to: int = 8, around_share: Optional[float] = None) -> list[int]:
    """The prefill counts tried first: all of 1..n-1 for small fleets, else shares k/8 (or 5 around a hint)."""
    if num_gpus < 2:
        return []
    if num_gpus <= exhaustive_up_to:
        return list(range(1, num_gpus))
    shares = ([around_share + d / 8 for d in (-2, -1, 0, 1, 2)] if around_share is not None
              else [k / 8 for k in range(1, 8)])
    return sorted({min(num_gpus - 1, max(1, round(s * num_gpus))) for s in shares})


def search_splits(num_gpus: int, base: FleetSpec, costs: StepCostModel, trace_at: TraceAtRate,
                  rates_per_gpu_rps: Sequence[float], slo: SLO, target: float = 0.9, colocated: bool = True,
                  prefill_costs: Optional[StepCostModel] = None, exhaustive_up_to: int = 8,
                  resolution: float = 1 / 32, around_share: Optional[float] = None,
                  on_result: Optional[OnResult] = None) -> list[SplitResult]:
    """The splits of ``num_gpus`` that a coarse-then-halving search sweeps, best goodput per GPU first.

    Each split's sweep stops at its first rate below ``target``. The best xPyD is exact up to
    ``exhaustive_up_to`` GPUs and within ``resolution`` x ``num_gpus`` prefill GPUs beyond.
    """
    rates = _check_rates(num_gpus, rates_per_gpu_rps)
    if not 0 < resolution <= 1:
        raise ValueError(f"resolution must be in (0, 1], got {resolution}")
    planned = ([0] if colocated else []) + initial_prefill_counts(num_gpus, exhaustive_up_to, around_share)
    done: dict[int, SplitResult] = {}

    def sweep(prefill: int) -> None:
        if prefill not in done:
            done[prefill] = sweep_split(base, prefill, num_gpus - prefill, costs, trace_at, rates, slo, target,
                                        prefill_costs, stop_after_miss=True)
            if on_result:
                on_result(num_gpus, done[prefill], len(planned))

    for prefill in planned:
        sweep(prefill)
    xpyd = [p for p in done if p > 0]
    if xpyd and num_gpus > exhaustive_up_to:
        step = max(1, round(num_gpus / 8))
        finest = max(1, round(resolution * num_gpus))
        while step > finest:
            step = max(finest, step // 2)
            best = max(xpyd, key=lambda p: (done[p].goodput_per_gpu_rps, -p))
            new = [p for p in (best - step, best + step) if 0 < p < num_gpus and p not in done]
            planned += new
            for prefill in new:
                sweep(prefill)
                xpyd.append(prefill)
    return _ranked(list(done.values()))


@dataclass(frozen=True)
class FleetPlan:
    """``search_splits`` at each fleet size: ``by_gpus[n]`` is every split swept for n GPUs, best first."""

    by_gpus: dict[int, list[SplitResult]]
    rates_per_gpu_rps: tuple[float, ...]
    slo: SLO
    target: float

    def best(self, num_gpus: int, disaggregated: Optional[bool] = None) -> Optional[SplitResult]:
        """The best split for ``num_gpus`` (only xPyD with ``disaggregated=True``, only colocated with False)."""
        results = [r for r in self.by_gpus[num_gpus]
                   if disaggregated is None or (r.num_prefill > 0) == disaggregated]
        return results[0] if results else None


def plan_fleet(gpu_counts: Sequence[int], base: FleetSpec, costs: StepCostModel, trace_for: TraceFor,
               rates_per_gpu_rps: Sequence[float], slo: SLO, target: float = 0.9,
               prefill_costs: Optional[StepCostModel] = None, exhaustive_up_to: int = 8,
               resolution: float = 1 / 32, on_result: Optional[OnResult] = None) -> FleetPlan:
    """``search_splits`` for every fleet size in ``gpu_counts`` (ascending), each seeded by the last best share."""
    if not gpu_counts or min(gpu_counts) < 1:
        raise ValueError(f"gpu_counts must be GPU counts >= 1, got {list(gpu_counts)}")
    by_gpus: dict[int, list[SplitResult]] = {}
    share: Optional[float] = None
    for n in sorted(set(gpu_counts)):
        results = search_splits(n, base, costs, lambda rate, n=n: trace_for(n, rate), rates_per_gpu_rps, slo,
                                target, True, prefill_costs, exhaustive_up_to, resolution, share, on_result)
        by_gpus[n] = results
        best_xpyd = next((r for r in results if r.num_prefill > 0), None)
        if best_xpyd is not None and best_xpyd.goodput_rps > 0:
            share = best_xpyd.prefill_share
    return FleetPlan(by_gpus, tuple(sorted(rates_per_gpu_rps)), slo, target)


def capacity_per_gpu_rps(costs: StepCostModel, mean_prompt: int, mean_output: int, max_num_seqs: int) -> float:
    """A rough request rate one GPU serves: one mean prefill plus its share of full-batch decode steps.

    It only places the rate grid (``rate_grid``); the sweep measures the real crossing.
    """
    prefill_s = costs.prefill_cost_s(mean_prompt)
    decode_s = costs.decode_cost_s(max_num_seqs, mean_prompt + mean_output // 2) / max_num_seqs
    return 1.0 / (prefill_s + max(0, mean_output - 1) * decode_s)


def rate_grid(capacity_rps: float, low: float = 0.1, high: float = 3.0, step: float = 1.25) -> list[float]:
    """Rates from ``low`` to ``high`` x a capacity estimate, ``step`` x apart (goodput interpolates between two),
    rounded to three significant figures."""
    if not (capacity_rps > 0 and 0 < low <= high and step > 1):
        raise ValueError(f"rate_grid needs capacity > 0, 0 < low <= high and step > 1, got {capacity_rps}, {low}, "
                         f"{high}, {step}")
    rates, m = [], low
    while m <= high * (1 + 1e-9):
        rates.append(float(f"{capacity_rps * m:.3g}"))
        m *= step
    return sorted(set(rates))
