"""How big a lab runs: small models and sweeps on a CPU, real shapes and full sweeps on a GPU."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LabDevice:
    """The device a lab measures on, with the model names and sweep size that suit it."""

    device: torch.device
    dtype: torch.dtype
    real_model: str
    shape_models: tuple[str, ...]
    full_sweeps: bool

    @property
    def is_gpu(self) -> bool:
        """True on a CUDA device."""
        return self.device.type == "cuda"

    def describe(self) -> str:
        """One line for the top of a lab: what runs where."""
        name = torch.cuda.get_device_name(self.device) if self.is_gpu else "CPU"
        dtype = str(self.dtype).removeprefix("torch.")
        return f"device: {name} ({self.device}), dtype {dtype}, models {', '.join(self.shape_models)}"


def lab_device(prefer: str | None = None) -> LabDevice:
    """Pick the lab's device: ``prefer`` or ``$MINIDISAGG_LAB_DEVICE`` if set, else CUDA when present, else CPU."""
    choice = prefer or os.environ.get("MINIDISAGG_LAB_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("a CUDA device was asked for but torch sees none; use 'cpu'")
    if device.type == "cuda":
        return LabDevice(device, torch.bfloat16, "smollm2-135m", ("llama-1b", "llama-8b"), full_sweeps=True)
    return LabDevice(device, torch.float32, "smollm2-135m", ("tiny", "smollm2-135m"), full_sweeps=False)
