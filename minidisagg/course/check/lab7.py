"""Checks of lab 7 (reusing and shrinking the KV): the block hash chain, the router's choice, the per-block quantiser."""

from __future__ import annotations

import numbers
import random
from typing import Any, Callable, Optional, Sequence

import torch

from minidisagg.course.checking import CheckResult, failed, not_implemented, passed, task_check
from minidisagg.course.grading import GradedTask, LabGrading
from minidisagg.course.reuse_lab import INT8_QMAX, dequantise_per_head, engine_choose_prefill
from minidisagg.disagg.prefix_index import prompt_block_keys
from minidisagg.kv.prefix_cache import hash_block

# ---------------------------------------------------------------- Task 1: the block hash chain

KeysCase = tuple[list[int], int]


def random_keys_case(rng: random.Random, long: bool = False) -> KeysCase:
    """Random token ids (any length, a partial last block likely) and a block size."""
    block_size = rng.choice((1, 2, 4, 8, 16, 32))
    return [rng.randrange(0, 49152) for _ in range(rng.randint(0, 600 if long else 200))], block_size


def boundary_keys_cases() -> list[KeysCase]:
    """No tokens; fewer than a block; exactly one block; a block and one token; blocks of one token."""
    return [([], 16), (list(range(10)), 16), (list(range(100, 116)), 16), (list(range(7, 24)), 16), ([5, 6, 7], 1)]


def _keys_mistake(tokens: list[int], block_size: int, got: list[Any], want: list[bytes]) -> str:
    if len(got) == len(want) + 1:
        return ("one key too many: a partial last block gets no key (its tokens may still grow, and only a full "
                "block can be shared)")
    if len(got) != len(want):
        return f"{len(got)} keys for {len(want)} full blocks of {block_size} tokens: every full block has exactly one key"
    first = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    block = tokens[first * block_size:(first + 1) * block_size]
    if got[first] == hash_block(None, block):
        return (f"block {first}'s key depends on its own tokens only: two prompts that differ before it would share "
                f"its key, but not its KV (each token's K and V depend on every token before it)")
    return f"block {first}'s key differs from the prefix cache's: chain it from the previous block's key"


def _check_keys_cases(block_keys: Callable[..., Any], task: str, cases: Sequence[KeysCase]) -> int:
    total = 0
    for index, (tokens, block_size) in enumerate(cases):
        where = f"case {index} ({len(tokens)} tokens, block_size {block_size})"
        try:
            got = block_keys(list(tokens), block_size)
        except NotImplementedError as err:
            return not_implemented(task, err)  # type: ignore[return-value]
        except Exception as err:  # noqa: BLE001 - the learner sees which case broke their function
            failed(f"{task}: {where}: block_keys raised {type(err).__name__}: {err}")
        if not isinstance(got, (list, tuple)) or not all(isinstance(k, bytes) for k in got):
            failed(f"{task}: {where}: returned {type(got).__name__}; expected a list of bytes keys (what hash_block returns)")
        want = prompt_block_keys(tokens, block_size)
        if list(got) != want:
            failed(f"{task}: {where}: {_keys_mistake(tokens, block_size, list(got), want)}")
        total += len(want)
    return total


@task_check("Lab 7, Task 1")
def task1(block_keys: Callable[..., list[bytes]], cases: int = 40, seed: Optional[int] = None) -> CheckResult:
    """``block_keys(token_ids, block_size)`` against the engine's prefix cache keys, byte for byte."""
    rng = random.Random(seed)
    drawn = boundary_keys_cases() + [random_keys_case(rng) for _ in range(cases)]
    total = _check_keys_cases(block_keys, "Lab 7, Task 1", drawn)
    return passed(f"{len(drawn)} prompts, {total} block keys, each equal to the engine's prefix cache key")


def hidden_task1(block_keys: Callable[..., list[bytes]]) -> CheckResult:
    """Fresh, longer prompts."""
    rng = random.Random()
    total = _check_keys_cases(block_keys, "Lab 7, Task 1", [random_keys_case(rng, long=True) for _ in range(40)])
    return passed(f"40 hidden prompts, {total} keys")


# ---------------------------------------------------------------- Task 2: the router's choice

RouteCase = tuple[list[int], list[int], int]


def random_route_case(rng: random.Random, wide: bool = False) -> RouteCase:
    """Cached prefix blocks and queued prompt tokens per worker, where affinity and load often disagree."""
    block_size = rng.choice((8, 16, 32))
    workers = rng.randint(2, 8 if wide else 5)
    overlap = [rng.choice((0, 0, rng.randint(1, 24))) for _ in range(workers)]
    queued = [rng.choice((0, rng.randint(0, 24) * block_size + rng.randint(0, block_size - 1)))
              for _ in range(workers)]
    return overlap, queued, block_size


def boundary_route_cases() -> list[RouteCase]:
    """One worker; a long cached prefix behind a longer queue; a short one behind none; a tie; nothing cached."""
    return [([3], [500], 16), ([10, 0], [400, 0], 16), ([10, 0], [100, 0], 16), ([2, 0], [32, 0], 16),
            ([0, 0, 0], [30, 5, 90], 16), ([4, 4], [0, 0], 8)]


def _cost_tokens(overlap: Sequence[int], queued: Sequence[int], block_size: int, w: int) -> int:
    """Tokens worker ``w`` computes before the prompt's first token, less the prompt's length (a constant)."""
    return queued[w] - overlap[w] * block_size


def _check_route_cases(choose: Callable[..., Any], task: str, cases: Sequence[RouteCase]) -> int:
    moved = 0
    for index, (overlap, queued, block_size) in enumerate(cases):
        where = f"case {index} (cached blocks {overlap}, queued tokens {queued}, block_size {block_size})"
        try:
            got = choose(list(overlap), list(queued), block_size)
        except NotImplementedError as err:
            return not_implemented(task, err)  # type: ignore[return-value]
        except Exception as err:  # noqa: BLE001
            failed(f"{task}: {where}: choose_prefill raised {type(err).__name__}: {err}")
        if isinstance(got, bool) or not isinstance(got, numbers.Integral) or not 0 <= got < len(overlap):
            failed(f"{task}: {where}: returned {got!r}; a worker is an index 0..{len(overlap) - 1}")
        best = engine_choose_prefill(overlap, queued, block_size)
        cost = [_cost_tokens(overlap, queued, block_size, w) for w in range(len(overlap))]
        if cost[got] > cost[best]:
            failed(f"{task}: {where}: worker {got} ({overlap[got]} blocks cached, {queued[got]} tokens queued) must "
                   f"compute {cost[got] - cost[best]} more tokens before this prompt's first token than worker {best} "
                   f"({overlap[best]} cached, {queued[best]} queued): a cached block spares {block_size} tokens of "
                   f"prefill, and each queued token is one more to compute first")
        moved += overlap[best] < max(overlap)
    return moved


@task_check("Lab 7, Task 2")
def task2(choose_prefill: Callable[..., int], cases: int = 200, seed: Optional[int] = None) -> CheckResult:
    """``choose_prefill(overlap_blocks, queued_tokens, block_size)``: as good a worker as the engine's router picks."""
    rng = random.Random(seed)
    drawn = boundary_route_cases() + [random_route_case(rng) for _ in range(cases)]
    moved = _check_route_cases(choose_prefill, "Lab 7, Task 2", drawn)
    return passed(f"{len(drawn)} routing decisions as good as the engine's cache-aware router's ({moved} of them "
                  f"away from the longest cached prefix, because of its queue)")


def hidden_task2(choose_prefill: Callable[..., int]) -> CheckResult:
    """Fresh decisions over up to 8 workers."""
    rng = random.Random()
    moved = _check_route_cases(choose_prefill, "Lab 7, Task 2", [random_route_case(rng, wide=True) for _ in range(300)])
    return passed(f"300 hidden decisions ({moved} away from the longest cached prefix)")


# ---------------------------------------------------------------- Task 3: the per-block quantiser

HALF_STEP_SLACK = 1e-4  # float32 rounding of x / scale and back (a value up to 127 steps from 0)


def random_pages(rng: random.Random, wide: bool = False) -> torch.Tensor:
    """Pages [2, blocks, block_size, kv_heads, head_dim] (or with a layer axis first) whose heads differ in loudness,
    with one all-zero block-head."""
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    shape = [2, rng.randint(1, 6), rng.choice((4, 16)), rng.randint(1, 4), rng.choice((8, 32, 64))]
    if wide or rng.random() < 0.3:
        shape.insert(0, rng.randint(1, 4))
    loudness = torch.exp(torch.empty(shape[-2]).uniform_(-3, 4, generator=gen)).view(1, -1, 1)
    pages = torch.randn(shape, generator=gen) * loudness
    pages[..., 0, :, :, :] *= torch.where(torch.rand((), generator=gen) < 0.5, 1.0, 0.01)
    pages.view(-1, *shape[-3:])[0, :, 0, :] = 0.0  # one block-head of zeros
    dtype = rng.choice((torch.float32, torch.float32, torch.bfloat16))
    return pages.to(dtype)


def _check_quantiser_cases(quantise: Callable[..., Any], task: str, cases: Sequence[torch.Tensor]) -> float:
    worst = 0.0
    for index, pages in enumerate(cases):
        shape = tuple(pages.shape)
        where = f"case {index} (pages {list(shape)}, {str(pages.dtype).removeprefix('torch.')})"
        try:
            got = quantise(pages.clone())
        except NotImplementedError as err:
            return not_implemented(task, err)  # type: ignore[return-value]
        except Exception as err:  # noqa: BLE001
            failed(f"{task}: {where}: quantise_blocks raised {type(err).__name__}: {err}")
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            failed(f"{task}: {where}: returned {type(got).__name__}; expected (int8 values, scales)")
        values, scales = got
        if not isinstance(values, torch.Tensor) or values.dtype != torch.int8 or tuple(values.shape) != shape:
            failed(f"{task}: {where}: values must be an int8 tensor of the pages' shape {list(shape)}, got "
                   f"{getattr(values, 'dtype', type(values).__name__)} {list(getattr(values, 'shape', []))}")
        want_scales = (*shape[:-3], shape[-2])
        if not isinstance(scales, torch.Tensor) or not scales.is_floating_point() or tuple(scales.shape) != want_scales:
            failed(f"{task}: {where}: scales must be a float tensor of shape {list(want_scales)}, one per block and KV "
                   f"head, got {list(getattr(scales, 'shape', []))}")
        if not bool(torch.isfinite(scales).all()):
            failed(f"{task}: {where}: a scale is inf or NaN (an all-zero block-head needs a scale too: 0 will do)")
        if bool((values == -128).any()):
            failed(f"{task}: {where}: a value is -128; the format is symmetric, -127..127 (the wire rejects -128)")
        x = pages.float()
        amax = x.abs().amax(dim=(-3, -1))
        step = scales.float()
        back = dequantise_per_head(values, step, torch.float32)
        bound = (step / 2).unsqueeze(-2).unsqueeze(-1) * (1 + HALF_STEP_SLACK) + 1e-12
        over = (back - x).abs() > bound
        if bool(over.any()):
            clipped = bool(((x.abs() > INT8_QMAX * step.unsqueeze(-2).unsqueeze(-1) * (1 + HALF_STEP_SLACK)) & over).any())
            failed(f"{task}: {where}: a value comes back further than half a step from where it was: "
                   + ("the step is too small for the block-head's largest value, so it clips" if clipped
                      else "round each value to the nearest step (in float32)"))
        loose = (amax > 0) & (step > amax / INT8_QMAX * (1 + HALF_STEP_SLACK))
        if bool(loose.any()):
            k = int(loose.flatten().nonzero()[0])
            ratio = float(step.flatten()[k] / (amax.flatten()[k] / INT8_QMAX))
            failed(f"{task}: {where}: a block-head's step is {ratio:.3g}x the smallest that holds its largest value: "
                   f"the values use only part of the int8 range, and every error grows with the step")
        worst = max(worst, float(((back - x).abs() / amax.clamp_min(1e-30).unsqueeze(-2).unsqueeze(-1)).max()))
    return worst


@task_check("Lab 7, Task 3")
def task3(quantise_blocks: Callable[..., Any], cases: int = 30, seed: Optional[int] = None) -> CheckResult:
    """``quantise_blocks(pages)``: int8 values and a scale per (block, KV head), nothing clipped, the step as small as it can be."""
    rng = random.Random(seed)
    drawn = [random_pages(rng) for _ in range(cases)]
    worst = _check_quantiser_cases(quantise_blocks, "Lab 7, Task 3", drawn)
    return passed(f"{len(drawn)} random pages (heads up to 1000x apart in loudness, zero block-heads, float32 and "
                  f"bfloat16): every value within half a step; worst error {worst:.2%} of its block-head's largest value")


def hidden_task3(quantise_blocks: Callable[..., Any]) -> CheckResult:
    """Fresh pages, every one with a layer axis."""
    rng = random.Random()
    worst = _check_quantiser_cases(quantise_blocks, "Lab 7, Task 3", [random_pages(rng, wide=True) for _ in range(30)])
    return passed(f"30 hidden pages, worst error {worst:.2%} of the block-head's largest value")


GRADING = LabGrading(
    lab=7,
    tasks=(
        GradedTask(task="Lab 7, Task 1", function="block_keys", points=2, hidden=hidden_task1,
                   reference="minidisagg.disagg.prefix_index:prompt_block_keys", design=False),
        GradedTask(task="Lab 7, Task 2", function="choose_prefill", points=3, hidden=hidden_task2,
                   reference="minidisagg.course.reuse_lab:engine_choose_prefill", design=True),
        GradedTask(task="Lab 7, Task 3", function="quantise_blocks", points=3, hidden=hidden_task3,
                   reference="minidisagg.course.reuse_lab:per_head_int8", design=True),
    ),
    predictions=("Lab 7, Q1", "Lab 7, Q2", "Lab 7, Q3"),
    written=("W1", "W2"),
)
