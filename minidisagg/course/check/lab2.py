"""Checks for lab 2 (the KV cache and paged memory), against the engine's KV pool, model and block manager."""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import torch

from minidisagg.config import ModelConfig
from minidisagg.course.checking import CheckResult, failed, not_implemented, passed, task_check
from minidisagg.course.kv_lab import engine_logits
from minidisagg.kv.block_manager import BlockManager
from minidisagg.kv.cache import PagedKVCache
from minidisagg.kv.pages import KVLayout
from minidisagg.models.llama import LlamaModel
from minidisagg.models.registry import load_model

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOGITS_ATOL = 1e-4  # float32 logits of the tiny model: the same math in another order differs by ~1e-6
TIE_GAP = 1e-5  # top-2 logits closer than this may legitimately pick either token


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


@task_check("Lab 2, Task 1")
def task1(kv_bytes_per_token: Callable[[int, int, int, torch.dtype], int], seed: int | None = None,
          num_cases: int = 60) -> CheckResult:
    """Compare ``kv_bytes_per_token(num_layers, num_kv_heads, head_dim, dtype)`` with what the engine's pool allocates."""
    task = "Lab 2, Task 1"
    _require_callable(task, kv_bytes_per_token, "check.lab2.task1(kv_bytes_per_token)")
    rng = random.Random(seed)
    try:
        for case in range(num_cases):
            dtype = DTYPES[case % len(DTYPES)]
            small = case % 2 == 0  # small shapes: a real PagedKVCache is allocated; large ones: the wire layout
            num_layers = rng.randint(1, 6) if small else rng.randint(1, 128)
            num_kv_heads = rng.randint(1, 4) if small else rng.randint(1, 64)
            head_dim = rng.choice([8, 16, 32]) if small else rng.choice([64, 80, 96, 128, 256])
            block_size = rng.choice([1, 4, 16])
            if small:
                cfg = ModelConfig("check", num_layers, num_kv_heads * head_dim, num_kv_heads, num_kv_heads, head_dim,
                                  32, 64)
                pool = PagedKVCache(cfg, 2, block_size, dtype, "cpu")
                want, source = pool.total_bytes // (2 * block_size), "a PagedKVCache of 2 blocks"
            else:
                layout = KVLayout(num_layers, num_kv_heads, head_dim, block_size, dtype)
                want, source = layout.request_nbytes(1) // block_size, "KVLayout.request_nbytes(1 block)"
            call_text = (f"kv_bytes_per_token(num_layers={num_layers}, num_kv_heads={num_kv_heads}, "
                         f"head_dim={head_dim}, dtype=torch.{_dtype_name(dtype)})")
            got = _run(task, call_text, kv_bytes_per_token, num_layers, num_kv_heads, head_dim, dtype)
            if got != want:
                failed(f"{task}: {call_text} returned {got!r}, but the engine stores {want} bytes per token "
                       f"({source} / its tokens; K and V, every layer, every KV head)")
    except NotImplementedError as err:
        return not_implemented(task, err)
    return passed(f"{num_cases} random shapes in fp32/bf16/fp16 match the engine's KV pool exactly")


@task_check("Lab 2, Task 2")
def task2(decode_with_kv_cache: Callable[[LlamaModel, list[int], int], tuple[Sequence[int], torch.Tensor]],
          seed: int | None = None, num_prompts: int = 6) -> CheckResult:
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
            prompt_len = 1 if case == 0 else rng.randint(1, 24)
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


def _random_block_manager(rng: random.Random) -> tuple[BlockManager, dict[int, int]]:
    """A pool after random interleaved growth and frees, so block tables are scattered; returns token counts."""
    manager = BlockManager(rng.randint(8, 64), rng.choice([1, 2, 4, 8, 16, 32]))
    tokens: dict[int, int] = {}
    for _ in range(rng.randint(5, 40)):
        key = rng.randrange(6)
        if key in tokens and rng.random() < 0.2:
            manager.free(key)
            del tokens[key]
            continue
        want = tokens.get(key, 0) + rng.randint(1, 3 * manager.block_size)
        if manager.can_grow(key, want):
            manager.grow(key, want)
            tokens[key] = want
    return manager, tokens


@task_check("Lab 2, Task 3")
def task3(slot_mapping: Callable[[list[int], list[int], int], Sequence[int]], seed: int | None = None,
          num_pools: int = 40) -> CheckResult:
    """Compare ``slot_mapping(block_table, positions, block_size)`` with ``BlockManager.slot_mapping`` on random pools."""
    task = "Lab 2, Task 3"
    _require_callable(task, slot_mapping, "check.lab2.task3(slot_mapping)")
    rng = random.Random(seed)
    num_sequences = 0
    try:
        for _ in range(num_pools):
            manager, tokens = _random_block_manager(rng)
            for key, count in tokens.items():
                table = list(manager.block_table(key))
                start = rng.randrange(count)
                end = rng.randint(start + 1, count)
                scattered = [rng.randrange(count) for _ in range(rng.randint(1, 8))]
                edges = _block_edges(count, manager.block_size)
                for positions in (list(range(start, end)), scattered, edges):
                    want = [manager.slot_mapping(key, p, p + 1)[0] for p in positions]
                    call_text = f"slot_mapping({table}, {_short(positions)}, block_size={manager.block_size})"
                    got = _run(task, call_text, slot_mapping, list(table), list(positions), manager.block_size)
                    got_list = [int(s) for s in torch.as_tensor(got).reshape(-1).tolist()]
                    if got_list != want:
                        bad = next(i for i in range(min(len(got_list), len(want)) + 1)
                                   if i >= len(got_list) or i >= len(want) or got_list[i] != want[i])
                        where = (f"position {positions[bad]} should be slot {want[bad]}, got "
                                 f"{got_list[bad] if bad < len(got_list) else 'nothing'}") if bad < len(want) else \
                            f"{len(got_list)} slots for {len(want)} positions"
                        failed(f"{task}: {call_text}: {where} (the engine's BlockManager.slot_mapping)")
                num_sequences += 1
    except NotImplementedError as err:
        return not_implemented(task, err)
    return passed(f"{num_pools} random pools, {num_sequences} block tables, contiguous, scattered and block-edge "
                  f"positions: every slot equals BlockManager.slot_mapping")


def _block_edges(count: int, block_size: int) -> list[int]:
    """Positions on both sides of every block boundary below ``count`` (0, bs - 1, bs, 2 bs - 1, 2 bs, ...)."""
    edges = {0, count - 1}
    for start in range(block_size, count, block_size):
        edges.update((start - 1, start))
    return sorted(edges)


def _short(values: list[int]) -> str:
    return str(values) if len(values) <= 12 else f"[{values[0]}, {values[1]}, ..., {values[-1]}] ({len(values)})"
