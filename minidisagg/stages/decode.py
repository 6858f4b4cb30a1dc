"""The decode stage: one token for every running sequence, in one batched forward pass.

Each running sequence has every token's KV but its newest one's. A decode step feeds that newest
token at its position, which writes its KV into the sequence's blocks, and samples the next
token from the logits. ``AsyncDecodeStage`` (``stages/async_decode.py``) runs the same step one
step ahead of the host.
"""

from __future__ import annotations

from minidisagg.engine.batch import BatchItem
from minidisagg.engine.sequence import Sequence
from minidisagg.stages.base import Stage, StageResult


class DecodeStage(Stage[Sequence]):
    """Computes the KV of each sequence's newest token and samples the next one."""

    name = "decode"

    def run(self, work: list[Sequence]) -> StageResult:
        """One decode iteration for a batch of running sequences."""
        check_ready_to_decode(work)
        items = [BatchItem([seq.last_token_id], seq.num_tokens - 1, seq.block_table, True) for seq in work]
        new_tokens, elapsed = self.execute_timed(items, work)
        for seq in work:
            seq.num_computed_tokens += 1
        return StageResult(list(work), new_tokens, elapsed, len(work))


def check_ready_to_decode(work: list[Sequence]) -> None:
    """ValueError unless every sequence has every token's KV but its newest one's."""
    for seq in work:
        if seq.num_prefill_tokens_left != 1:
            raise ValueError(
                f"request {seq.request_id} is not ready to decode: {seq.num_prefill_tokens_left} tokens lack KV"
            )
