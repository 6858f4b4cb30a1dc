"""Compressed KV on the wire: pages quantised to int8 or fp8 (e4m3) for the trip, with one scale per (block, head).

The pool itself stays in the model's dtype: only the copy that crosses the link is quantised,
and the decode worker dequantises it into its own pool's dtype on arrival. Attention then reads
the same dtype as ever; what changes is the values, each within half a quantisation step.

Granularity. Pages of any order ([2, blocks, ...], [layers, 2, blocks, ...], [blocks, layers, 2,
...]) end in [block_size, kv_heads, head_dim]; each scale covers one (layer, K or V, block, KV
head): ``block_size * head_dim`` values (1024 for SmolLM2 with 16-token blocks), scaled
symmetrically so their largest magnitude maps to the format's largest value (127 for int8, 448
for fp8 e4m3). Why there:
- per head: K's magnitudes differ between heads by an order of magnitude (some heads carry
  RoPE outliers); one scale shared by all heads would spend the int8 range on the loudest one;
- per block: a block is the unit the pool allocates, gathers and scatters, so each block's
  message is self-contained (a piece of blocks can be cut out, sent and dequantised alone), and
  its tokens' magnitudes can differ from other blocks' (the first tokens are often outliers);
- not per token or per channel: a float32 scale per 64 values would cost 6% of the int8 bytes;
  per 1024 values it costs 0.4%, so int8 is ~0.25x float32 pages and ~0.50x bfloat16 ones.

A message is one flat byte tensor, scales (float32, in the pages' order with the head last)
first, so they sit 4-byte aligned, then the quantised values: what every transport sends as one
payload (socket) or one tensor (torch.distributed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from minidisagg.config import KV_WIRE_DTYPES

SCALE_DTYPE = torch.float32
QMAX = {"int8": 127.0, "fp8_e4m3": 448.0}  # the largest magnitude each format holds (symmetric)
STORAGE = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}


class WireFormatError(ValueError):
    """A quantised message that cannot be what its header says (wrong size, corrupt scales or values)."""


def check_wire_dtype(wire_dtype: object) -> str:
    """``wire_dtype`` if it is one of ``KV_WIRE_DTYPES``; ValueError naming the choices otherwise."""
    if wire_dtype not in KV_WIRE_DTYPES:
        raise ValueError(f"kv_wire_dtype must be one of {list(KV_WIRE_DTYPES)}, got {wire_dtype!r}")
    return str(wire_dtype)


def scale_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The scales' shape for pages of ``shape`` [..., block_size, kv_heads, head_dim]: [..., kv_heads]."""
    if len(shape) < 3:
        raise ValueError(f"pages must end in [block_size, kv_heads, head_dim], got shape {tuple(shape)}")
    return (*shape[:-3], shape[-2])


def wire_nbytes(shape: Sequence[int], wire_dtype: str, dtype: torch.dtype) -> int:
    """Bytes on the wire for pages of ``shape`` and pool ``dtype``: the pages themselves for ``auto``, else
    one byte per value plus a float32 scale per (…, block, head)."""
    numel = math.prod(int(s) for s in shape)
    if check_wire_dtype(wire_dtype) == "auto":
        return numel * dtype.itemsize
    return numel + math.prod(scale_shape(shape)) * SCALE_DTYPE.itemsize


def _broadcast(scales: torch.Tensor) -> torch.Tensor:
    """Scales [..., heads] shaped to multiply pages [..., block_size, heads, head_dim]."""
    return scales.unsqueeze(-2).unsqueeze(-1)


def quantise(pages: torch.Tensor, wire_dtype: str, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, scales) of ``pages``: values in the wire format (``out`` if given), scales float32 [..., kv_heads].

    A block-head of zeros gets scale 0 and zero values. Non-finite pages raise ValueError: no
    scale could carry them, and the receiver would only reject them later.
    """
    if wire_dtype not in QMAX:
        raise ValueError(f"quantise needs one of {list(QMAX)}, got {wire_dtype!r}")
    x = pages.to(SCALE_DTYPE)
    amax = x.abs().amax(dim=(-3, -1))
    if not bool(torch.isfinite(amax).all()):
        raise ValueError("KV pages hold inf or NaN: they cannot be quantised for the wire")
    scales = amax / QMAX[wire_dtype]
    inverse = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
    y = x * _broadcast(inverse)  # a fresh tensor, so the in-place steps below never touch the pool
    if wire_dtype == "int8":
        y.round_().clamp_(-127.0, 127.0)
    else:
        y.clamp_(-448.0, 448.0)  # x * (448 / amax) may round just past 448, which e4m3fn cannot hold
    if out is None:
        out = torch.empty(pages.shape, dtype=STORAGE[wire_dtype], device=pages.device)
    out.copy_(y)  # the cast: exact for int8 (already integers), round to nearest even for fp8
    return out, scales


def dequantise(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Pages in ``dtype`` from wire ``values`` and their ``scales`` (the product is taken in float32)."""
    if values.dtype == torch.int8:  # int8 times float32 promotes to float32 without a copy of its own
        return (values * _broadcast(scales)).to(dtype)
    return (values.to(SCALE_DTYPE) * _broadcast(scales)).to(dtype)  # torch does not promote float8


@dataclass
class WireMessage:
    """Quantised pages as they travel: ``data`` (uint8, scales first, then values) and the pages' shape."""

    data: torch.Tensor
    shape: tuple[int, ...]
    wire_dtype: str

    @classmethod
    def empty(cls, shape: Sequence[int], wire_dtype: str, device: torch.device | str = "cpu") -> "WireMessage":
        """An uninitialised message to receive pages of ``shape`` into."""
        nbytes = wire_nbytes(shape, wire_dtype, torch.uint8)
        return cls(torch.empty(nbytes, dtype=torch.uint8, device=device), tuple(int(s) for s in shape), wire_dtype)

    @classmethod
    def encode(cls, pages: torch.Tensor, wire_dtype: str) -> "WireMessage":
        """Quantise ``pages`` into one message on their device."""
        message = cls.empty(pages.shape, wire_dtype, pages.device)
        values, scales = message.parts()
        scales.copy_(quantise(pages, wire_dtype, out=values)[1])
        return message

    @property
    def nbytes(self) -> int:
        """Bytes of the message (what crosses the wire)."""
        return self.data.numel()

    def parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the message: (values in the wire format, float32 scales)."""
        if self.data.dtype != torch.uint8 or self.data.dim() != 1:
            raise WireFormatError(f"a wire message is a flat uint8 tensor, got {self.data.dtype} {tuple(self.data.shape)}")
        expected = wire_nbytes(self.shape, self.wire_dtype, torch.uint8)
        if self.nbytes != expected:
            raise WireFormatError(f"{self.wire_dtype} message of {self.nbytes} bytes for pages {list(self.shape)}; "
                                  f"expected {expected}")
        num_scale_bytes = math.prod(scale_shape(self.shape)) * SCALE_DTYPE.itemsize
        scales = self.data[:num_scale_bytes].view(SCALE_DTYPE).view(scale_shape(self.shape))
        values = self.data[num_scale_bytes:].view(STORAGE[self.wire_dtype]).view(self.shape)
        return values, scales

    def decode(self, dtype: torch.dtype) -> torch.Tensor:
        """The pages in ``dtype`` (the decode pool's); WireFormatError if the message is corrupt.

        Checked first: every scale finite and >= 0, no int8 value -128 (the symmetric format never
        writes it), no fp8 NaN pattern. A message that fails could only give garbage pages.
        """
        values, scales = self.parts()
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise WireFormatError(f"{self.wire_dtype} message for pages {list(self.shape)} has negative or "
                                  f"non-finite scales: corrupt")
        raw = values.view(torch.uint8)
        bad = (raw == 0x80) if self.wire_dtype == "int8" else ((raw & 0x7F) == 0x7F)
        if bool(bad.any()):
            what = "the value -128" if self.wire_dtype == "int8" else "NaN values"
            raise WireFormatError(f"{self.wire_dtype} message for pages {list(self.shape)} holds {what}, which a "
                                  f"sender never writes: corrupt")
        return dequantise(values, scales, dtype)
