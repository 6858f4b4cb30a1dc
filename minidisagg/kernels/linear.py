"""Matrix multiply ``x @ w.T``, with a batch-invariant mode.

Float matmuls are not batch-invariant: the bits of one row of ``F.linear`` can depend on
how many rows the call had (BLAS picks a different kernel for M=1, and different blocking
for large M). In batch-invariant mode the rows are padded to a multiple of a fixed tile and
computed tile by tile, so every call the kernel sees has the same shape and a row's result
never depends on the rest of the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INVARIANT_TILE_ROWS = 16


def linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Plain ``x @ weight.T``."""
    return F.linear(x, weight)


def linear_batch_invariant(x: torch.Tensor, weight: torch.Tensor, tile_rows: int = INVARIANT_TILE_ROWS) -> torch.Tensor:
    """``x @ weight.T`` computed in fixed ``tile_rows``-row tiles (rows zero-padded)."""
    rows = x.shape[0]
    if rows == 0:
        return x.new_zeros(0, weight.shape[0])
    num_tiles = -(-rows // tile_rows)
    padded = x.new_zeros(num_tiles * tile_rows, x.shape[1])
    padded[:rows] = x
    tiles = padded.view(num_tiles, tile_rows, x.shape[1])
    out = torch.bmm(tiles, weight.t().unsqueeze(0).expand(num_tiles, -1, -1))
    return out.view(num_tiles * tile_rows, -1)[:rows]


def linear(x: torch.Tensor, weight: torch.Tensor, batch_invariant: bool = False) -> torch.Tensor:
    """Dispatch point for every projection in the model. ``x`` is [tokens, in_features]."""
    if batch_invariant:
        return linear_batch_invariant(x, weight)
    return linear_reference(x, weight)
