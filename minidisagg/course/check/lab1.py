"""Checks for lab 1 (arithmetic intensity and the roofline), against ``minidisagg.roofline``."""

from __future__ import annotations

import math
import random
from typing import Any, Callable

import torch

from minidisagg import roofline
from minidisagg.course.checking import CheckResult, failed, not_implemented, passed, task_check

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NUM_CASES = 200
REL_TOL = 1e-9
# (m, n, k) where a plausible slip shows at once: one token (a decode GEMV), a 1x1x1 product (integer
# division gives 0), a single output column, and an outer product (k = 1)
BOUNDARY_GEMMS = ((1, 1, 1), (1, 4096, 4096), (7, 1, 3), (512, 512, 1), (1, 576, 1536))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _call(task: str, fn: Callable[..., Any], call_text: str, *args: Any) -> float:
    """Run the learner's function on one case; turn a crash or a non-number into a FAIL that names the case."""
    try:
        value = fn(*args)
    except NotImplementedError:
        raise
    except Exception as err:  # the learner sees which input broke their function
        failed(f"{task}: {call_text} raised {type(err).__name__}: {err}")
    try:
        return float(value)
    except (TypeError, ValueError):
        failed(f"{task}: {call_text} returned {value!r}, not a number")
    raise AssertionError("unreachable")


def _relative_error(got: float, want: float) -> float:
    return abs(got - want) / abs(want)


def _require_callable(task: str, fn: Any) -> None:
    if not callable(fn):
        failed(f"{task}: pass your function itself, e.g. check.lab1.task1(arithmetic_intensity); got {fn!r}")


@task_check("Lab 1, Task 1")
def task1(arithmetic_intensity: Callable[[int, int, int, torch.dtype], float], seed: int | None = None) -> CheckResult:
    """Compare the learner's ``arithmetic_intensity(m, n, k, dtype)`` with the roofline module on random GEMMs."""
    task = "Lab 1, Task 1"
    _require_callable(task, arithmetic_intensity)
    rng = random.Random(seed)
    worst = 0.0
    try:
        boundary = [(m, n, k, dtype) for m, n, k in BOUNDARY_GEMMS for dtype in DTYPES]
        for case in range(NUM_CASES):
            if case < len(boundary):
                m, n, k, dtype = boundary[case]
            else:  # decode-like (m small), prefill-like (m large) and arbitrary shapes
                m = rng.choice([rng.randint(1, 16), rng.randint(64, 8192), rng.randint(1, 100_000)])
                n, k = rng.randint(1, 30_000), rng.randint(1, 30_000)
                dtype = DTYPES[case % len(DTYPES)]
            call_text = f"arithmetic_intensity(m={m}, n={n}, k={k}, dtype=torch.{_dtype_name(dtype)})"
            got = _call(task, arithmetic_intensity, call_text, m, n, k, dtype)
            want = roofline.arithmetic_intensity(m, n, k, dtype)
            err = _relative_error(got, want)
            if not err <= REL_TOL:
                flops, bytes_moved = roofline.gemm_flops(m, n, k), roofline.gemm_bytes(m, n, k, dtype)
                failed(f"{task}: {call_text} returned {got:.6g} FLOP/byte, expected {want:.6g} "
                       f"(= {flops} FLOPs / {bytes_moved} bytes; relative error {err:.2e})")
            worst = max(worst, err)
    except NotImplementedError as err:
        return not_implemented(task, err)
    return passed(f"{NUM_CASES} GEMM shapes in fp32/bf16/fp16 (m=1 and 1x1x1 included); max relative error {worst:.1e}")


@task_check("Lab 1, Task 2")
def task2(roofline_time: Callable[[float, float, float, float], float], seed: int | None = None) -> CheckResult:
    """Compare the learner's ``roofline_time(flops, bytes, peak, bw)`` with ``roofline.roofline_time_s`` on random work."""
    task = "Lab 1, Task 2"
    _require_callable(task, roofline_time)
    rng = random.Random(seed)
    worst = 0.0
    num_compute_bound = 0
    try:
        for case in range(NUM_CASES):
            flops = 10 ** rng.uniform(3, 15)
            bytes_moved = 10 ** rng.uniform(3, 12)
            peak = 10 ** rng.uniform(10, 15)
            bandwidth = 10 ** rng.uniform(9, 13)
            if case == 0:  # a pure copy (a KV transfer): no FLOPs, and it still takes time
                flops = 0.0
            elif case == 1:  # exactly at the ridge: compute and memory take the same time
                flops = bytes_moved * peak / bandwidth
            call_text = f"roofline_time({flops:.4g}, {bytes_moved:.4g}, {peak:.4g}, {bandwidth:.4g})"
            got = _call(task, roofline_time, call_text, flops, bytes_moved, peak, bandwidth)
            want = roofline.roofline_time_s(flops, bytes_moved, peak, bandwidth)
            compute_s, memory_s = flops / peak, bytes_moved / bandwidth
            num_compute_bound += compute_s > memory_s
            err = _relative_error(got, want)
            if not err <= REL_TOL:
                bound = "balanced (at the ridge)" if math.isclose(compute_s, memory_s, rel_tol=1e-9) else \
                    "compute-bound" if compute_s > memory_s else "memory-bound"
                bound += " (a pure copy: no FLOPs)" if flops == 0 else ""
                failed(f"{task}: {call_text} returned {got:.6g} s, expected {want:.6g} s; this case is {bound} "
                       f"(compute {compute_s:.3g} s, memory {memory_s:.3g} s; relative error {err:.2e})")
            worst = max(worst, err)
    except NotImplementedError as err:
        return not_implemented(task, err)
    return passed(f"{NUM_CASES} cases (a pure copy and one at the ridge included), {num_compute_bound} compute-bound; "
                  f"max relative error {worst:.1e}")
