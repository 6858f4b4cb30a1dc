"""Checks of lab 6 (goodput and placement): goodput under a TTFT + TPOT SLO, and the xPyD placement search."""

from __future__ import annotations

import math
import random
from typing import Callable, Optional

import torch

from minidisagg.course.checking import CheckResult, failed, not_implemented, passed, task_check
from minidisagg.course.placement_lab import PhaseCosts, WorkloadShape, system_goodput
from minidisagg.course.transfer_lab import PrefillCostModel
from minidisagg.metrics import SLO, RequestMetrics, goodput, slo_attainment


def random_metrics(rng: random.Random, slo: SLO, load: float, count: int) -> list[RequestMetrics]:
    """Requests whose TTFT and TPOT grow with ``load``; some sit exactly on the SLO (a tie meets it)."""
    out = []
    for _ in range(count):
        ttft = slo.ttft_s * load * rng.lognormvariate(0, 0.6)
        tpot = slo.tpot_s * load * rng.lognormvariate(0, 0.6)
        pick = rng.random()
        if pick < 0.1:
            ttft = slo.ttft_s
        elif pick < 0.2:
            tpot = slo.tpot_s
        n = rng.randint(2, 64)
        out.append(RequestMetrics(ttft_s=ttft, tpot_s=tpot, itl_s=(tpot,) * (n - 1), e2e_s=ttft + tpot * (n - 1),
                                  queue_s=0.0, prefill_s=ttft / 2, num_output_tokens=n))
    return out


def _request(ttft_s: float, tpot_s: float, num_tokens: int = 8) -> RequestMetrics:
    return RequestMetrics(ttft_s=ttft_s, tpot_s=tpot_s, itl_s=(tpot_s,) * (num_tokens - 1),
                          e2e_s=ttft_s + tpot_s * (num_tokens - 1), queue_s=0.0, prefill_s=ttft_s / 2,
                          num_output_tokens=num_tokens)


def boundary_sweep() -> tuple[dict[float, list[RequestMetrics]], SLO, float]:
    """The lowest rate sits exactly on the target (9 of 10), one of its 9 exactly on the SLO: goodput is that rate."""
    slo = SLO(1.0, 0.1)
    meets, on_slo, misses = _request(0.5, 0.05), _request(slo.ttft_s, slo.tpot_s), _request(2.0, 0.05)
    sweep = {2.0: [meets] * 5 + [misses] * 5, 1.0: [meets] * 8 + [on_slo, misses], 3.0: [meets] * 2 + [misses] * 8}
    return sweep, slo, 0.9


def _random_sweep(rng: random.Random) -> tuple[dict[float, list[RequestMetrics]], SLO, float]:
    slo = SLO(rng.uniform(0.05, 5.0), rng.uniform(0.005, 0.5))
    rates = sorted({round(rng.uniform(0.1, 50.0), 3) for _ in range(rng.randint(1, 8))})
    style = rng.random()
    loads = [0.3 + 1.4 * i / max(1, len(rates) - 1) for i in range(len(rates))]
    if style < 0.2:
        loads = [0.2] * len(rates)  # everything passes
    elif style < 0.35:
        loads = [3.0] * len(rates)  # the lowest rate already fails
    elif style < 0.5 and len(loads) > 2:
        loads[-1] = 0.2  # a noisy pass after the first failure
    sweep = {rate: random_metrics(rng, slo, load, rng.randint(5, 40)) for rate, load in zip(rates, loads)}
    shuffled = list(sweep.items())
    rng.shuffle(shuffled)  # a dict in no particular order
    return dict(shuffled), slo, rng.choice((0.5, 0.8, 0.9, 0.99))


@task_check("Lab 6, Task 1")
def task1(goodput_rps: Callable[..., float], cases: int = 60, seed: Optional[int] = None) -> CheckResult:
    """``goodput_rps(metrics_by_rate, slo, target)`` against ``metrics.slo_attainment`` + ``metrics.goodput``."""
    rng = random.Random(seed)
    worst = 0.0
    for case in range(cases):
        sweep, slo, target = _random_sweep(rng) if case else boundary_sweep()
        rates = list(sweep)
        attainments = [slo_attainment(sweep[r], slo) for r in rates]
        want = goodput(rates, attainments, target)
        try:
            got = goodput_rps(sweep, slo, target)
        except NotImplementedError as err:
            return not_implemented("Lab 6, Task 1", err)
        except Exception as err:  # noqa: BLE001
            return failed(f"case {case}: {slo}, target {target}: goodput_rps raised {type(err).__name__}: {err}")
        error = abs(float(got) - want)
        if not error <= 1e-9 * max(1.0, abs(want)):
            table = ", ".join(f"{r:g} req/s: {a:.3f}" for r, a in sorted(zip(rates, attainments)))
            why = ("the lowest rate meets the target exactly (an attainment equal to the target passes, a request "
                   "exactly on the SLO meets it)" if case == 0 else
                   "attainment of TTFT and TPOT together, a tie meets the SLO")
            return failed(f"case {case}: {slo}, target {target}: got {got}, expected {want:.6g} "
                          f"({why}; per rate {table})")
        worst = max(worst, error)
    return passed(f"{cases} sweeps (ties on the SLO, a rate exactly on the target, all-pass, first-fails, noisy passes), "
                  f"max error {worst:.1e} req/s")


def random_phase_costs(gen: torch.Generator) -> PhaseCosts:
    """Plausible random costs (for checks): prefill, decode and link spanning a few orders of magnitude."""
    def draw(low: float, high: float) -> float:
        return math.exp(math.log(low) + (math.log(high) - math.log(low)) * float(torch.rand((), generator=gen)))

    prefill = PrefillCostModel(draw(1e-4, 5e-2), draw(1e-6, 1e-3), draw(1e-10, 1e-7))
    return PhaseCosts(prefill, draw(1e-3, 5e-2), draw(1e-5, 5e-3), int(draw(1e4, 1e6)), draw(0.5, 400.0),
                      int(draw(8, 256)))


def _random_placement_case(rng: random.Random) -> tuple[PhaseCosts, WorkloadShape, SLO, int]:
    costs = random_phase_costs(torch.Generator().manual_seed(rng.randrange(1 << 30)))
    shape = WorkloadShape(rng.randint(16, 4096), rng.randint(2, 512))
    prefill_s, step_s = costs.prefill_s(shape.prompt_len), costs.decode_step_s(1)
    slo = SLO(prefill_s * rng.uniform(1.2, 20.0), step_s * rng.uniform(1.05, 10.0))
    return costs, shape, slo, rng.randint(2, 12)


@task_check("Lab 6, Task 2")
def task2(best_placement: Callable[..., tuple[int, int]], cases: int = 60, seed: Optional[int] = None) -> CheckResult:
    """``best_placement(costs, shape, slo, gpu_budget)`` against a brute force over every xPyD with the lab's model."""
    rng = random.Random(seed)
    for case in range(cases):
        costs, shape, slo, budget = _random_placement_case(rng)
        budget = 2 if case == 0 else budget  # the smallest budget: 1P1D is the only placement
        options = [(x, y) for x in range(1, budget) for y in range(1, budget - x + 1)]
        per_gpu = {xy: system_goodput(costs, shape, slo, *xy) / sum(xy) for xy in options}
        best = max(per_gpu.values())
        try:
            got = best_placement(costs, shape, slo, budget)
        except NotImplementedError as err:
            return not_implemented("Lab 6, Task 2", err)
        except Exception as err:  # noqa: BLE001
            return failed(f"case {case}: budget {budget} GPUs, {shape}, {slo}: best_placement raised "
                          f"{type(err).__name__}: {err}")
        where = f"case {case}: budget {budget} GPUs, {shape}, {slo}"
        try:
            x, y = (int(v) for v in got)
        except (TypeError, ValueError):
            return failed(f"{where}: returned {got!r}, expected a pair (num_prefill, num_decode)")
        if (x, y) not in per_gpu:
            return failed(f"{where}: {x}P{y}D is not a placement within the budget (x >= 1, y >= 1, x + y <= {budget})")
        if not math.isclose(per_gpu[(x, y)], best, rel_tol=1e-9, abs_tol=1e-12):
            winner = max(per_gpu, key=per_gpu.get)
            return failed(f"{where}: {x}P{y}D gives {per_gpu[(x, y)]:.4g} req/s per GPU, but "
                          f"{winner[0]}P{winner[1]}D gives {best:.4g}")
    return passed(f"{cases} random costs, workloads, SLOs and budgets (2-12 GPUs, 2 included): best goodput per GPU "
                  f"every time")
