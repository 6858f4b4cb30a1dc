"""Lab 3, Task 2 cases: random budget questions drawn around what a grid of replayed budgets measured, and their judge."""

from __future__ import annotations

import dataclasses
import itertools
import random
from dataclasses import dataclass
from typing import Optional

from minidisagg.course.budget_lab import BudgetChooser, budget_grid, chunked_steps, judge_budget, replay_budget
from minidisagg.course.checking import failed, not_implemented
from minidisagg.course.interference_lab import during_decodes
from minidisagg.engine.step_cost import StepCostModel
from minidisagg.models.registry import LoadedModel
from minidisagg.workload import Scenario


@dataclass(frozen=True)
class BudgetCase:
    """One budget question: a scenario, the two objectives, and what the grid of budgets measured for it."""

    scenario: Scenario
    itl_p99_target_s: float
    ttft_slo_s: float
    note: str
    feasible: Optional[int]  # a grid budget meeting both with room to spare, or None when none does

    def describe(self) -> str:
        """The case in one line."""
        sc = self.scenario
        return (f"{sc.num_decodes} decodes, a {sc.long_prompt_len}-token prompt, ITL p99 target "
                f"{1e3 * self.itl_p99_target_s:.2f} ms, TTFT SLO {1e3 * self.ttft_slo_s:.1f} ms ({self.note})")


def monotone_decodes(costs: StepCostModel) -> StepCostModel:
    """``costs`` with decode steps never cheaper for a larger batch (a calibration on a busy host can dip)."""
    return dataclasses.replace(costs, decode_s=tuple(itertools.accumulate(costs.decode_s, max)))


def budget_cases(loaded: LoadedModel, costs: StepCostModel, rng: random.Random, longest: int, num_cases: int,
                 max_decodes: int) -> list[BudgetCase]:
    """Random budget questions: most with a window of budgets meeting both objectives, some with none."""
    cases = []
    for case in range(num_cases):
        scenario = during_decodes(Scenario(num_decodes=rng.randint(1, max_decodes), decode_output_len=rng.randint(48, 64),
                                           num_long=1, long_prompt_len=rng.randint(longest // 4, longest)), costs)
        runs = {b: replay_budget(loaded, costs, scenario, b) for b in budget_grid(scenario, max(8, longest // 32))}
        inner = sorted(runs)[1:-1] or sorted(runs)
        pick = rng.choice(inner)
        target_s = runs[pick].itl_max_s * rng.uniform(1.03, 1.3)
        slo_s = runs[pick].long_ttft_s * rng.uniform(1.15, 1.4) + 2 * scenario_decode_s(costs, scenario)
        note = "a window of budgets meets both"
        if case % 3 == 1:  # the prompt's first token is asked too soon for any budget that keeps ITL down
            fast = min(r.long_ttft_s for r in runs.values() if r.itl_p99_s <= target_s)
            slo_s, note = 0.7 * fast, "no budget meets both: the TTFT SLO is too tight for the ITL target"
        elif case % 3 == 2 and case >= 5:
            target_s, note = 0.8 * min(r.itl_p99_s for r in runs.values()), "no budget meets the ITL target"
        roomy = [b for b, r in runs.items() if r.itl_max_s <= target_s and r.long_ttft_s <= 0.85 * slo_s]
        cases.append(BudgetCase(scenario, target_s, slo_s, note, max(roomy) if roomy else None))
    return cases


def scenario_decode_s(costs: StepCostModel, scenario: Scenario) -> float:
    """One decode step of the scenario's steady decodes at their longest context."""
    return costs.decode_cost_s(max(1, scenario.num_decodes), scenario.decode_prompt_len + scenario.decode_output_len)


def judge_chooser(choose: BudgetChooser, loaded: LoadedModel, costs: StepCostModel,
                  cases: list[BudgetCase]) -> tuple[int, int]:
    """Replay each budget ``choose`` picks; FAIL (raised) naming the objective it breaks. Returns (answered, None)."""
    answered = declined = 0
    for case in cases:
        sc = case.scenario
        try:
            got = choose(costs, sc, case.itl_p99_target_s, case.ttft_slo_s)
        except NotImplementedError as err:
            not_implemented("Lab 3, Task 2", err)
            raise AssertionError("unreachable") from err
        except Exception as err:  # noqa: BLE001
            failed(f"{case.describe()}: choose_token_budget raised {type(err).__name__}: {err}")
        if got is None:
            if case.feasible is not None:
                v = judge_budget(loaded, costs, sc, case.feasible, case.itl_p99_target_s, case.ttft_slo_s)
                failed(f"{case.describe()}: you answered None, but a budget meets both: {v.describe()}. "
                       f"None is for when no budget does")
            declined += 1
            continue
        if isinstance(got, bool) or not isinstance(got, int):
            failed(f"{case.describe()}: answer a whole number of tokens per step (or None), not {got!r}")
        if got <= sc.num_decodes:
            failed(f"{case.describe()}: budget {got} is used up by the {sc.num_decodes} decodes alone, so the "
                   f"prompt would never be prefilled")
        v = judge_budget(loaded, costs, sc, got, case.itl_p99_target_s, case.ttft_slo_s)
        steps = chunked_steps(costs, sc, got)
        if not v.meets_itl:
            failed(f"{case.describe()}: {v.describe()}: the ITL target is broken. A decode waits through every step "
                   f"that carries a chunk; under this budget the costliest such step costs "
                   f"{1e3 * steps.worst_step_s:.2f} ms (a gap holds one step's chunk and the next step's decodes, and after "
                   f"the prompt's last chunk the prompt decodes too)")
        if not v.meets_ttft:
            why = ("no budget meets both objectives here: say so with None rather than break one"
                   if case.feasible is None else "a larger budget needs fewer steps to finish the prompt")
            failed(f"{case.describe()}: {v.describe()}: the TTFT SLO is broken; {why}")
        answered += 1
    return answered, declined
