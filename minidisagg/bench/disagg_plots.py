"""Figures of ``minidisagg bench disagg``: attainment curves, ITL timelines, TTFT breakdown."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from minidisagg.bench.common import compact_png
from minidisagg.bench.disagg_result import fixed_rate_rows
from minidisagg.metrics import RequestTimeline

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COLORS = {"colocated-prefill_first": "tab:red", "colocated-chunked": "tab:orange", "disagg-overlap": "tab:blue",
          "disagg-no-overlap": "tab:cyan"}
TIMELINE_CONFIGS = ("colocated-prefill_first", "colocated-chunked", "disagg-overlap")
PARTS = (("queue_s", "queue", "0.6"), ("prefill_s", "prefill", "tab:green"), ("transfer_s", "transfer", "tab:purple"),
         ("decode_queue_s", "decode queue (after first token)", "tab:brown"))


def _panels(result: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(model, workload, model result) for every workload a model swept."""
    return [(model, w, res) for model, res in result["models"].items()
            for w in sorted({s["workload"] for s in res["sweeps"]})]


def plot_attainment(result: dict[str, Any], path: Path) -> None:
    """SLO attainment against total request rate: a panel per model and workload, a line per configuration."""
    import matplotlib.pyplot as plt

    panels = _panels(result) or [("", "", {"sweeps": []})]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, (model, workload, res) in zip(axes[0], panels):
        for s in (s for s in res["sweeps"] if s["workload"] == workload):
            ax.plot([p["rate_rps"] for p in s["points"]], [p["attainment"] for p in s["points"]], "-o",
                    color=COLORS.get(s["config"]), label=f"{s['config']} ({s['goodput_per_gpu_rps']:.3g}/GPU)")
        ax.axhline(0.9, color="k", ls=":", lw=1)
        ax.set(title=f"{model} {workload}", xlabel="request rate (req/s, 2 GPUs)", ylabel="SLO attainment",
               ylim=(-0.03, 1.03))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="goodput per GPU", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _timeline(record: dict[str, Any]) -> RequestTimeline:
    return RequestTimeline(arrival_s=record["arrival_s"], prefill_start_s=record["prefill_start_s"],
                           prefill_end_s=record["prefill_end_s"], token_times_s=list(record["token_times_s"]))


def plot_itl_timelines(result: dict[str, Any], path: Path) -> None:
    """Write ``itl_timelines_figure(result)`` to ``path`` as a PNG."""
    import matplotlib.pyplot as plt

    fig = itl_timelines_figure(result)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def itl_timelines_figure(result: dict[str, Any]) -> "Figure":
    """At the fixed rate: ITL of each request against time, prefills of the same GPU shaded (colocated: replica 0).

    A configuration with no timeline (its sweep stopped below the fixed rate, or never ran) gets a
    panel that says which.
    """
    import matplotlib.pyplot as plt

    from minidisagg.plots import plot_itl_timeline

    rows = [(model, w, res) for model, w, res in _panels(result)] or [("", "", {"sweeps": []})]
    fig, axes = plt.subplots(len(rows), len(TIMELINE_CONFIGS), figsize=(5 * len(TIMELINE_CONFIGS), 3.2 * len(rows)),
                             squeeze=False)
    for ax_row, (model, workload, res) in zip(axes, rows):
        for ax, config in zip(ax_row, TIMELINE_CONFIGS):
            sweep = next((s for s in res["sweeps"] if s["config"] == config and s["workload"] == workload), None)
            records = sweep["timelines"] if sweep else []
            if config.startswith("colocated"):
                records = [r for r in records if r.get("replica") in (0, None)]
            timelines = [_timeline(r) for r in records]
            if timelines:
                plot_itl_timeline(ax, timelines, timelines, f"{model} {workload}: {config}")
            else:
                ax.set_title(f"{model} {workload}: {config}", fontsize=9)
                why = ("no timeline at the fixed rate:\nthe sweep stopped below it" if sweep
                       else "not run (time budget)")
                ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="0.4")
                ax.set_xticks([])
                ax.set_yticks([])
    fig.tight_layout()
    return fig


def plot_ttft_breakdown(result: dict[str, Any], path: Path) -> None:
    """Median TTFT parts at the fixed rate: stacked bars per configuration, a panel per model and workload."""
    import matplotlib.pyplot as plt

    panels = _panels(result) or [("", "", {"sweeps": [], "calibration": {}})]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (model, workload, res) in zip(axes[0], panels):
        rows = [r for r in fixed_rate_rows(res) if r["workload"] == workload]
        names = [r["config"].replace("-", "\n", 1) for r in rows]
        bottoms = [0.0] * len(rows)
        for key, label, color in PARTS:
            heights = [1e3 * (r["breakdown_median_s"][key] or 0.0) for r in rows]
            ax.bar(names, heights, bottom=bottoms, color=color, label=label)
            bottoms = [b + h for b, h in zip(bottoms, heights)]
        ax.set(title=f"{model} {workload}: median TTFT parts", ylabel="ms")
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(result: dict[str, Any], stem: Path) -> list[Path]:
    """The three PNGs beside ``stem``'s JSON (palette PNGs, ``compact_png``); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    paths = [Path(f"{stem}-{name}.png") for name in ("attainment", "itl-timeline", "ttft-breakdown")]
    for plot, path in zip((plot_attainment, plot_itl_timelines, plot_ttft_breakdown), paths):
        plot(result, path)
        compact_png(path)
    return paths
