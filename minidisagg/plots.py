"""Matplotlib figures the CLI, labs and slides share (nothing in the engine imports this)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from minidisagg.metrics import RequestTimeline

DECODE_COLOR = "tab:blue"
PREFILL_COLOR = "crimson"


def plot_itl_timeline(
    ax: Axes,
    decode_timelines: Sequence[RequestTimeline],
    prefill_timelines: Sequence[RequestTimeline] = (),
    title: str = "",
    t0_s: float = 0.0,
) -> float:
    """Inter-token latency (ms) of each steady decode request against time since ``t0_s``, prefills shaded.

    Every decode is drawn in one colour, the legend's; the time axis runs from 0 to this run's end,
    which is returned (seconds since ``t0_s``).
    """
    end_s = 0.0
    for i, tl in enumerate(decode_timelines):
        times = [t - t0_s for t in tl.token_times_s]
        gaps_ms = [1000 * (b - a) for a, b in zip(times, times[1:])]
        end_s = max([end_s, *times])
        # steps: each gap is drawn across the interval it lasted, so a stall reads as a plateau, not a ramp
        ax.plot(times[1:], gaps_ms, lw=1, alpha=0.7, color=DECODE_COLOR, drawstyle="steps-pre",
                label="decode requests" if i == 0 else None)
    for i, tl in enumerate(prefill_timelines):
        ax.axvline(tl.arrival_s - t0_s, color=PREFILL_COLOR, ls="--", lw=1, label="long prompt arrives" if i == 0 else None)
        end_s = max(end_s, tl.arrival_s - t0_s)
        if tl.prefill_start_s is not None and tl.prefill_end_s is not None:
            ax.axvspan(tl.prefill_start_s - t0_s, tl.prefill_end_s - t0_s, color=PREFILL_COLOR, alpha=0.12,
                       label="its prefill runs" if i == 0 else None)
            end_s = max(end_s, tl.prefill_end_s - t0_s)
    if end_s > 0:
        ax.set_xlim(0.0, 1.02 * end_s)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("inter-token latency (ms)")
    ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    return end_s


def itl_timeline_figure(
    panels: Sequence[tuple[str, Sequence[RequestTimeline], Sequence[RequestTimeline], float]],
    path: Optional[str | Path] = None,
    share_time: bool = False,
    share_latency: bool = False,
) -> Figure:
    """One ITL timeline panel per run (title, decodes, long prompts, start time), stacked; saved if ``path``.

    Each panel gets its own time axis unless ``share_time`` (runs of very different lengths would
    otherwise fill a sliver of the width); ``share_latency`` gives every panel the same latency axis.
    """
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.0 * len(panels)), sharex=share_time,
                             sharey=share_latency, squeeze=False)
    ends_s = [plot_itl_timeline(ax, decodes, prefills, title, t0_s)
              for ax, (title, decodes, prefills, t0_s) in zip(axes[:, 0], panels)]
    if share_time and max(ends_s) > 0:
        axes[0, 0].set_xlim(0.0, 1.02 * max(ends_s))
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig
