"""The decode stage: one token for every running sequence, in one batched forward pass."""

from __future__ import annotations

from minidisagg.engine.runner import BatchItem
from minidisagg.engine.sequence import Sequence
from minidisagg.stages.base import Stage, StageResult


class DecodeStage(Stage[Sequence]):
    """Computes the KV of each sequence's newest token and samples the next one."""

    name = "decode"

    def run(self, work: list[Sequence]) -> StageResult:
        """One decode iteration for a batch of running sequences."""
        items = []
        for seq in work:
            if seq.num_prefill_tokens_left != 1:
                raise ValueError(
                    f"request {seq.request_id} is not ready to decode: {seq.num_prefill_tokens_left} tokens lack KV"
                )
            items.append(BatchItem([seq.last_token_id], seq.num_tokens - 1, seq.block_table, True))
        new_tokens, elapsed = self.execute_timed(items, work)
        for seq in work:
            seq.num_computed_tokens += 1
        return StageResult(list(work), new_tokens, elapsed, len(work))
