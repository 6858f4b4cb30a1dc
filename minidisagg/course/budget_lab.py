"""Lab 3, Task 2 helpers: choose a chunked-prefill token budget under an ITL target and a TTFT SLO.

A ``BudgetQuestion`` is one situation: a calibrated ``StepCostModel``, the interference scenario
(steady decodes, one long prompt arriving while they run) and the two service objectives. A
chooser answers with a budget (tokens per step) or None when no budget meets both objectives.
``judge_budget`` replays the scenario with the chosen budget on the simulated clock, charging the
same calibrated costs, and says whether both objectives held.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

from minidisagg.course.interference_lab import ScenarioRun, run_scenario
from minidisagg.engine.step_cost import StepCostModel
from minidisagg.models.registry import LoadedModel
from minidisagg.workload import Scenario

BudgetChooser = Callable[[StepCostModel, Scenario, float, float], Optional[int]]


@dataclass(frozen=True)
class ChunkedSteps:
    """What the cost model says about one budget: the costliest step a decode waits through, and the prompt's TTFT."""

    token_budget: int
    worst_step_s: float
    ttft_s: float


def chunked_steps(costs: StepCostModel, scenario: Scenario, token_budget: int) -> ChunkedSteps:
    """Price the gaps a decode sees while the long prompt is chunked under ``token_budget``, and the prompt's TTFT.

    A decode's gap is one step's chunk plus the next step's decodes; after the prompt's last chunk that next
    step decodes the prompt too. Decodes are priced at their longest context.
    """
    num_decodes = scenario.num_decodes
    chunk = token_budget - num_decodes
    if chunk < 1:
        return ChunkedSteps(token_budget, math.inf, math.inf)
    context = scenario.decode_prompt_len + scenario.decode_output_len
    decode_s = costs.decode_cost_s(num_decodes, context) if num_decodes else 0.0
    # after its last chunk the prompt decodes too, reading its whole context: price the batch's mean context
    joined_s = costs.decode_cost_s(num_decodes + 1, -(-(num_decodes * context + scenario.long_prompt_len + 1)
                                                     // (num_decodes + 1)))
    done, worst_s, ttft_s = 0, 0.0, decode_s  # the prompt may arrive just as a decode step starts: wait for it
    while done < scenario.long_prompt_len:
        num_tokens = min(chunk, scenario.long_prompt_len - done)
        prefill_s = costs.prefill_cost_s(num_tokens, done)
        done += num_tokens
        ttft_s += decode_s + prefill_s
        worst_s = max(worst_s, prefill_s + (joined_s if done == scenario.long_prompt_len else decode_s))
    return ChunkedSteps(token_budget, worst_s, ttft_s)


def choose_token_budget_reference(costs: StepCostModel, scenario: Scenario, itl_p99_target_s: float,
                                  ttft_slo_s: float) -> Optional[int]:
    """The largest budget whose costliest chunked step meets the ITL target, if its TTFT meets the SLO; else None."""
    for token_budget in range(scenario.num_decodes + scenario.long_prompt_len, scenario.num_decodes, -1):
        steps = chunked_steps(costs, scenario, token_budget)
        if steps.worst_step_s <= itl_p99_target_s:
            return token_budget if steps.ttft_s <= ttft_slo_s else None
    return None


@dataclass(frozen=True)
class BudgetVerdict:
    """A budget replayed: its ITL p99 and long-prompt TTFT against the two objectives."""

    token_budget: int
    itl_p99_s: float
    itl_max_s: float
    ttft_s: float
    itl_p99_target_s: float
    ttft_slo_s: float

    @property
    def meets_itl(self) -> bool:
        """ITL p99 of the steady decodes is within the target."""
        return self.itl_p99_s <= self.itl_p99_target_s

    @property
    def meets_ttft(self) -> bool:
        """The long prompt's first token came within the SLO."""
        return self.ttft_s <= self.ttft_slo_s

    @property
    def meets_both(self) -> bool:
        """Both objectives held."""
        return self.meets_itl and self.meets_ttft

    def describe(self) -> str:
        """``budget 200: ITL p99 12.1 ms (target 15.0), TTFT 80.2 ms (SLO 90.0)``."""
        return (f"budget {self.token_budget}: ITL p99 {1e3 * self.itl_p99_s:.2f} ms (target "
                f"{1e3 * self.itl_p99_target_s:.2f}), TTFT {1e3 * self.ttft_s:.1f} ms (SLO {1e3 * self.ttft_slo_s:.1f})")


def replay_budget(loaded: LoadedModel, costs: StepCostModel, scenario: Scenario, token_budget: int) -> ScenarioRun:
    """Replay ``scenario`` under the engine's chunked policy with ``token_budget``, charging ``costs``."""
    return run_scenario(loaded, dataclasses.replace(scenario, token_budget=token_budget), "chunked", costs=costs)


def judge_budget(loaded: LoadedModel, costs: StepCostModel, scenario: Scenario, token_budget: int,
                 itl_p99_target_s: float, ttft_slo_s: float) -> BudgetVerdict:
    """Replay ``token_budget`` and compare its latencies with the objectives."""
    run = replay_budget(loaded, costs, scenario, token_budget)
    return BudgetVerdict(token_budget, run.itl_p99_s, run.itl_max_s, run.long_ttft_s, itl_p99_target_s, ttft_slo_s)


def budget_grid(scenario: Scenario, step: int = 16) -> list[int]:
    """Budgets from one chunk of ``step`` tokens up to the whole prompt in one step, ``step`` tokens apart."""
    top = scenario.num_decodes + scenario.long_prompt_len
    return list(range(scenario.num_decodes + step, top, step)) + [top]
