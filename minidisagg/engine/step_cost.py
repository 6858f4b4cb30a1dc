"""What an engine step costs: the shape of a stage run, and a cost model calibrated before a replay.

A simulated-clock replay that advanced by each step's wall time would let other programs' load
leak into its "simulated" timeline: on a busy machine a 256-token prefill can take longer than a
512-token one, and a lesson can invert. A ``StepCostModel`` is measured first (the fastest of
several repeats per shape: load only ever adds time), then every replayed step is charged what the
model says its shape costs. The replay is then deterministic given the calibration, and both
sides of a comparison share one calibration.

The model is piecewise linear in the quantity that dominates each phase, plus a linear term for
attention:
- prefill: interpolated over the batch's tokens (measured at context 0), plus ``prefill_attention_s``
  per query-key pair beyond what a fresh prompt of that size has;
- decode: interpolated over the batch size (measured at ``decode_reference_context`` tokens per
  sequence), plus ``decode_context_s`` per context token beyond that.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Sequence

PREFILL = "prefill"
DECODE = "decode"


@dataclass(frozen=True)
class StepShape:
    """What one stage run did, in the units its cost depends on.

    ``attention_pairs``: query-key pairs the batch's attention computes (prefill: each new token
    attends to every earlier token and itself; decode: each sequence's context length).
    """

    phase: str
    num_seqs: int
    num_tokens: int
    attention_pairs: float

    @classmethod
    def of_work(cls, phase: str, work: Sequence[Any]) -> "StepShape":
        """The shape of a stage's work list, read before it runs (prefill chunks or decoding sequences)."""
        if work and hasattr(work[0], "num_tokens") and hasattr(work[0], "seq"):  # PrefillChunk
            pairs = sum(c.num_tokens * (c.seq.num_computed_tokens + (c.num_tokens + 1) / 2) for c in work)
            return cls(PREFILL, len(work), sum(c.num_tokens for c in work), float(pairs))
        return cls(DECODE if phase != PREFILL else phase, len(work), len(work), float(sum(s.num_tokens for s in work)))


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear ``y(x)`` through sorted points, extended past the ends by the nearest segment's slope."""
    if len(xs) == 1:
        return ys[0] * x / xs[0] if xs[0] else ys[0]
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclass(frozen=True)
class StepCostModel:
    """Seconds per stage run, by shape: measured points per phase plus linear attention terms."""

    prefill_tokens: tuple[int, ...]
    prefill_s: tuple[float, ...]
    decode_batch_sizes: tuple[int, ...]
    decode_s: tuple[float, ...]
    prefill_attention_s: float = 0.0  # per query-key pair beyond a fresh prompt's own
    decode_context_s: float = 0.0  # per context token beyond decode_reference_context per sequence
    decode_reference_context: int = 0
    device: str = "cpu"
    load_1min: float = 0.0  # host load while calibrating, for the record
    cpu_threads: int = 0  # threads the CPU calibration ran on (0: not a CPU)

    def __post_init__(self) -> None:
        for name, xs, ys in (("prefill", self.prefill_tokens, self.prefill_s),
                             ("decode", self.decode_batch_sizes, self.decode_s)):
            if not xs or len(xs) != len(ys):
                raise ValueError(f"StepCostModel: {name} needs matching, non-empty sizes and times")
            if list(xs) != sorted(set(xs)) or min(xs) < 1:
                raise ValueError(f"StepCostModel: {name} sizes must be increasing and >= 1, got {xs}")
            if not all(t > 0 for t in ys):
                raise ValueError(f"StepCostModel: {name} times must be > 0, got {ys}")
        if self.prefill_attention_s < 0 or self.decode_context_s < 0:
            raise ValueError("StepCostModel: attention costs must be >= 0")

    def cost_s(self, shape: StepShape) -> float:
        """Seconds a stage run of ``shape`` costs under this calibration (never below a tenth of the cheapest point)."""
        if shape.phase == PREFILL:
            n = shape.num_tokens
            own_pairs = n * (n + 1) / 2
            base = interpolate(self.prefill_tokens, self.prefill_s, n)
            extra = self.prefill_attention_s * max(0.0, shape.attention_pairs - own_pairs)
            floor = 0.1 * self.prefill_s[0]
        else:
            b = shape.num_seqs
            base = interpolate(self.decode_batch_sizes, self.decode_s, b)
            extra = self.decode_context_s * max(0.0, shape.attention_pairs - b * self.decode_reference_context)
            floor = 0.1 * self.decode_s[0]
        return max(floor, base) + extra

    def prefill_cost_s(self, num_tokens: int, context_tokens: int = 0) -> float:
        """One chunk of ``num_tokens`` after ``context_tokens`` already in the cache."""
        pairs = num_tokens * (context_tokens + (num_tokens + 1) / 2)
        return self.cost_s(StepShape(PREFILL, 1, num_tokens, pairs))

    def decode_cost_s(self, batch_size: int, context_tokens_per_seq: int) -> float:
        """One decode step of ``batch_size`` sequences with ``context_tokens_per_seq`` tokens each."""
        return self.cost_s(StepShape(DECODE, batch_size, batch_size, float(batch_size * context_tokens_per_seq)))

    def describe(self) -> str:
        """The calibration in two lines, with units."""
        pre = ", ".join(f"{n}: {1e3 * t:.1f}" for n, t in zip(self.prefill_tokens, self.prefill_s))
        dec = ", ".join(f"{b}: {1e3 * t:.1f}" for b, t in zip(self.decode_batch_sizes, self.decode_s))
        return (f"prefill ms by tokens {{{pre}}} + {1e9 * self.prefill_attention_s:.2f} ns per extra attention pair\n"
                f"decode ms by batch {{{dec}}} at {self.decode_reference_context} context tokens "
                f"+ {1e9 * self.decode_context_s:.1f} ns per extra context token  "
                f"(calibrated on {self.device}{f', {self.cpu_threads} thread' if self.cpu_threads else ''}, "
                f"host load {self.load_1min:.1f})")
