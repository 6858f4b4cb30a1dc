"""Lab 6 checks: PASS for implementations built from the engine's metrics and the lab's model, FAIL for wrong ones."""

from __future__ import annotations

import pytest

from minidisagg.course import check
from minidisagg.course.checking import CheckFailed
from minidisagg.course.placement_lab import system_goodput
from minidisagg.metrics import SLO, goodput, slo_attainment


def engine_goodput(metrics_by_rate, slo, target=0.9):
    """The engine's own slo_attainment and goodput."""
    rates = list(metrics_by_rate)
    return goodput(rates, [slo_attainment(metrics_by_rate[r], slo) for r in rates], target)


def ttft_only_goodput(metrics_by_rate, slo, target=0.9):
    """Subtly wrong: judges TTFT alone."""
    return engine_goodput(metrics_by_rate, SLO(slo.ttft_s, 1e9), target)


def brute_force_placement(costs, shape, slo, gpu_budget):
    """Every xPyD within the budget, scored with the lab's model."""
    options = [(x, y) for x in range(1, gpu_budget) for y in range(1, gpu_budget - x + 1)]
    return max(options, key=lambda xy: system_goodput(costs, shape, slo, *xy) / sum(xy))


def whole_budget_placement(costs, shape, slo, gpu_budget):
    """Subtly wrong: always uses every GPU of the budget."""
    options = [(x, gpu_budget - x) for x in range(1, gpu_budget)]
    return max(options, key=lambda xy: system_goodput(costs, shape, slo, *xy) / sum(xy))


def not_done(*args, **kwargs):
    raise NotImplementedError("Lab 6: not done")


@pytest.mark.parametrize("seed", [0, 1])
def test_task1_passes_engine_metrics(seed, capsys):
    assert check.lab6.task1(engine_goodput, seed=seed)
    assert "PASS" in capsys.readouterr().out


def test_task1_catches_missing_tpot():
    with pytest.raises(CheckFailed, match="TTFT and TPOT"):
        check.lab6.task1(ttft_only_goodput, seed=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_task2_passes_brute_force(seed):
    assert check.lab6.task2(brute_force_placement, seed=seed)


def test_task2_catches_whole_budget_only():
    with pytest.raises(CheckFailed, match="per GPU"):
        check.lab6.task2(whole_budget_placement, seed=0)


@pytest.mark.parametrize("task", ["task1", "task2"])
def test_not_implemented_is_a_fail(task, capsys):
    with pytest.raises(CheckFailed, match="not implemented") as info:
        getattr(check.lab6, task)(not_done)
    assert capsys.readouterr().out == ""  # the raised FAIL line is all the learner sees
    assert str(info.value).startswith(f"FAIL  Lab 6, Task {task[-1]}: not implemented yet")


def strict_target_goodput(metrics_by_rate, slo, target=0.9):
    """Plausible: an attainment equal to the target counts as a miss (> instead of >=)."""
    return engine_goodput(metrics_by_rate, slo, target + 1e-12)


def strict_slo_goodput(metrics_by_rate, slo, target=0.9):
    """Plausible: a request exactly on the SLO misses it (< instead of <=)."""
    return engine_goodput(metrics_by_rate, SLO(slo.ttft_s * (1 - 1e-12), slo.tpot_s * (1 - 1e-12)), target)


@pytest.mark.parametrize("wrong", [strict_target_goodput, strict_slo_goodput], ids=["target", "slo"])
def test_task1_fails_on_the_boundary_sweep(wrong):
    with pytest.raises(CheckFailed) as info:
        check.lab6.task1(wrong, seed=0)
    message = str(info.value)
    assert message.startswith("FAIL  Lab 6, Task 1: case 0: SLO(ttft_s=1.0, tpot_s=0.1), target 0.9: got 0.0, "
                              "expected 1 (the lowest rate meets the target exactly"), message


def placement_skipping_the_last_prefill_count(costs, shape, slo, gpu_budget):
    """Plausible: an off-by-one in the range of x, which leaves nothing to pick from with 2 GPUs."""
    options = [(x, y) for x in range(1, gpu_budget - 1) for y in range(1, gpu_budget - x + 1)]
    return max(options, key=lambda xy: system_goodput(costs, shape, slo, *xy) / sum(xy))


def test_task2_fails_with_two_gpus():
    with pytest.raises(CheckFailed, match=r"^FAIL  Lab 6, Task 2: case 0: budget 2 GPUs, .* best_placement raised "
                                          r"ValueError"):
        check.lab6.task2(placement_skipping_the_last_prefill_count, seed=0)
