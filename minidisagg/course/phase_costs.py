"""Lab 6's per-phase costs: what one prefill and one decode step cost on the device, measured before any replay.

Every point is the fastest of several interleaved repeats (another program's load only ever adds
time), capped by the larger sizes' (more work never costs less); the calibration keeps every
repeat, their spread and the host load, so a notebook can print how disturbed the measurement was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from minidisagg.course.claims import HostLoad, host_load
from minidisagg.course.transfer_lab import PrefillCostModel, fit_decode, measure_decode_steps, measure_prefill
from minidisagg.engine.step_cost import StepCostModel
from minidisagg.models.registry import LoadedModel


@dataclass(frozen=True)
class PhaseCosts:
    """What each phase costs on one device: prefill per prompt, decode per step, KV transfer per prompt."""

    prefill: PrefillCostModel
    decode_fixed_s: float  # one decode step = decode_fixed_s + decode_per_seq_s x batch size
    decode_per_seq_s: float
    kv_bytes_per_token: int
    link_GBps: float = 3.0
    max_batch: int = 64  # most sequences one decode step runs

    def __post_init__(self) -> None:
        if not (self.decode_fixed_s >= 0 and self.decode_per_seq_s >= 0):
            raise ValueError("decode costs must be >= 0")
        if not self.decode_fixed_s + self.decode_per_seq_s > 0:
            raise ValueError("a decode step must cost some time")
        if not self.link_GBps > 0 or self.max_batch < 1 or self.kv_bytes_per_token < 0:
            raise ValueError("link_GBps must be > 0, max_batch >= 1 and kv_bytes_per_token >= 0")

    @classmethod
    def from_step_costs(cls, step_costs: StepCostModel, prompt_lens: Sequence[int], kv_bytes_per_token: int,
                        link_GBps: float = 3.0, max_batch: int = 64) -> "PhaseCosts":
        """The same calibration as an engine replay's (``calibrate_step_costs``), in this lab's two fits.

        Prefill is read at ``prompt_lens`` (fresh prompts), decode at the calibrated batch sizes.
        """
        prefill = lower_envelope({n: step_costs.prefill_cost_s(n) for n in prompt_lens})
        decode = lower_envelope({b: step_costs.decode_cost_s(b, step_costs.decode_reference_context)
                                 for b in step_costs.decode_batch_sizes})
        fixed, per_seq = fit_decode(decode)
        return cls(PrefillCostModel.fit(list(prefill), list(prefill.values())), fixed, per_seq, kv_bytes_per_token,
                   link_GBps, max_batch)

    def prefill_s(self, prompt_len: int) -> float:
        """Seconds to prefill one prompt alone."""
        return float(self.prefill.seconds(prompt_len))

    def decode_step_s(self, batch_size: float) -> float:
        """Seconds of one decode step over ``batch_size`` sequences."""
        return self.decode_fixed_s + self.decode_per_seq_s * batch_size

    def transfer_s(self, prompt_len: int) -> float:
        """Seconds to ship one prompt's KV over the link."""
        return prompt_len * self.kv_bytes_per_token / (self.link_GBps * 1e9)

    def describe(self) -> str:
        """The costs in one line, with units."""
        return (f"{self.prefill.describe()}; decode step(B) = {self.decode_fixed_s * 1e3:.1f} ms + "
                f"{self.decode_per_seq_s * 1e3:.2f} ms x B; KV {self.kv_bytes_per_token / 1e3:.1f} kB/token over "
                f"{self.link_GBps:g} GB/s")


@dataclass(frozen=True)
class CostCalibration:
    """How ``measure_phase_costs`` measured: every repeat's seconds per point, and the host load around it.

    Each point's cost is the fastest of its repeats (another program's load only ever adds time);
    the spread says how much the slower repeats were disturbed.
    """

    prefill_samples_s: dict[int, list[float]]  # prompt tokens -> seconds of each repeat
    decode_samples_s: dict[int, list[float]]  # batch size -> fastest step of each repeat
    load_before: HostLoad
    load_after: HostLoad

    @property
    def spread(self) -> float:
        """The largest (slowest - fastest) / fastest over all points: how much load moved the repeats."""
        samples = [*self.prefill_samples_s.values(), *self.decode_samples_s.values()]
        return max((max(v) - min(v)) / min(v) for v in samples if v)

    @property
    def overloaded(self) -> bool:
        """More runnable work than cores before or after: the slower repeats carry other programs' time."""
        return self.load_before.overloaded or self.load_after.overloaded

    def describe(self) -> str:
        """One line: repeats, spread, and the host load before and after."""
        repeats = min(len(v) for v in [*self.prefill_samples_s.values(), *self.decode_samples_s.values()])
        line = (f"calibration: fastest of {repeats} repeats per point; repeats spread up to {100 * self.spread:.0f}%; "
                f"host {self.load_before.describe()} before, {self.load_after.load_1min:.1f} after")
        if self.overloaded:
            line += " (WARNING: busier than its cores; the minimum is the figure least disturbed)"
        return line


def lower_envelope(seconds_by_size: dict[int, float]) -> dict[int, float]:
    """Each point capped by every larger size's time: more work never costs less, so a smaller size that
    measured slower than a larger one was disturbed (by load), and the larger one's time bounds it."""
    out: dict[int, float] = {}
    lowest = float("inf")
    for size in sorted(seconds_by_size, reverse=True):
        lowest = min(lowest, seconds_by_size[size])
        out[size] = lowest
    return dict(sorted(out.items()))


def measure_phase_costs(loaded: LoadedModel, prompt_lens: Sequence[int], batch_sizes: Sequence[int],
                        link_GBps: float = 3.0, max_batch: int = 64, repeats: int = 3) -> tuple[PhaseCosts, dict[str, Any]]:
    """Time prefills and decode steps on the loaded model's device, ``repeats`` times each; fit the fastest.

    Each point is the fastest of its repeats, capped by the larger sizes' (``lower_envelope``). Returns the costs and the raw points: ``prefill_s`` and ``decode_step_s`` (fastest per point) and
    ``calibration`` (a ``CostCalibration``: every repeat, their spread, the host load). Every replay
    that compares deployments charges these same costs.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    before = host_load()
    prefill: dict[int, list[float]] = {n: [] for n in prompt_lens}
    decode: dict[int, list[float]] = {b: [] for b in batch_sizes}
    for rep in range(repeats):  # whole passes, interleaved: a burst of load hits one repeat of each point
        for n, t in measure_prefill(loaded, prompt_lens, 1, seed=rep).items():
            prefill[n].append(t)
        for b, t in measure_decode_steps(loaded, batch_sizes, steps=6, seed=rep).items():
            decode[b].append(t)
    calibration = CostCalibration(prefill, decode, before, host_load())
    prefill_points = lower_envelope({n: min(v) for n, v in prefill.items()})
    decode_points = lower_envelope({b: min(v) for b, v in decode.items()})
    fixed, per_seq = fit_decode(decode_points)
    dtype_bytes = torch.tensor([], dtype=loaded.model.dtype).element_size()
    costs = PhaseCosts(PrefillCostModel.fit(list(prefill_points), list(prefill_points.values())), fixed, per_seq,
                       loaded.config.kv_bytes_per_token(dtype_bytes), link_GBps, max_batch)
    return costs, {"prefill_s": prefill_points, "decode_step_s": decode_points, "calibration": calibration}
