"""Lab 6 checks: the references pass the checks and the hidden cases, plausible mistakes fail with a named cause."""

from __future__ import annotations

import pytest

from minidisagg.course import check
from minidisagg.course import leaderboard as lb
from minidisagg.course.check.lab6 import GRADING
from minidisagg.course.checking import CheckFailed
from minidisagg.course.gpu_sweeps import verdict_of_runs
from minidisagg.course.placement_lab import sweep_goodput_rps
from minidisagg.engine.batch import PrefillChunk
from minidisagg.engine.scheduler import StepPlan, prefill_first
from minidisagg.metrics import SLO


def ttft_only_goodput(metrics_by_rate, slo, target=0.9):
    """Subtly wrong: judges TTFT alone."""
    return sweep_goodput_rps(metrics_by_rate, SLO(slo.ttft_s, 1e9), target)


def strict_target_goodput(metrics_by_rate, slo, target=0.9):
    """Plausible: an attainment equal to the target counts as a miss (> instead of >=)."""
    return sweep_goodput_rps(metrics_by_rate, slo, target + 1e-12)


def strict_slo_goodput(metrics_by_rate, slo, target=0.9):
    """Plausible: a request exactly on the SLO misses it (< instead of <=)."""
    return sweep_goodput_rps(metrics_by_rate, SLO(slo.ttft_s * (1 - 1e-12), slo.tpot_s * (1 - 1e-12)), target)


def mean_verdict(ratios):
    """Plausible: calls the mean of the runs, hiding a run on the other side of 1."""
    if len(ratios) < 2:
        return "tie"
    mean = sum(ratios) / len(ratios)
    return "gains" if mean >= 1.05 else "loses" if mean <= 0.95 else "tie"


def one_run_verdict(ratios):
    """Plausible: trusts a single run."""
    if not ratios:
        return "tie"
    if min(ratios) > 1:
        return "gains"
    if max(ratios) < 1:
        return "loses"
    return "tie"


def colocated_prefill_first_entry(rules):
    """Plausible: keeps the default (nothing gained over the baseline)."""
    return prefill_first, (0, rules.gpu_budget)


def one_more_gpu_entry(rules):
    """Plausible: one GPU over the budget (4 prefill GPUs and 1 decode GPU of a 4-GPU budget)."""
    return prefill_first, (rules.gpu_budget, 1)


def every_prompt_at_once(waiting, running, budget):
    """Plausible: admits every waiting prompt whole, whatever the token budget."""
    chunks = [PrefillChunk(s, s.num_prefill_tokens_left) for s in waiting[: budget.max_num_seqs - len(running)]]
    return StepPlan(prefills=chunks) if chunks else StepPlan(decodes=list(running))


def greedy_prefill_entry(rules):
    """Plausible: a good split with a policy that ignores the token budget."""
    return every_prompt_at_once, (rules.gpu_budget - 1, 1)


def not_done(*args, **kwargs):
    raise NotImplementedError("Lab 6: not done")


@pytest.mark.parametrize("seed", [0, 1])
def test_task1_reference_passes(seed, capsys):
    assert check.lab6.task1(sweep_goodput_rps, seed=seed)
    assert "PASS" in capsys.readouterr().out
    assert GRADING.task("Lab 6, Task 1").hidden(sweep_goodput_rps)


def test_task1_catches_missing_tpot():
    with pytest.raises(CheckFailed, match="TTFT and TPOT"):
        check.lab6.task1(ttft_only_goodput, seed=0)
    with pytest.raises(CheckFailed, match="TTFT and TPOT"):
        GRADING.task("Lab 6, Task 1").hidden(ttft_only_goodput)


@pytest.mark.parametrize("wrong", [strict_target_goodput, strict_slo_goodput], ids=["target", "slo"])
def test_task1_fails_on_the_boundary_sweep(wrong):
    with pytest.raises(CheckFailed) as info:
        check.lab6.task1(wrong, seed=0)
    message = str(info.value)
    assert message.startswith("FAIL  Lab 6, Task 1: case 0: SLO(ttft_s=1.0, tpot_s=0.1), target 0.9: got 0.0, "
                              "expected 1 (the lowest rate meets the target exactly"), message


@pytest.mark.parametrize("seed", [0, 1])
def test_task2_reference_passes(seed):
    assert check.lab6.task2(verdict_of_runs, seed=seed)
    assert GRADING.task("Lab 6, Task 2").hidden(verdict_of_runs)


def test_task2_catches_a_mean_that_hides_disagreeing_runs():
    with pytest.raises(CheckFailed, match="runs disagree .* did a mean or a median hide"):
        check.lab6.task2(mean_verdict, seed=0)


def test_task2_catches_trusting_one_run():
    with pytest.raises(CheckFailed, match="one run proves little"):
        GRADING.task("Lab 6, Task 2").hidden(one_run_verdict)


def test_task3_reference_passes_and_ranks_first(capsys):
    assert check.lab6.task3(lb.reference_entry)
    out = capsys.readouterr().out
    assert "   1* your entry" in out and "PASS" in out
    assert GRADING.task("Lab 6, Task 3").hidden(lb.reference_entry)


def test_task3_catches_no_gain_over_the_baseline():
    with pytest.raises(CheckFailed, match="no more than colocated prefill_first's"):
        check.lab6.task3(colocated_prefill_first_entry)


def test_task3_catches_a_split_over_budget():
    with pytest.raises(CheckFailed, match="uses 5 GPUs, over the budget of 4"):
        check.lab6.task3(one_more_gpu_entry)


def test_task3_catches_a_policy_over_the_token_budget():
    with pytest.raises(CheckFailed, match="over the token budget of 128"):
        check.lab6.task3(greedy_prefill_entry)


@pytest.mark.parametrize("task", ["Lab 6, Task 1", "Lab 6, Task 2", "Lab 6, Task 3"])
def test_a_stub_fails_check_and_hidden(task, capsys):
    graded = GRADING.task(task)
    with pytest.raises(CheckFailed, match="not implemented"):
        getattr(check.lab6, f"task{task[-1]}")(not_done)
    assert capsys.readouterr().out == ""
    with pytest.raises(CheckFailed):
        graded.hidden(not_done)


def test_grading_lists_three_tasks_two_of_them_design_six_predictions_two_written():
    assert [t.design for t in GRADING.tasks] == [False, True, True]
    assert GRADING.predictions == ("Lab 6, Q1", "Lab 6, Q2", "Lab 6, Q3", "Lab 6, Q4", "Lab 6, Q5", "Lab 6, Q6")
    assert GRADING.written == ("W1", "W2")
    for t in GRADING.tasks:
        assert callable(t.load_reference())


def test_the_gpu_validation_summary_counts_crossings_and_signs_with_and_without_serving_costs(tmp_path):
    import json
    import random

    from minidisagg.course import fleet_lab as fl

    rng = random.Random()
    with pytest.raises(FileNotFoundError, match="with and without serving costs"):
        fl.gpu_validation_summary(tmp_path)
    expected, data = {}, {"summary": {}, "signs": {}, "commit_fit": {}}
    for name, key in (("with", fl.SERVING_KEY), ("without", fl.DEVICE_ONLY_KEY)):
        compared = rng.randint(5, 50)
        within = rng.randint(0, compared)
        signs = [{"decided": rng.random() < 0.7, "sign_agrees": rng.random() < 0.5} for _ in range(rng.randint(3, 30))]
        signs = [{**s, "sign_agrees": s["decided"] and s["sign_agrees"]} for s in signs]
        data["summary"][key] = {"crossings_within_goal": within, "crossings_compared": compared}
        data["signs"][key] = signs
        expected[name] = {"crossings_within": within, "crossings_compared": compared,
                          "signs_right": sum(s["sign_agrees"] for s in signs), "signs_decided": sum(s["decided"] for s in signs)}
    (tmp_path / "sim-validation-gpu-2026-01-02.json").write_text(json.dumps(data))
    (tmp_path / "sim-validation-gpu-2026-01-03.json").write_text(json.dumps({"summary": {"rows": {}}, "signs": {}}))
    got = fl.gpu_validation_summary(tmp_path)  # the newer file lacks the two models: passed over
    assert got["path"].name == "sim-validation-gpu-2026-01-02.json"
    assert {k: got[k] for k in ("with", "without")} == expected


def test_the_two_gpu_prediction_adds_serving_costs_fitted_without_its_run():
    import dataclasses
    import random

    from minidisagg.course import fleet_lab as fl

    case = fl.two_gpu_case("h100", "llama-8b", "summarization")
    serving = fl.held_out_serving(case)
    assert case.run not in serving.fitted_on and serving.fitted_on and serving.num_fits == 1
    seeds = (random.Random().randrange(100),)
    device_only = fl.simulate_two_gpu(case, seeds, with_serving=False)
    zero = dataclasses.replace(serving, decode_commit_s=0.0, submit_s=0.0, control_rtt_s=0.0, decode_per_seq_s=0.0,
                               decode_context_extra=0.0)
    assert fl.simulate_two_gpu(case, seeds, serving=zero) == device_only  # zero serving costs change nothing
    # a slow serving path (a reservation round trip near the TTFT target, heavy host work per decoding sequence)
    slow = dataclasses.replace(serving, control_rtt_s=case.slo.ttft_s * random.uniform(0.8, 0.95),
                               decode_per_seq_s=case.slo.tpot_s / 8)
    slowed = fl.simulate_two_gpu(case, seeds, serving=slow)
    assert slowed["1P1D"].goodput_per_gpu_rps < device_only["1P1D"].goodput_per_gpu_rps, (seeds, slowed, device_only)
    assert slowed["colocated x2"].goodput_per_gpu_rps <= device_only["colocated x2"].goodput_per_gpu_rps
