"""Checks for lab 1 (arithmetic intensity, and a decode batch chosen for a latency budget), and its grading."""

from __future__ import annotations

import random
from typing import Any, Callable

import torch

from minidisagg import roofline
from minidisagg.config import PRESETS
from minidisagg.course.checking import CheckResult, failed, hidden_check, not_implemented, passed, task_check
from minidisagg.course.grading import GradedTask, LabGrading
from minidisagg.course.sizing import decode_batch_for_budget, decode_step_bound_s

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
                       f"(= {flops} FLOPs / {bytes_moved} bytes; relative error {err:.2e})"
                       + _intensity_mistake(got, m, n, k, dtype))
            worst = max(worst, err)
    except NotImplementedError as err:
        return not_implemented(task, err)
    return passed(f"{NUM_CASES} GEMM shapes in fp32/bf16/fp16 (m=1 and 1x1x1 included); max relative error {worst:.1e}")


def _intensity_mistake(got: float, m: int, n: int, k: int, dtype: torch.dtype) -> str:
    """Name the slip when a wrong intensity equals a known one, else nothing."""
    flops, size = roofline.gemm_flops(m, n, k), roofline.dtype_bytes(dtype)
    slips = {
        "; you left out writing the output (m x n elements)": flops / ((m * k + k * n) * size),
        "; a multiply-add is 2 FLOPs, you counted 1": flops / 2 / roofline.gemm_bytes(m, n, k, dtype),
        "; the element size comes from dtype, you used 2 bytes for every dtype": flops / ((m * k + k * n + m * n) * 2),
        "; integer division (//) rounded it down": float(flops // roofline.gemm_bytes(m, n, k, dtype)),
    }
    for why, value in slips.items():
        if value != roofline.arithmetic_intensity(m, n, k, dtype) and abs(got - value) <= 1e-9 * abs(value):
            return why
    return ""


@hidden_check("Lab 1, Task 1")
def _hidden_task1(arithmetic_intensity: Callable[..., float]) -> CheckResult:
    """Every real preset's four layer GEMMs at random token counts, in fp64, fp32, bf16 and fp16."""
    task = "Lab 1, Task 1"
    rng = random.Random()
    cases = 0
    for name, cfg in sorted(PRESETS.items()):
        for out_f, in_f in _layer_shapes(cfg):
            for dtype in (torch.float64, *DTYPES):
                m = rng.choice([1, 2, rng.randint(3, 64), rng.randint(65, 65_536)])
                call_text = f"arithmetic_intensity(m={m}, n={out_f}, k={in_f}, dtype=torch.{_dtype_name(dtype)})"
                got = _call(task, arithmetic_intensity, call_text, m, out_f, in_f, dtype)
                want = roofline.arithmetic_intensity(m, out_f, in_f, dtype)
                if not _relative_error(got, want) <= REL_TOL:
                    failed(f"{task} (hidden, {name}): {call_text} returned {got:.6g}, expected {want:.6g}"
                           + _intensity_mistake(got, m, out_f, in_f, dtype))
                cases += 1
    return passed(f"{cases} hidden GEMMs of every preset's layer, fp64 included")


def _layer_shapes(cfg: Any) -> list[tuple[int, int]]:
    """(out_features, in_features) of one layer's four weight GEMMs (as ``gemm_lab.layer_gemms``)."""
    h, f = cfg.hidden_size, cfg.intermediate_size
    return [(cfg.q_size + 2 * cfg.kv_size, h), (h, cfg.q_size), (2 * f, h), (h, f)]


BatchFn = Callable[..., int]


def _batch_mistake(got: int, case: tuple) -> str:
    """Name the slip when a wrong batch equals what a known mistake gives, else nothing."""
    shapes, layers, dtype, peak, bandwidth, budget, max_batch = case
    want = decode_batch_for_budget(*case)
    variants = {
        "; you timed one layer: a step runs every layer": decode_batch_for_budget(shapes, 1, dtype, peak, bandwidth,
                                                                                   budget, max_batch),
        "; you put the whole layer on the roof at once: each GEMM is its own kernel, bound on its own":
            _whole_layer_batch(shapes, layers, dtype, peak, bandwidth, budget, max_batch),
        "; you counted the weights' bytes only: the activations move too": _weights_only_batch(
            shapes, layers, dtype, peak, bandwidth, budget, max_batch),
    }
    for why, value in variants.items():
        if value != want and got == value:
            return why
    if got > max_batch:
        return f"; the batch may not exceed max_batch={max_batch}"
    if want == 0 and got >= 1:
        return "; even one sequence misses the budget here: return 0"
    return ""


def _largest(fits: Callable[[int], bool], max_batch: int) -> int:
    best = 0
    low, high = 1, max_batch
    while low <= high:
        mid = (low + high) // 2
        if fits(mid):
            best, low = mid, mid + 1
        else:
            high = mid - 1
    return best


def _whole_layer_batch(shapes, layers, dtype, peak, bandwidth, budget, max_batch) -> int:  # noqa: ANN001
    def fits(b: int) -> bool:
        flops = sum(roofline.gemm_flops(b, o, i) for o, i in shapes)
        moved = sum(roofline.gemm_bytes(b, o, i, dtype) for o, i in shapes)
        return layers * roofline.roofline_time_s(flops, moved, peak, bandwidth) <= budget
    return _largest(fits, max_batch)


def _weights_only_batch(shapes, layers, dtype, peak, bandwidth, budget, max_batch) -> int:  # noqa: ANN001
    def fits(b: int) -> bool:
        return layers * sum(roofline.roofline_time_s(roofline.gemm_flops(b, o, i), o * i * roofline.dtype_bytes(dtype),
                                                     peak, bandwidth) for o, i in shapes) <= budget
    return _largest(fits, max_batch)


def _check_batches(task: str, fn: BatchFn, cases: list[tuple], label: str) -> int:
    """Run ``fn`` on every case; FAIL with the case and the slip on the first wrong batch. Returns the cases past the ridge."""
    past = 0
    for case in cases:
        shapes, layers, dtype, peak, bandwidth, budget, max_batch = case
        call_text = (f"choose_decode_batch({shapes}, num_layers={layers}, dtype=torch.{_dtype_name(dtype)}, "
                     f"peak={peak:.3g}, bandwidth={bandwidth:.3g}, step_budget_s={budget:.4g}, max_batch={max_batch})")
        try:
            got = fn(list(shapes), layers, dtype, peak, bandwidth, budget, max_batch)
        except NotImplementedError:
            raise
        except Exception as err:  # the learner sees which input broke their function
            failed(f"{task}{label}: {call_text} raised {type(err).__name__}: {err}")
        if isinstance(got, bool) or not isinstance(got, int):
            failed(f"{task}{label}: {call_text} returned {got!r}, not a whole number of sequences")
        want = decode_batch_for_budget(*case)
        if got != want:
            def step(b: int) -> str:
                return f"{decode_step_bound_s(shapes, layers, b, dtype, peak, bandwidth):.4g} s"
            detail = (f"batch {got} takes {step(got)} on the roofline, over the budget" if 1 <= got <= max_batch
                      and got > want else f"the largest batch that fits is {want} ({step(want)})" if want else
                      f"even batch 1 takes {step(1)}")
            failed(f"{task}{label}: {call_text} returned {got}, expected {want}: {detail}" + _batch_mistake(got, case))
        past += want > 1 and decode_step_bound_s(shapes, layers, want, dtype, peak, bandwidth) > \
            decode_step_bound_s(shapes, layers, 1, dtype, peak, bandwidth)
    return past


def _random_batch_case(rng: random.Random) -> tuple:
    """Random layer shapes and ceilings, a budget between half and 40 times the batch-1 step, a random cap."""
    hidden = rng.choice([64, 128, 256, 576, 1024, 2048, 4096])
    shapes = [(rng.randint(1, 4) * hidden, hidden), (hidden, rng.randint(1, 2) * hidden),
              (2 * rng.randint(2, 4) * hidden, hidden), (hidden, rng.randint(2, 4) * hidden)]
    layers, dtype = rng.randint(1, 40), rng.choice(DTYPES)
    peak, bandwidth = 10 ** rng.uniform(10, 15), 10 ** rng.uniform(9, 12.5)
    one = decode_step_bound_s(shapes, layers, 1, dtype, peak, bandwidth)
    return shapes, layers, dtype, peak, bandwidth, one * rng.uniform(0.5, 40), rng.choice([8, 64, 512, 4096, 1 << 16])


@task_check("Lab 1, Task 2")
def task2(choose_decode_batch: BatchFn, seed: int | None = None, num_cases: int = 60) -> CheckResult:
    """Compare the learner's batch for a step budget with the largest one that meets it, on random shapes and ceilings."""
    task = "Lab 1, Task 2"
    _require_callable(task, choose_decode_batch)
    rng = random.Random(seed)
    cases = [_random_batch_case(rng) for _ in range(num_cases)]
    for index, scale in ((0, 0.9), (1, 1.0)):  # first: not even one sequence fits; then: exactly batch 1's step
        shapes, layers, dtype, peak, bandwidth, _, max_batch = cases[index]
        one = decode_step_bound_s(shapes, layers, 1, dtype, peak, bandwidth)
        cases[index] = (shapes, layers, dtype, peak, bandwidth, one * scale, max_batch)
    shapes, layers, dtype, peak, bandwidth, budget, _ = cases[2]
    cases[2] = (shapes, layers, dtype, peak, bandwidth, budget * 1000, 3)  # a budget far above what the cap allows
    try:
        past = _check_batches(task, choose_decode_batch, cases, "")
    except NotImplementedError as err:
        return not_implemented(task, err)
    return passed(f"{num_cases} random layers, ceilings and budgets (none fits, exactly batch 1, the cap reached); "
                  f"{past} answers lie past the flat part of the step's time")


@hidden_check("Lab 1, Task 2")
def _hidden_task2(choose_decode_batch: BatchFn) -> CheckResult:
    """Real presets on CPU-like and H100-like ceilings; budgets exactly at a batch's bound, below batch 1, small caps."""
    task = "Lab 1, Task 2"
    rng = random.Random()
    cases = []
    for name, cfg in sorted(PRESETS.items()):
        shapes = _layer_shapes(cfg)
        for peak, bandwidth in ((rng.uniform(5e10, 2e11), rng.uniform(8e9, 3e10)),
                                (rng.uniform(4e14, 9e14), rng.uniform(2e12, 3.5e12))):
            dtype = rng.choice(DTYPES)
            exact = rng.randint(2, 3000)  # a budget exactly equal to this batch's bound: it fits
            budget = decode_step_bound_s(shapes, cfg.num_layers, exact, dtype, peak, bandwidth)
            cases.append((shapes, cfg.num_layers, dtype, peak, bandwidth, budget, 4096))
            one = decode_step_bound_s(shapes, cfg.num_layers, 1, dtype, peak, bandwidth)
            cases.append((shapes, cfg.num_layers, dtype, peak, bandwidth, one * 0.99, 4096))  # nothing fits
            cases.append((shapes, cfg.num_layers, dtype, peak, bandwidth, one * 100, rng.randint(1, 16)))  # the cap
    _check_batches(task, choose_decode_batch, cases, " (hidden)")
    return passed(f"{len(cases)} hidden cases: every preset, CPU- and H100-like ceilings, edges of the budget and the cap")


GRADING = LabGrading(
    lab=1,
    tasks=(
        GradedTask(task="Lab 1, Task 1", function="arithmetic_intensity", points=2, hidden=_hidden_task1,
                   reference="minidisagg.roofline:arithmetic_intensity", design=False),
        GradedTask(task="Lab 1, Task 2", function="choose_decode_batch", points=3, hidden=_hidden_task2,
                   reference="minidisagg.course.sizing:decode_batch_for_budget", design=True),
    ),
    predictions=("Lab 1, Q1", "Lab 1, Q2", "Lab 1, Q3"),
    written=("W1", "W2"),
)
