"""``AttentionMetadata``: where a packed batch's queries and cached keys sit, shared by every attention kernel."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Where each sequence's queries sit in the packed batch and where its keys sit in the cache."""

    query_starts: list[int]
    query_lens: list[int]
    context_lens: list[int]  # tokens in the cache after this step's write, per sequence
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64, padded with 0
    context_lens_tensor: torch.Tensor  # [num_seqs] int64
    slot_mapping: torch.Tensor  # [num_tokens] int64: flat cache slot of each new token
    batch_invariant: bool = False
    num_splits: int | None = None  # decode attention's context splits, pinned (CUDA graphs); None: chosen per call

    @property
    def num_seqs(self) -> int:
        """Number of sequences in the batch."""
        return len(self.query_lens)

    @property
    def is_decode(self) -> bool:
        """True when every sequence contributes exactly one query token."""
        return all(n == 1 for n in self.query_lens)

    @functools.cached_property
    def host_block_tables(self) -> list[list[int]]:
        """``block_tables`` as Python lists, read once per batch (for the CPU path: on a GPU it would sync)."""
        return self.block_tables.tolist()

    @functools.cached_property
    def seq_info(self) -> torch.Tensor:
        """[num_seqs, 3] int32 (query start, query length, context length) on the tables' device, built once per batch."""
        rows = list(zip(self.query_starts, self.query_lens, self.context_lens))
        return torch.tensor(rows, dtype=torch.int32).to(self.block_tables.device, non_blocking=True)
