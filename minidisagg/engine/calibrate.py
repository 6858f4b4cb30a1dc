"""Calibrate a ``StepCostModel`` on the loaded model's device, with the engine's own stages.

Every point is the fastest of several runs of the same shape: another program's load only ever
adds time, so the minimum is the figure least disturbed by it (``keep="median"`` keeps the median run
instead: the figure a fit to serving runs by medians, ``sim.costs.fit_costs``, is comparable with). The runs are interleaved, every shape
once per round for ``repeats`` rounds (cheap shapes a few times a round), so a load that comes and
goes touches every shape alike rather than whichever happened to be timed at that moment. Calibration runs on wall
time; the replays that use the model then run on a ``SimulatedClock(cost_model=...)``.

On a CPU the calibration runs on one thread. With several, each op ends at a barrier where every
thread waits for the slowest; when another program holds a core, one descheduled thread stalls them
all for a scheduler slice, so a step's time stops depending on its size at all (``benchmarks/NOTES.md``,
"Calibration under load", has an example). One thread's timings stay in proportion to the work under
load; the replay is then that of a one-core machine.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from rich.progress import Progress

from minidisagg.config import CacheConfig, EngineConfig
from minidisagg.engine.llm_engine import LLMEngine
from minidisagg.engine.sampling import SamplingParams
from minidisagg.engine.step_cost import DECODE, PREFILL, StepCostModel
from minidisagg.models.registry import LoadedModel

BLOCK_SIZE = 16
MAX_RUNS_PER_ROUND = 4  # most runs of one cheap prefill shape in one round
CHEAP_SHAPE_S = 0.05  # a prefill shape is run again within a round while its runs took less than this
DECODE_STEPS_PER_ROUND = 4  # decode steps timed per batch size per round


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


KEEP = ("fastest", "median")


def kept_s(times: Sequence[float], keep: str = "fastest") -> float:
    """The figure a calibration point keeps of its runs' seconds: the fastest, or the median."""
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {list(KEEP)}, got {keep!r}")
    if not times:
        raise ValueError("a calibration point needs at least one run")
    return min(times) if keep == "fastest" else statistics.median(times)


def calibrate_step_costs(loaded: LoadedModel, plan: CalibrationPlan, progress: bool = True,
                         seed: int = 0, keep: str = "fastest") -> StepCostModel:
    """Time every shape in ``plan`` with the engine's prefill and decode stages; return the fitted model.

    ``keep``: which of a shape's runs makes its point (``kept_s``).
    """
    kept_s([1.0], keep)  # refuse a bad ``keep`` before anything is timed
    if loaded.device.type != "cpu":
        return _calibrate(loaded, plan, progress, seed, threads=0, keep=keep)
    with cpu_threads(1):
        return _calibrate(loaded, plan, progress, seed, threads=1, keep=keep)


@contextlib.contextmanager
def cpu_threads(num_threads: int) -> Iterator[None]:
    """Run the block on ``num_threads`` torch CPU threads (0: leave them as they are), then restore the count.

    One thread is how a busy CPU is timed fairly: a multi-threaded op waits at its barriers for a thread
    that another program holds, so its time swings with the load; one thread only shares its core.
    """
    before = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _calibrate(loaded: LoadedModel, plan: CalibrationPlan, progress: bool, seed: int, threads: int,
               keep: str) -> StepCostModel:
    gen = torch.Generator().manual_seed(seed)
    chunk = plan.prefill_tokens[len(plan.prefill_tokens) // 2]
    offsets = list(range(0, max(plan.max_context_tokens, 2 * chunk), chunk))
    ctx_long = offsets[-1] + chunk  # the chunked prompt then decodes: batch 1 at a long context
    ref = plan.decode_reference_context
    big_b = plan.decode_batch_sizes[-1]
    steps = DECODE_STEPS_PER_ROUND
    needed_tokens = max(big_b * (ref + steps + 2), ctx_long + steps + 2, plan.prefill_tokens[-1] + 1)
    blocks = -(-needed_tokens // BLOCK_SIZE) + big_b + 8
    # synchronous decode: with a step queued ahead, a stage's wall time would miss the device time it overlaps
    common = dict(max_num_seqs=big_b, cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=blocks), async_scheduling=False)
    whole = LLMEngine(loaded, EngineConfig(max_num_batched_tokens=max(plan.prefill_tokens[-1], big_b * ref),
                                           policy="prefill_first", **common))
    chunked = LLMEngine(loaded, EngineConfig(max_num_batched_tokens=chunk, policy="chunked", **common))
    whole.capture_cuda_graphs()
    chunked.capture_cuda_graphs()

    def run(engine: LLMEngine, prompt_len: int, batch: int = 1, max_tokens: int = 1) -> None:
        for _ in range(batch):
            engine.add_request(_prompt(loaded, prompt_len, gen),
                               SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        _drain(engine)

    bar = Progress(transient=True, disable=not progress)
    with bar:
        task = bar.add_task("calibrating step costs", total=plan.repeats + 1)
        for engine in (whole, chunked):  # first calls pay one-time costs: keep them out of every point
            run(engine, min(64, chunk), max_tokens=3)
        run(whole, ref, batch=big_b, max_tokens=3)
        bar.advance(task)
        marks = (len(whole.stats.steps), len(chunked.stats.steps))
        for _ in range(plan.repeats):  # one round: every shape, in the same order
            for n in plan.prefill_tokens:
                start, runs = time.perf_counter(), 0
                while runs < 1 or (runs < MAX_RUNS_PER_ROUND and time.perf_counter() - start < CHEAP_SHAPE_S):
                    run(whole, n)
                    runs += 1
            run(chunked, ctx_long, max_tokens=steps + 1)
            for b in plan.decode_batch_sizes:
                run(whole, ref, batch=b, max_tokens=steps + 1)
            bar.advance(task)
    whole_steps, chunked_steps = whole.stats.steps[marks[0]:], chunked.stats.steps[marks[1]:]
    points = [(n, n * (n + 1) / 2, kept_s([s.measured_s for s in whole_steps if s.stage == PREFILL and s.num_tokens == n],
                                          keep)) for n in plan.prefill_tokens]
    chunk_runs = [s for s in chunked_steps if s.stage == PREFILL]
    per_prompt = len(offsets)
    for i, offset in enumerate(offsets):  # the i-th chunk of every chunked prompt ran at this offset
        times = [s.measured_s for s in chunk_runs[i::per_prompt]]
        points.append((chunk, chunk * (offset + (chunk + 1) / 2), kept_s(times, keep)))
    decode_s = [kept_s([s.measured_s for s in whole_steps if s.stage == DECODE and s.num_seqs == b], keep)
                for b in plan.decode_batch_sizes]
    long_s = kept_s([s.measured_s for s in chunked_steps if s.stage == DECODE], keep)
    context_s = max(0.0, (long_s - decode_s[0]) / (ctx_long - ref))
    return StepCostModel.fitted(points, plan.decode_batch_sizes, decode_s, decode_context_s=context_s,
                                decode_reference_context=ref, device=str(loaded.device), load_1min=os.getloadavg()[0],
                                cpu_threads=threads)
