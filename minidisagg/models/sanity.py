"""Cheap checks that loaded weights are a model's and not garbage: every value finite, no degenerate tensor.

A file whose tensor data was overwritten (random bytes, zeros) still has the right names and
shapes, so it loads; the model then produces NaN logits and, greedily, token 0 forever. These
checks run on each tensor as it streams in and name the first bad one.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from minidisagg.models.weights import WeightsError


def check_tensor(name: str, tensor: torch.Tensor, source: str) -> None:
    """Raise ``WeightsError`` naming ``name`` if it holds NaN or inf, or is degenerate.

    Degenerate: a matrix whose values are all equal (no trained or initialised weight is), or a
    norm weight that is all zeros (it would erase every activation).
    """
    if tensor.numel() == 0:
        raise WeightsError(f"{source}: tensor {name!r} is empty")
    low, high = torch.aminmax(tensor)  # one pass; NaN and inf show in the extremes
    if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
        bad = int((~torch.isfinite(tensor)).sum())  # only on the way to an error
        raise WeightsError(f"{source}: tensor {name!r} holds {bad} non-finite values (NaN or inf) of "
                           f"{tensor.numel()}; the file is damaged or its data is not this model's weights")
    if tensor.dim() >= 2 and tensor.numel() > 1 and bool(low == high):
        raise WeightsError(f"{source}: every value of tensor {name!r} ({tuple(tensor.shape)}) is {float(low):g}; "
                           f"a degenerate matrix (the file's tensor data looks overwritten)")
    if tensor.dim() == 1 and name.endswith("norm.weight") and bool(low == 0) and bool(high == 0):
        raise WeightsError(f"{source}: norm weight {name!r} is all zeros; it would erase every activation")


def checked_tensors(tensors: Iterable[tuple[str, torch.Tensor]], source: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``tensors`` passed through unchanged, each checked by ``check_tensor`` on the way."""
    for name, tensor in tensors:
        check_tensor(name, tensor, source)
        yield name, tensor
