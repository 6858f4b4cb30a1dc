"""A fleet plan as JSON, text and two figures: attainment against rate, and the best split against fleet size."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from minidisagg.sim.plan import FleetPlan, SplitResult
from minidisagg.sim.serving import ServingCosts


def split_to_dict(r: SplitResult) -> dict[str, Any]:
    """One swept split as JSON."""
    return {"label": r.label, "num_prefill": r.num_prefill, "num_decode": r.num_decode,
            "rates_rps": list(r.rates_rps), "attainments": list(r.attainments), "goodput_rps": r.goodput_rps,
            "goodput_per_gpu_rps": r.goodput_per_gpu_rps}


def plan_to_dict(plan: FleetPlan, **meta: Any) -> dict[str, Any]:
    """The plan (every swept split per fleet size, best first) and ``meta`` (model, card, workload ...) as JSON."""
    sizes = []
    for n, results in plan.by_gpus.items():
        best, colo, xpyd = plan.best(n), plan.best(n, False), plan.best(n, True)
        sizes.append({"num_gpus": n, "best": best.label if best else None,
                      "best_xpyd": xpyd.label if xpyd else None,
                      "best_xpyd_prefill_share": xpyd.prefill_share if xpyd else None,
                      "colocated_goodput_per_gpu_rps": colo.goodput_per_gpu_rps if colo else None,
                      "splits": [split_to_dict(r) for r in results]})
    return {**meta, "slo": {"ttft_s": plan.slo.ttft_s, "tpot_s": plan.slo.tpot_s}, "target": plan.target,
            "rates_per_gpu_rps": list(plan.rates_per_gpu_rps), "fleet_sizes": sizes}


def serving_meta(serving: Optional[ServingCosts], why_none: str = "") -> dict[str, Any]:
    """The plan's record of the serving-path costs it simulated: their line, values and source file, or why none."""
    if serving is None:
        return {"serving_costs": None, "serving_costs_note": f"serving costs: none ({why_none or 'not asked for'})"}
    return {"serving_costs": serving.as_dict(), "serving_costs_note": serving.describe()}


def plan_lines(plan: FleetPlan, top: int = 5) -> list[str]:
    """Per fleet size: the best ``top`` splits with goodput and attainment by rate."""
    lines = []
    for n, results in plan.by_gpus.items():
        lines.append(f"{n} GPUs ({len(results)} splits swept):")
        for r in results[:top]:
            atts = " ".join(f"{a:.2f}" for a in r.attainments)
            lines.append(f"  {r.label:>14}  goodput {r.goodput_rps:8.2f} req/s  per GPU {r.goodput_per_gpu_rps:6.2f}  "
                         f"attainment {atts}")
    return lines


def figure_paths(json_path: str | Path) -> tuple[Path, Path]:
    """``plan.json`` -> (``plan-attainment.png``, ``plan-splits.png``) beside it."""
    p = Path(json_path)
    return p.with_name(f"{p.stem}-attainment.png"), p.with_name(f"{p.stem}-splits.png")


def attainment_figure(plan: FleetPlan, title: str = ""):
    """SLO attainment against rate per GPU: each fleet size's best xPyD (solid) and colocated (dashed)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    colors = plt.get_cmap("viridis")
    sizes = list(plan.by_gpus)
    for i, n in enumerate(sizes):
        color = colors(i / max(1, len(sizes) - 1))
        for r, style in ((plan.best(n, True), "-"), (plan.best(n, False), "--")):
            if r is not None:
                ax.plot([x / n for x in r.rates_rps], r.attainments, style, marker="o", ms=3, color=color,
                        label=f"{n} GPUs: {r.label}")
    ax.axhline(plan.target, color="gray", lw=0.8, ls=":")
    ax.set(xlabel="requests/s per GPU", ylabel="SLO attainment", ylim=(-0.03, 1.03),
           title=title or f"TTFT <= {plan.slo.ttft_s * 1e3:.0f} ms, TPOT <= {plan.slo.tpot_s * 1e3:.1f} ms")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def splits_figure(plan: FleetPlan, title: str = ""):
    """Against fleet size: the best xPyD's prefill share, and goodput per GPU of it and of colocated."""
    import matplotlib.pyplot as plt

    sizes = list(plan.by_gpus)
    xpyd = [plan.best(n, True) for n in sizes]
    colo = [plan.best(n, False) for n in sizes]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    pts = [(n, r.prefill_share) for n, r in zip(sizes, xpyd) if r is not None]
    a.plot([n for n, _ in pts], [s for _, s in pts], "o-")
    for n, r in zip(sizes, xpyd):
        if r is not None:
            a.annotate(r.label, (n, r.prefill_share), fontsize=7, textcoords="offset points", xytext=(3, 4))
    a.set(xlabel="GPUs", ylabel="prefill share of the best xPyD", ylim=(0, 1), title="best split")
    b.plot([n for n, r in zip(sizes, xpyd) if r], [r.goodput_per_gpu_rps for r in xpyd if r], "o-", label="best xPyD")
    b.plot([n for n, r in zip(sizes, colo) if r], [r.goodput_per_gpu_rps for r in colo if r], "s--", label="colocated")
    b.set(xlabel="GPUs", ylabel="goodput per GPU, req/s", title="goodput per GPU")
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(n) for n in sizes])  # plain numbers, not 2^k
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def write_plan(plan: FleetPlan, json_path: str | Path, title: str = "", **meta: Any) -> list[Path]:
    """Write the JSON and, beside it, the two PNG figures; returns the three paths."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(plan_to_dict(plan, **meta), indent=1))
    written = [json_path]
    for path, make in zip(figure_paths(json_path), (attainment_figure, splits_figure)):
        fig = make(plan, title)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
