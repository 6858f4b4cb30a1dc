"""A request's life inside the engine: its tokens, KV progress, sampling state and timeline."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

import torch

from minidisagg.engine.sampling import SamplingParams
from minidisagg.metrics import RequestTimeline


class SequenceStatus(enum.Enum):
    """Where a sequence is: waiting for (more) prefill, decoding, or done."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request being served.

    ``num_computed_tokens`` counts tokens whose KV is already in the cache. A waiting
    sequence needs tokens ``num_computed_tokens .. num_tokens - 1`` prefilled (all of them
    after a preemption, which frees the cache and recomputes); a running one has every
    token but the last in the cache, and each decode step computes that last token's KV
    and samples the next.
    """

    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    timeline: RequestTimeline
    prompt: Optional[str] = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: Optional[str] = None
    num_preemptions: int = 0
    generator: Optional[torch.Generator] = None

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by generated tokens."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prefill_tokens_left(self) -> int:
        """Tokens a waiting sequence still has to prefill before it can sample."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        """Whether generation has ended."""
        return self.status is SequenceStatus.FINISHED

    @property
    def last_token_id(self) -> int:
        """The newest token (the input of the next decode step)."""
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]
