"""Step-cost models for the simulator: calibrate one, or fit one to a run's own steps; save it as JSON, load it back.

Two sources. ``calibrate_costs`` is the engine's own calibration (``engine.calibrate``: stages timed shape
by shape, the median of several repeats, as ``fit_costs`` takes medians, so the two compare). ``fit_costs``
fits the same model to the steps a serving run actually took (``RecordingClock`` records each stage run's
shape and wall time, plus the host time spent since the previous run: scheduling, sampling, bookkeeping),
by medians: a model fitted on one run of a busy host predicts another run of that host, load included.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from minidisagg.engine.clock import WallClock
from minidisagg.engine.step_cost import DECODE, PREFILL, StepCostModel, StepShape, fit_prefill

StepTiming = tuple[StepShape, float]  # a stage run's shape and the seconds it took


def costs_to_dict(costs: StepCostModel) -> dict[str, Any]:
    """A JSON-friendly form of ``costs``."""
    return {f.name: getattr(costs, f.name) for f in dataclasses.fields(costs)}


def costs_from_dict(data: dict[str, Any]) -> StepCostModel:
    """Inverse of ``costs_to_dict``; ValueError naming what is missing or unknown."""
    names = {f.name for f in dataclasses.fields(StepCostModel)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"not a step-cost model: unknown field(s) {unknown}; expected some of {sorted(names)}")
    fields = dict(data)
    for name in ("decode_batch_sizes", "decode_s"):
        if name in fields:
            fields[name] = tuple(fields[name])
    if "prefill_points" in fields:
        fields["prefill_points"] = tuple(tuple(p) for p in fields["prefill_points"])
    try:
        return StepCostModel(**fields)
    except TypeError as exc:
        raise ValueError(f"not a step-cost model: {exc}") from None


def save_costs(costs: StepCostModel, path: str | Path, **meta: Any) -> Path:
    """Write ``costs`` (and ``meta``: model, card, date ...) as JSON; returns the path."""
    path = Path(path)
    path.write_text(json.dumps({"step_costs": costs_to_dict(costs), **meta}, indent=1))
    return path


def load_costs(path: str | Path) -> StepCostModel:
    """The step-cost model saved by ``save_costs``; ValueError saying what is wrong with a bad file."""
    hint = "write one with `minidisagg sim calibrate --out FILE` (or minidisagg.sim.costs.save_costs)"
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such step-cost file; {hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not JSON ({exc}); {hint}") from None
    if not isinstance(data, dict) or not isinstance(data.get("step_costs"), dict):
        raise ValueError(f"{path}: no 'step_costs' object; {hint}")
    try:
        return costs_from_dict(data["step_costs"])
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}; {hint}") from None


class RecordingClock(WallClock):
    """A wall clock that records every stage run charged to it: ``timings`` holds (shape, seconds).

    With ``host_overhead`` (the default) a run's seconds include the host time since the previous run ended
    (or since a wait for an arrival ended): what the engine spent scheduling, sampling and updating between
    runs, which a serving run pays on every step and a stage's own timing misses.
    """

    def __init__(self, origin_s: Optional[float] = None, host_overhead: bool = True) -> None:
        super().__init__(origin_s)
        self.host_overhead = host_overhead
        self.timings: list[StepTiming] = []
        self._last_end_s: Optional[float] = None

    def restart(self) -> None:
        """Forget what was recorded (a warm-up, say); the next run counts no host time before it."""
        self.timings.clear()
        self._last_end_s = None

    def wait_until(self, t_s: float) -> None:
        """Sleep until ``t_s``; the next run's overhead counts from the end of the sleep."""
        super().wait_until(t_s)
        self._last_end_s = time.perf_counter()

    def charge(self, shape: StepShape, measured_s: float) -> float:
        """Record the run, then return ``measured_s`` as a wall clock does."""
        end_s = time.perf_counter()
        seconds = measured_s
        if self.host_overhead and self._last_end_s is not None:
            seconds = max(measured_s, end_s - self._last_end_s)
        self.timings.append((shape, seconds))
        self._last_end_s = end_s
        return measured_s


def _check_timings(timings: Sequence[StepTiming]) -> None:
    for shape, seconds in timings:
        if not isinstance(shape, StepShape):
            raise ValueError(f"fit_costs: expected (StepShape, seconds) pairs, got a {type(shape).__name__}")
        if not (seconds > 0 and np.isfinite(seconds)):
            raise ValueError(f"fit_costs: a step's seconds must be positive and finite, got {seconds} for {shape}")
    phases = {shape.phase for shape, _ in timings}
    for phase in (PREFILL, DECODE):
        if phase not in phases:
            raise ValueError(f"fit_costs: no {phase} steps among {len(timings)} timings; a cost model needs both")


def fit_costs(timings: Sequence[StepTiming], decode_reference_context: Optional[int] = None,
              **fields: Any) -> StepCostModel:
    """A ``StepCostModel`` fitted to recorded stage runs (``RecordingClock.timings``), robust to load spikes.

    Prefill: the runs grouped by shape (tokens, attention pairs), each shape's median time, then the usual
    non-negative line (``fit_prefill``). Decode: one slope per context token shared by every batch size
    (each batch size's runs split at their median context, the halves' median times compared; a weighted
    mean over batch sizes), then each batch size's median time less that slope's share, at
    ``decode_reference_context`` tokens a sequence (default: the smallest mean context seen). ``fields`` go
    to the model (device, load_1min, cpu_threads).
    """
    _check_timings(timings)
    by_shape: dict[tuple[int, float], list[float]] = {}
    decode: dict[int, list[tuple[float, float]]] = {}
    for shape, seconds in timings:
        if shape.phase == PREFILL:
            by_shape.setdefault((shape.num_tokens, shape.attention_pairs), []).append(seconds)
        else:
            decode.setdefault(shape.num_seqs, []).append((shape.attention_pairs / shape.num_seqs, seconds))
    points = [(n, pairs, statistics.median(ts)) for (n, pairs), ts in sorted(by_shape.items())]
    if decode_reference_context is None:
        decode_reference_context = int(min(ctx for runs in decode.values() for ctx, _ in runs))
    slopes, weights = [], []
    for b, runs in decode.items():  # per batch size: the lower and upper halves by context, median against median
        runs = sorted(runs)
        low, high = runs[:len(runs) // 2], runs[(len(runs) + 1) // 2:]
        if not low or not high:
            continue
        dc = statistics.median(c for c, _ in high) - statistics.median(c for c, _ in low)
        if dc > 0:
            dt = statistics.median(t for _, t in high) - statistics.median(t for _, t in low)
            slopes.append(dt / (b * dc))
            weights.append(len(runs) * b * dc)  # more runs over a wider context say more
    per_context_s = max(0.0, float(np.average(slopes, weights=weights))) if slopes else 0.0
    sizes = sorted(decode)
    decode_s = [max(1e-9, statistics.median(t - per_context_s * b * max(0.0, c - decode_reference_context)
                                            for c, t in decode[b])) for b in sizes]
    fields.setdefault("device", "cpu")
    return StepCostModel.fitted(points, sizes, decode_s, decode_context_s=per_context_s,
                                decode_reference_context=decode_reference_context, **fields)


def calibrate_costs(model: str, device: str = "auto", max_prompt_tokens: int = 2048, max_batch: int = 64,
                    max_context_tokens: int = 0, repeats: int = 3, random_weights: bool = True) -> StepCostModel:
    """Time the engine's stages on ``device`` for ``model`` (random weights by default: costs need shapes only).

    Each shape keeps the median of its ``repeats`` runs (``engine.calibrate.kept_s``), as ``fit_costs`` does.
    """
    from minidisagg.engine.calibrate import CalibrationPlan, calibrate_step_costs
    from minidisagg.models.registry import load_model

    loaded = load_model(model, device=device, random_weights=random_weights)
    plan = CalibrationPlan.covering(max_prompt_tokens, max_batch, max_context_tokens or None, repeats=repeats)
    return calibrate_step_costs(loaded, plan, progress=False, keep="median")


if __name__ == "__main__":  # python -m minidisagg.sim.costs MODEL MAX_PROMPT MAX_BATCH MAX_CONTEXT OUT.json
    import sys
    import time

    name, prompt, batch, context, out = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5]
    t0 = time.perf_counter()
    cost_model = calibrate_costs(name, max_prompt_tokens=prompt, max_batch=batch, max_context_tokens=context)
    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    save_costs(cost_model, out, model=name, card=card, calibrated_s=time.perf_counter() - t0)
    print(cost_model.describe())


def costs_from_gpu_rows(path: str | Path, model: str, kv_bytes_per_token: int) -> StepCostModel:
    """A step-cost model for ``model`` from a committed ``bench gpu`` result (``results/gpu-<card>-<date>.json``).

    Prefill: the ``prefill <model> <N>`` rows (whole prompts of N tokens), the usual fitted line. Decode: the
    ``decode <model> bs<B>`` rows (CUDA graphs, asynchronous scheduling) at the bench's context (prompt plus half
    its new tokens), plus the KV cache read per extra context token at the card's measured read bandwidth
    (roofline: decode attention streams ``kv_bytes_per_token`` a token of context).
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read a bench gpu result ({exc})") from None
    rows = {r.get("name"): r for r in data.get("rows", []) if isinstance(r, dict)} if isinstance(data, dict) else {}
    scale = {"ms": 1e-3, "us": 1e-6, "s": 1.0}
    prefill, decode = [], []
    for name, row in rows.items():
        parts = str(name).split()
        if len(parts) == 3 and parts[1] == model and row.get("unit") in scale:
            seconds = float(row["value"]) * scale[row["unit"]]
            if parts[0] == "prefill" and parts[2].isdigit():
                n = int(parts[2])
                prefill.append((n, n * (n + 1) / 2, seconds))
            elif parts[0] == "decode" and parts[2].startswith("bs") and parts[2][2:].isdigit():
                decode.append((int(parts[2][2:]), seconds))
    if len(prefill) < 2 or not decode:
        raise ValueError(f"{path}: needs 'prefill {model} N' rows (two or more) and 'decode {model} bsB' rows; "
                         f"found {len(prefill)} and {len(decode)}; is it a bench gpu result that ran {model}?")
    read_GBps = float(data.get("read_GBps") or data.get("copy_GBps") or 0.0)
    if read_GBps <= 0:
        raise ValueError(f"{path}: no read_GBps or copy_GBps figure for the KV read per context token")
    decode.sort()
    reference = int(data.get("prompt_len", 0)) + int(data.get("new_tokens", 0)) // 2
    return StepCostModel.fitted(sorted(prefill), [b for b, _ in decode], [t for _, t in decode],
                                decode_context_s=kv_bytes_per_token / (read_GBps * 1e9),
                                decode_reference_context=reference, device=str(data.get("card", "gpu")))
