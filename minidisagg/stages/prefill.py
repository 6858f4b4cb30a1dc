"""The prefill stage: computes prompts' KV (whole or in chunks) and samples each first token."""

from __future__ import annotations

from minidisagg.engine.runner import BatchItem
from minidisagg.stages.base import PrefillChunk, Stage, StageResult


class PrefillStage(Stage[PrefillChunk]):
    """Runs a packed batch of prefill chunks of different lengths in one forward pass."""

    name = "prefill"

    def run(self, work: list[PrefillChunk]) -> StageResult:
        """Write the chunks' KV into their pages; sample a token for every chunk that ends a prefill."""
        items = []
        for chunk in work:
            seq = chunk.seq
            if not 1 <= chunk.num_tokens <= seq.num_prefill_tokens_left:
                raise ValueError(
                    f"request {seq.request_id}: prefill chunk of {chunk.num_tokens} tokens, "
                    f"but {seq.num_prefill_tokens_left} are left"
                )
            start = seq.num_computed_tokens
            tokens = seq.all_token_ids[start : start + chunk.num_tokens]
            items.append(BatchItem(tokens, start, seq.block_table, chunk.is_last))
        seqs = [c.seq for c in work]
        new_tokens, elapsed = self.execute_timed(items, seqs)
        for chunk in work:
            chunk.seq.num_computed_tokens += chunk.num_tokens
        return StageResult(seqs, new_tokens, elapsed, sum(c.num_tokens for c in work))
