"""Checks for lab 2 (the KV cache: sizing a pool, a cached decode loop, admission, a profiled step), and its grading."""

from __future__ import annotations

import random
from typing import Any, Callable, Optional, Sequence

import torch

from minidisagg.config import PRESETS, ModelConfig
from minidisagg.course.checking import CheckResult, failed, hidden_check, not_implemented, passed, task_check
from minidisagg.course.grading import GradedTask, LabGrading
from minidisagg.course.kv_lab import engine_logits
from minidisagg.course.profile_lab import ProfiledSteps, breakdown_from_methods, breakdown_from_trace, profile_decode_steps
from minidisagg.course.sizing import Request, admit_fcfs, blocks_for, kv_pool_plan
from minidisagg.kv.cache import PagedKVCache
from minidisagg.models.llama import LlamaModel
from minidisagg.models.registry import load_model

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOGITS_ATOL = 1e-4  # float32 logits of the tiny model: the same math in another order differs by ~1e-6
TIE_GAP = 1e-5  # top-2 logits closer than this may legitimately pick either token
SHARE_TOL = 0.1  # a trace's share of the step against the methods' own timers: the profiler's cost per call differs
READ_TOL = 1e-6  # reading the same trace: only the order of a sum may differ


def _require_callable(task: str, fn: Any, example: str) -> None:
    if not callable(fn):
        failed(f"{task}: pass your function itself, e.g. {example}; got {fn!r}")


def _run(task: str, call_text: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run the learner's function on one case; a crash becomes a FAIL that names the case."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise
    except Exception as err:  # the learner sees which input broke their function
        failed(f"{task}: {call_text} raised {type(err).__name__}: {err}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- Task 1: a KV pool for a memory budget ---

def _plan_mistake(got: tuple[int, int], cfg: ModelConfig, dtype: torch.dtype, memory: int, block_size: int,
                  tokens: int) -> str:
    """Name the slip when a wrong plan equals what a known mistake gives, else nothing."""
    size = torch.empty((), dtype=dtype).element_size()
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * size
    blocks = memory // (per_token * block_size)
    slips = {
        "you counted a key and a value per QUERY head: the cache holds one per KV head (grouped-query attention)":
            (memory // (2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * size * block_size), None),
        "you counted keys only: every token stores a key AND a value": (memory // (per_token // 2 * block_size), None),
        "you counted one layer: every layer keeps its own keys and values": (memory // (per_token // cfg.num_layers
                                                                                       * block_size), None),
        "you divided the pool's tokens by the request's tokens: a request holds whole blocks, so round its blocks up":
            (blocks, blocks * block_size // tokens),
        "you rounded a request's blocks down: a partly filled block is still a whole block":
            (blocks, blocks // max(1, tokens // block_size)),
    }
    for why, (num_blocks, num_requests) in slips.items():
        if num_requests is None and num_blocks == blocks:
            continue  # this slip changes nothing for this model (e.g. as many query heads as KV heads)
        if got[0] == num_blocks and (num_requests is None or got[1] == num_requests) and got != kv_pool_plan(
                cfg, dtype, memory, block_size, tokens):
            return f"; {why}"
    return ""


def _check_plans(task: str, fn: Callable[..., Any], cases: list[tuple], label: str) -> None:
    for cfg, dtype, memory, block_size, tokens, engine_block_bytes in cases:
        call_text = (f"plan_kv_pool(<{cfg.name}: {cfg.num_layers} layers, {cfg.num_heads} query heads, "
                     f"{cfg.num_kv_heads} KV heads of {cfg.head_dim}>, torch.{_dtype_name(dtype)}, "
                     f"kv_memory_bytes={memory}, block_size={block_size}, request_tokens={tokens})")
        got = _run(task, call_text, fn, cfg, dtype, memory, block_size, tokens)
        if not (isinstance(got, tuple) and len(got) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                               for x in got)):
            failed(f"{task}{label}: {call_text} returned {got!r}; return (num_blocks, num_requests), two whole numbers")
        want = kv_pool_plan(cfg, dtype, memory, block_size, tokens)
        if got != want:
            failed(f"{task}{label}: {call_text} returned {got}, expected {want} (the engine's block holds "
                   f"{engine_block_bytes} bytes; a request takes {blocks_for(tokens, block_size)} blocks)"
                   + _plan_mistake(got, cfg, dtype, memory, block_size, tokens))


@task_check("Lab 2, Task 1")
def task1(plan_kv_pool: Callable[..., tuple[int, int]], seed: int | None = None, num_cases: int = 40) -> CheckResult:
    """Compare the learner's pool plan with the engine's own block size in bytes, on random small models and budgets."""
    task = "Lab 2, Task 1"
    _require_callable(task, plan_kv_pool, "check.lab2.task1(plan_kv_pool)")
    rng = random.Random(seed)
    cases = []
    for case in range(num_cases):
        kv_heads = rng.randint(1, 4)
        cfg = ModelConfig("random", rng.randint(1, 6), kv_heads * rng.choice([1, 2, 4]) * 16,
                          kv_heads * rng.choice([1, 2, 4]), kv_heads, rng.choice([8, 16, 32]), 32, 64)
        dtype, block_size = DTYPES[case % len(DTYPES)], rng.choice([1, 4, 16, 32])
        block_bytes = PagedKVCache(cfg, 1, block_size, dtype, "cpu").bytes_per_block  # what the engine allocates
        memory = rng.randint(block_bytes, 5000 * block_bytes)
        tokens = rng.choice([rng.randint(1, block_size), rng.randint(1, 40 * block_size), block_size * rng.randint(1, 9)])
        cases.append((cfg, dtype, memory, block_size, tokens, block_bytes))
    try:
        _check_plans(task, plan_kv_pool, cases, "")
    except NotImplementedError as err:
        return not_implemented(task, err)
    return passed(f"{num_cases} random models, budgets, block sizes and request lengths match the engine's pool")


@hidden_check("Lab 2, Task 1")
def _hidden_task1(plan_kv_pool: Callable[..., tuple[int, int]]) -> CheckResult:
    """Every preset at real budgets (1-80 GiB), requests of one token to 128k, a budget below one block."""
    task = "Lab 2, Task 1"
    rng = random.Random()
    cases = []
    for cfg in PRESETS.values():
        dtype, block_size = rng.choice(DTYPES), rng.choice([8, 16, 32, 128])
        block_bytes = 2 * cfg.num_layers * block_size * cfg.kv_size * torch.empty((), dtype=dtype).element_size()
        for memory in (rng.randint(1, 80) << 30, block_bytes - 1):
            cases.append((cfg, dtype, memory, block_size, rng.choice([1, block_size + 1, rng.randint(2, 131_072)]),
                          block_bytes))
    _check_plans(task, plan_kv_pool, cases, " (hidden)")
    return passed(f"{len(cases)} hidden plans: every preset, GiB budgets and one below a single block")


# --- Task 2: a decode loop with a KV cache ---

@task_check("Lab 2, Task 2")
def task2(decode_with_kv_cache: Callable[[LlamaModel, list[int], int], tuple[Sequence[int], torch.Tensor]],
          seed: int | None = None, num_prompts: int = 6, max_prompt: int = 24) -> CheckResult:
    """Run the learner's cached greedy loop on random prompts; compare tokens and logits with full recompute."""
    task = "Lab 2, Task 2"
    _require_callable(task, decode_with_kv_cache, "check.lab2.task2(decode_with_kv_cache)")
    rng = random.Random(seed)
    model_seed = rng.randrange(1 << 30)
    model = load_model("tiny", device="cpu", dtype="float32", seed=model_seed).model
    worst = 0.0
    total_tokens = 0
    try:
        for case in range(num_prompts):
            # boundaries first: a one-token prompt (nothing before the last token to prefill), then one new
            # token (the prefill's own, no decode step), then random
            prompt_len = 1 if case == 0 else rng.randint(1, max_prompt)
            num_new = 1 if case == 1 else rng.randint(2, 10)
            prompt = [rng.randrange(100, model.cfg.vocab_size) for _ in range(prompt_len)]
            call_text = f"decode_with_kv_cache(model, <prompt of {len(prompt)} tokens>, {num_new})"
            result = _run(task, call_text, decode_with_kv_cache, model, list(prompt), num_new)
            tokens, logits = _unpack(task, call_text, result, num_new, model.cfg.vocab_size)
            # Recompute from scratch: one engine forward over prompt + the learner's tokens gives, at each
            # position, the logits a no-cache loop would have computed for the next token.
            want = engine_logits(model, prompt + tokens[:-1])[len(prompt) - 1:]
            for step in range(num_new):
                err = float((logits[step] - want[step]).abs().max())
                if not err <= LOGITS_ATOL:
                    failed(f"{task}: {call_text} (tiny model, seed {model_seed}): step {step} logits differ from "
                           f"recomputing the whole sequence by up to {err:.3g} (tolerance {LOGITS_ATOL}); "
                           f"position {len(prompt) + step - 1}. "
                           + ("The prompt's last logits are already off: check the prefill. " if step == 0 else
                              "The prompt step matches but a decode step does not: check the positions and that "
                              "the new token's keys/values join the cache before attention. "))
                top2 = want[step].topk(2).values
                if tokens[step] != int(want[step].argmax()) and float(top2[0] - top2[1]) > TIE_GAP:
                    failed(f"{task}: {call_text}: step {step} picked token {tokens[step]}, greedy picks "
                           f"{int(want[step].argmax())}")
                worst = max(worst, err)
            total_tokens += num_new
    except NotImplementedError as err:
        return not_implemented(task, err)
    return passed(f"{num_prompts} random prompts (a one-token prompt and a single new token included), {total_tokens} "
                  f"generated tokens equal to full recompute on the engine's LlamaModel; max logit error {worst:.1e}")


def _unpack(task: str, call_text: str, result: Any, num_new: int, vocab: int) -> tuple[list[int], torch.Tensor]:
    """Validate the learner's (tokens, logits) return value."""
    if not isinstance(result, tuple) or len(result) != 2:
        failed(f"{task}: {call_text} must return (tokens, logits), got {type(result).__name__}")
    tokens, logits = result
    tokens = [int(t) for t in tokens]
    logits = torch.as_tensor(logits).detach().float().cpu()
    if len(tokens) != num_new or tuple(logits.shape) != (num_new, vocab):
        failed(f"{task}: {call_text} returned {len(tokens)} tokens and logits of shape {tuple(logits.shape)}; "
               f"expected {num_new} tokens and logits [{num_new}, {vocab}]")
    return tokens, logits


@hidden_check("Lab 2, Task 2")
def _hidden_task2(decode_with_kv_cache: Callable[..., Any]) -> CheckResult:
    """Longer prompts (up to 80 tokens, several 16-token blocks) on a freshly seeded tiny model."""
    return task2.__wrapped__(decode_with_kv_cache, seed=random.randrange(1 << 30), num_prompts=4, max_prompt=80)


# --- Task 3: admission that keeps every admitted request's KV within the pool ---

def _admit_variants(waiting: Sequence[Request], running: Sequence[Request], free: int, bs: int) -> dict[str, int]:
    """What known slips of an admission rule would return, by the slip's description."""
    def fcfs(budget: int, need: Callable[[Request], int], stop: bool = True) -> int:
        count = 0
        for r in waiting:
            if need(r) > budget:
                if stop:
                    break
                continue
            budget -= need(r)
            count += 1
        return count

    held_later = sum(blocks_for(r.tokens_at_most, bs) - blocks_for(r.tokens_now, bs) for r in running)
    full = lambda r: blocks_for(r.tokens_at_most, bs)  # noqa: E731
    return {
        "you let a later request jump a request that did not fit: first come, first served stops at the first "
        "that does not fit": fcfs(free - held_later, full, stop=False),
        "you ignored the blocks the running requests will still need as they generate": fcfs(free, full),
        "you reserved the running requests' whole final size, but they already hold blocks for their tokens so far":
            fcfs(free - sum(full(r) for r in running), full),
        "you sized a request by its prompt alone: its output tokens need slots too":
            fcfs(free - held_later, lambda r: blocks_for(r.prompt_len, bs)),
        "you counted tokens, not blocks: every request rounds up to whole blocks": _token_admit(waiting, running,
                                                                                                 free, bs),
    }


def _token_admit(waiting: Sequence[Request], running: Sequence[Request], free: int, bs: int) -> int:
    budget = free * bs - sum(r.max_new_tokens - r.generated for r in running)
    count = 0
    for r in waiting:
        if r.tokens_at_most > budget:
            break
        budget -= r.tokens_at_most
        count += 1
    return count


def _random_scene(rng: random.Random, bs: int) -> tuple[list[Request], list[Request], int]:
    running = []
    for _ in range(rng.randint(0, 6)):
        max_new = rng.randint(1, 6 * bs)
        running.append(Request(rng.randint(1, 8 * bs), max_new, rng.randint(0, max_new - 1)))
    waiting = [Request(rng.randint(1, 10 * bs), rng.randint(1, 6 * bs)) for _ in range(rng.randint(1, 8))]
    if len(waiting) > 2 and rng.random() < 0.5:  # a long request in the middle, small ones after it
        waiting[1] = Request(40 * bs, 20 * bs)
        waiting[2:] = [Request(1, 1) for _ in waiting[2:]]
    future = sum(blocks_for(r.tokens_at_most, bs) - blocks_for(r.tokens_now, bs) for r in running)
    free = future + rng.randint(0, sum(blocks_for(r.tokens_at_most, bs) for r in waiting) + 2)
    return waiting, running, free


def _check_admissions(task: str, fn: Callable[..., Any], scenes: list[tuple], label: str) -> int:
    """Run every scene; FAIL on the first wrong count, naming the slip that gives the learner's count on every scene."""
    admitted = 0
    consistent: Optional[set[str]] = None  # the slips that give the learner's answer on every scene
    first_wrong: Optional[str] = None
    for waiting, running, free, bs in scenes:
        call_text = f"admit(waiting={waiting}, running={running}, free_blocks={free}, block_size={bs})"
        got = _run(task, call_text, fn, list(waiting), list(running), free, bs)
        if isinstance(got, bool) or not isinstance(got, int):
            failed(f"{task}{label}: {call_text} returned {got!r}, not a number of requests")
        variants = _admit_variants(waiting, running, free, bs)
        matching = {why for why, value in variants.items() if value == got}
        consistent = matching if consistent is None else consistent & matching
        want = admit_fcfs(waiting, running, free, bs)
        if got != want and first_wrong is None:
            first_wrong = (f"{task}{label}: {call_text} admitted {got}, expected {want}"
                           + (" (admitting more lets a request run out of blocks before it finishes)" if got > want else ""))
        admitted += want
    if first_wrong is not None:
        why = next((w for w in _admit_variants([], [], 0, 1) if w in (consistent or set())), "")
        failed(first_wrong + (f"; {why}" if why else ""))
    return admitted


@task_check("Lab 2, Task 3")
def task3(admit: Callable[..., int], seed: int | None = None, num_scenes: int = 200) -> CheckResult:
    """Compare the learner's admission count with first-come-first-served worst-case reservation, on random queues."""
    task = "Lab 2, Task 3"
    _require_callable(task, admit, "check.lab2.task3(admit)")
    rng = random.Random(seed)
    scenes = []
    for _ in range(num_scenes):
        bs = rng.choice([1, 4, 16])
        scenes.append((*_random_scene(rng, bs), bs))
    try:
        admitted = _check_admissions(task, admit, scenes, "")
    except NotImplementedError as err:
        return not_implemented(task, err)
    return passed(f"{num_scenes} random pools and queues ({admitted} requests admitted): none can run out of blocks, "
                  f"none admitted that would not fit, first come first served")


@hidden_check("Lab 2, Task 3")
def _hidden_task3(admit: Callable[..., int]) -> CheckResult:
    """Edges: an empty queue, an exactly full pool, a pool already overcommitted, block size 32."""
    task = "Lab 2, Task 3"
    rng = random.Random()
    exact = [Request(31, 1), Request(32, 32)]  # 1 + 2 blocks of 32: exactly 3 free
    scenes = [([], [Request(5, 5, 2)], 7, 4), (exact, [], 3, 32), (exact, [], 2, 32),
              ([Request(1, 1)], [Request(10, 100, 3)], 5, 4)]  # the running one already needs more than is free
    scenes += [(*_random_scene(rng, 32), 32) for _ in range(60)]
    _check_admissions(task, admit, scenes, " (hidden)")
    return passed(f"{len(scenes)} hidden queues: empty, exactly full, overcommitted, block size 32")


# --- Task 4: reading a profiled decode step ---

def _trace_variants(steps: ProfiledSteps) -> dict[str, tuple[float, float, float]]:
    """What known misreadings of the trace give, by the misreading's description."""
    rows = {e.key: e for e in steps.averages}
    n, wall = steps.num_steps, steps.step_wall_s
    ops = [e for e in steps.averages if not e.is_user_annotation]
    right = breakdown_from_trace(steps.averages, n, wall)
    return {
        "you used a label's self time: a label's own time leaves out the operators inside it, use its total":
            (rows["lm_head"].self_cpu_time_total / 1e6 / n / wall, rows["attention"].self_cpu_time_total / 1e6 / n / wall,
             right[2]),
        "the trace holds several steps: divide its times by the number of steps": (right[0] * n, right[1] * n,
                                                                                   wall - (wall - right[2]) * n),
        "you summed the operators' total times: an operator's total includes the operators it calls, counted again "
        "in theirs; sum the self times": (right[0], right[1], wall - sum(e.cpu_time_total for e in ops) / 1e6 / n),
        "you counted the labels' self time as operator time: a label is not an operator, its self time is the "
        "Python around the operators": (right[0], right[1], wall - sum(e.self_cpu_time_total
                                                                       for e in steps.averages) / 1e6 / n),
    }


def _check_reading(task: str, fn: Callable[..., Any], steps: ProfiledSteps, label: str) -> str:
    call_text = f"read_profile(<trace of {steps.num_steps} steps>, {steps.num_steps}, {steps.step_wall_s:.4g})"
    got = _run(task, call_text, fn, steps.averages, steps.num_steps, steps.step_wall_s)
    try:
        lm_head, attention, overhead = (float(x) for x in got)
    except (TypeError, ValueError):
        failed(f"{task}{label}: {call_text} returned {got!r}; return (lm_head_share, attention_share, overhead_s)")
    want = breakdown_from_trace(steps.averages, steps.num_steps, steps.step_wall_s)
    names = ("LM head share", "attention share", "overhead per step (s)")
    for name, g, w in zip(names, (lm_head, attention, overhead), want):
        if not abs(g - w) <= READ_TOL * max(1.0, abs(w)):
            why = next((v for v, values in _trace_variants(steps).items()
                        if all(abs(a - b) <= READ_TOL * max(1.0, abs(b)) for a, b in zip((lm_head, attention, overhead),
                                                                                           values))), "")
            failed(f"{task}{label}: {call_text}: {name} {g:.4g}, the trace says {w:.4g}" + (f"; {why}" if why else ""))
    by_methods = breakdown_from_methods(steps)
    agree = all(abs(a - b) <= SHARE_TOL for a, b in zip(want[:2], by_methods))
    return (f"LM head {want[0]:.0%} and attention {want[1]:.0%} of the step from the trace, {by_methods[0]:.0%} and "
            f"{by_methods[1]:.0%} from the methods' own timers ({'within' if agree else 'OUTSIDE'} the {SHARE_TOL:g} "
            f"asked: a timer also counts the Python of its method and the profiler's cost per call); "
            f"overhead {want[2] * 1e3:.2f} ms of {steps.step_wall_s * 1e3:.2f} ms")


def _profiled_tiny(rng: random.Random, batch: int, context_len: int, num_steps: int) -> ProfiledSteps:
    model = load_model("tiny", device="cpu", dtype="float32", seed=rng.randrange(1 << 30)).model
    return profile_decode_steps(model, batch, context_len, num_steps)


@task_check("Lab 2, Task 4")
def task4(read_profile: Callable[..., Any], seed: int | None = None) -> CheckResult:
    """Read a freshly profiled engine decode step of the tiny model; compare with the trace and the methods' timers."""
    task = "Lab 2, Task 4"
    _require_callable(task, read_profile, "check.lab2.task4(read_profile)")
    rng = random.Random(seed)
    steps = _profiled_tiny(rng, rng.randint(1, 4), rng.randint(16, 256), 2)
    try:
        detail = _check_reading(task, read_profile, steps, "")
    except NotImplementedError as err:
        return not_implemented(task, err)
    return passed(f"a fresh trace of the tiny model: {detail}")


@hidden_check("Lab 2, Task 4")
def _hidden_task4(read_profile: Callable[..., Any]) -> CheckResult:
    """A larger batch and context, and a different number of steps."""
    rng = random.Random()
    _check_reading("Lab 2, Task 4", read_profile, _profiled_tiny(rng, rng.randint(5, 8), rng.randint(300, 600), 3),
                   " (hidden)")
    return passed("a hidden trace: batch 5-8, context 300-600, three steps")


GRADING = LabGrading(
    lab=2,
    tasks=(
        GradedTask(task="Lab 2, Task 1", function="plan_kv_pool", points=2, hidden=_hidden_task1,
                   reference="minidisagg.course.sizing:kv_pool_plan", design=True),
        GradedTask(task="Lab 2, Task 2", function="decode_with_kv_cache", points=3, hidden=_hidden_task2,
                   reference="minidisagg.course.kv_lab:decode_with_engine_cache", design=False),
        GradedTask(task="Lab 2, Task 3", function="admit", points=3, hidden=_hidden_task3,
                   reference="minidisagg.course.sizing:admit_fcfs", design=True),
        GradedTask(task="Lab 2, Task 4", function="read_profile", points=2, hidden=_hidden_task4,
                   reference="minidisagg.course.profile_lab:breakdown_from_trace", design=False),
    ),
    predictions=("Lab 2, Q1", "Lab 2, Q2", "Lab 2, Q3"),
    written=("W1", "W2"),
)
