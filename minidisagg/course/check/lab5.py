"""Checks of lab 5 (KV transfer): the layer-group size, the break-even prompt length and the admission rule."""

from __future__ import annotations

import numbers
import random
from typing import Any, Callable, Optional, Sequence

import torch

from minidisagg.course.admission_lab import first_fit_in_order
from minidisagg.course.checking import CheckResult, failed, not_implemented, passed, task_check
from minidisagg.course.grading import GradedTask, LabGrading
from minidisagg.course.grouping_lab import LayerPipeline, fastest_group_size
from minidisagg.course.transfer_lab import LinkModel, PrefillCostModel
from minidisagg.kv.pages import KVLayout

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TAIL_REL_TOL = 1e-9


def _log_uniform(rng: random.Random, low: float, high: float) -> float:
    return low * (high / low) ** rng.random()


# ---------------------------------------------------------------- Task 1: layers per message

GroupCase = tuple[int, float, float, LinkModel]


def random_group_case(rng: random.Random, wide: bool = False) -> GroupCase:
    """A prefill (layers, seconds per layer, KV bytes per layer) and a link, its send and latency times drawn
    around one layer's compute time (where the choice matters), with a few far from it."""
    layers = rng.randint(1, 128 if wide else 64)
    compute_s = _log_uniform(rng, 1e-6 if wide else 1e-5, 1e-1 if wide else 2e-2)
    layer_bytes = _log_uniform(rng, 1e3, 1e9 if wide else 1e8)
    spread = 1000.0 if wide else 30.0
    send_s = compute_s * _log_uniform(rng, 1 / spread, spread)  # one layer's bytes over the bandwidth
    latency_s = 0.0 if rng.random() < 0.15 else compute_s * _log_uniform(rng, 1 / spread, spread)
    return layers, compute_s, layer_bytes, LinkModel("random", layer_bytes / send_s / 1e9, latency_s)


def boundary_group_cases() -> list[GroupCase]:
    """One layer (g = 1 is all there is); a link so fast that one message per layer is best; one whose latency dwarfs compute."""
    return [(1, 1e-3, 1e6, LinkModel("any", 1.0, 1e-3)),
            (32, 1e-3, 1e5, LinkModel("fast, no latency", 100.0, 0.0)),
            (32, 1e-5, 1e3, LinkModel("1 ms per message", 10.0, 1e-3)),
            (24, 1e-3, 1e6, LinkModel("as slow as compute, latency 4 layers", 1.0, 4e-3))]


def _describe_group_case(case: GroupCase) -> str:
    layers, compute_s, layer_bytes, link = case
    return (f"{layers} layers of {compute_s * 1e6:.3g} us compute and {layer_bytes / 1e6:.3g} MB each, link "
            f"{link.bandwidth_GBps:.3g} GB/s + {link.latency_s * 1e6:.3g} us per message")


def _group_mistake(got: int, best: int, case: GroupCase) -> str:
    layers, compute_s, layer_bytes, link = case
    send_one_s = float(link.seconds(layer_bytes, 1))
    if got == layers:
        return ("sending every layer after the prefill hides nothing: the early layers could have been on the wire "
                "while later ones computed")
    if got < best:
        return (f"groups this small pay the per-message latency ({link.latency_s * 1e6:.3g} us) too many times: one layer "
                f"takes {send_one_s * 1e6:.3g} us to send against {compute_s * 1e6:.3g} us to compute, so the link "
                f"falls behind")
    return ("groups this large keep the link idle while the prefill computes them, and leave a large last group to "
            "send after the prefill ends")


def _check_group_cases(choose: Callable[..., Any], task: str, cases: Sequence[GroupCase]) -> tuple[int, int]:
    """Every case against the fastest group size; (cases where g = 1 won, cases where g = all layers won)."""
    ones = alls = 0
    for index, case in enumerate(cases):
        layers, compute_s, layer_bytes, link = case
        where = f"case {index} ({_describe_group_case(case)})"
        try:
            got = choose(layers, compute_s, layer_bytes, link)
        except NotImplementedError as err:
            return not_implemented(task, err)  # type: ignore[return-value]
        except Exception as err:  # noqa: BLE001 - the learner sees which case broke their function
            failed(f"{task}: {where}: choose_group_size raised {type(err).__name__}: {err}")
        if isinstance(got, bool) or not isinstance(got, numbers.Integral) or not 1 <= got <= layers:
            failed(f"{task}: {where}: returned {got!r}; a group size is a whole number of layers, 1..{layers}")
        pipe = LayerPipeline(layers, compute_s, layer_bytes)
        best = fastest_group_size(layers, compute_s, layer_bytes, link)
        got_tail, best_tail = pipe.tail_s(got, link), pipe.tail_s(best, link)
        if got_tail > best_tail * (1 + TAIL_REL_TOL) + 1e-15:
            failed(f"{task}: {where}: g={got} lands the last byte {got_tail * 1e3:.4g} ms after the prefill ends, "
                   f"g={best} in {best_tail * 1e3:.4g} ms: {_group_mistake(got, best, case)}")
        ones += best == 1
        alls += best == layers
    return ones, alls


@task_check("Lab 5, Task 1")
def task1(choose_group_size: Callable[..., int], cases: int = 60, seed: Optional[int] = None) -> CheckResult:
    """``choose_group_size(num_layers, layer_compute_s, layer_bytes, link)``: the shortest tail after the prefill."""
    rng = random.Random(seed)
    drawn = boundary_group_cases() + [random_group_case(rng) for _ in range(cases)]
    ones, alls = _check_group_cases(choose_group_size, "Lab 5, Task 1", drawn)
    return passed(f"{len(drawn)} prefills and links: your group size always lands the last byte as early as the best "
                  f"one ({ones} best at one layer per message, {alls} at all layers in one, the rest in between)")


def hidden_task1(choose_group_size: Callable[..., int]) -> CheckResult:
    """Fresh links and prefills from a wider family (up to 128 layers, latencies up to 100 ms)."""
    rng = random.Random()
    ones, alls = _check_group_cases(choose_group_size, "Lab 5, Task 1",
                                    [random_group_case(rng, wide=True) for _ in range(80)])
    return passed(f"80 hidden prefills and links ({ones} best at g=1, {alls} at g=all)")


# ---------------------------------------------------------------- Task 2: the break-even prompt length


def reference_break_even(layout: KVLayout, prefill: PrefillCostModel, link: LinkModel, max_len: int) -> Optional[int]:
    """First prompt length whose KV (whole blocks, ``KVLayout.request_nbytes``) takes >= its prefill to ship.

    Transfer time is constant within a block and prefill time grows with n, so only each block's
    first token can be the first to qualify.
    """
    for blocks in range(1, -(-max_len // layout.block_size) + 1):
        n = (blocks - 1) * layout.block_size + 1
        if float(link.seconds(layout.request_nbytes(blocks), layout.num_layers)) >= float(prefill.seconds(n)):
            return n
    return None


def _random_break_even_case(rng: random.Random) -> tuple[KVLayout, PrefillCostModel, LinkModel, int]:
    layout = KVLayout(rng.randint(1, 40), rng.choice((1, 2, 3, 8)), rng.choice((16, 64, 128)), rng.choice((8, 16, 32)),
                      rng.choice(DTYPES))
    prefill = PrefillCostModel(_log_uniform(rng, 1e-5, 1e-1), _log_uniform(rng, 1e-7, 1e-3),
                               rng.choice((0.0, _log_uniform(rng, 1e-12, 1e-7))))
    link = LinkModel("random", _log_uniform(rng, 0.01, 500.0), rng.choice((0.0, _log_uniform(rng, 1e-7, 1e-4))))
    return layout, prefill, link, rng.choice((512, 4096, 16384))


def _boundary_break_even_case(case: int) -> tuple[KVLayout, PrefillCostModel, LinkModel, int]:
    """Case 0: a link so slow that one token already pays (answer 1); case 1: so fast that none does (None)."""
    layout = KVLayout(2, 2, 64, 16, torch.bfloat16)
    if case == 0:
        return layout, PrefillCostModel(1e-5, 1e-6), LinkModel("slow", 0.001), 512
    return layout, PrefillCostModel(1e-2, 1e-4), LinkModel("fast", 1e4), 512


def _check_break_even(fn: Callable[..., Optional[int]], cases: list[tuple[KVLayout, PrefillCostModel, LinkModel, int]]
                      ) -> int:
    found = 0
    for case, (layout, prefill, link, max_len) in enumerate(cases):
        want = reference_break_even(layout, prefill, link, max_len)
        try:
            got = fn(layout, prefill, link, max_len)
        except NotImplementedError as err:
            not_implemented("Lab 5, Task 2", err)
        except Exception as err:  # noqa: BLE001
            failed(f"Lab 5, Task 2: case {case}: {layout}, {prefill}, {link}, max_len={max_len}: "
                   f"break_even_prompt_len raised {type(err).__name__}: {err}")
        if got != want:
            why = ("no prompt up to max_len ships slower than it prefills: return None" if want is None else
                   "a one-token prompt already ships slower than it prefills" if want == 1 else
                   f"KV crosses in whole blocks of {layout.block_size} tokens, one message per layer")
            failed(f"Lab 5, Task 2: case {case}: {layout}, {prefill}, {link}, max_len={max_len}: got {got}, "
                   f"expected {want} ({why})")
        found += want is not None
    return found


@task_check("Lab 5, Task 2")
def task2(break_even_prompt_len: Callable[..., Optional[int]], cases: int = 40, seed: Optional[int] = None) -> CheckResult:
    """``break_even_prompt_len(layout, prefill, link, max_len)`` against a block-by-block search with ``KVLayout``."""
    rng = random.Random(seed)
    drawn = [_boundary_break_even_case(0), _boundary_break_even_case(1)]
    drawn += [_random_break_even_case(rng) for _ in range(cases - 2)]
    found = _check_break_even(break_even_prompt_len, drawn)
    return passed(f"{cases} shapes, prefill costs and links ({found} with a break-even, one at a single token; "
                  f"{cases - found} without), exact match")


def hidden_task2(break_even_prompt_len: Callable[..., Optional[int]]) -> CheckResult:
    """Fresh shapes and links, the boundaries included."""
    rng = random.Random()
    drawn = [_boundary_break_even_case(1), _boundary_break_even_case(0)] + [_random_break_even_case(rng) for _ in range(40)]
    found = _check_break_even(break_even_prompt_len, drawn)
    return passed(f"42 hidden shapes and links ({found} with a break-even)")


# ---------------------------------------------------------------- Task 3: the decode worker's admission rule

AdmitCase = tuple[list[int], int, int]


def random_admit_case(rng: random.Random, long: bool = False) -> AdmitCase:
    """A waiting queue (block needs, oldest first), the free blocks and the running batch's reserve."""
    queue = [rng.choice((1, 2, 4, 8, 16, 32, 64)) * rng.randint(1, 2) for _ in range(rng.randint(0, 40 if long else 12))]
    free = rng.randint(0, 400 if long else 160)
    reserve = rng.choice((0, rng.randint(0, 40), rng.randint(0, free + 5)))
    return queue, free, reserve


def boundary_admit_cases() -> list[AdmitCase]:
    """Empty queue; reserve above free; the head does not fit but later ones do; exactly full; everything fits."""
    return [([], 50, 5), ([2, 2], 10, 12), ([64, 8, 4, 80, 2], 40, 10), ([10, 20, 10], 40, 0), ([3, 3, 3], 100, 10)]


def _check_admit_cases(admit: Callable[..., Sequence[int]], task: str, cases: Sequence[AdmitCase]) -> int:
    """Every case against the three rules; returns the number of requests admitted in all."""
    total = 0
    for index, (needs, free, reserve) in enumerate(cases):
        where = f"case {index} (needs {needs}, free {free}, reserve {reserve})"
        try:
            got = admit(list(needs), free, reserve)
        except NotImplementedError as err:
            return not_implemented(task, err)  # type: ignore[return-value]
        except Exception as err:  # noqa: BLE001
            failed(f"{task}: {where}: admit_handoffs raised {type(err).__name__}: {err}")
        try:
            chosen = [int(i) for i in got]
        except (TypeError, ValueError):
            failed(f"{task}: {where}: returned {got!r}, not a list of queue indices")
        if len(set(chosen)) != len(chosen) or any(not 0 <= i < len(needs) for i in chosen):
            failed(f"{task}: {where}: returned {chosen}: indices must be distinct positions in the queue, "
                   f"0..{len(needs) - 1}")
        taken = sum(needs[i] for i in chosen)
        if taken > free:
            failed(f"{task}: {where}: admitted {taken} blocks with only {free} free: over-committed the pool")
        if taken > max(0, free - reserve):
            failed(f"{task}: {where}: admitted {taken} blocks, eating into the {reserve} blocks reserved for the "
                   f"running batch's growth: its next new blocks would preempt a running sequence")
        left = free - reserve - taken
        idle = [i for i in range(len(needs)) if i not in chosen and needs[i] <= left]
        if idle:
            i = idle[0]
            failed(f"{task}: {where}: request {i} needs {needs[i]} blocks and {left} stay unused after the reserve, "
                   f"but it waits: blocks sit idle while a request fits")
        want = first_fit_in_order(needs, free, reserve)
        if sorted(chosen) != want:
            passed_over = min(set(want) - set(chosen))
            failed(f"{task}: {where}: admitted {sorted(chosen)}; request {passed_over} is older than the younger ones "
                   f"you admitted and fitted when its turn came: an older request that fits is never passed over")
        total += len(chosen)
    return total


@task_check("Lab 5, Task 3")
def task3(admit_handoffs: Callable[..., Sequence[int]], cases: int = 200, seed: Optional[int] = None) -> CheckResult:
    """``admit_handoffs(needs_blocks, free_blocks, reserve_blocks)``: no over-commit, no idle blocks, oldest first."""
    rng = random.Random(seed)
    drawn = boundary_admit_cases() + [random_admit_case(rng) for _ in range(cases)]
    total = _check_admit_cases(admit_handoffs, "Lab 5, Task 3", drawn)
    return passed(f"{len(drawn)} queues ({total} requests admitted): never past the reserve, no request left waiting "
                  f"that fits, no older fitting request passed over")


def hidden_task3(admit_handoffs: Callable[..., Sequence[int]]) -> CheckResult:
    """Fresh, longer queues with larger pools."""
    rng = random.Random()
    total = _check_admit_cases(admit_handoffs, "Lab 5, Task 3", [random_admit_case(rng, long=True) for _ in range(300)])
    return passed(f"300 hidden queues ({total} requests admitted)")


GRADING = LabGrading(
    lab=5,
    tasks=(
        GradedTask(task="Lab 5, Task 1", function="choose_group_size", points=3, hidden=hidden_task1,
                   reference="minidisagg.course.grouping_lab:fastest_group_size", design=True),
        GradedTask(task="Lab 5, Task 2", function="break_even_prompt_len", points=2, hidden=hidden_task2,
                   reference="minidisagg.course.check.lab5:reference_break_even", design=False),
        GradedTask(task="Lab 5, Task 3", function="admit_handoffs", points=3, hidden=hidden_task3,
                   reference="minidisagg.course.admission_lab:first_fit_in_order", design=True),
    ),
    predictions=("Lab 5, Q1", "Lab 5, Q2", "Lab 5, Q3", "Lab 5, Q4"),
    written=("W1", "W2"),
)
