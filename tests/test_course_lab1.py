"""Lab 1 checks: PASS for the roofline module's own functions, a precise FAIL for subtly wrong ones."""

from __future__ import annotations

import pytest
import torch

from minidisagg import roofline
from minidisagg.course import check
from minidisagg.course.checking import CheckFailed
from minidisagg.course.gemm_lab import LayerGemmBench, layer_gemms
from minidisagg.config import PRESETS
from minidisagg.course.sizing import decode_batch_for_budget


def test_task1_passes_with_the_roofline_module(module_seed):
    result = check.lab1.task1(roofline.arithmetic_intensity, seed=module_seed)
    assert result.passed, f"seed {module_seed}"
    assert "200 GEMM shapes" in result.detail and "m=1 and 1x1x1 included" in result.detail


def _without_output_write(m, n, k, dtype):
    return roofline.gemm_flops(m, n, k) / ((m * k + k * n) * roofline.dtype_bytes(dtype))


def _multiply_adds_as_one_flop(m, n, k, dtype):
    return roofline.arithmetic_intensity(m, n, k, dtype) / 2


def _always_two_bytes(m, n, k, dtype):
    return roofline.gemm_flops(m, n, k) / ((m * k + k * n + m * n) * 2)


def _integer_division(m, n, k, dtype):
    return roofline.gemm_flops(m, n, k) // roofline.gemm_bytes(m, n, k, dtype)


@pytest.mark.parametrize("wrong", [_without_output_write, _multiply_adds_as_one_flop, _always_two_bytes,
                                   _integer_division])
def test_task1_fails_a_subtly_wrong_count(wrong, module_seed):
    with pytest.raises(CheckFailed) as info:
        check.lab1.task1(wrong, seed=module_seed)
    message = str(info.value)
    assert message.startswith("FAIL  Lab 1, Task 1: arithmetic_intensity(m="), message
    assert "expected" in message and "FLOPs /" in message, message


def test_task1_names_the_factor_two_on_the_first_case():
    """Without the factor 2 the very first case, a 1x1x1 product, shows half the FLOPs."""
    with pytest.raises(CheckFailed) as info:
        check.lab1.task1(_multiply_adds_as_one_flop, seed=0)
    assert str(info.value) == ("FAIL  Lab 1, Task 1: arithmetic_intensity(m=1, n=1, k=1, dtype=torch.float32) "
                               "returned 0.0833333 FLOP/byte, expected 0.166667 (= 2 FLOPs / 12 bytes; relative "
                               "error 5.00e-01); a multiply-add is 2 FLOPs, you counted 1")


def test_task1_integer_division_fails_on_a_one_token_product():
    with pytest.raises(CheckFailed, match=r"m=1, n=1, k=1, .* returned 0 FLOP/byte, expected 0.166667"):
        check.lab1.task1(_integer_division, seed=0)


def test_task1_reports_not_implemented():
    def stub(m, n, k, dtype):
        raise NotImplementedError("Lab 1, Task 1: count the FLOPs and the bytes")

    with pytest.raises(CheckFailed, match="not implemented yet"):
        check.lab1.task1(stub)


def test_task1_names_the_case_that_crashed_and_refuses_a_non_function():
    with pytest.raises(CheckFailed, match=r"raised ZeroDivisionError"):
        check.lab1.task1(lambda m, n, k, dtype: 1 / 0)
    with pytest.raises(CheckFailed, match="pass your function itself"):
        check.lab1.task1(0.5)


# --- Task 2: a decode batch for a latency budget ---

def _batch_one_layer(shapes, layers, dtype, peak, bandwidth, budget, max_batch):
    return decode_batch_for_budget(shapes, 1, dtype, peak, bandwidth, budget, max_batch)


def _batch_ignoring_the_cap(shapes, layers, dtype, peak, bandwidth, budget, max_batch):
    return decode_batch_for_budget(shapes, layers, dtype, peak, bandwidth, budget, 1 << 20)


def _batch_at_least_one(shapes, layers, dtype, peak, bandwidth, budget, max_batch):
    return max(1, decode_batch_for_budget(shapes, layers, dtype, peak, bandwidth, budget, max_batch))


def test_task2_and_its_hidden_cases_pass_the_reference(module_seed):
    result = check.lab1.task2(decode_batch_for_budget, seed=module_seed)
    assert result.passed and "random layers, ceilings and budgets" in result.detail, f"seed {module_seed}"
    assert check.lab1.GRADING.task("Lab 1, Task 2").hidden(decode_batch_for_budget).passed


@pytest.mark.parametrize("wrong, names", [
    (_batch_one_layer, "a step runs every layer"),
    (_batch_ignoring_the_cap, "may not exceed max_batch"),
    (_batch_at_least_one, "return 0"),
], ids=["one-layer", "no-cap", "never-zero"])
def test_task2_names_the_mistake(wrong, names, module_seed):
    with pytest.raises(CheckFailed) as info:
        check.lab1.task2(wrong, seed=module_seed)
    assert names in str(info.value), f"seed {module_seed}: {info.value}"
    with pytest.raises(CheckFailed, match="hidden"):
        check.lab1.GRADING.task("Lab 1, Task 2").hidden(wrong)


def test_task2_reports_not_implemented():
    def stub(*args):
        raise NotImplementedError("Lab 1, Task 2: the largest batch")

    with pytest.raises(CheckFailed, match="Lab 1, Task 2: not implemented yet"):
        check.lab1.task2(stub)
    with pytest.raises(CheckFailed, match="not implemented yet"):
        check.lab1.GRADING.task("Lab 1, Task 2").hidden(stub)


# --- grading ---

def test_task1_hidden_passes_the_reference_and_names_a_slip():
    hidden = check.lab1.GRADING.task("Lab 1, Task 1").hidden
    assert hidden(roofline.arithmetic_intensity).passed
    with pytest.raises(CheckFailed, match="you left out writing the output"):
        hidden(_without_output_write)
    with pytest.raises(CheckFailed, match="not implemented yet"):
        hidden(lambda *args: (_ for _ in ()).throw(NotImplementedError("Lab 1, Task 1: count")))


def test_grading_declares_two_tasks_one_of_them_design():
    grading = check.lab1.GRADING
    assert [t.function for t in grading.tasks] == ["arithmetic_intensity", "choose_decode_batch"]
    assert [t.design for t in grading.tasks] == [False, True]
    assert grading.predictions == ("Lab 1, Q1", "Lab 1, Q2", "Lab 1, Q3") and grading.written == ("W1", "W2")
    for graded in grading.tasks:
        assert callable(graded.load_reference())


def test_layer_gemms_match_the_model_weights():
    from minidisagg.models.llama import LlamaLayer

    cfg = PRESETS["smollm2-135m"]
    layer = LlamaLayer(cfg, torch.float32, "meta")
    shapes = {g.name: (g.out_features, g.in_features) for g in layer_gemms(cfg)}
    assert shapes == {name: tuple(getattr(layer, name).shape) for name in shapes}


def test_bench_measures_a_point_with_counted_flops_and_bytes():
    cfg = PRESETS["tiny"]
    bench = LayerGemmBench(cfg, "cpu", torch.float32, stream_bytes=0)
    point = bench.measure(8, "decode B=8", iters=2)
    assert bench.num_copies == 1
    assert point.flops == sum(roofline.gemm_flops(8, g.out_features, g.in_features) for g in layer_gemms(cfg))
    assert point.bytes_moved == sum(roofline.gemm_bytes(8, g.out_features, g.in_features, torch.float32)
                                    for g in layer_gemms(cfg))
    assert point.time_s > 0 and point.intensity == pytest.approx(point.flops / point.bytes_moved)
    with pytest.raises(ValueError, match="tokens must be >= 1"):
        bench.measure(0)


def test_the_lab_notebook_names_no_reference():
    """labs/ must not reach a task's reference: neither its module imported whole nor its name, unless it is the task's own."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "labs" / "01_arithmetic_intensity.ipynb").read_text()
    for graded in check.lab1.GRADING.tasks:
        module, attribute = graded.reference.split(":")
        parent, leaf = module.rsplit(".", 1)
        assert f"from {parent} import {leaf}" not in text and f"import {module}" not in text, graded.task
        assert f"{leaf}.{attribute}" not in text, graded.task
        if attribute != graded.function:
            assert attribute not in text, graded.task
