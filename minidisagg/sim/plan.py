"""Planning a fleet with the simulator: for a GPU count, which split (colocated, or x prefill + y decode) serves
the most requests per second per GPU within an SLO.

For each candidate split the simulator sweeps request rates (``rates_per_gpu`` x GPUs, the same per-GPU load
for every split) and measures SLO attainment at each; goodput is the highest rate whose attainment stays at or
above the target (``metrics.goodput``, DistServe's definition), divided by the GPUs for goodput per GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

from minidisagg.engine.step_cost import StepCostModel
from minidisagg.metrics import SLO, goodput
from minidisagg.sim.fleet import FleetSpec, simulate
from minidisagg.sim.results import Trace

TraceAtRate = Callable[[float], Trace]  # a workload's trace at a request rate (requests/s)


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
    def label(self) -> str:
        """``colocated x8`` or ``3P5D``."""
        return f"colocated x{self.num_decode}" if self.num_prefill == 0 else f"{self.num_prefill}P{self.num_decode}D"


def sweep_split(base: FleetSpec, num_prefill: int, num_decode: int, costs: StepCostModel, trace_at: TraceAtRate,
                rates_rps: Sequence[float], slo: SLO, target: float = 0.9,
                prefill_costs: Optional[StepCostModel] = None) -> SplitResult:
    """Simulate ``base`` as ``num_prefill``P``num_decode``D (0 prefill: colocated) at every rate."""
    spec = replace(base, num_prefill=num_prefill, num_decode=num_decode)
    attainments = [simulate(spec, costs, trace_at(rate), prefill_costs=prefill_costs).attainment(slo)
                   for rate in rates_rps]
    return SplitResult(num_prefill, num_decode, tuple(rates_rps), tuple(attainments),
                       goodput(rates_rps, attainments, target))


def plan_splits(num_gpus: int, base: FleetSpec, costs: StepCostModel, trace_at: TraceAtRate,
                rates_per_gpu_rps: Sequence[float], slo: SLO, target: float = 0.9, colocated: bool = True,
                prefill_costs: Optional[StepCostModel] = None) -> list[SplitResult]:
    """Every split of ``num_gpus`` (colocated, 1P..(n-1)P), best goodput per GPU first (ties: fewer prefill)."""
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
    if not rates_per_gpu_rps or min(rates_per_gpu_rps) <= 0:
        raise ValueError("rates_per_gpu_rps needs at least one positive rate")
    rates = [r * num_gpus for r in sorted(rates_per_gpu_rps)]
    splits = ([(0, num_gpus)] if colocated else []) + [(p, num_gpus - p) for p in range(1, num_gpus)]
    results = [sweep_split(base, p, d, costs, trace_at, rates, slo, target, prefill_costs) for p, d in splits]
    return sorted(results, key=lambda r: (-r.goodput_per_gpu_rps, r.num_prefill))
