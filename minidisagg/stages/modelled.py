"""Stages that charge a calibrated cost instead of running the model: fast replays of long timed workloads.

The engine around them is unchanged: its scheduler plans each step, its block manager fits the plan
into the KV pool, its timelines record every token. Only the forward pass is replaced by the cost
the calibration measured for a step of that shape (``engine.step_cost``), and each prompt's first
token and every decoded token is a filler id. Replays whose outputs are not read (ignore EOS, fixed
lengths) then take milliseconds where running the model would take minutes on a CPU.
"""

from __future__ import annotations

from typing import Protocol

from minidisagg.engine.batch import PrefillChunk
from minidisagg.engine.runner import ModelRunner
from minidisagg.engine.sequence import Sequence
from minidisagg.engine.step_cost import DECODE, PREFILL, StepShape
from minidisagg.stages.base import StageResult
from minidisagg.stages.decode import DecodeStage
from minidisagg.stages.prefill import PrefillStage

FILLER_TOKEN_ID = 100  # what a modelled stage "samples": an ordinary token of the SmolLM2 vocabulary


class StepCosts(Protocol):
    """Anything that prices a stage run by its shape (``StepCostModel`` does)."""

    def cost_s(self, shape: StepShape) -> float:
        """Seconds a stage run of ``shape`` costs."""


class ModelledPrefillStage(PrefillStage):
    """A prefill that advances its chunks and reports their calibrated cost, without running the model."""

    def __init__(self, runner: ModelRunner, costs: StepCosts) -> None:
        super().__init__(runner)
        self.costs = costs

    def run(self, work: list[PrefillChunk]) -> StageResult:
        """Mark each chunk computed; a chunk that ends its prompt 'samples' the filler token."""
        shape = StepShape.of_work(PREFILL, work)
        for chunk in work:
            if not 1 <= chunk.num_tokens <= chunk.seq.num_prefill_tokens_left:
                raise ValueError(f"request {chunk.seq.request_id}: prefill chunk of {chunk.num_tokens} tokens, "
                                 f"but {chunk.seq.num_prefill_tokens_left} are left")
        tokens = [FILLER_TOKEN_ID if c.is_last else None for c in work]
        for chunk in work:
            chunk.seq.num_computed_tokens += chunk.num_tokens
        return StageResult([c.seq for c in work], tokens, self.costs.cost_s(shape), shape.num_tokens)


class ModelledDecodeStage(DecodeStage):
    """A decode step that advances every sequence by one filler token and reports its calibrated cost."""

    def __init__(self, runner: ModelRunner, costs: StepCosts) -> None:
        super().__init__(runner)
        self.costs = costs

    def run(self, work: list[Sequence]) -> StageResult:
        """One modelled decode iteration over ``work``."""
        shape = StepShape.of_work(DECODE, work)
        for seq in work:
            seq.num_computed_tokens += 1
        return StageResult(list(work), [FILLER_TOKEN_ID] * len(work), self.costs.cost_s(shape), len(work))


class StagedEngine(Protocol):
    """An engine whose stages can be swapped (``LLMEngine``)."""

    runner: ModelRunner
    prefill_stage: PrefillStage
    decode_stage: DecodeStage


def use_modelled_stages(engine: StagedEngine, costs: StepCosts) -> None:
    """Swap ``engine``'s stages for modelled ones: every step charged ``costs`` for its shape, no forward pass."""
    engine.prefill_stage = ModelledPrefillStage(engine.runner, costs)
    engine.decode_stage = ModelledDecodeStage(engine.runner, costs)
