"""The units of work that flow from the scheduler to the stages and on to the model runner.

They live here, below both, so that the scheduler, the stages and the runner share them without
importing one another.
"""

from __future__ import annotations

from dataclasses import dataclass

from minidisagg.engine.sequence import Sequence


@dataclass(frozen=True)
class PrefillChunk:
    """Prefill the next ``num_tokens`` uncomputed tokens of ``seq``."""

    seq: Sequence
    num_tokens: int

    @property
    def is_last(self) -> bool:
        """Whether this chunk completes the sequence's prefill (so a token is sampled)."""
        return self.num_tokens == self.seq.num_prefill_tokens_left


@dataclass(frozen=True)
class BatchItem:
    """Tokens of one sequence to run now, at positions ``start_pos ...``, with the blocks holding its KV."""

    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    want_logits: bool
