"""Lab 7: lab 5's break-even prompt length, re-derived with each trick that makes the KV hand-off cheaper.

Lab 5 finds the shortest prompt whose KV takes at least as long to ship as its prefill takes to
compute (``check.lab5.reference_break_even``, called here unchanged). A trick changes one side or both:

- a compressed wire (``kv_wire_dtype``) multiplies the bytes by its ratio to the pool's pages;
- prefix caching with hit rate ``h`` on the prefill worker leaves ``1 - h`` of the prompt to compute:
  the per-token and attention terms of the prefill scale by ``1 - h`` (the new tokens still attend to
  the cached ones), the fixed part stays. The whole prompt's KV still crosses, as it does in this engine
  when the decode worker does not hold the prefix;
- prefix reuse at both ends (the decode worker holds the prefix too: this engine's decode-side prefix
  cache, or a shared KV store) also sends only the uncached ``1 - h`` of the bytes.

Scaling the bytes by ``f`` is the same as dividing the link's bandwidth by ``f`` (its per-message cost
stays), which is how the scaled problem is handed to lab 5's search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from minidisagg.course.check.lab5 import reference_break_even
from minidisagg.course.transfer_lab import LinkModel, PrefillCostModel
from minidisagg.kv.pages import KVLayout

MAX_LEN = 32768


@dataclass(frozen=True)
class Trick:
    """One way of making the hand-off cheaper: a wire ratio, a prefix hit rate, and whether the decode side reuses too."""

    name: str
    wire_ratio: float = 1.0
    hit_rate: float = 0.0
    reuse_at_decode: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.wire_ratio <= 1:
            raise ValueError(f"{self.name}: wire_ratio must be in (0, 1], got {self.wire_ratio}")
        if not 0 <= self.hit_rate < 1:
            raise ValueError(f"{self.name}: hit_rate must be in [0, 1), got {self.hit_rate}")

    @property
    def bytes_factor(self) -> float:
        """What multiplies the KV bytes on the wire."""
        return self.wire_ratio * ((1 - self.hit_rate) if self.reuse_at_decode else 1.0)

    def prefill(self, prefill: PrefillCostModel) -> PrefillCostModel:
        """The prefill model with ``1 - hit_rate`` of the prompt left to compute (the fixed part unchanged)."""
        keep = 1 - self.hit_rate
        return PrefillCostModel(prefill.fixed_s, prefill.per_token_s * keep, prefill.per_token_sq_s * keep)

    def link(self, link: LinkModel) -> LinkModel:
        """The link as seen by the unscaled bytes: bandwidth over ``bytes_factor``, the same per-message cost."""
        return LinkModel(f"{link.name} ({self.name})", link.bandwidth_GBps / self.bytes_factor, link.latency_s)


def tricks(hit_rate: float, int8_ratio: float) -> list[Trick]:
    """The lab's five cases: none, an int8 wire, prefix caching at the prefill only, at both ends, and int8 with both ends."""
    return [Trick("plain"), Trick("int8 wire", wire_ratio=int8_ratio),
            Trick(f"prefix hits {hit_rate:.0%}, prefill side", hit_rate=hit_rate),
            Trick(f"prefix hits {hit_rate:.0%}, both ends", hit_rate=hit_rate, reuse_at_decode=True),
            Trick(f"int8 + hits {hit_rate:.0%}, both ends", wire_ratio=int8_ratio, hit_rate=hit_rate,
                  reuse_at_decode=True)]


def break_even_with(layout: KVLayout, prefill: PrefillCostModel, link: LinkModel, trick: Trick,
                    max_len: int = MAX_LEN) -> Optional[int]:
    """Lab 5's break-even prompt length with ``trick`` applied to the bytes and the prefill; None if none up to ``max_len``."""
    return reference_break_even(layout, trick.prefill(prefill), trick.link(link), max_len)


def break_even_sweep(layout: KVLayout, prefill: PrefillCostModel, bandwidths_GBps: Sequence[float],
                     cases: Sequence[Trick], latency_s: float = 0.0, max_len: int = MAX_LEN
                     ) -> dict[str, list[Optional[int]]]:
    """Break-even length per trick at each link bandwidth (None where the transfer never catches up)."""
    return {t.name: [break_even_with(layout, prefill, LinkModel(f"{b:.3g} GB/s", float(b), latency_s), t, max_len)
                     for b in bandwidths_GBps] for t in cases}


def break_even_axes(ax: Any, sweep: dict[str, list[Optional[int]]], bandwidths_GBps: Sequence[float], title: str,
                    max_len: int = MAX_LEN) -> None:
    """Draw break-even length against link bandwidth, one line per trick, on ``ax``."""
    styles = ("-", "--", "-.", ":", (0, (5, 1)))
    for (name, lengths), style in zip(sweep.items(), styles):
        y = np.array([np.nan if n is None else n for n in lengths], dtype=float)
        ax.plot(bandwidths_GBps, y, linestyle=style, lw=2, label=name)
    ax.set(xscale="log", yscale="log", xlabel="link GB/s", ylabel="break-even prompt (tokens)", ylim=(0.7, max_len),
           xlim=(min(bandwidths_GBps), max(bandwidths_GBps)), title=title)
    ax.text(0.98, 0.04, f"where a line ends: no break-even up to {max_len} tokens", transform=ax.transAxes,
            ha="right", fontsize=7, color="dimgray")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left")


def compare_sweeps(a: Sequence[Optional[int]], b: Sequence[Optional[int]]) -> tuple[int, int]:
    """(bandwidths where ``a``'s break-even is shorter than ``b``'s, where it is longer); no break-even counts as longest."""
    inf = float("inf")
    pairs = [(inf if x is None else x, inf if y is None else y) for x, y in zip(a, b)]
    return sum(x < y for x, y in pairs), sum(x > y for x, y in pairs)
