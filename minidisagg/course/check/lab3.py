"""Checks of lab 3 (interference): a chunked-prefill scheduling policy, and a token budget chosen under two SLOs.

Task 1 runs the learner's policy on fresh random schedules built from real ``Sequence`` objects,
judges each plan against the scheduler's rules and the engine's own ``chunked`` policy, then
replays a short interference workload with it. Task 2 replays the budget the learner's chooser
picks, on the simulated clock with calibrated step costs, and judges it against an ITL p99 target
and a TTFT SLO drawn around what the replays of a grid of budgets measured.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from minidisagg.course.budget_lab import BudgetChooser
from minidisagg.course.check.lab3_budget import budget_cases, judge_chooser, monotone_decodes
from minidisagg.course.checking import CheckResult, failed, not_implemented, passed, task_check
from minidisagg.course.interference_lab import Scenario, run_scenario
from minidisagg.engine.calibrate import CalibrationPlan, calibrate_step_costs
from minidisagg.engine.sampling import SamplingParams
from minidisagg.engine.scheduler import POLICIES, StepBudget, StepPlan
from minidisagg.engine.sequence import Sequence, SequenceStatus
from minidisagg.metrics import RequestTimeline
from minidisagg.models.registry import LoadedModel, load_model
from minidisagg.engine.batch import PrefillChunk
from minidisagg.engine.step_cost import StepCostModel
from minidisagg.course.grading import GradedTask, LabGrading

NUM_SCHEDULES = 40
NUM_BUDGET_CASES = 6
NUM_HIDDEN_SCHEDULES = 60


@dataclass
class Schedule:
    """One random scheduling situation: queues as the scheduler would pass them, and the step budget."""

    index: int
    waiting: list[Sequence]
    running: list[Sequence]
    budget: StepBudget
    note: str = ""

    def describe(self) -> str:
        """The situation in one line, so a FAIL can be reproduced by hand."""
        left = [s.num_prefill_tokens_left for s in self.waiting]
        note = f", {self.note}" if self.note else ""
        return (f"schedule {self.index} ({len(self.running)} running; waiting prompts with {left} tokens left; "
                f"budget {self.budget.max_num_batched_tokens} tokens, {self.budget.max_num_seqs} seqs{note})")


def _sequence(seq_id: int, rng: random.Random, prompt_len: int) -> Sequence:
    """A real sequence with random token ids and a fresh timeline."""
    ids = [rng.randrange(100, 49152) for _ in range(prompt_len)]
    return Sequence(seq_id, f"req{seq_id}", ids, SamplingParams(temperature=0, max_tokens=64), RequestTimeline(0.0))


def random_schedule(index: int, rng: random.Random) -> Schedule:
    """A random schedule; ``index % 4`` picks the regime so every rule is exercised within a few cases.

    0: prompts longer than the budget (chunks split), 1: a budget larger than all waiting work,
    2: many short prompts and few sequence slots, 3: anything (empty queues included).
    """
    regime = index % 4
    max_num_seqs = rng.randint(3, 6) if regime == 2 else rng.randint(2, 24)
    num_running = rng.randint(0, min(max_num_seqs - 1, 8)) if regime == 2 else rng.randint(0, max_num_seqs)
    num_waiting = {0: rng.randint(1, 4), 1: rng.randint(1, 4), 2: rng.randint(4, 10), 3: rng.randint(0, 5)}[regime]
    prompt_lens = [rng.randint(8, 40) if regime == 2 else rng.randint(1, 600) for _ in range(num_waiting)]
    if regime == 0:
        budget_tokens = num_running + rng.randint(1, max(1, sum(prompt_lens) - 1))
    elif regime == 1:
        budget_tokens = num_running + sum(prompt_lens) + rng.randint(0, 300)
    else:
        budget_tokens = max(1, num_running) + rng.randint(0, 700)
    ids = iter(range(1000 * index, 1000 * index + 100))
    running = _running(ids, rng, num_running)
    waiting = [_sequence(next(ids), rng, n) for n in prompt_lens]
    if waiting and rng.random() < 0.5 and len(waiting[0].prompt_token_ids) > 1:
        waiting[0].num_computed_tokens = rng.randint(1, len(waiting[0].prompt_token_ids) - 1)  # earlier chunks done
    return Schedule(index, waiting, running, StepBudget(max_num_seqs, budget_tokens))


def _running(ids: Iterator[int], rng: random.Random, count: int) -> list[Sequence]:
    """``count`` decoding sequences (prompt computed, a few tokens generated)."""
    running = []
    for _ in range(count):
        seq = _sequence(next(ids), rng, rng.randint(1, 80))
        seq.output_token_ids = [rng.randrange(100, 49152) for _ in range(rng.randint(1, 20))]
        seq.num_computed_tokens = seq.num_tokens - 1
        seq.status = SequenceStatus.RUNNING
        running.append(seq)
    return running


BOUNDARY_NOTES = (
    "the budget is used up by the decodes",
    "the budget ends exactly at the first prompt's end",
    "every sequence slot is taken by a decode",
    "one-token prompts",
    "a half-prefilled prompt and room to spare",
    "nothing waits",
)


def boundary_schedule(index: int, rng: random.Random) -> Schedule:
    """Schedule ``index`` of the edge cases a plausible policy gets wrong (``BOUNDARY_NOTES[index]``)."""
    ids = iter(range(1000 * index, 1000 * index + 100))
    running = _running(ids, rng, rng.randint(1, 4))
    waiting = [_sequence(next(ids), rng, n) for n in (rng.randint(5, 90), rng.randint(5, 90))]
    seqs, tokens = 16, len(running) + rng.randint(0, 400)
    if index == 0:
        tokens = len(running)
    elif index == 1:
        tokens = len(running) + waiting[0].num_prefill_tokens_left
    elif index == 2:
        seqs = len(running)
    elif index == 3:
        waiting = [_sequence(next(ids), rng, 1) for _ in range(3)]
        tokens = len(running) + 2
    elif index == 4:
        waiting[0].num_computed_tokens = len(waiting[0].prompt_token_ids) - rng.randint(1, 4)
        tokens = len(running) + len(waiting[0].prompt_token_ids) + 1
    else:
        waiting = []
    return Schedule(index, waiting, running, StepBudget(seqs, tokens), note=BOUNDARY_NOTES[index])


def _state(seqs: list[Sequence]) -> list[tuple[int, int, SequenceStatus, int]]:
    return [(s.seq_id, s.num_computed_tokens, s.status, len(s.output_token_ids)) for s in seqs]


def _plan_text(plan: StepPlan) -> str:
    chunks = [(c.seq.request_id, c.num_tokens) for c in plan.prefills]
    return f"decodes {[s.request_id for s in plan.decodes]}, prefill chunks {chunks}"


def rule_broken(plan: object, sched: Schedule) -> Optional[str]:
    """The first scheduler rule ``plan`` breaks for ``sched``, as a sentence; None when it keeps them all."""
    if not isinstance(plan, StepPlan):
        return f"rule 'returns a StepPlan' broken: got {type(plan).__name__}"
    if not all(isinstance(c, PrefillChunk) for c in plan.prefills) or not all(isinstance(s, Sequence) for s in plan.decodes):
        return "rule 'returns a StepPlan' broken: prefills must be PrefillChunk objects and decodes Sequence objects"
    budget, running, waiting = sched.budget, sched.running, sched.waiting
    want_decodes = running[: budget.max_num_seqs]
    decode_ids = [s.seq_id for s in plan.decodes]
    if sorted(decode_ids) != sorted(s.seq_id for s in want_decodes):
        missing = [s.request_id for s in want_decodes if s.seq_id not in decode_ids]
        wrong = sorted({s.request_id for s in plan.decodes if s not in want_decodes or decode_ids.count(s.seq_id) > 1})
        return (f"rule 'all decodes included' broken: every running sequence decodes once per step; "
                f"missing {missing}, not running or repeated {wrong}")
    waiting_ids = [s.seq_id for s in waiting]
    chunk_ids = [c.seq.seq_id for c in plan.prefills]
    for chunk in plan.prefills:
        if chunk.seq.seq_id not in waiting_ids or chunk_ids.count(chunk.seq.seq_id) > 1:
            return f"rule 'prefill only waiting prompts, once each' broken by request {chunk.seq.request_id}"
        if chunk.num_tokens < 1:
            return (f"rule 'no empty chunks' broken: request {chunk.seq.request_id} got {chunk.num_tokens} tokens "
                    f"(stop adding chunks when the budget or the sequence slots run out)")
        if chunk.num_tokens > chunk.seq.num_prefill_tokens_left:
            return (f"rule 'chunks never exceed what is left of a prompt' broken: request {chunk.seq.request_id} got "
                    f"{chunk.num_tokens} tokens with {chunk.seq.num_prefill_tokens_left} left"
                    + (f" (its prompt has {len(chunk.seq.prompt_token_ids)} tokens, {chunk.seq.num_computed_tokens} "
                       f"already computed)" if chunk.seq.num_computed_tokens else ""))
    used = len(plan.decodes) + sum(c.num_tokens for c in plan.prefills)
    if used > budget.max_num_batched_tokens:
        return (f"rule 'token budget never exceeded' broken: {len(plan.decodes)} decode tokens + "
                f"{[c.num_tokens for c in plan.prefills]} prefill tokens = {used} > {budget.max_num_batched_tokens}")
    num_seqs = len(plan.decodes) + len(plan.prefills)
    if num_seqs > budget.max_num_seqs:
        return f"rule 'at most max_num_seqs sequences' broken: {num_seqs} > {budget.max_num_seqs}"
    if chunk_ids != waiting_ids[: len(chunk_ids)]:
        return (f"rule 'FIFO order of waiting prompts' broken: chunks went to {[c.seq.request_id for c in plan.prefills]}, "
                f"but the queue is {[s.request_id for s in waiting]} (oldest first)")
    for chunk in plan.prefills[:-1]:
        if chunk.num_tokens < chunk.seq.num_prefill_tokens_left:
            return (f"rule 'FIFO order of waiting prompts' broken: request {chunk.seq.request_id} got only "
                    f"{chunk.num_tokens} of its {chunk.seq.num_prefill_tokens_left} tokens, yet a later prompt was scheduled")
    work_left = sum(s.num_prefill_tokens_left for s in waiting) > sum(c.num_tokens for c in plan.prefills)
    can_extend = bool(plan.prefills) and plan.prefills[-1].num_tokens < plan.prefills[-1].seq.num_prefill_tokens_left
    if work_left and used < budget.max_num_batched_tokens and (can_extend or num_seqs < budget.max_num_seqs):
        return (f"rule 'budget used fully when work is left' broken: the plan computes {used} of "
                f"{budget.max_num_batched_tokens} tokens while prompts still wait")
    return None


TINY_LONGEST_PROMPT = 1024


@functools.lru_cache(maxsize=1)
def tiny_setup() -> tuple[LoadedModel, StepCostModel]:
    """The small random ``tiny`` model on CPU and one calibration of it, shared by every check that needs none given."""
    loaded = load_model("tiny", device="cpu", dtype="float32")
    plan = CalibrationPlan.covering(TINY_LONGEST_PROMPT, 8, TINY_LONGEST_PROMPT + 64)
    return loaded, calibrate_step_costs(loaded, plan, progress=False)


def judge_schedules(policy: Callable[[list[Sequence], list[Sequence], StepBudget], StepPlan],
                    schedules: Iterator[Schedule]) -> int:
    """Run ``policy`` on every schedule; FAIL (raised) at the first broken rule or difference from ``chunked``."""
    reference = POLICIES["chunked"]
    count = 0
    for sched in schedules:
        before = _state(sched.waiting + sched.running)
        try:
            plan = policy(list(sched.waiting), list(sched.running), sched.budget)
        except NotImplementedError as err:
            not_implemented("Lab 3, Task 1", err)
            raise AssertionError("unreachable") from err
        except Exception as err:  # noqa: BLE001
            failed(f"{sched.describe()}: the policy raised {type(err).__name__}: {err}")
        if _state(sched.waiting + sched.running) != before:
            failed(f"{sched.describe()}: rule 'a policy only plans' broken: it changed the sequences "
                   f"(their computed tokens, status or outputs); the engine does that when the plan runs")
        broken = rule_broken(plan, sched)
        if broken is not None:
            failed(f"{sched.describe()}: {broken}; the plan was {_plan_text(plan) if isinstance(plan, StepPlan) else plan!r}")
        want = reference(list(sched.waiting), list(sched.running), sched.budget)
        if [(c.seq.seq_id, c.num_tokens) for c in plan.prefills] != [(c.seq.seq_id, c.num_tokens) for c in want.prefills]:
            failed(f"{sched.describe()}: differs from the engine's chunked policy: got {_plan_text(plan)}, "
                   f"expected {_plan_text(want)}")
        count += 1
    return count


def _notebook_schedules(rng: random.Random) -> Iterator[Schedule]:
    for index in range(NUM_SCHEDULES):
        yield boundary_schedule(index, rng) if index < len(BOUNDARY_NOTES) else random_schedule(index, rng)


@task_check("Lab 3, Task 1")
def task1(policy: Callable[[list[Sequence], list[Sequence], StepBudget], StepPlan],
          loaded: Optional[LoadedModel] = None, long_prompt_len: Optional[int] = None) -> CheckResult:
    """Check a chunked-prefill policy on 40 random schedules, then replay a workload with it against prefill_first.

    ``loaded`` is the model for the replay (default: the small random ``tiny`` preset on CPU).
    """
    judge_schedules(policy, _notebook_schedules(random.Random()))
    if loaded is None:
        loaded, costs = tiny_setup()
        length = long_prompt_len or TINY_LONGEST_PROMPT
    else:
        length = long_prompt_len or min(1024, loaded.config.max_position // 2)
        costs = None
    scenario = Scenario(num_decodes=2, decode_output_len=12, num_long=1, long_prompt_len=length, start_long_s=0.0,
                        token_budget=max(32, length // 4))
    # steps are charged calibrated costs, so host load during the replays cannot flip the comparison
    costs = costs or calibrate_step_costs(loaded, CalibrationPlan.covering(length, scenario.num_decodes + 1,
                                                                           length + scenario.decode_output_len),
                                          progress=False)
    try:  # one replay each: deterministic given the calibration
        mine = run_scenario(loaded, scenario, policy, costs=costs)
    except NotImplementedError as err:
        return not_implemented("Lab 3, Task 1", err)
    except Exception as err:  # the engine's own checks (PolicyError) or a crash inside the policy
        return failed(f"the engine could not run a replay with this policy: {type(err).__name__}: {err}")
    want = [scenario.decode_output_len] * scenario.num_decodes + [scenario.long_output_len] * scenario.num_long
    got = [len(o.token_ids) for o in mine.decodes + mine.longs]
    if got != want:
        return failed(f"in the engine replay the requests produced {got} tokens; expected {want}")
    ratio = run_scenario(loaded, scenario, "prefill_first", costs=costs).itl_p99_s / mine.itl_p99_s
    verdict = f"{ratio:.1f}x lower than" if ratio >= 1 else f"{1 / ratio:.1f}x higher than"
    return passed(f"{NUM_SCHEDULES} random schedules; ITL p99 {verdict} prefill_first")




def _hidden_schedules(rng: random.Random) -> Iterator[Schedule]:
    """Schedules the notebook's check never draws: other seeds, wider queues, and every regime shuffled."""
    for index in range(NUM_HIDDEN_SCHEDULES):
        yield boundary_schedule(index % len(BOUNDARY_NOTES), rng) if index % 5 == 0 else \
            random_schedule(rng.randrange(4) + 4 * (index + 50), rng)


def hidden_task1(policy: Callable[[list[Sequence], list[Sequence], StepBudget], StepPlan]) -> CheckResult:
    """The grader's cases for Task 1: fresh schedules of every regime, judged like the notebook's."""
    count = judge_schedules(policy, _hidden_schedules(random.Random()))
    return passed(f"{count} hidden schedules")


@task_check("Lab 3, Task 2")
def task2(choose: BudgetChooser, loaded: Optional[LoadedModel] = None, costs: Optional[StepCostModel] = None,
          longest: Optional[int] = None) -> CheckResult:
    """Replay the budget ``choose`` picks for random scenarios and objectives; both objectives must hold, or None."""
    if loaded is None or costs is None:
        loaded, costs = tiny_setup()
        longest = longest or TINY_LONGEST_PROMPT
    costs = monotone_decodes(costs)  # the same cost model for your chooser and for the replays that judge it
    cases = budget_cases(loaded, costs, random.Random(), longest or 512, NUM_BUDGET_CASES, 4)
    answered, declined = judge_chooser(choose, loaded, costs, cases)
    return passed(f"{len(cases)} random scenarios replayed on calibrated costs: {answered} budgets met both "
                  f"objectives, {declined} answered None where no budget could")


def hidden_task2(choose: BudgetChooser) -> CheckResult:
    """The grader's cases for Task 2: other scenario sizes (more decodes, shorter prompts), feasible and not."""
    loaded, costs = tiny_setup()
    costs = monotone_decodes(costs)
    rng = random.Random()
    cases = budget_cases(loaded, costs, rng, TINY_LONGEST_PROMPT // 2, NUM_BUDGET_CASES + 3, 7)
    answered, declined = judge_chooser(choose, loaded, costs, cases)
    return passed(f"{len(cases)} hidden scenarios: {answered} budgets, {declined} None")


GRADING = LabGrading(
    lab=3,
    tasks=(
        GradedTask(task="Lab 3, Task 1", function="chunked_policy", points=3, hidden=hidden_task1,
                   reference="minidisagg.engine.scheduler:chunked", design=True),
        GradedTask(task="Lab 3, Task 2", function="choose_token_budget", points=3, hidden=hidden_task2,
                   reference="minidisagg.course.budget_lab:choose_token_budget_reference", design=True),
    ),
    predictions=("Lab 3, Q1", "Lab 3, Q2", "Lab 3, Q3"),
    written=("W1", "W2"),
)
