"""Lab 5 support code: sending a prefill's KV in groups of layers while later layers still compute.

Layer i's KV is written at (i + 1) x ``layer_compute_s``. With a group size g, layers 0..g-1 leave
in one message once layer g-1 is written, the next g layers in the next message, and so on (the
last group holds what is left). A message starts when its group is written and the link is free,
and takes ``link.seconds(bytes, 1)``: the link's per-message latency plus bytes over bandwidth.
What pipelining is for is the *tail*: the time from the prefill's end to the last byte landed.
The figures here are modelled from a link model and a per-layer compute time, not measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from minidisagg.course.transfer_lab import LinkModel


@dataclass(frozen=True)
class LayerPipeline:
    """One prefill of ``num_layers`` layers, each computed in ``layer_compute_s`` and holding ``layer_bytes`` of KV."""

    num_layers: int
    layer_compute_s: float
    layer_bytes: float

    def __post_init__(self) -> None:
        if self.num_layers < 1 or not self.layer_compute_s >= 0 or not self.layer_bytes >= 0:
            raise ValueError(f"need num_layers >= 1 and non-negative times and bytes, got {self}")

    @property
    def prefill_s(self) -> float:
        """The prefill's compute time, every layer."""
        return self.num_layers * self.layer_compute_s

    def tail_s(self, group_layers: int, link: LinkModel) -> float:
        """Seconds from the prefill's end to the last byte landed, sending ``group_layers`` layers per message."""
        if not 1 <= group_layers <= self.num_layers:
            raise ValueError(f"group_layers must be in 1..{self.num_layers}, got {group_layers}")
        end_s = 0.0
        for first in range(0, self.num_layers, group_layers):
            last = min(first + group_layers, self.num_layers)
            ready_s = last * self.layer_compute_s
            end_s = max(ready_s, end_s) + float(link.seconds((last - first) * self.layer_bytes, 1))
        return end_s - self.prefill_s

    def tails_s(self, link: LinkModel) -> np.ndarray:
        """``tail_s`` of every group size, 1..num_layers (index g - 1)."""
        return np.array([self.tail_s(g, link) for g in range(1, self.num_layers + 1)])


def fastest_group_size(num_layers: int, layer_compute_s: float, layer_bytes: float, link: LinkModel) -> int:
    """The group size with the shortest tail, found by trying every one (the smallest among ties)."""
    tails = LayerPipeline(num_layers, layer_compute_s, layer_bytes).tails_s(link)
    return int(np.flatnonzero(tails <= tails.min() * (1 + 1e-12))[0]) + 1


def group_size_figure(pipelines: dict[str, tuple[LayerPipeline, LinkModel]], chosen: dict[str, int], title: str) -> Any:
    """Tail against group size, one curve per (pipeline, link); the chosen size of each marked with a dot."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    for color, (label, (pipe, link)) in zip(("tab:blue", "tab:orange", "tab:green", "tab:red"), pipelines.items()):
        sizes = np.arange(1, pipe.num_layers + 1)
        tails_ms = pipe.tails_s(link) * 1e3
        ax.plot(sizes, tails_ms, color=color, lw=1.5, label=label)
        g = chosen[label]
        ax.plot([g], [tails_ms[g - 1]], "o", color=color, ms=8, mfc="white", mew=2)
        ax.annotate(f"your g={g}", (g, tails_ms[g - 1]), textcoords="offset points", xytext=(6, 6), fontsize=8,
                    color=color)
    ax.set(yscale="log", xlabel="layers per message (g); g = all layers is sending after the prefill",
           ylabel="prefill end -> last byte (ms)", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
