"""Step-cost models for the simulator: calibrate one on the local device, save it as JSON, load it back.

The calibration is the engine's own (``engine.calibrate``: the engine's stages timed shape by shape,
the fastest of several repeats), so a simulated instance is priced by what this device measured.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from minidisagg.engine.step_cost import StepCostModel


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
    """The step-cost model saved by ``save_costs``."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "step_costs" not in data:
        raise ValueError(f"{path}: no 'step_costs' object; write it with minidisagg.sim.costs.save_costs")
    return costs_from_dict(data["step_costs"])


def calibrate_costs(model: str, device: str = "auto", max_prompt_tokens: int = 2048, max_batch: int = 64,
                    max_context_tokens: int = 0, repeats: int = 3, random_weights: bool = True) -> StepCostModel:
    """Time the engine's stages on ``device`` for ``model`` (random weights by default: costs need shapes only)."""
    from minidisagg.engine.calibrate import CalibrationPlan, calibrate_step_costs
    from minidisagg.models.registry import load_model

    loaded = load_model(model, device=device, random_weights=random_weights)
    plan = CalibrationPlan.covering(max_prompt_tokens, max_batch, max_context_tokens or None, repeats=repeats)
    return calibrate_step_costs(loaded, plan, progress=False)


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
