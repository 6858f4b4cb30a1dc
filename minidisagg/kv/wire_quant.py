"""Compressed KV on the wire: pages quantised to int8 or fp8 (e4m3) for the trip, a scale per (block, head, channel, token).

The pool itself stays in the model's dtype: only the copy that crosses the link is quantised,
and the decode worker dequantises it into its own pool's dtype on arrival. Attention then reads
the same dtype as ever; what changes is the values, each within half a quantisation step.

Granularity. Pages of any order ([2, blocks, ...], [layers, 2, blocks, ...], [blocks, layers, 2,
...]) end in [block_size, kv_heads, head_dim]. Within each (layer, K or V, block, KV head) a value's
scale is ``head_scale * 2 ** (-code / 32) * 2 ** (-token_code / 32)``: one float32 ``head_scale``
(absmax / qmax of the block-head: 127 for int8, 448 for fp8 e4m3), one uint8 ``code`` per channel
(head dim) and one uint8 ``token_code`` per token. Each code picks the smallest such step that still
holds its channel's absmax over the block's tokens, then each token's largest value over those
channel steps (codes stop at 255, 2 ** -8 of the step above: quieter ones keep that step). Why so:
- per channel: RoPE'd keys carry a few channels (head dims) tens of times larger than the rest, in
  every token (the reason KIVI and KVQuant quantise K per channel). One scale per head spends the
  int8 range on those channels and leaves the others a handful of levels; on SmolLM2 that cost
  most of the greedy agreement;
- per token as well: a token quieter than the block's loudest in every channel (values, and keys
  outside the outlier channels) gets the whole range back, as per-token value scales (KIVI) do;
- the same rule for K and V: per channel and per token is never coarser than per head for either,
  and the codec then needs no K/V axis (every transport hands it pages in its own order);
- per block: a block is the unit the pool allocates, gathers and scatters, so each block's
  message is self-contained (a piece of blocks can be cut out, sent and dequantised alone);
- log codes of one byte, to fit the byte budget: a float32 scale per channel would cost 25 % of
  the int8 bytes (float16 12.5 %, already 0.5625x bfloat16); a code costs one byte and puts each
  step within 2.2 % of its ideal. Per 1024 values (SmolLM2: 16 tokens x 64 dims) that is 4 + 64 + 16
  bytes, so int8 is (1024 + 84) / 4096 = 0.271x float32 pages and (1024 + 84) / 2048 = 0.541x
  bfloat16 ones.

A message is one flat byte tensor: head scales (float32, in the pages' order with the head last)
first, so they sit 4-byte aligned, then the channel codes (uint8, [..., heads, head_dim]), the token
codes (uint8, [..., block_size, heads]), then the quantised values: what every transport sends as
one payload (socket) or one tensor (torch.distributed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from minidisagg.config import KV_WIRE_DTYPES

SCALE_DTYPE = torch.float32  # the head scales'; the channel and token codes are uint8
CODES_PER_OCTAVE = 32  # each code scales a step by 2 ** (-code / CODES_PER_OCTAVE), code in 0..255
LEVELS = torch.exp2(-torch.arange(256, dtype=torch.float64) / CODES_PER_OCTAVE).to(SCALE_DTYPE)  # by code
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
    """The head scales' shape for pages of ``shape`` [..., block_size, kv_heads, head_dim]: [..., kv_heads]."""
    if len(shape) < 3:
        raise ValueError(f"pages must end in [block_size, kv_heads, head_dim], got shape {tuple(shape)}")
    return (*shape[:-3], shape[-2])


def code_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The channel codes' shape for pages of ``shape`` [..., block_size, kv_heads, head_dim]: [..., kv_heads, head_dim]."""
    return (*scale_shape(shape), shape[-1])


def token_code_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The token codes' shape for pages of ``shape`` [..., block_size, kv_heads, head_dim]: [..., block_size, kv_heads]."""
    return (*shape[:-3], shape[-3], shape[-2]) if len(shape) >= 3 else scale_shape(shape)


def wire_nbytes(shape: Sequence[int], wire_dtype: str, dtype: torch.dtype) -> int:
    """Bytes on the wire for pages of ``shape`` and pool ``dtype``: the pages themselves for ``auto``, else
    one byte per value, a float32 scale per (…, block, head), a uint8 code per (…, block, head, channel) and
    one per (…, block, token, head)."""
    numel = math.prod(int(s) for s in shape)
    if check_wire_dtype(wire_dtype) == "auto":
        return numel * dtype.itemsize
    return (numel + math.prod(scale_shape(shape)) * SCALE_DTYPE.itemsize + math.prod(code_shape(shape))
            + math.prod(token_code_shape(shape)))


def channel_scales(head_scales: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Each channel's scale [..., heads, head_dim]: ``head_scale * 2 ** (-code / 32)``, in float32."""
    return head_scales.unsqueeze(-1) * LEVELS.to(head_scales.device)[codes.long()]


def value_scales(head_scales: torch.Tensor, codes: torch.Tensor, token_codes: torch.Tensor) -> torch.Tensor:
    """Each value's scale [..., block_size, heads, head_dim]: its channel's scale times ``2 ** (-token_code / 32)``."""
    token_levels = LEVELS.to(head_scales.device)[token_codes.long()].unsqueeze(-1)
    return channel_scales(head_scales, codes).unsqueeze(-3) * token_levels


def _fitting_codes(amax: torch.Tensor, unit: torch.Tensor, qmax: float) -> torch.Tensor:
    """uint8 codes of the smallest steps ``unit * 2 ** (-code / 32)`` with ``step * qmax >= amax`` (255 at most)."""
    ratio = amax / (torch.where(unit > 0, unit, torch.ones_like(unit)) * qmax)
    codes = torch.floor(-CODES_PER_OCTAVE * torch.log2(ratio)).clamp_(0, 255)  # log2(0) = -inf: code 255
    # one code coarser where rounding (of log2, or of the unit) left the step just short
    short = unit * LEVELS.to(amax.device)[codes.long()] * qmax < amax
    return torch.where(short & (codes > 0), codes - 1, codes).to(torch.uint8)


def quantise(pages: torch.Tensor, wire_dtype: str, out: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, head_scales, codes, token_codes) of ``pages``: values in the wire format (``out`` if given),
    head scales float32 [..., kv_heads], channel codes uint8 [..., kv_heads, head_dim], token codes uint8
    [..., block_size, kv_heads].

    A block-head of zeros gets scale 0 and zero values. Non-finite pages raise ValueError: no
    scale could carry them, and the receiver would only reject them later.
    """
    if wire_dtype not in QMAX:
        raise ValueError(f"quantise needs one of {list(QMAX)}, got {wire_dtype!r}")
    qmax = QMAX[wire_dtype]
    x = pages.to(SCALE_DTYPE)
    channel_amax = x.abs().amax(dim=-3)  # [..., heads, head_dim]: over the block's tokens
    head_amax = channel_amax.amax(dim=-1)
    if not bool(torch.isfinite(head_amax).all()):
        raise ValueError("KV pages hold inf or NaN: they cannot be quantised for the wire")
    head_scales = head_amax / qmax
    codes = _fitting_codes(channel_amax, head_scales.unsqueeze(-1), qmax)
    scales = channel_scales(head_scales, codes)
    y = x * torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales)).unsqueeze(-3)  # a fresh tensor
    token_codes = _fitting_codes(y.abs().amax(dim=-1), torch.ones((), device=y.device), qmax)  # [..., T, heads]
    y.mul_((1.0 / LEVELS.to(y.device)[token_codes.long()]).unsqueeze(-1))  # in place: never touches the pool
    if wire_dtype == "int8":
        y.round_().clamp_(-127.0, 127.0)
    else:
        y.clamp_(-448.0, 448.0)  # x * (448 / amax) may round just past 448, which e4m3fn cannot hold
    if out is None:
        out = torch.empty(pages.shape, dtype=STORAGE[wire_dtype], device=pages.device)
    out.copy_(y)  # the cast: exact for int8 (already integers), round to nearest even for fp8
    return out, head_scales, codes, token_codes


def dequantise(values: torch.Tensor, head_scales: torch.Tensor, codes: torch.Tensor, token_codes: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    """Pages in ``dtype`` from wire ``values``, their head scales, channel and token codes (the product in float32)."""
    scales = value_scales(head_scales, codes, token_codes)
    if values.dtype == torch.int8:  # int8 times float32 promotes to float32 without a copy of its own
        return (values * scales).to(dtype)
    return (values.to(SCALE_DTYPE) * scales).to(dtype)  # torch does not promote float8


@dataclass
class WireMessage:
    """Quantised pages as they travel: ``data`` (uint8: head scales, channel codes, token codes, values) and the pages' shape."""

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
        values, head_scales, codes, token_codes = message.parts()
        _, got_scales, got_codes, got_token_codes = quantise(pages, wire_dtype, out=values)
        head_scales.copy_(got_scales)
        codes.copy_(got_codes)
        token_codes.copy_(got_token_codes)
        return message

    @property
    def nbytes(self) -> int:
        """Bytes of the message (what crosses the wire)."""
        return self.data.numel()

    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of the message: (values in the wire format, float32 head scales, uint8 channel and token codes)."""
        if self.data.dtype != torch.uint8 or self.data.dim() != 1:
            raise WireFormatError(f"a wire message is a flat uint8 tensor, got {self.data.dtype} {tuple(self.data.shape)}")
        expected = wire_nbytes(self.shape, self.wire_dtype, torch.uint8)
        if self.nbytes != expected:
            raise WireFormatError(f"{self.wire_dtype} message of {self.nbytes} bytes for pages {list(self.shape)}; "
                                  f"expected {expected}")
        num_scale_bytes = math.prod(scale_shape(self.shape)) * SCALE_DTYPE.itemsize
        codes_end = num_scale_bytes + math.prod(code_shape(self.shape))
        token_codes_end = codes_end + math.prod(token_code_shape(self.shape))
        head_scales = self.data[:num_scale_bytes].view(SCALE_DTYPE).view(scale_shape(self.shape))
        codes = self.data[num_scale_bytes:codes_end].view(code_shape(self.shape))
        token_codes = self.data[codes_end:token_codes_end].view(token_code_shape(self.shape))
        values = self.data[token_codes_end:].view(STORAGE[self.wire_dtype]).view(self.shape)
        return values, head_scales, codes, token_codes

    def decode(self, dtype: torch.dtype) -> torch.Tensor:
        """The pages in ``dtype`` (the decode pool's); WireFormatError if the message is corrupt.

        Checked first: every head scale finite and >= 0, no int8 value -128 (the symmetric format
        never writes it), no fp8 NaN pattern. (Every code byte is a valid code.) A message that
        fails could only give garbage pages.
        """
        values, head_scales, codes, token_codes = self.parts()
        if not bool(torch.isfinite(head_scales).all()) or bool((head_scales < 0).any()):
            raise WireFormatError(f"{self.wire_dtype} message for pages {list(self.shape)} has negative or "
                                  f"non-finite scales: corrupt")
        raw = values.view(torch.uint8)
        bad = (raw == 0x80) if self.wire_dtype == "int8" else ((raw & 0x7F) == 0x7F)
        if bool(bad.any()):
            what = "the value -128" if self.wire_dtype == "int8" else "NaN values"
            raise WireFormatError(f"{self.wire_dtype} message for pages {list(self.shape)} holds {what}, which a "
                                  f"sender never writes: corrupt")
        return dequantise(values, head_scales, codes, token_codes, dtype)
