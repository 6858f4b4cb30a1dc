"""When sending KV layer by layer during the prefill pays: a pipeline model of both ways of sending.

Sequential (the engine's default, ``kv_overlap=False``): the prefill runs, then every layer goes in
one message, so TTFT = prefill + latency + bytes / bandwidth.

Layer-wise (``kv_overlap=True``): layer i's pages leave once layer i is computed and the link is
free, one message per layer; handing each layer to the sender costs the prefill ``per_layer_s`` of
its own time (a gather and a queue hop). Layer i is ready at (i + 1) x (prefill + L x per_layer_s) / L,
its send ends at max(ready_i, end_{i-1}) + latency + bytes / L / bandwidth, and TTFT is the end of the
last send. Overlap can save at most the transfer time, and only when the link is slow enough for
there to be something to hide. The figures it gives are modelled, not measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from minidisagg.course.transfer_lab import LinkModel


@dataclass(frozen=True)
class OverlapModel:
    """Sequential and layer-wise TTFT of one request, from its prefill time, its KV bytes and a link."""

    num_layers: int
    per_layer_s: float = 0.0  # what handing one layer to the sender adds to the prefill

    def __post_init__(self) -> None:
        if self.num_layers < 1 or not self.per_layer_s >= 0:
            raise ValueError(f"need num_layers >= 1 and per_layer_s >= 0, got {self.num_layers}, {self.per_layer_s}")

    def sequential_s(self, prefill_s: float, num_bytes: float, link: LinkModel) -> float:
        """Prefill, then one message with every layer."""
        return prefill_s + float(link.seconds(num_bytes, 1))

    def layerwise_s(self, prefill_s: float, num_bytes: float, link: LinkModel) -> float:
        """Each layer sent as soon as it is computed and the link is free; returns when the last one lands."""
        layers = self.num_layers
        compute_s = (prefill_s + layers * self.per_layer_s) / layers
        send_s = float(link.seconds(num_bytes / layers, 1))
        end_s = 0.0
        for i in range(layers):
            end_s = max((i + 1) * compute_s, end_s) + send_s
        return end_s

    def speedup(self, prefill_s: float, num_bytes: float, link: LinkModel) -> float:
        """Sequential TTFT over layer-wise TTFT: above 1 when overlap wins."""
        return self.sequential_s(prefill_s, num_bytes, link) / self.layerwise_s(prefill_s, num_bytes, link)

    def speedup_at_ratio(self, prefill_s: float, num_bytes: float, transfer_over_prefill: float,
                         latency_s: float = 0.0) -> float:
        """The speedup on a link whose one-message transfer of ``num_bytes`` takes ``transfer_over_prefill`` x prefill."""
        wire_s = transfer_over_prefill * prefill_s - latency_s
        if wire_s <= 0:
            raise ValueError("the link's latency alone exceeds that transfer time")
        return self.speedup(prefill_s, num_bytes, LinkModel("ratio", num_bytes / wire_s / 1e9, latency_s))


def per_layer_cost_s(sequential_ttft_s: float, layerwise_ttft_s: float, num_layers: int) -> float:
    """Per-layer cost of layer-wise sending read off a fast link, where there is nothing to hide (>= 0)."""
    return max(0.0, (layerwise_ttft_s - sequential_ttft_s) / num_layers)


def speedup_curve_figure(models: dict[str, OverlapModel], prefill_s: float, num_bytes: float, ratios: Sequence[float],
                         marks: dict[str, float], title: str) -> Any:
    """Modelled speedup of layer-wise sending against transfer time / prefill time, one curve per model, links marked."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for (label, model), style in zip(models.items(), ("-", "--", ":")):
        ax.plot(ratios, [model.speedup_at_ratio(prefill_s, num_bytes, r) for r in ratios], style, color="tab:blue",
                lw=2, label=label)
    ax.axhline(1.0, color="black", lw=1)
    ax.text(ratios[0], 1.02, "above: overlap wins; below: it loses", fontsize=8)
    for i, (name, r) in enumerate(marks.items()):
        ax.axvline(r, color=f"C{i + 1}", ls="--", lw=1, label=f"{name}: {r:.3g}x")
    ax.set(xscale="log", xlabel="transfer time / prefill time (one message)",
           ylabel="sequential / layer-wise TTFT", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def speedups(model: OverlapModel, prefill_s: np.ndarray, num_bytes: np.ndarray, link: LinkModel) -> np.ndarray:
    """``speedup`` for several requests at once (prefill seconds and KV bytes per request)."""
    return np.array([model.speedup(float(p), float(b), link) for p, b in zip(prefill_s, num_bytes)])
