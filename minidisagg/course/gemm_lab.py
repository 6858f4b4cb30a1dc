"""Lab 1 helpers: one transformer layer's GEMMs, counted, timed on the device, and drawn on a roofline."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.nn.functional as F

from minidisagg.config import ModelConfig
from minidisagg.roofline import Ceilings, gemm_bytes, gemm_flops, time_fn_s

if TYPE_CHECKING:  # matplotlib is needed only to draw
    from matplotlib.axes import Axes

# Weights streamed per timed call on CPU: as many bytes as the copy benchmark's buffer, so the GEMMs
# and the memory roof they are compared with read memory from the same level of the cache hierarchy.
CPU_STREAM_BYTES = 256 << 20
# FLOPs one timed call may do at most (CPU): past this a call is compute-bound, cached weights or not.
CPU_CALL_FLOP_BUDGET = 2e9


@dataclass(frozen=True)
class GemmShape:
    """One weight matrix of a layer: tokens [m x in_features] @ weight.T [in_features x out_features]."""

    name: str
    out_features: int
    in_features: int

    def flops(self, tokens: int) -> int:
        """FLOPs of this projection over ``tokens`` rows."""
        return gemm_flops(tokens, self.out_features, self.in_features)

    def bytes_moved(self, tokens: int, dtype: torch.dtype) -> int:
        """Minimum bytes moved: activations in, the weight, activations out."""
        return gemm_bytes(tokens, self.out_features, self.in_features, dtype)


def layer_gemms(cfg: ModelConfig) -> list[GemmShape]:
    """The four GEMMs of one layer of ``LlamaModel`` (fused QKV, O, fused gate/up, down)."""
    h, f = cfg.hidden_size, cfg.intermediate_size
    return [
        GemmShape("qkv_proj", cfg.q_size + 2 * cfg.kv_size, h),
        GemmShape("o_proj", h, cfg.q_size),
        GemmShape("gate_up_proj", 2 * f, h),
        GemmShape("down_proj", h, f),
    ]


def layer_weight_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of one layer's four projection weights."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(g.out_features * g.in_features for g in layer_gemms(cfg)) * itemsize


@dataclass(frozen=True)
class GemmPoint:
    """One layer's four GEMMs over ``tokens`` rows: counted FLOPs and bytes, and the measured time."""

    label: str
    tokens: int
    flops: int
    bytes_moved: int
    time_s: float

    @property
    def intensity(self) -> float:
        """Arithmetic intensity in FLOP/byte."""
        return self.flops / self.bytes_moved

    @property
    def flops_per_s(self) -> float:
        """Achieved FLOP/s."""
        return self.flops / self.time_s


class LayerGemmBench:
    """Random weights of one layer's shape (several copies on CPU, see ``CPU_STREAM_BYTES``), timed per token count."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype,
                 stream_bytes: Optional[int] = None, seed: int = 0) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = dtype
        self.gemms = layer_gemms(cfg)
        if stream_bytes is None:
            stream_bytes = CPU_STREAM_BYTES if self.device.type == "cpu" else 0
        num_copies = max(1, math.ceil(stream_bytes / layer_weight_bytes(cfg, dtype)))
        gen = torch.Generator(device=self.device).manual_seed(seed)
        self.weights = [
            [torch.empty(g.out_features, g.in_features, device=self.device, dtype=dtype).uniform_(-0.05, 0.05, generator=gen)
             for g in self.gemms]
            for _ in range(num_copies)
        ]

    @property
    def num_copies(self) -> int:
        """How many distinct copies of the layer's weights a timed call cycles through."""
        return len(self.weights)

    def count(self, tokens: int) -> tuple[int, int]:
        """(FLOPs, bytes) of the layer's four GEMMs over ``tokens`` rows."""
        return sum(g.flops(tokens) for g in self.gemms), sum(g.bytes_moved(tokens, self.dtype) for g in self.gemms)

    def measure(self, tokens: int, label: str = "", iters: int = 5) -> GemmPoint:
        """Time the four GEMMs over ``tokens`` rows (one layer's worth, averaged over the copies used)."""
        if tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {tokens}")
        flops, bytes_moved = self.count(tokens)
        copies = self.weights
        if self.device.type == "cpu":
            copies = copies[: max(1, min(len(copies), int(CPU_CALL_FLOP_BUDGET // flops)))]
        inputs = {g.in_features: torch.randn(tokens, g.in_features, device=self.device, dtype=self.dtype)
                  for g in self.gemms}

        def run() -> None:
            for layer in copies:
                for w in layer:
                    F.linear(inputs[w.shape[1]], w)

        time_s = time_fn_s(run, self.device, warmup=2, iters=iters) / len(copies)
        return GemmPoint(label or f"m={tokens}", tokens, flops, bytes_moved, time_s)


def draw_roofline(ax: Axes, ceilings: Ceilings, points: Sequence[GemmPoint] = (),
                  highlight: Optional[GemmPoint] = None, title: str = "") -> None:
    """Log-log roofline of the measured ceilings, the ridge point marked, measured points on top."""
    ridge = ceilings.ridge_flops_per_byte
    xs = [p.intensity for p in points] + ([highlight.intensity] if highlight else [])
    lo = min(xs + [ridge]) / 4
    hi = max(xs + [ridge]) * 4
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    roof = [min(ceilings.matmul_flops_per_s, ceilings.copy_bytes_per_s * x) for x in grid]
    ax.plot(grid, roof, color="black", lw=2, label="roofline (measured ceilings)")
    ax.axvline(ridge, color="gray", ls=":", lw=1)
    ax.annotate(f"ridge {ridge:.1f} FLOP/B", (ridge, ceilings.matmul_flops_per_s), textcoords="offset points",
                xytext=(5, -14), fontsize=8, color="gray")
    for kind, marker, color in (("decode", "o", "tab:blue"), ("prefill", "s", "tab:orange")):
        chosen = [p for p in points if p.label.startswith(kind)]
        if chosen:
            ax.plot([p.intensity for p in chosen], [p.flops_per_s for p in chosen], marker, color=color,
                    ls="-", lw=0.8, label=f"{kind} (measured)")
            for p in chosen:
                ax.annotate(p.label.split(" ", 1)[-1], (p.intensity, p.flops_per_s), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
    if highlight is not None:
        ax.plot([highlight.intensity], [highlight.flops_per_s], "*", color="crimson", ms=14, label=highlight.label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("FLOP/s")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    if title:
        ax.set_title(title)
