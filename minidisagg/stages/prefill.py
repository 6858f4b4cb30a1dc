"""The prefill stage: computes prompts' KV (whole or in chunks) and samples each first token."""

from __future__ import annotations

from typing import Callable, Optional

from minidisagg.engine.batch import BatchItem, PrefillChunk
from minidisagg.engine.sequence import Sequence
from minidisagg.stages.base import Stage, StageResult


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


class LayerwisePrefillStage(PrefillStage):
    """A prefill that announces each finished layer, so a request's KV can ship while later layers compute.

    ``on_layer(seqs, layer)`` is called after ``layer``'s KV of this batch is in the cache, with
    the sequences whose prefill this batch completes (the ones about to be handed off).
    ``on_batch_start(seqs)`` is called with the same sequences before the batch runs.
    """

    name = "prefill"
    on_layer: Optional[Callable[[list[Sequence], int], None]] = None
    on_batch_start: Optional[Callable[[list[Sequence]], None]] = None

    def run(self, work: list[PrefillChunk]) -> StageResult:
        """Run the batch with a per-layer hook on the runner."""
        finishing = [c.seq for c in work if c.is_last]
        if self.on_batch_start is not None and finishing:
            self.on_batch_start(finishing)
        hook = self.on_layer
        if hook is not None and finishing:
            self.runner.layer_hook = lambda layer: hook(finishing, layer)
        try:
            return super().run(work)
        finally:
            self.runner.layer_hook = None
