"""The committed two-GPU sweeps (``benchmarks/results/disagg-*.json``, written by ``minidisagg bench disagg``), read for lab 6.

Each file is one run on a pair of GPUs: per model and workload, a sweep of request rates for each
configuration (colocated ``prefill_first`` or ``chunked`` on two replicas; 1P1D with or without
layer-wise overlap), with per-rate attainment, latency percentiles and the goodput per GPU.
A goodput of 0 means the lowest rate of the grid already missed the 90% line: the crossing lies
below the grid, so no ratio can be formed with it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Optional, Sequence

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

COLOCATED = "colocated-prefill_first"
CHUNKED = "colocated-chunked"
OVERLAP = "disagg-overlap"
NO_OVERLAP = "disagg-no-overlap"
DISAGG = (OVERLAP, NO_OVERLAP)
CONFIGS = (COLOCATED, CHUNKED, OVERLAP, NO_OVERLAP)
COLORS = {COLOCATED: "tab:blue", CHUNKED: "tab:cyan", OVERLAP: "tab:orange", NO_OVERLAP: "tab:red"}


def results_dir() -> Path:
    """``benchmarks/results`` of the checkout this package lives in."""
    return Path(__file__).resolve().parents[2] / "benchmarks" / "results"


@dataclass(frozen=True)
class Sweep:
    """One configuration's rate sweep, for one model and workload, in one run."""

    run: str  # the file's stem, e.g. disagg-h200-2026-11-28
    date: str  # ISO 8601, as the run recorded it
    card: str
    model: str
    workload: str
    config: str
    goodput_per_gpu_rps: float
    points: tuple[dict, ...]  # per rate: rate_rps, num_requests, attainment, ttft/itl/tpot p50 and p99 (s), ...
    fixed_rate_rps: Optional[float]  # the rate every configuration ran, for side-by-side latencies
    window_s: float  # seconds of arrivals per rate
    unloaded_ttft_s: Optional[float]  # TTFT of a lone request on one replica (the SLOs are multiples of it)
    unloaded_tpot_s: Optional[float]  # its TPOT, likewise

    def point_at(self, rate_rps: Optional[float]) -> Optional[dict]:
        """The measured point at ``rate_rps`` (None when this sweep has none there)."""
        return next((p for p in self.points if rate_rps is not None and abs(p["rate_rps"] - rate_rps) < 1e-6), None)


def load_sweeps(results: Optional[Path] = None) -> list[Sweep]:
    """Every sweep of every ``disagg-*.json`` under ``results``, oldest run first."""
    sweeps = []
    for path in (results or results_dir()).glob("disagg-*.json"):
        data = json.loads(path.read_text())
        named = re.search(r"\d{4}-\d{2}-\d{2}", path.stem)
        date = str(data.get("date") or (named.group(0) if named else ""))
        gpus = data.get("machine", {}).get("gpus") or [data.get("card", "?")]
        for model, run in data.get("models", {}).items():
            calibration = run.get("calibration", {})
            for s in run.get("sweeps", []):
                sweeps.append(Sweep(path.stem, date, str(gpus[0]), model, s["workload"], s["config"],
                                    float(s.get("goodput_per_gpu_rps", 0.0)), tuple(s["points"]),
                                    calibration.get(s["workload"], {}).get("fixed_rate_rps"),
                                    float(data.get("settings", {}).get("window_s", 0.0)),
                                    calibration.get(s["workload"], {}).get("ttft_s"),
                                    calibration.get(s["workload"], {}).get("tpot_s")))
    return sorted(sweeps, key=lambda s: (s.date, s.run))


def runs_of(sweeps: Sequence[Sweep]) -> list[str]:
    """The runs' names, oldest first."""
    return list(dict.fromkeys(s.run for s in sweeps))


def kv_probes(results: Optional[Path] = None) -> dict[tuple[str, str], dict]:
    """Per (run, model): the lone 2k-token request's KV transfer (``achieved_GBps``, ``transfer_over_ttft``, ...)."""
    out = {}
    for path in (results or results_dir()).glob("disagg-*.json"):
        for model, run in json.loads(path.read_text()).get("models", {}).items():
            if run.get("kv_probe"):
                out[(path.stem, model)] = run["kv_probe"]
    return out


def find(sweeps: Sequence[Sweep], run: str, model: str, workload: str, config: str) -> Optional[Sweep]:
    """The one sweep with these keys, or None."""
    return next((s for s in sweeps if (s.run, s.model, s.workload, s.config) == (run, model, workload, config)), None)


@dataclass(frozen=True)
class Verdict:
    """Best disaggregated goodput per GPU against colocated ``prefill_first``, for one run, model and workload."""

    run: str
    card: str
    model: str
    workload: str
    colocated_rps: float
    disagg_rps: float
    best_disagg: str

    @property
    def ratio(self) -> Optional[float]:
        """Disaggregated over colocated goodput per GPU; None when either side met no rate of its grid."""
        return self.disagg_rps / self.colocated_rps if self.colocated_rps > 0 and self.disagg_rps > 0 else None


def verdicts(sweeps: Sequence[Sweep]) -> list[Verdict]:
    """One verdict per run, model and workload that has a colocated ``prefill_first`` sweep, oldest run first."""
    out = []
    for s in sweeps:
        if s.config != COLOCATED:
            continue
        disagg = [d for d in (find(sweeps, s.run, s.model, s.workload, c) for c in DISAGG) if d is not None]
        if disagg:
            best = max(disagg, key=lambda d: d.goodput_per_gpu_rps)
            out.append(Verdict(s.run, s.card, s.model, s.workload, s.goodput_per_gpu_rps, best.goodput_per_gpu_rps,
                               best.config))
    return out


def best_ratio_per_run(all_verdicts: Sequence[Verdict], model: str) -> dict[str, float]:
    """Per run, the highest ratio ``model`` formed over its workloads (runs that formed none are left out)."""
    out: dict[str, float] = {}
    for v in all_verdicts:
        if v.model == model and v.ratio is not None:
            out[v.run] = max(out.get(v.run, 0.0), v.ratio)
    return out


def median_ratio(all_verdicts: Sequence[Verdict], model: str, workload: str) -> Optional[float]:
    """The median ratio over the runs that formed one for ``model`` and ``workload``."""
    ratios = [v.ratio for v in all_verdicts if (v.model, v.workload) == (model, workload) and v.ratio is not None]
    return median(ratios) if ratios else None


def attainment_figure(sweeps: Sequence[Sweep], run: str) -> Figure:
    """One run's attainment against rate per GPU: a panel per model and workload, a line per configuration."""
    mine = [s for s in sweeps if s.run == run]
    panels = list(dict.fromkeys((s.model, s.workload) for s in mine))
    cols = 2 if len(panels) > 1 else 1
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(8, 2.4 * rows + 0.9), squeeze=False, sharey=True)
    for ax, (model, workload) in zip(axes.flat, panels):
        for config in CONFIGS:
            s = find(mine, run, model, workload, config)
            if s is None or not s.points:
                continue
            pts = sorted((p["rate_rps"] / 2, p["attainment"]) for p in s.points)  # every set-up uses 2 GPUs
            ax.plot(*zip(*pts), "-o", ms=3, color=COLORS[config], label=config)
        ax.axhline(0.9, color="k", lw=0.8, ls="--")
        ax.set_title(f"{model}, {workload}", fontsize=10)
        ax.set_ylim(-0.03, 1.05)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("requests/s per GPU")
    for ax in axes[:, 0]:
        ax.set_ylabel("SLO attainment")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.suptitle(f"measured on two GPUs ({mine[0].card if mine else '?'}): {run}", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def ratio_figure(all_verdicts: Sequence[Verdict]) -> Figure:
    """Every run's disaggregated/colocated goodput ratio per model and workload; the runs in time order."""
    runs = list(dict.fromkeys(v.run for v in all_verdicts))
    keys = list(dict.fromkeys((v.model, v.workload) for v in all_verdicts))
    markers = {"chat": "o", "summarization": "s"}
    colors = {"llama-8b": "tab:red", "llama-1b": "tab:gray"}
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for i, (model, workload) in enumerate(keys):
        xs, ys = [], []
        for v in all_verdicts:
            if (v.model, v.workload) == (model, workload) and v.ratio is not None:
                xs.append(runs.index(v.run) + 0.08 * (i - 1.5))
                ys.append(v.ratio)
        ax.plot(xs, ys, markers.get(workload, "^"), color=colors.get(model, "tab:blue"), ms=7, ls="none",
                label=f"{model} {workload}")
    ax.axhline(1.0, color="k", lw=1)
    ax.axhspan(0.75, 1.25, color="gray", alpha=0.12, lw=0)
    ax.text(-0.4, 1.23, "within 25% of a tie", ha="left", va="top", fontsize=8, color="dimgray")
    ratios = [v.ratio for v in all_verdicts if v.ratio is not None]
    ax.set_xlim(-0.5, len(runs) - 0.5)
    ax.set_ylim(min([0.75, *ratios]) - 0.25, max([1.25, *ratios]) + 0.1)
    ax.set_xticks(range(len(runs)), [r.removeprefix("disagg-") for r in runs], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("goodput per GPU,\ndisaggregated / colocated")
    ax.set_title("two-GPU runs: best 1P1D against colocated prefill_first (missing: no ratio formed)", fontsize=10)
    ax.legend(fontsize=8, loc="lower left", ncol=2)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


GAINS, LOSES, TIE = "gains", "loses", "tie"
NOISE_BAND = 0.1  # a ratio within 10% of 1 is inside the spread of one 4 s window


def verdict_of_runs(ratios: Sequence[float]) -> str:
    """Call a model and workload from its ratios across runs: 'gains', 'loses' or 'tie'.

    One run proves little, runs that disagree on the side of 1 are a tie, and a call needs every
    run beyond the noise band on the same side.
    """
    values = [float(r) for r in ratios]
    if len(values) < 2:
        return TIE
    if min(values) >= 1 + NOISE_BAND:
        return GAINS
    if max(values) <= 1 - NOISE_BAND:
        return LOSES
    return TIE
