"""Checks of lab 6: goodput under a TTFT + TPOT SLO, a rule that calls a gain across noisy runs, a leaderboard entry.

Task 1 compares with the engine's ``slo_attainment`` + ``goodput``; tasks 2 and 3 are design tasks,
checked for the properties any sound answer has (task 3 by the leaderboard's own replay).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable, Optional

from minidisagg.course import leaderboard as lb
from minidisagg.course.checking import CheckResult, failed, not_implemented, passed, task_check
from minidisagg.course.grading import GradedTask, LabGrading
from minidisagg.engine.scheduler import StepBudget, StepPlan, prefill_first
from minidisagg.metrics import SLO, RequestMetrics, goodput, slo_attainment


def random_metrics(rng: random.Random, slo: SLO, load: float, count: int) -> list[RequestMetrics]:
    """Requests whose TTFT and TPOT grow with ``load``; some sit exactly on the SLO (a tie meets it)."""
    out = []
    for _ in range(count):
        ttft = slo.ttft_s * load * rng.lognormvariate(0, 0.6)
        tpot = slo.tpot_s * load * rng.lognormvariate(0, 0.6)
        pick = rng.random()
        if pick < 0.1:
            ttft = slo.ttft_s
        elif pick < 0.2:
            tpot = slo.tpot_s
        n = rng.randint(2, 64)
        out.append(RequestMetrics(ttft_s=ttft, tpot_s=tpot, itl_s=(tpot,) * (n - 1), e2e_s=ttft + tpot * (n - 1),
                                  queue_s=0.0, prefill_s=ttft / 2, num_output_tokens=n))
    return out


def _request(ttft_s: float, tpot_s: float, num_tokens: int = 8) -> RequestMetrics:
    return RequestMetrics(ttft_s=ttft_s, tpot_s=tpot_s, itl_s=(tpot_s,) * (num_tokens - 1),
                          e2e_s=ttft_s + tpot_s * (num_tokens - 1), queue_s=0.0, prefill_s=ttft_s / 2,
                          num_output_tokens=num_tokens)


def boundary_sweep() -> tuple[dict[float, list[RequestMetrics]], SLO, float]:
    """The lowest rate sits exactly on the target (9 of 10), one of its 9 exactly on the SLO: goodput is that rate."""
    slo = SLO(1.0, 0.1)
    meets, on_slo, misses = _request(0.5, 0.05), _request(slo.ttft_s, slo.tpot_s), _request(2.0, 0.05)
    sweep = {2.0: [meets] * 5 + [misses] * 5, 1.0: [meets] * 8 + [on_slo, misses], 3.0: [meets] * 2 + [misses] * 8}
    return sweep, slo, 0.9


def _random_sweep(rng: random.Random) -> tuple[dict[float, list[RequestMetrics]], SLO, float]:
    slo = SLO(rng.uniform(0.05, 5.0), rng.uniform(0.005, 0.5))
    rates = sorted({round(rng.uniform(0.1, 50.0), 3) for _ in range(rng.randint(1, 8))})
    style = rng.random()
    loads = [0.3 + 1.4 * i / max(1, len(rates) - 1) for i in range(len(rates))]
    if style < 0.2:
        loads = [0.2] * len(rates)  # everything passes
    elif style < 0.35:
        loads = [3.0] * len(rates)  # the lowest rate already fails
    elif style < 0.5 and len(loads) > 2:
        loads[-1] = 0.2  # a noisy pass after the first failure
    sweep = {rate: random_metrics(rng, slo, load, rng.randint(5, 40)) for rate, load in zip(rates, loads)}
    shuffled = list(sweep.items())
    rng.shuffle(shuffled)  # a dict in no particular order
    return dict(shuffled), slo, rng.choice((0.5, 0.8, 0.9, 0.99))


def goodput_cases(goodput_rps: Callable[..., float], rng: random.Random, cases: int, task: str) -> CheckResult:
    """``cases`` sweeps (the boundary sweep first) against the engine's own attainment and goodput."""
    worst = 0.0
    for case in range(cases):
        sweep, slo, target = _random_sweep(rng) if case else boundary_sweep()
        rates = list(sweep)
        attainments = [slo_attainment(sweep[r], slo) for r in rates]
        want = goodput(rates, attainments, target)
        try:
            got = goodput_rps(sweep, slo, target)
        except NotImplementedError as err:
            return not_implemented(task, err)
        except Exception as err:  # noqa: BLE001
            return failed(f"case {case}: {slo}, target {target}: goodput_rps raised {type(err).__name__}: {err}")
        error = abs(float(got) - want)
        if not error <= 1e-9 * max(1.0, abs(want)):
            table = ", ".join(f"{r:g} req/s: {a:.3f}" for r, a in sorted(zip(rates, attainments)))
            why = ("the lowest rate meets the target exactly (an attainment equal to the target passes, a request "
                   "exactly on the SLO meets it)" if case == 0 else
                   "attainment of TTFT and TPOT together, a tie meets the SLO")
            return failed(f"case {case}: {slo}, target {target}: got {got}, expected {want:.6g} "
                          f"({why}; per rate {table})")
        worst = max(worst, error)
    return passed(f"{cases} sweeps (ties on the SLO, a rate exactly on the target, all-pass, first-fails, noisy passes), "
                  f"max error {worst:.1e} req/s")


@task_check("Lab 6, Task 1")
def task1(goodput_rps: Callable[..., float], cases: int = 60, seed: Optional[int] = None) -> CheckResult:
    """``goodput_rps(metrics_by_rate, slo, target)`` against ``metrics.slo_attainment`` + ``metrics.goodput``."""
    return goodput_cases(goodput_rps, random.Random(seed), cases, "Lab 6, Task 1")


def hidden_task1(goodput_rps: Callable[..., float]) -> CheckResult:
    """Hidden cases of Task 1: 150 fresh sweeps from an unseeded generator, the boundary sweep included."""
    return goodput_cases(goodput_rps, random.Random(random.SystemRandom().randrange(1 << 62) | 1 << 61), 150,
                         "Lab 6, Task 1")


VERDICTS = ("gains", "loses", "tie")
ORDER = {"loses": 0, "tie": 1, "gains": 2}


def _call(call_verdict: Callable[..., str], ratios: list[float], task: str) -> str:
    try:
        got = call_verdict(list(ratios))
    except NotImplementedError as err:
        raise err
    except Exception as err:  # noqa: BLE001
        failed(f"call_verdict({[round(r, 3) for r in ratios]}) raised {type(err).__name__}: {err}")
    if got not in VERDICTS:
        failed(f"call_verdict({[round(r, 3) for r in ratios]}) returned {got!r}; return one of {VERDICTS}")
    return got


def _verdict_case(rng: random.Random) -> list[float]:
    style = rng.random()
    n = rng.randint(2, 7)
    if style < 0.15:
        return [rng.uniform(0.3, 3.0) for _ in range(rng.randint(0, 1))]
    if style < 0.35:
        return [rng.uniform(1.1, 2.5) for _ in range(n)]
    if style < 0.5:
        return [rng.uniform(0.3, 0.9) for _ in range(n)]
    if style < 0.75:  # runs on both sides of 1
        return [rng.uniform(1.01, 2.5), rng.uniform(0.4, 0.99)] + [rng.uniform(0.5, 2.0) for _ in range(n - 2)]
    return [rng.uniform(0.85, 1.15) for _ in range(n)]  # the grey zone: the learner's judgement


def verdict_cases(call_verdict: Callable[..., str], rng: random.Random, cases: int, task: str) -> CheckResult:
    """Properties every sound rule has, on ``cases`` random ratio lists, and monotonicity when every run improves."""
    try:
        for _ in range(cases):
            ratios = _verdict_case(rng)
            got = _call(call_verdict, ratios, task)
            shown = [round(r, 3) for r in ratios]
            if len(ratios) < 2 and got != "tie":
                failed(f"{shown}: called {got!r} on {len(ratios)} run(s); one run proves little (the best llama-8b "
                       f"ratio moved 1.5x between runs of the same code): call it a tie")
            if len(ratios) >= 2 and min(ratios) >= 1.1 and got != "gains":
                failed(f"{shown}: every run wins by 10% or more, yet called {got!r}")
            if len(ratios) >= 2 and max(ratios) <= 0.9 and got != "loses":
                failed(f"{shown}: every run loses by 10% or more, yet called {got!r}")
            if max(ratios, default=1) > 1 > min(ratios, default=1) and got != "tie":
                failed(f"{shown}: the runs disagree (some above 1, some below), yet called {got!r}: did a mean or a "
                       f"median hide the runs on the other side? Disagreeing runs are a tie")
            better = [r * rng.uniform(1.01, 1.5) for r in ratios]
            if ORDER[_call(call_verdict, better, task)] < ORDER[got]:
                failed(f"{shown} called {got!r}, but every run made better ({[round(r, 3) for r in better]}) is called "
                       f"{_call(call_verdict, better, task)!r}: better runs must never get a worse call")
    except NotImplementedError as err:
        return not_implemented(task, err)
    return passed(f"{cases} random sets of run ratios: one run is a tie, consistent wins and losses are called, "
                  f"disagreeing runs are a tie, better runs never get a worse call")


@task_check("Lab 6, Task 2")
def task2(call_verdict: Callable[..., str], cases: int = 300, seed: Optional[int] = None) -> CheckResult:
    """``call_verdict(ratios) -> 'gains' | 'loses' | 'tie'``: the properties of a sound rule on random run ratios."""
    return verdict_cases(call_verdict, random.Random(seed), cases, "Lab 6, Task 2")


def hidden_task2(call_verdict: Callable[..., str]) -> CheckResult:
    """Hidden cases of Task 2: fresh ratio lists and the exact edges (1.1, 0.9, 1.0, no runs at all)."""
    for edge in ([], [1.1, 1.1], [0.9, 0.9, 0.9], [1.0, 1.0], [1.1, 1.0], [2.0], [0.5]):
        try:
            got = _call(call_verdict, edge, "Lab 6, Task 2")
        except NotImplementedError as err:
            return failed(f"not implemented yet ({err})")
        want = {0: "tie", 1: "tie"}.get(len(edge)) or (
            "gains" if min(edge) >= 1.1 else "loses" if max(edge) <= 0.9 else got)
        if got != want and len(edge) < 2:
            failed(f"{edge}: called {got!r} on {len(edge)} run(s); one run proves little (the best llama-8b ratio "
                   f"moved 1.5x between runs of the same code): call it a tie")
        if got != want:
            failed(f"{edge}: called {got!r}, expected {want!r} (every run at least 10% ahead, or behind, is beyond "
                   f"the noise: a run exactly on 1.1 or 0.9 counts)")
    return verdict_cases(call_verdict, random.Random(random.SystemRandom().randrange(1 << 62)), 400, "Lab 6, Task 2")


def budget_guard(policy: Callable[..., StepPlan]) -> Callable[..., StepPlan]:
    """``policy`` checked for the token budget: a step computes at most the budget (one lone whole prompt excepted)."""
    def run(waiting: list, running: list, budget: StepBudget) -> StepPlan:
        plan = policy(waiting, running, budget)
        if isinstance(plan, StepPlan):
            tokens = sum(c.num_tokens for c in plan.prefills) + len(plan.decodes)
            lone = len(plan.prefills) == 1 and not plan.decodes
            if tokens > budget.max_num_batched_tokens and not lone:
                raise lb.SubmissionError(
                    f"a step of {len(plan.prefills)} prefills and {len(plan.decodes)} decodes computes {tokens} tokens, "
                    f"over the token budget of {budget.max_num_batched_tokens} (only a lone prompt may exceed it)")
        return plan

    run.__name__ = getattr(policy, "__name__", "policy")
    return run


def entry_result(my_entry: Callable[..., Any], rules: lb.Rules, task: str) -> tuple[lb.Entry, lb.Entry]:
    """(the learner's entry, colocated prefill_first) replayed under ``rules``; FAIL on an invalid entry."""
    try:
        policy, split = my_entry(rules)
    except NotImplementedError:
        raise
    except (TypeError, ValueError) as err:
        failed(f"my_entry(rules) must return (policy, (num_prefill, num_decode)): {type(err).__name__}: {err}")
    try:
        submission = lb.make_submission("your entry", split, budget_guard(policy), rules)
        mine = lb.evaluate(submission, rules, is_submission=True)
    except lb.SubmissionError as err:
        failed(f"{rules.gpu_budget}-GPU budget, seed {rules.seed}: {err}")
    base = lb.evaluate(lb.make_submission("colocated prefill_first", (0, rules.gpu_budget), prefill_first, rules),
                       rules)
    if not mine.goodput_per_gpu_rps > base.goodput_per_gpu_rps:
        failed(f"{rules.gpu_budget}-GPU budget, seed {rules.seed}: your {mine.split} carries "
               f"{mine.goodput_per_gpu_rps:.3f} req/s per GPU, no more than colocated prefill_first's "
               f"{base.goodput_per_gpu_rps:.3f}: which phase limits each GPU of your split?")
    return mine, base


@task_check("Lab 6, Task 3")
def task3(my_entry: Callable[..., Any], rules: lb.Rules = lb.RULES) -> CheckResult:
    """``my_entry(rules) -> (policy, split)``: valid, within the token and GPU budgets, above colocated prefill_first."""
    try:
        mine, base = entry_result(my_entry, rules, "Lab 6, Task 3")
    except NotImplementedError as err:
        return not_implemented("Lab 6, Task 3", err)
    board = lb.rank([mine, *[lb.evaluate(s, rules) for s in lb.reference_submissions(rules)]])
    place = next(i for i, e in enumerate(board, 1) if e.is_submission)
    print(lb.table(board))
    return passed(f"your {mine.split}: {mine.goodput_per_gpu_rps:.3f} req/s per GPU under the leaderboard's rules, "
                  f"rank {place} of {len(board)} (colocated prefill_first {base.goodput_per_gpu_rps:.3f})")


def hidden_task3(my_entry: Callable[..., Any]) -> CheckResult:
    """Hidden cases of Task 3: other budgets, seeds and TPOT targets; the entry must stay valid and beat the baseline."""
    rng = random.Random(random.SystemRandom().randrange(1 << 62))
    lines = []
    for budget in (rng.choice((4, 5)), 6):
        rules = dataclasses.replace(lb.RULES, gpu_budget=budget, seed=rng.randrange(1000, 10**6),
                                    tpot_slo_s=round(lb.RULES.tpot_slo_s * rng.uniform(0.95, 1.3), 4))
        try:
            mine, base = entry_result(my_entry, rules, "Lab 6, Task 3")
        except NotImplementedError as err:
            return failed(f"not implemented yet ({err})")
        lines.append(f"{budget} GPUs: {mine.split} {mine.goodput_per_gpu_rps:.2f} vs {base.goodput_per_gpu_rps:.2f}")
    return passed("; ".join(lines))


GRADING = LabGrading(
    lab=6,
    tasks=(
        GradedTask(task="Lab 6, Task 1", function="goodput_rps", points=2, hidden=hidden_task1,
                   reference="minidisagg.course.placement_lab:sweep_goodput_rps", design=False),
        GradedTask(task="Lab 6, Task 2", function="call_verdict", points=2, hidden=hidden_task2,
                   reference="minidisagg.course.gpu_sweeps:verdict_of_runs", design=True),
        GradedTask(task="Lab 6, Task 3", function="my_entry", points=3, hidden=hidden_task3,
                   reference="minidisagg.course.leaderboard:reference_entry", design=True),
    ),
    predictions=("Lab 6, Q1", "Lab 6, Q2", "Lab 6, Q3", "Lab 6, Q4", "Lab 6, Q5", "Lab 6, Q6"),
    written=("W1", "W2"),
)
