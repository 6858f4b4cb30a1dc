"""Lab 7's figures: hits and TTFT per chat turn, the two routing policies, and bytes against agreement per wire."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt

from minidisagg.course.reuse_lab import ChatTurn, RoutingRun


def chat_figure(turns: Sequence[ChatTurn]) -> Any:
    """Left: each turn's prompt, its cached part shaded; right: TTFT per turn with and without prefix caching."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    x = [t.turn for t in turns]
    left.bar(x, [t.prompt_tokens for t in turns], color="lightgray", label="prompt tokens")
    left.bar(x, [t.cached_tokens for t in turns], color="tab:green", label="found in the prefix cache")
    left.set(xlabel="turn", ylabel="tokens", title="each turn resends the history")
    left.legend(fontsize=7)
    right.plot(x, [1e3 * t.ttft_plain_s for t in turns], "o-", color="tab:gray", label="no cache")
    right.plot(x, [1e3 * t.ttft_cached_s for t in turns], "o-", color="tab:green", label="prefix caching")
    right.set(xlabel="turn", ylabel="TTFT (ms)", ylim=(0, None), title="TTFT per turn, measured")
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    return fig


def routing_figure(runs: Mapping[str, RoutingRun]) -> Any:
    """Realised hit rate and per-request TTFT for each routing policy."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    names = list(runs)
    colors = ["tab:gray", "tab:blue", "tab:orange"][:len(names)]
    left.bar(names, [runs[n].hit_rate for n in names], color=colors)
    left.set(ylabel="prompt tokens found cached", ylim=(0, 1), title="realised prefix hit rate")
    for name, color in zip(names, colors):
        right.plot(range(1, len(runs[name].ttfts_s) + 1), [1e3 * s for s in runs[name].ttfts_s], "o-", ms=3,
                   color=color, label=f"{name} (mean {1e3 * runs[name].mean_ttft_s:.0f} ms)")
    right.set(xlabel="request", ylabel="TTFT (ms)", ylim=(0, None), title="TTFT per request, measured")
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    return fig


def wire_figure(bytes_ratio: Mapping[str, float], agreement: Mapping[str, float], title: str) -> Any:
    """Bytes on the wire (relative to float32 pages) against greedy token agreement, one point per wire."""
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for name in agreement:
        ax.plot(bytes_ratio[name], agreement[name], "o", ms=8)
        ax.annotate(name, (bytes_ratio[name], agreement[name]), textcoords="offset points", xytext=(6, -10), fontsize=8)
    ax.set(xlabel="bytes on the wire / float32 pages", ylabel="greedy token agreement", xlim=(0, 1.1),
           ylim=(min(0.5, min(agreement.values()) - 0.05), 1.03), title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
