"""What an engine step costs: the shape of a stage run, and a cost model calibrated before a replay.

A simulated-clock replay that advanced by each step's wall time would let other programs' load
leak into its "simulated" timeline: on a busy machine a 256-token prefill can take longer than a
512-token one, and a lesson can invert. A ``StepCostModel`` is measured first (the fastest of
several repeats per shape: load only ever adds time), then every replayed step is charged what the
model says its shape costs. The replay is then deterministic given the calibration, and both
sides of a comparison share one calibration.

The model:
- prefill: ``fixed + per_token x tokens + per_pair x attention pairs``, fitted (non-negative, by
  relative error) to the fastest runs of whole prompts and of chunks at growing context. Every
  token goes through every weight (linear) and attends to every earlier token (pairs);
- decode: interpolated over the batch size (measured at ``decode_reference_context`` tokens per
  sequence; a CPU's products change kernels with the batch, so this need not be monotone), plus
  ``decode_context_s`` per context token beyond that, plus ``decode_per_seq_s`` per sequence (host work
  per sequence and step that a batch-by-batch device timing leaves out: its inputs, its sampled token's
  bookkeeping, its output message; 0 unless fitted to a serving run).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

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


def fit_prefill(points: Sequence[tuple[int, float, float]]) -> tuple[float, float, float]:
    """(fixed_s, per_token_s, per_pair_s) >= 0 fitting (tokens, attention pairs, seconds) points by relative error."""
    x = np.array([[1.0, n, pairs] for n, pairs, _ in points])
    t = np.array([secs for _, _, secs in points])
    a, y = x / t[:, None], np.ones(len(t))  # relative error: every shape counts, small or large
    active = [0, 1, 2]
    coef = np.zeros(3)
    while active:
        sol, *_ = np.linalg.lstsq(a[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[:] = 0.0
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))  # drop the most negative term and refit
    return float(coef[0]), float(coef[1]), float(coef[2])


@dataclass(frozen=True)
class StepCostModel:
    """Seconds per stage run, by shape: a fitted prefill line plus attention, decode points plus context."""

    prefill_fixed_s: float
    prefill_per_token_s: float
    prefill_per_pair_s: float
    decode_batch_sizes: tuple[int, ...]
    decode_s: tuple[float, ...]
    decode_context_s: float = 0.0  # per context token beyond decode_reference_context per sequence
    decode_reference_context: int = 0
    device: str = "cpu"
    load_1min: float = 0.0  # host load while calibrating, for the record
    cpu_threads: int = 0  # threads the CPU calibration ran on (0: not a CPU)
    prefill_points: tuple[tuple[int, float, float], ...] = ()  # what was measured: (tokens, pairs, fastest s)
    decode_commit_s: float = 0.0  # a disaggregated decode instance taking in one request's KV, between its steps
    decode_per_seq_s: float = 0.0  # host work per sequence in each decode step, on top of the device's batch time

    def __post_init__(self) -> None:
        xs, ys = self.decode_batch_sizes, self.decode_s
        if not xs or len(xs) != len(ys):
            raise ValueError("StepCostModel: decode needs matching, non-empty batch sizes and times")
        if list(xs) != sorted(set(xs)) or min(xs) < 1:
            raise ValueError(f"StepCostModel: decode batch sizes must be increasing and >= 1, got {xs}")
        if not all(t > 0 for t in ys):
            raise ValueError(f"StepCostModel: decode times must be > 0, got {ys}")
        coefs = (self.prefill_fixed_s, self.prefill_per_token_s, self.prefill_per_pair_s, self.decode_context_s,
                 self.decode_commit_s)
        if min(coefs) < 0:
            raise ValueError("StepCostModel: costs per step, token, pair, context token and KV commit must be >= 0")
        if not self.decode_per_seq_s >= 0:
            raise ValueError(f"StepCostModel: decode_per_seq_s (host seconds per sequence and decode step) must be >= 0, "
                             f"got {self.decode_per_seq_s}")
        if not self.prefill_fixed_s + self.prefill_per_token_s > 0:
            raise ValueError("StepCostModel: a prefill must cost some time")

    @classmethod
    def fitted(cls, prefill_points: Sequence[tuple[int, float, float]], decode_batch_sizes: Sequence[int],
               decode_s: Sequence[float], **fields: Any) -> "StepCostModel":
        """The model whose prefill line is fitted to measured (tokens, pairs, seconds) points."""
        fixed, per_token, per_pair = fit_prefill(prefill_points)
        return cls(fixed, per_token, per_pair, tuple(decode_batch_sizes), tuple(decode_s),
                   prefill_points=tuple(prefill_points), **fields)

    def cost_s(self, shape: StepShape) -> float:
        """Seconds a stage run of ``shape`` costs under this calibration."""
        if shape.phase == PREFILL:
            return (self.prefill_fixed_s + self.prefill_per_token_s * shape.num_tokens
                    + self.prefill_per_pair_s * shape.attention_pairs)
        b = shape.num_seqs
        base = max(0.1 * self.decode_s[0], interpolate(self.decode_batch_sizes, self.decode_s, b)) + self.decode_per_seq_s * b
        return base + self.decode_context_s * max(0.0, shape.attention_pairs - b * self.decode_reference_context)

    def decode_costs_s(self, batch_size: int, attention_pairs: np.ndarray) -> np.ndarray:
        """``cost_s`` of decode steps of ``batch_size`` sequences at each of ``attention_pairs``, bit for bit, at once.

        The same arithmetic as ``cost_s`` in the same order, elementwise: a simulator advancing many
        decode steps in one go gets exactly the times that stepping one by one would.
        """
        b = batch_size
        base = max(0.1 * self.decode_s[0], interpolate(self.decode_batch_sizes, self.decode_s, b)) + self.decode_per_seq_s * b
        pairs = np.asarray(attention_pairs, dtype=np.float64)
        return base + self.decode_context_s * np.maximum(0.0, pairs - b * self.decode_reference_context)

    def prefill_cost_s(self, num_tokens: int, context_tokens: int = 0) -> float:
        """One chunk of ``num_tokens`` after ``context_tokens`` already in the cache."""
        pairs = num_tokens * (context_tokens + (num_tokens + 1) / 2)
        return self.cost_s(StepShape(PREFILL, 1, num_tokens, pairs))

    def decode_cost_s(self, batch_size: int, context_tokens_per_seq: int) -> float:
        """One decode step of ``batch_size`` sequences with ``context_tokens_per_seq`` tokens each."""
        return self.cost_s(StepShape(DECODE, batch_size, batch_size, float(batch_size * context_tokens_per_seq)))

    def describe(self) -> str:
        """The calibration in two lines, with units."""
        dec = ", ".join(f"{b}: {1e3 * t:.1f}" for b, t in zip(self.decode_batch_sizes, self.decode_s))
        return (f"prefill = {1e3 * self.prefill_fixed_s:.1f} ms + {1e6 * self.prefill_per_token_s:.1f} us x tokens + "
                f"{1e9 * self.prefill_per_pair_s:.2f} ns x attention pairs (fitted to {len(self.prefill_points)} "
                f"measured shapes)\n"
                f"decode ms by batch {{{dec}}} at {self.decode_reference_context} context tokens "
                f"+ {1e9 * self.decode_context_s:.1f} ns per extra context token"
                f"{f' + {1e6 * self.decode_per_seq_s:.1f} us per sequence' if self.decode_per_seq_s else ''}"
                f"{f' + {1e3 * self.decode_commit_s:.1f} ms per KV commit' if self.decode_commit_s else ''}  "
                f"(calibrated on {self.device}{f', {self.cpu_threads} thread' if self.cpu_threads else ''}, "
                f"host load {self.load_1min:.1f})")
