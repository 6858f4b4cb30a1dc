"""Lab 1 helpers: one transformer layer's GEMMs, counted, timed on the device, and drawn on a roofline."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from minidisagg.config import ModelConfig
from minidisagg.roofline import (Ceilings, dtype_bytes, gemm_bytes, gemm_flops, measure_ceilings, roofline_time_s,
                                synchronize)

if TYPE_CHECKING:  # matplotlib is needed only to draw
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# Weights streamed per timed call on CPU: as many bytes as the copy benchmark's buffer, so the GEMMs
# and the memory roof they are compared with read memory from the same level of the cache hierarchy.
CPU_STREAM_BYTES = 128 << 20
# Square matmul sizes whose best rate is the CPU's peak (fastest of several calls of each).
CPU_MATMUL_SIZES = (256, 512, 1024)
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


def decode_attention_counts(cfg: ModelConfig, batch: int, context_len: int, dtype: torch.dtype) -> tuple[int, int]:
    """(FLOPs, bytes) of one layer's decode attention: one new query per sequence over ``context_len`` cached tokens.

    Each sequence reads its own keys and values (``num_kv_heads`` of them per token); each of the
    ``num_heads`` query heads does a dot product with every key and a weighted sum of every value.
    """
    flops = batch * cfg.num_heads * context_len * cfg.head_dim * 4  # q.k and p.v: a multiply and an add each
    kv_bytes = batch * 2 * context_len * cfg.num_kv_heads * cfg.head_dim * dtype_bytes(dtype)
    return flops, kv_bytes


def min_time_s(fn: Callable[[], object], device: torch.device, warmup: int = 2, iters: int = 5) -> float:
    """Fastest of ``iters`` timed calls of ``fn()`` (after ``warmup``): other programs only ever add time."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


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


def roof_fraction(point: GemmPoint, ceilings: Ceilings) -> float:
    """How close a measured point came to the roof: its roofline lower bound over its measured time."""
    bound_s = roofline_time_s(point.flops, point.bytes_moved, ceilings.matmul_flops_per_s, ceilings.copy_bytes_per_s)
    return bound_s / point.time_s


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

        time_s = min_time_s(run, self.device, warmup=2, iters=iters) / len(copies)
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


def fastest_ceilings(device: torch.device | str, dtype: torch.dtype, iters: int = 8) -> Ceilings:
    """The device's copy bandwidth and matmul rate; on a CPU each from the fastest of ``iters`` single calls.

    The matmul rate is the best over a few square sizes, the copy one of ``CPU_STREAM_BYTES``.
    Points are timed as the fastest of several runs, so on a CPU the roof they are compared with is
    too: other programs on the machine can only make a call slower. A GPU uses ``measure_ceilings``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return measure_ceilings(device, dtype)
    src = torch.ones(CPU_STREAM_BYTES // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy_s = min_time_s(lambda: dst.copy_(src), device, warmup=1, iters=iters)
    rates = []
    for size in CPU_MATMUL_SIZES:  # a short call is more likely to run undisturbed on a busy machine
        a = torch.randn(size, size, dtype=dtype, device=device)
        b = torch.randn(size, size, dtype=dtype, device=device)
        rates.append(gemm_flops(size, size, size) / min_time_s(lambda: torch.mm(a, b), device, warmup=1, iters=iters))
    return Ceilings(str(device), str(dtype).removeprefix("torch."), 2 * CPU_STREAM_BYTES / copy_s, max(rates))


GPU_RUN_MODELS = ("smollm2-135m", "llama-1b", "llama-8b")


def gpu_run_fractions(run: dict, models: Sequence[str] = GPU_RUN_MODELS) -> dict[str, dict[str, float]]:
    """Per model, the fraction of its roof that a ``bench gpu`` run's decode and prefill rows reached.

    Decode rows are against the weight-streaming floor (bandwidth), prefill rows against the matmul rate.
    """
    by_name = {r["name"]: r for r in run["rows"]}
    wanted = {"decode B=1": "decode {} bs1", "decode B=128": "decode {} bs128", "prefill 2048": "prefill {} 2048"}
    return {model: {label: float(by_name[pattern.format(model)]["fraction_of_limit"])
                    for label, pattern in wanted.items() if pattern.format(model) in by_name}
            for model in models}


def gpu_run_figure(run: dict, models: Sequence[str] = GPU_RUN_MODELS) -> Figure:
    """Grouped bars, one group per model: how close a GPU run's decode and prefill came to their roof."""
    import matplotlib.pyplot as plt

    fractions = gpu_run_fractions(run, models)
    labels = list(dict.fromkeys(label for per_model in fractions.values() for label in per_model))
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        xs = [j + i * width for j in range(len(models))]
        vals = [fractions[m].get(label, 0.0) for m in models]
        bars = ax.bar(xs, vals, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(models))], list(models))
    ax.axhline(1.0, color="k", lw=1)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("fraction of the roof")
    ax.set_title(f"{run['card']}: decode vs its bandwidth floor, prefill vs the matmul rate ({run.get('_file', '')})",
                 fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def largest_cache_bytes(cpu: int = 0) -> Optional[int]:
    """Size of the largest CPU cache that ``cpu`` sees (Linux sysfs), or None where it cannot be read."""
    from pathlib import Path

    sizes = []
    for entry in Path(f"/sys/devices/system/cpu/cpu{cpu}/cache").glob("index*/size"):
        text = entry.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes) if sizes else None
