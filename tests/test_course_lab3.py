"""Lab 3 checks: they pass the engine's own chunked policy and a correct ITL percentile, and name what a broken one breaks."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from minidisagg.course.check import lab3
from minidisagg.course.checking import CheckFailed
from minidisagg.course.device import LabDevice
from minidisagg.course.budget_lab import choose_token_budget_reference
from minidisagg.course.interference_lab import LabSizes, Scenario, pooled_itl_percentile_s, run_scenario
from minidisagg.engine.scheduler import POLICIES, StepBudget, StepPlan
from minidisagg.engine.sequence import Sequence
from minidisagg.metrics import percentile, summarize
from minidisagg.engine.batch import PrefillChunk

chunked = POLICIES["chunked"]


def drops_a_decode(waiting: list[Sequence], running: list[Sequence], budget: StepBudget) -> StepPlan:
    plan = chunked(waiting, running, budget)
    return dataclasses.replace(plan, decodes=plan.decodes[1:])


def overruns_the_budget(waiting: list[Sequence], running: list[Sequence], budget: StepBudget) -> StepPlan:
    """Forgets that decodes spend tokens too: chunks fill the whole budget."""
    chunks, free = [], budget.max_num_batched_tokens
    for seq in waiting:
        if free <= 0 or len(running) + len(chunks) >= budget.max_num_seqs:
            break
        chunks.append(PrefillChunk(seq, min(seq.num_prefill_tokens_left, free)))
        free -= chunks[-1].num_tokens
    return StepPlan(prefills=chunks, decodes=list(running), prefill_before_decode=False)


def lifo(waiting: list[Sequence], running: list[Sequence], budget: StepBudget) -> StepPlan:
    return chunked(list(reversed(waiting)), running, budget)


def leaves_a_token_unused(waiting: list[Sequence], running: list[Sequence], budget: StepBudget) -> StepPlan:
    return chunked(waiting, running, StepBudget(budget.max_num_seqs, budget.max_num_batched_tokens - 1))


def chunk_past_the_prompt(waiting: list[Sequence], running: list[Sequence], budget: StepBudget) -> StepPlan:
    plan = chunked(waiting, running, budget)
    if plan.prefills:
        first = plan.prefills[0]
        plan.prefills[0] = PrefillChunk(first.seq, first.seq.num_prefill_tokens_left + 1)
    return plan


def too_many_sequences(waiting: list[Sequence], running: list[Sequence], budget: StepBudget) -> StepPlan:
    return chunked(waiting, running, StepBudget(10_000, budget.max_num_batched_tokens))


def advances_the_sequences(waiting: list[Sequence], running: list[Sequence], budget: StepBudget) -> StepPlan:
    plan = chunked(waiting, running, budget)
    for chunk in plan.prefills:
        chunk.seq.num_computed_tokens += chunk.num_tokens
    return plan


def not_done(waiting: list[Sequence], running: list[Sequence], budget: StepBudget) -> StepPlan:
    raise NotImplementedError("Lab 3, Task 1: fill the step")


def test_task1_passes_the_engines_chunked_policy(capsys):
    result = lab3.task1(chunked)
    assert result.passed
    assert "40 random schedules; ITL p99" in result.detail and "prefill_first" in result.detail
    assert capsys.readouterr().out.startswith("PASS  (40 random schedules")


@pytest.mark.parametrize(
    ("policy", "rule"),
    [
        (drops_a_decode, "all decodes included"),
        (overruns_the_budget, "token budget never exceeded"),
        (lifo, "FIFO order of waiting prompts"),
        (leaves_a_token_unused, "budget used fully when work is left"),
        (chunk_past_the_prompt, "chunks never exceed what is left of a prompt"),
        (too_many_sequences, "at most max_num_seqs sequences"),
        (advances_the_sequences, "a policy only plans"),
    ],
)
def test_task1_names_the_broken_rule_and_the_schedule(policy, rule, capsys):
    with pytest.raises(CheckFailed, match=rule) as info:
        lab3.task1(policy)
    message = str(info.value)
    assert message.startswith("FAIL  Lab 3, Task 1: schedule ") and "tokens left" in message and "budget" in message
    assert capsys.readouterr().out == ""  # the raised line is the only FAIL the learner sees


def chunks_whole_prompts(waiting: list[Sequence], running: list[Sequence], budget: StepBudget) -> StepPlan:
    """Plausible: sizes chunks by the prompt's length, forgetting the chunks already computed."""
    decodes = list(running[: budget.max_num_seqs])
    left, chunks = budget.max_num_batched_tokens - len(decodes), []
    for seq in waiting:
        if left <= 0 or len(decodes) + len(chunks) >= budget.max_num_seqs:
            break
        chunks.append(PrefillChunk(seq, min(len(seq.prompt_token_ids), left)))
        left -= chunks[-1].num_tokens
    return StepPlan(prefills=chunks, decodes=decodes, prefill_before_decode=False)


def empty_chunk_when_budget_spent(waiting: list[Sequence], running: list[Sequence], budget: StepBudget) -> StepPlan:
    """Plausible: checks the slots but not the tokens left, so a spent budget still adds a 0-token chunk."""
    decodes = list(running[: budget.max_num_seqs])
    left, chunks = budget.max_num_batched_tokens - len(decodes), []
    for seq in waiting:
        if len(decodes) + len(chunks) >= budget.max_num_seqs:
            break
        chunks.append(PrefillChunk(seq, min(seq.num_prefill_tokens_left, left)))
        left -= chunks[-1].num_tokens
    return StepPlan(prefills=chunks, decodes=decodes, prefill_before_decode=False)


def prefills_past_the_slots(waiting: list[Sequence], running: list[Sequence], budget: StepBudget) -> StepPlan:
    """Plausible: caps the decodes by max_num_seqs but lets one prefill in even when no slot is left."""
    plan = chunked(waiting, running, budget)
    left = budget.max_num_batched_tokens - len(plan.decodes) - sum(c.num_tokens for c in plan.prefills)
    rest = [s for s in waiting if s not in [c.seq for c in plan.prefills]]
    if not plan.prefills and rest and left > 0:
        plan.prefills.append(PrefillChunk(rest[0], min(rest[0].num_prefill_tokens_left, left)))
    return plan


@pytest.mark.parametrize(("policy", "schedule", "says"), [
    (empty_chunk_when_budget_spent, 0, "the budget is used up by the decodes): rule 'no empty chunks' broken"),
    (prefills_past_the_slots, 2, "every sequence slot is taken by a decode): rule 'at most max_num_seqs sequences'"),
    (chunks_whole_prompts, 4, "a half-prefilled prompt and room to spare): rule 'chunks never exceed what is left"),
])
def test_task1_boundary_schedules_catch_plausible_policies(policy, schedule, says):
    """Each policy is right on most random schedules; a boundary schedule, checked first, names its slip."""
    with pytest.raises(CheckFailed) as info:
        lab3.task1(policy)
    message = str(info.value)
    assert message.startswith(f"FAIL  Lab 3, Task 1: schedule {schedule} ("), message
    assert says in message, message


def test_boundary_schedules_keep_the_rules_and_hold_their_edge():
    rng = random.Random()
    for index in range(len(lab3.BOUNDARY_NOTES)):
        sched = lab3.boundary_schedule(index, rng)
        plan = chunked(list(sched.waiting), list(sched.running), sched.budget)
        assert lab3.rule_broken(plan, sched) is None, sched.describe()
        used = len(plan.decodes) + sum(c.num_tokens for c in plan.prefills)
        if index in (0, 1):
            assert used == sched.budget.max_num_batched_tokens and len(plan.prefills) == index
        if index == 2:
            assert not plan.prefills and sched.waiting
        if index == 4:
            head = sched.waiting[0]
            assert 0 < head.num_prefill_tokens_left < len(head.prompt_token_ids) < sched.budget.max_num_batched_tokens


def test_task1_reports_not_implemented():
    with pytest.raises(CheckFailed, match="Lab 3, Task 1: not implemented yet"):
        lab3.task1(not_done)


def test_task1_rejects_a_plan_that_is_not_a_step_plan():
    with pytest.raises(CheckFailed, match="returns a StepPlan"):
        lab3.task1(lambda waiting, running, budget: (waiting, running))


def test_random_schedules_exercise_every_rule_and_the_engine_keeps_them():
    rng = random.Random()
    split, leftover, seq_capped, partial_head = 0, 0, 0, 0
    for index in range(200):
        sched = lab3.random_schedule(index, rng)
        plan = chunked(list(sched.waiting), list(sched.running), sched.budget)
        assert lab3.rule_broken(plan, sched) is None, sched.describe()
        used = len(plan.decodes) + sum(c.num_tokens for c in plan.prefills)
        split += any(c.num_tokens < c.seq.num_prefill_tokens_left for c in plan.prefills)
        leftover += used < sched.budget.max_num_batched_tokens
        seq_capped += len(plan.decodes) + len(plan.prefills) == sched.budget.max_num_seqs and len(plan.prefills) < len(sched.waiting)
        partial_head += bool(sched.waiting) and sched.waiting[0].num_computed_tokens > 0
    assert min(split, leftover, seq_capped, partial_head) >= 10


def smallest_budget(costs, scenario, itl_p99_target_s, ttft_slo_s):
    """Plausible: only the ITL target counts, so one prompt token per step is always safest."""
    return scenario.num_decodes + 1


def never_declines(costs, scenario, itl_p99_target_s, ttft_slo_s):
    """Plausible: picks by the ITL target and never checks the TTFT SLO, so never answers None."""
    return choose_token_budget_reference(costs, scenario, itl_p99_target_s, float("inf"))


def forgets_the_decodes(costs, scenario, itl_p99_target_s, ttft_slo_s):
    """Plausible: prices a step by its chunk alone, as if the decodes ran for free."""
    return choose_token_budget_reference(costs, dataclasses.replace(scenario, num_decodes=0), itl_p99_target_s,
                                         ttft_slo_s)


def choose_not_done(costs, scenario, itl_p99_target_s, ttft_slo_s):
    raise NotImplementedError("Lab 3, Task 2: pick a budget")


def test_task2_and_hidden_pass_the_reference(capsys):
    assert lab3.task2(choose_token_budget_reference).passed
    assert capsys.readouterr().out.startswith("PASS  (6 random scenarios replayed on calibrated costs")
    assert lab3.GRADING.task("Lab 3, Task 2").hidden(choose_token_budget_reference).passed
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("wrong", "says"),
    [
        (smallest_budget, r"TTFT SLO is broken; a larger budget needs fewer steps|ITL target is broken"),
        (never_declines, r"no budget meets both objectives here: say so with None"),
        # its budgets are too large: the ITL breaks, or where no budget fits it still answers one
        (forgets_the_decodes, r"ITL target is broken\. A decode waits through every step that carries a chunk|"
                              r"say so with None"),
    ],
)
def test_task2_and_hidden_name_the_mistake(wrong, says):
    with pytest.raises(CheckFailed, match=says):
        lab3.task2(wrong)
    with pytest.raises(CheckFailed, match=says):
        lab3.GRADING.task("Lab 3, Task 2").hidden(wrong)


def test_task2_fails_none_where_a_budget_fits_and_a_budget_the_decodes_use_up():
    with pytest.raises(CheckFailed, match="you answered None, but a budget meets both"):
        lab3.task2(lambda costs, scenario, itl, ttft: None)
    with pytest.raises(CheckFailed, match="used up by the .* decodes alone"):
        lab3.task2(lambda costs, scenario, itl, ttft: scenario.num_decodes)


def test_task2_reports_not_implemented_and_hidden_fails_a_stub():
    with pytest.raises(CheckFailed, match="Lab 3, Task 2: not implemented yet"):
        lab3.task2(choose_not_done)
    for task, stub in (("Lab 3, Task 1", not_done), ("Lab 3, Task 2", choose_not_done)):
        with pytest.raises(CheckFailed, match="not implemented yet"):
            lab3.GRADING.task(task).hidden(stub)


def test_hidden_task1_passes_chunked_and_names_broken_rules():
    assert lab3.GRADING.task("Lab 3, Task 1").hidden(chunked).passed
    for policy, rule in ((lifo, "FIFO order"), (overruns_the_budget, "token budget never exceeded"),
                         (drops_a_decode, "all decodes included")):
        with pytest.raises(CheckFailed, match=rule):
            lab3.GRADING.task("Lab 3, Task 1").hidden(policy)


def test_grading_declares_two_design_tasks_three_predictions_and_two_written_questions():
    grading = lab3.GRADING
    assert [t.function for t in grading.tasks] == ["chunked_policy", "choose_token_budget"]
    assert all(t.design for t in grading.tasks)
    assert grading.predictions == ("Lab 3, Q1", "Lab 3, Q2", "Lab 3, Q3") and grading.written == ("W1", "W2")
    assert grading.task("Lab 3, Task 1").load_reference() is chunked
    assert grading.task("Lab 3, Task 2").load_reference() is choose_token_budget_reference


def test_pooled_itl_percentile_matches_metrics():
    rng = np.random.default_rng()
    rows = [list(np.cumsum(rng.exponential(0.05, size=int(n)))) for n in rng.integers(1, 30, size=5)]
    rows.append([0.0, 0.1])
    gaps = [b - a for row in rows for a, b in zip(row, row[1:])]
    assert pooled_itl_percentile_s(rows, 99.0) == pytest.approx(percentile(gaps, 99.0), abs=1e-15)


def test_run_scenario_splits_decodes_from_long_prompts(tiny_loaded):
    scenario = Scenario(num_decodes=3, decode_prompt_len=8, decode_output_len=6, num_long=2, long_prompt_len=80,
                        long_every_s=0.01, start_long_s=0.001, long_output_len=3, token_budget=32)
    for policy in ("prefill_first", "chunked", chunked):
        run = run_scenario(tiny_loaded, scenario, policy)
        assert [len(o.token_ids) for o in run.decodes] == [6, 6, 6]
        assert [len(o.prompt_token_ids) for o in run.longs] == [80, 80]
        assert [len(o.token_ids) for o in run.longs] == [3, 3]
        summary = summarize([o.metrics for o in run.decodes], run.duration_s)
        assert run.itl_p99_s == pytest.approx(summary.itl_p99_s) and run.itl_p50_s == pytest.approx(summary.itl_p50_s)
        assert run.long_ttft_s > 0 and run.output_tokens_per_s > 0
    chunked_run = run_scenario(tiny_loaded, scenario, "chunked", token_budget=16)
    assert all(o.metrics.prefill_s > 0 for o in chunked_run.longs)  # several chunks: prefill spans steps


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_lab_sizes_fit_the_notebook(device):
    lab = LabDevice(torch.device(device), torch.float32, "smollm2-135m", ("tiny",), full_sweeps=device == "cuda")
    sizes = LabSizes.for_lab(lab)
    assert sizes.sweep.long_prompt_len in sizes.long_prompt_lens
    low, high, step = sizes.slider_lens
    start = sizes.sweep.long_prompt_len // 2
    assert low <= start <= high and (start - low) % step == 0
    assert sizes.timeline.num_long >= 2 and sizes.timeline.start_long_s > 0
    assert (sizes.model == "llama-1b") == (device == "cuda")
