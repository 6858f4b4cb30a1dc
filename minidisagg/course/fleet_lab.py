"""Lab 6's fleet planning on the simulator: how far the simulator was from measured runs, and the two-GPU case
predicted by ``minidisagg.sim`` (costs from the committed GPU benchmark) against the committed ``bench disagg`` run.

Everything here reads committed files (``benchmarks/results``) and simulates; nothing is timed on this device,
so the answers are the same on any machine.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from minidisagg.config import PRESETS
from minidisagg.course import gpu_sweeps as gs
from minidisagg.metrics import SLO, goodput
from minidisagg.sim import FleetSpec, InstanceConfig, LinkSpec, Trace
from minidisagg.sim.cost_table import GpuTable, costs_from_gpu_table, find_gpu_table
from minidisagg.sim.plan import SplitResult, plan_splits
from minidisagg.sim.serving import ServingCosts, apply_serving_costs, load_serving_costs, validation_files
from minidisagg.workload import poisson_workload


_VALIDATION_FILE = re.compile(r"sim-validation-cpu-(\d{4}-\d\d-\d\d)")  # a session's headline file, not -runN


def latest_validation(results: Optional[Path] = None) -> dict[str, Any]:
    """The newest committed CPU validation (``sim-validation-cpu-<date>.json``), with its ``path`` added.

    Files written before held-out fitting carry one ``median_abs_rel_error`` per figure and rows with a
    ``rel_error``; later ones nest the errors by prediction (``held_out``, ``fit``, ...). Either way the
    result gives the held-out (or only) errors as ``median_abs_rel_error`` and each row's as ``rel_error``.
    """
    found = [p for p in (results or gs.results_dir()).glob("sim-validation-cpu-*.json")
             if _VALIDATION_FILE.fullmatch(p.stem)]
    if not found:
        raise FileNotFoundError("no benchmarks/results/sim-validation-cpu-<date>.json: run benchmarks/sim_validation.py")
    path = max(found, key=lambda p: p.stem)
    data = json.loads(path.read_text())
    errors, rows = data.get("median_abs_rel_error"), data.get("rows")
    if not rows or not isinstance(errors, dict) or not errors:
        raise ValueError(f"{path.name}: no rows or median_abs_rel_error; is it a sim_validation result?")
    held_out = isinstance(next(iter(errors.values())), dict)
    try:
        errors = errors["held_out"] if held_out else errors
        rows = [{**row, "rel_error": row["error_held_out"] if held_out else row["rel_error"]} for row in rows]
    except KeyError as exc:
        raise ValueError(f"{path.name}: a sim_validation result without {exc}") from None
    return {**data, "median_abs_rel_error": errors, "rows": rows, "path": path}


def optimistic_fraction(validation: dict[str, Any]) -> float:
    """Fraction of the validation's (row, figure) pairs where the simulator predicted a lower latency than measured."""
    signs = [e < 0 for row in validation["rows"] for e in row["rel_error"].values()]
    return sum(signs) / len(signs)


@dataclass(frozen=True)
class TwoGpuCase:
    """One model and workload of a committed two-GPU ``bench disagg`` run, and what the simulator needs to replay it."""

    run: str
    card: str
    model: str
    workload: str
    slo: SLO
    rates_rps: tuple[float, ...]
    measured_per_gpu_rps: dict[str, float]  # "colocated x2", "1P1D" (the better of overlap and no-overlap)
    settings: dict[str, Any]
    link_GBps: float

    @property
    def measured_best(self) -> str:
        """The split the real run found best (ties: colocated, which needs no hand-off)."""
        return max(self.measured_per_gpu_rps, key=lambda k: (self.measured_per_gpu_rps[k], k.startswith("colocated")))


def two_gpu_case(card: str = "h100", model: str = "llama-8b", workload: str = "summarization",
                 results: Optional[Path] = None) -> TwoGpuCase:
    """The newest committed run on ``card`` that swept ``model`` on ``workload`` colocated and 1P1D."""
    sweeps = [s for s in gs.load_sweeps(results) if (s.model, s.workload) == (model, workload)
              and s.run.startswith(f"disagg-{card}-")]
    runs = [r for r in gs.runs_of(sweeps) if gs.find(sweeps, r, model, workload, gs.COLOCATED)
            and any(gs.find(sweeps, r, model, workload, c) for c in gs.DISAGG)]
    if not runs:
        raise FileNotFoundError(f"no committed disagg-{card}-*.json swept {model} {workload} both ways")
    run = runs[-1]
    data = json.loads(((results or gs.results_dir()) / f"{run}.json").read_text())
    cal = data["models"][model]["calibration"][workload]
    disagg = max(s.goodput_per_gpu_rps for c in gs.DISAGG if (s := gs.find(sweeps, run, model, workload, c)))
    probe = gs.kv_probes(results).get((run, model), {})
    return TwoGpuCase(run, card, model, workload, SLO(cal["slo"]["ttft_s"], cal["slo"]["tpot_s"]),
                      tuple(cal["rates_rps"]),
                      {"colocated x2": gs.find(sweeps, run, model, workload, gs.COLOCATED).goodput_per_gpu_rps,
                       "1P1D": disagg}, data["settings"], float(probe.get("achieved_GBps", 150.0)))


def card_costs(card: str, model: str, results: Optional[Path] = None):
    """(the ``StepCostModel`` of ``model`` from the newest committed ``gpu-<card>-*.json``, that table)."""
    table = GpuTable.load(find_gpu_table(card, results))
    return costs_from_gpu_table(table, model), table


def fleet_base(settings: dict[str, Any], model: str, link_GBps: float) -> FleetSpec:
    """The simulated deployment of a ``bench disagg`` run's settings: prefill_first replicas, its batch limits."""
    instance = InstanceConfig("prefill_first", int(settings["max_num_seqs"]), int(settings["prefill_token_budget"]),
                              num_blocks=int(settings.get("num_kv_blocks") or 16384))
    return FleetSpec(1, instance=instance, link=LinkSpec("nvlink", link_GBps),
                     kv_bytes_per_token=PRESETS[model].kv_bytes_per_token(2))


def workload_trace(case: TwoGpuCase, rate_rps: float, seed: int, num_requests: Optional[int] = None) -> Trace:
    """The run's workload at ``rate_rps``: ``num_requests``, or as many as its window held (within its min and max)."""
    from minidisagg.bench.disagg_sweep import workloads

    spec = next(w for w in workloads(smoke=False) if w.name == case.workload)
    s = case.settings
    n = num_requests or int(min(s["max_requests"], max(s["min_requests"], round(rate_rps * s["window_s"]))))
    return Trace.of(poisson_workload(rate_rps, n, spec.prompt_len, spec.output_len, seed=seed))


def held_out_serving(case: TwoGpuCase, results: Optional[Path] = None) -> ServingCosts:
    """The card's serving-path costs fitted without ``case``'s own sweep file (as the GPU validation predicts it)."""
    return load_serving_costs(case.card, results, exclude=case.run)


def simulate_two_gpu(case: TwoGpuCase, seeds: tuple[int, ...] = (0, 1, 2),
                     serving: Optional[ServingCosts] = None, with_serving: bool = True) -> dict[str, SplitResult]:
    """``plan_splits`` of two GPUs on the card's committed costs, at the run's rates and SLO; mean attainment over seeds.

    The serving path's costs are added (``serving``, default ``held_out_serving(case)``: never fitted on the run
    predicted) unless ``with_serving`` is False. Each seed is one window of arrivals like the run's; averaging a
    few keeps one unlucky window from deciding.
    """
    costs, _ = card_costs(case.card, case.model)
    base = fleet_base(case.settings, case.model, case.link_GBps)
    if with_serving:
        base, costs = apply_serving_costs(serving or held_out_serving(case), base, costs)
    per_gpu = [r / 2 for r in case.rates_rps]
    by_seed = [plan_splits(2, base, costs, lambda rate, s=seed: workload_trace(case, rate, s), per_gpu, case.slo)
               for seed in seeds]
    out = {}
    for label in ("colocated x2", "1P1D"):
        runs = [next(r for r in results if r.label == label) for results in by_seed]
        atts = tuple(sum(r.attainments[i] for r in runs) / len(runs) for i in range(len(runs[0].rates_rps)))
        first = runs[0]
        out[label] = SplitResult(first.num_prefill, first.num_decode, first.rates_rps, atts,
                                 goodput(first.rates_rps, atts, 0.9))
    return out


SERVING_KEY, DEVICE_ONLY_KEY = "anchored + serving costs", "anchored"  # the GPU validation's two headline models


def gpu_validation_summary(results: Optional[Path] = None) -> dict[str, Any]:
    """The newest committed GPU validation's headline figures, with and without the serving costs.

    ``{"path": ..., "with": {...}, "without": {...}}``, each with ``crossings_within`` of ``crossings_compared``
    (goodput within 20% of the measured one) and ``signs_right`` of ``signs_decided`` (the sign of best
    disaggregated minus best colocated goodput, where a measured crossing exists).
    """
    for path in validation_files(results or gs.results_dir()):
        data = json.loads(path.read_text())
        summary, signs = data.get("summary", {}), data.get("signs", {})
        if not all(k in summary and k in signs for k in (SERVING_KEY, DEVICE_ONLY_KEY)):
            continue
        out: dict[str, Any] = {"path": path}
        for name, key in (("with", SERVING_KEY), ("without", DEVICE_ONLY_KEY)):
            decided = [s for s in signs[key] if s["decided"]]
            out[name] = {"crossings_within": summary[key]["crossings_within_goal"],
                         "crossings_compared": summary[key]["crossings_compared"],
                         "signs_right": sum(bool(s["sign_agrees"]) for s in decided), "signs_decided": len(decided)}
        return out
    raise FileNotFoundError("no committed sim-validation-gpu-<date>.json compares the simulator with and without "
                            "serving costs: run benchmarks/sim_gpu_validation.py")
