"""Roofline arithmetic and a device's own ceilings, measured: copy bandwidth and matmul rate.

Used by lab 1, `minidisagg bench gpu` and the slides; nothing in the engine imports it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch


def dtype_bytes(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def gemm_flops(m: int, n: int, k: int) -> int:
    """FLOPs of an (m x k) @ (k x n) matmul: one multiply and one add per term."""
    return 2 * m * n * k


def gemm_bytes(m: int, n: int, k: int, dtype: torch.dtype) -> int:
    """Minimum bytes an (m x k) @ (k x n) matmul moves: read both inputs once, write the output once."""
    return (m * k + k * n + m * n) * dtype_bytes(dtype)


def arithmetic_intensity(m: int, n: int, k: int, dtype: torch.dtype) -> float:
    """FLOPs per byte moved of an (m x k) @ (k x n) matmul."""
    return gemm_flops(m, n, k) / gemm_bytes(m, n, k, dtype)


def roofline_time_s(flops: float, bytes_moved: float, peak_flops_per_s: float, bandwidth_bytes_per_s: float) -> float:
    """Lower bound on run time: the larger of compute time and memory time."""
    if peak_flops_per_s <= 0 or bandwidth_bytes_per_s <= 0:
        raise ValueError("peak_flops_per_s and bandwidth_bytes_per_s must be positive")
    return max(flops / peak_flops_per_s, bytes_moved / bandwidth_bytes_per_s)


def ridge_point(peak_flops_per_s: float, bandwidth_bytes_per_s: float) -> float:
    """Arithmetic intensity (FLOP/byte) where the memory roof meets the compute roof."""
    return peak_flops_per_s / bandwidth_bytes_per_s


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn_s(fn: Callable[[], object], device: torch.device, warmup: int = 3, iters: int = 10) -> float:
    """Median wall time of ``fn()`` in seconds, after ``warmup`` calls, synchronizing the device around each."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return samples[len(samples) // 2]


@dataclass(frozen=True)
class Ceilings:
    """A device's measured ceilings: copy bandwidth (bytes read + written per second) and matmul rate."""

    device: str
    dtype: str
    copy_bytes_per_s: float
    matmul_flops_per_s: float

    @property
    def ridge_flops_per_byte(self) -> float:
        """Arithmetic intensity where this device turns compute-bound."""
        return ridge_point(self.matmul_flops_per_s, self.copy_bytes_per_s)


def time_device_s(fn: Callable[[], object], device: torch.device, calls_per_sample: int = 10,
                  samples: int = 20, graph: bool = True) -> float:
    """Median device time of one ``fn()`` call in seconds: what the GPU spends, not the host's launch.

    On CUDA each sample is ``calls_per_sample`` calls timed by CUDA events. With ``graph`` the
    calls are captured in one CUDA graph and replayed (as the engine's decode runs its kernels),
    so Python launch cost stays out of the figure even for kernels of a few microseconds;
    ``fn`` must then be capturable (no host reads of device values, no synchronisation).
    Without it the calls are queued back to back, which hides launches only behind long calls;
    the ceilings are measured that way, since a copy captured in a graph becomes a copy-engine
    transfer, slower than the copy kernel eager code gets. Elsewhere this is ``time_fn_s``.
    """
    if device.type != "cuda":
        return time_fn_s(fn, device, warmup=3, iters=samples)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm up (compilation, autotuning, allocator) outside any capture
        fn()
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    if graph:
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            for _ in range(calls_per_sample):
                fn()
        run = captured.replay
    else:
        def run() -> None:
            for _ in range(calls_per_sample):
                fn()
    run()
    torch.cuda.synchronize(device)
    samples_s = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        samples_s.append(start.elapsed_time(end) / 1e3 / calls_per_sample)
    samples_s.sort()
    return samples_s[len(samples_s) // 2]


def measure_copy_bandwidth(device: torch.device | str, size_bytes: int | None = None, iters: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    device = torch.device(device)
    if size_bytes is None:
        size_bytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(size_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = time_device_s(lambda: dst.copy_(src), device, calls_per_sample=3, samples=iters, graph=False)
    return 2 * src.numel() * src.element_size() / t


def measure_read_bandwidth(device: torch.device | str, size_bytes: int | None = None, iters: int = 10) -> float:
    """Device read bandwidth in bytes/s, by a sum over a large buffer (reads it once, writes one value).

    For comparison with the copy bandwidth: a copy mixes reads and writes, and a kernel that only
    reads can run a little faster than it. torch's reduction is not always at the read roof.
    """
    device = torch.device(device)
    if size_bytes is None:
        size_bytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(size_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    out = torch.empty((), dtype=torch.float32, device=device)
    t = time_device_s(lambda: torch.sum(src, dim=0, out=out), device, calls_per_sample=3, samples=iters,
                      graph=False)
    return src.numel() * src.element_size() / t


def measure_matmul_rate(
    device: torch.device | str, dtype: torch.dtype | None = None, size: int | None = None, iters: int = 10
) -> float:
    """Square matmul rate in FLOP/s (bf16 8192^3 on CUDA, fp32 1024^3 on CPU by default)."""
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if size is None:
        size = 8192 if device.type == "cuda" else 1024
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    t = time_device_s(lambda: torch.mm(a, b), device, calls_per_sample=3, samples=iters, graph=False)
    return gemm_flops(size, size, size) / t


def measure_ceilings(device: torch.device | str, dtype: torch.dtype | None = None) -> Ceilings:
    """Measure copy bandwidth and matmul rate on ``device`` in one go."""
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return Ceilings(
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        copy_bytes_per_s=measure_copy_bandwidth(device),
        matmul_flops_per_s=measure_matmul_rate(device, dtype),
    )
