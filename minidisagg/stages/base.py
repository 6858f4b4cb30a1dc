"""The ``Stage`` protocol: one phase of inference run over a batch of sequences, timed."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Generic, Optional, TypeVar

from minidisagg.engine.batch import BatchItem
from minidisagg.engine.runner import ModelRunner
from minidisagg.engine.sampling import sample
from minidisagg.engine.scheduler import StepPlan
from minidisagg.engine.sequence import Sequence


@dataclass
class StageResult:
    """What a stage did: the token sampled for each sequence (``None`` if none yet) and how long it took."""

    seqs: list[Sequence]
    new_token_ids: list[Optional[int]]
    elapsed_s: float
    num_tokens: int
    extras: dict[str, float] = field(default_factory=dict)


WorkT = TypeVar("WorkT")


class Stage(ABC, Generic[WorkT]):
    """A phase of inference. Subclass it and pass the subclass to ``LLM`` to change how a phase runs.

    ``run`` must write the batch's KV into the sequences' pages, advance each sequence's
    ``num_computed_tokens``, and return the sampled tokens; it must not append them (the
    engine does, so that stopping rules live in one place).
    """

    name: str = "stage"

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    @abstractmethod
    def run(self, work: list[WorkT]) -> StageResult:
        """Run one batch of work."""

    def settle(self) -> None:
        """Wait for device work this stage queued ahead of its results (none by default).

        The engine calls it before it hands freed blocks to a writer outside its own device stream
        (incoming KV from another worker).
        """

    def execute_timed(self, items: list[BatchItem], seqs: list[Sequence]) -> tuple[list[Optional[int]], float]:
        """Run the model over ``items``, sample where logits were asked for, and time it all."""
        t0 = time.perf_counter()
        logits = self.runner.execute(items)
        wanted = [s for s, it in zip(seqs, items) if it.want_logits]
        sampled = iter(sample(logits, [s.params for s in wanted], [s.generator for s in wanted]))
        tokens = [next(sampled) if it.want_logits else None for it in items]
        self.runner.synchronize()
        return tokens, time.perf_counter() - t0


def planned_runs(plan: StepPlan, prefill_stage: Stage, decode_stage: Stage, now_s: float) -> list[tuple[Stage, list]]:
    """The plan's work by stage in the plan's order, each planned prefill's first scheduling and start stamped."""
    for chunk in plan.prefills:
        tl = chunk.seq.timeline
        tl.scheduled_s = now_s if tl.scheduled_s is None else tl.scheduled_s
        tl.prefill_start_s = now_s if tl.prefill_start_s is None else tl.prefill_start_s
    runs: list[tuple[Stage, list]] = [(prefill_stage, plan.prefills), (decode_stage, plan.decodes)]
    return runs if plan.prefill_before_decode else runs[::-1]
