"""Calibrate a ``StepCostModel`` on the loaded model's device, with the engine's own stages.

Every point is the fastest of several runs of the same shape (at least ``repeats``; cheap shapes
run more often, up to ``MAX_REPEATS`` or ``CHEAP_SHAPE_BUDGET_S`` of work): another program's load
only ever adds time, so the minimum is the figure least disturbed by it. Calibration runs on wall
time; the replays that use the model then run on a ``SimulatedClock(cost_model=...)``.

On a CPU the calibration runs on one thread. With several, each op ends at a barrier where every
thread waits for the slowest; when another program holds a core, one descheduled thread stalls them
all for a scheduler slice, so a step's time stops depending on its size at all (measured on a 2-core
host at load 6: a 16-token prefill "took" 235 ms, a 64-token one 31 ms). One thread's timings stay
in proportion to the work under load; the replay is then that of a one-core machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
from rich.progress import Progress

from minidisagg.config import CacheConfig, EngineConfig
from minidisagg.engine.llm_engine import LLMEngine
from minidisagg.engine.sampling import SamplingParams
from minidisagg.engine.step_cost import DECODE, PREFILL, StepCostModel
from minidisagg.models.registry import LoadedModel

BLOCK_SIZE = 16
MAX_REPEATS = 12  # most runs of one cheap shape
CHEAP_SHAPE_BUDGET_S = 0.25  # a shape is run again (up to MAX_REPEATS) while its runs took less than this in all


@dataclass(frozen=True)
class CalibrationPlan:
    """Which shapes to time: prefill token counts, decode batch sizes, and how far context reaches."""

    prefill_tokens: tuple[int, ...]
    decode_batch_sizes: tuple[int, ...]
    max_context_tokens: int
    decode_reference_context: int = 32
    repeats: int = 3

    @classmethod
    def covering(cls, max_prefill_tokens: int, max_batch: int, max_context_tokens: Optional[int] = None,
                 repeats: int = 3) -> "CalibrationPlan":
        """Powers of two up to ``max_prefill_tokens`` tokens and ``max_batch`` sequences (both ends included)."""
        if max_prefill_tokens < 1 or max_batch < 1 or repeats < 1:
            raise ValueError("max_prefill_tokens, max_batch and repeats must be >= 1")
        tokens = sorted({n for n in (2 ** k for k in range(4, 20)) if n < max_prefill_tokens} | {max_prefill_tokens})
        batches = sorted({b for b in (2 ** k for k in range(0, 12)) if b < max_batch} | {max_batch})
        return cls(tuple(tokens), tuple(batches), max(max_context_tokens or 0, max_prefill_tokens), repeats=repeats)


def _prompt(loaded: LoadedModel, n: int, gen: torch.Generator) -> dict:
    return {"prompt_token_ids": torch.randint(100, loaded.config.vocab_size, (n,), generator=gen).tolist()}


def _drain(engine: LLMEngine) -> None:
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                engine.release(out.request_id)


def _fastest(engine: LLMEngine, mark: int, stage: str, **match: int) -> list[float]:
    return [s.measured_s for s in engine.stats.steps[mark:]
            if s.stage == stage and all(getattr(s, k) == v for k, v in match.items())]


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs, clamped to >= 0 (noise must not make context free)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den) if den else 0.0


def calibrate_step_costs(loaded: LoadedModel, plan: CalibrationPlan, progress: bool = True,
                         seed: int = 0) -> StepCostModel:
    """Time every shape in ``plan`` with the engine's prefill and decode stages; return the fitted model."""
    if loaded.device.type != "cpu":
        return _calibrate(loaded, plan, progress, seed, threads=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _calibrate(loaded, plan, progress, seed, threads=1)
    finally:
        torch.set_num_threads(threads)


def _calibrate(loaded: LoadedModel, plan: CalibrationPlan, progress: bool, seed: int, threads: int) -> StepCostModel:
    gen = torch.Generator().manual_seed(seed)
    reps = plan.repeats
    chunk = plan.prefill_tokens[len(plan.prefill_tokens) // 2]
    offsets = list(range(0, max(plan.max_context_tokens, 2 * chunk), chunk))
    ctx_long = max(plan.max_context_tokens, plan.decode_reference_context + 1)
    big_b = plan.decode_batch_sizes[-1]
    needed_tokens = max(big_b * (plan.decode_reference_context + reps + 2), ctx_long + reps + 2,
                        offsets[-1] + chunk + 1, plan.prefill_tokens[-1] + 1)
    blocks = -(-needed_tokens // BLOCK_SIZE) + big_b + 8
    common = dict(max_num_seqs=big_b, cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=blocks))
    whole = LLMEngine(loaded, EngineConfig(max_num_batched_tokens=max(plan.prefill_tokens[-1], ctx_long,
                                                                                  big_b * plan.decode_reference_context),
                                           policy="prefill_first", **common))
    chunked = LLMEngine(loaded, EngineConfig(max_num_batched_tokens=chunk, policy="chunked", **common))
    whole.capture_cuda_graphs()
    long_reps = max(1, reps // 2)  # the long-context runs cost the most and vary least
    total = reps * (len(plan.prefill_tokens) + len(plan.decode_batch_sizes) + 1) + long_reps + 1
    bar = Progress(transient=True, disable=not progress)
    with bar:
        task = bar.add_task("calibrating step costs", total=total)
        for engine in (whole, chunked):  # first calls pay one-time costs: keep them out of every point
            engine.add_request(_prompt(loaded, min(64, chunk), gen), SamplingParams(temperature=0, max_tokens=3,
                                                                                    ignore_eos=True))
            _drain(engine)
        bar.advance(task)
        prefill_s = []
        for n in plan.prefill_tokens:
            mark = len(whole.stats.steps)
            times: list[float] = []
            while len(times) < reps or (len(times) < MAX_REPEATS and sum(times) < CHEAP_SHAPE_BUDGET_S):
                whole.add_request(_prompt(loaded, n, gen), SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
                _drain(whole)
                times = _fastest(whole, mark, PREFILL, num_tokens=n)
                if len(times) <= reps:
                    bar.advance(task)
            prefill_s.append(max(min(times), prefill_s[-1] if prefill_s else 0.0))  # more tokens never cost less
        by_offset: dict[int, list[float]] = {o: [] for o in offsets}
        for _ in range(long_reps):  # one long prompt in chunks: the same chunk size at growing context
            mark = len(chunked.stats.steps)
            chunked.add_request(_prompt(loaded, offsets[-1] + chunk, gen),
                                SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
            _drain(chunked)
            for offset, t in zip(offsets, _fastest(chunked, mark, PREFILL, num_tokens=chunk)):
                by_offset[offset].append(t)
            bar.advance(task)
        attention_s = _slope([float(o * chunk) for o in offsets], [min(v) for v in by_offset.values()])

        def decode_step_s(batch: int, context: int) -> float:
            mark = len(whole.stats.steps)
            for _ in range(batch):  # decode steps are cheap next to the prefill that sets them up: time several
                whole.add_request(_prompt(loaded, context, gen),
                                  SamplingParams(temperature=0, max_tokens=MAX_REPEATS + 1, ignore_eos=True))
            _drain(whole)
            bar.advance(task, reps)
            return min(_fastest(whole, mark, DECODE, num_seqs=batch))

        ref = plan.decode_reference_context
        decode_s = [decode_step_s(b, ref) for b in plan.decode_batch_sizes]
        long_s = decode_step_s(1, ctx_long)  # one sequence with a long context: what each context token adds
        context_s = max(0.0, (long_s - decode_s[0]) / (ctx_long - ref))
    return StepCostModel(tuple(plan.prefill_tokens), tuple(prefill_s), tuple(plan.decode_batch_sizes), tuple(decode_s),
                         attention_s, context_s, ref, str(loaded.device), os.getloadavg()[0], threads)
