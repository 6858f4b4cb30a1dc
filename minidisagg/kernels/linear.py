"""Matrix multiply ``x @ w.T``: the dispatch point of every projection, with a batch-invariant mode.

Float matmuls are not batch-invariant: the bits of one row of ``F.linear`` can depend on
how many rows the call had (BLAS picks a different kernel for M=1, and different blocking
for large M). In batch-invariant mode the rows are padded to a multiple of a fixed tile and
computed tile by tile, so every call the kernel sees has the same shape and a row's result
never depends on the rest of the batch.

On the CPU, weights packed once into oneDNN's blocked layout (as torch.compile's CPU backend
does) stream faster than ``F.linear`` re-reading the plain layout every call: every bf16 call
(bit-identical to ``F.linear``) and fp32 calls of 3 or more rows take the packed weights; fp32
calls of 1-2 rows, where packing is slower, stay on plain ``F.linear`` (timings in
``benchmarks/NOTES.md``, "What changed"). A packed copy is made on first use of a weight (and
again if the weight is changed in place), so fp32 models that batch hold their weights twice.
``MINIDISAGG_CPU_PACKED_LINEAR=0`` turns packing off.

One row (a batch-1 decode step) goes to a matrix-vector product instead: the native ``gemv``
(``kernels/cpu_native.py``; float32 on a CPU with AVX512F, bf16 with AVX512-BF16), which streams
the weights near the memory's rate where torch's one-row kernels reach about half of it
(``benchmarks/NOTES.md``, "One model path"); elsewhere bf16 takes ``torch.mv``, whose bf16 kernel
beat the packed oneDNN kernel at one row on a Xeon ("Fewer ops per batch-1 step"), with the same
bits as ``F.linear`` in every shape tried, and float32 plain ``F.linear``. The GEMV's sums run in
another order than torch's kernels.

Inside a ``torch.compile`` graph of the model (``engine/compiled.py``) the products are
:func:`linear_in_graph`: the packed weights live outside the graph, so the graph gets ``F.linear``
(planned by inductor) or, for one bf16 row, the native GEMV or ``addmv``.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Optional

import torch
import torch.nn.functional as F

from minidisagg.kernels import cpu_native

log = logging.getLogger(__name__)
INVARIANT_TILE_ROWS = 16
FP32_PACKED_MIN_ROWS = 3  # below this, plain F.linear (MKL's GEMV path) is the faster fp32 kernel
PACK_HINT_ROWS = 8  # the batch size oneDNN tunes the packed layout for (any row count works)

PACKED_ATTR = "_minidisagg_packed"  # (weight version, packed copy), kept on the weight so it lives as long
_packing: dict[str, Optional[bool]] = {"enabled": None}


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


def cpu_packing_available() -> bool:
    """Whether this torch build and CPU can run oneDNN-packed linears (and the switch allows it)."""
    if _packing["enabled"] is None:
        _packing["enabled"] = (
            os.environ.get("MINIDISAGG_CPU_PACKED_LINEAR", "1") != "0"
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        )
    return bool(_packing["enabled"])


def cpu_linear_kind(rows: int, dtype: torch.dtype) -> str:
    """Which kernel :func:`linear` runs for a CPU product of ``rows`` rows in ``dtype`` (weight of the same dtype).

    ``"native_gemv"``: one row where the native ``gemv`` runs it, :func:`linear_cpu_native_gemv`;
    ``"mv"``: one bf16 row elsewhere, :func:`linear_cpu_gemv`; ``"packed"``: :func:`linear_cpu_packed`
    (every bf16 call where oneDNN runs bf16, fp32 calls of ``FP32_PACKED_MIN_ROWS`` or more rows);
    ``"plain"``: ``F.linear``. The opt-in whole-step decode (``minidisagg/accel``) asks this too, to
    run the same products.
    """
    if rows == 1 and cpu_native.gemv_available(dtype):
        return "native_gemv"
    if dtype == torch.bfloat16 and rows == 1:
        return "mv"
    if rows > 0 and cpu_packing_available() and (
            (dtype == torch.bfloat16 and _bf16_packing_supported())
            or (dtype == torch.float32 and rows >= FP32_PACKED_MIN_ROWS)):
        return "packed"
    return "plain"


def linear_cpu_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for a single row ``x`` [1, in_features], as a matrix-vector product."""
    return torch.mv(weight, x.view(-1)).view(1, -1)


def linear_cpu_native_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for a single row ``x`` [1, in_features] through the native ``gemv`` (float32 or bf16)."""
    return torch.ops.minidisagg_cpu.gemv(weight, x.view(-1)).view(1, -1)


def linear_in_graph(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` traced into a ``torch.compile`` graph: one row as the native GEMV, or ``addmv`` in bf16.

    ``addmv`` is the call of torch's ``mv`` kernel that inductor can keep whole (``engine/compiled.py``
    tells it not to decompose it); the rest is ``F.linear``, planned by inductor.
    """
    if x.shape[0] == 1 and cpu_native.gemv_in_cpu_graph(x):
        return linear_cpu_native_gemv(x, weight)
    if x.dtype == torch.bfloat16 and x.shape[0] == 1:
        return torch.addmv(x.new_zeros(()), weight, x.view(-1), beta=0).view(1, -1)
    return F.linear(x, weight)


@functools.cache
def _bf16_packing_supported() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (asked once: the answer cannot change)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in oneDNN's packed layout, made on first use and remade if the weight changed in place."""
    entry = getattr(weight, PACKED_ATTR, None)
    if entry is None or entry[0] != weight._version:
        entry = (weight._version, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_HINT_ROWS))
        setattr(weight, PACKED_ATTR, entry)
    return entry[1]


def linear_cpu_packed(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` with the weight packed for oneDNN (CPU, float32 or bfloat16)."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed_weight(weight), None, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor, batch_invariant: bool = False) -> torch.Tensor:
    """Dispatch point for every projection in the model. ``x`` is [tokens, in_features]."""
    if batch_invariant:
        return linear_batch_invariant(x, weight)
    if not x.is_cpu or x.dim() != 2 or x.dtype != weight.dtype:
        return linear_reference(x, weight)
    if torch.compiler.is_compiling():
        return linear_in_graph(x, weight)
    kind = cpu_linear_kind(x.shape[0], x.dtype)
    if kind == "native_gemv":
        return linear_cpu_native_gemv(x, weight)
    if kind == "mv":
        return linear_cpu_gemv(x, weight)
    if kind == "packed":
        try:
            return linear_cpu_packed(x, weight)
        except RuntimeError as exc:  # an unusual build or CPU: fall back for good, once, with the reason
            disable_cpu_packing(exc)
    return linear_reference(x, weight)


def disable_cpu_packing(reason: Exception) -> None:
    """Stop using oneDNN-packed weights in this process (they failed to run here), saying why once."""
    log.warning("oneDNN packed linear unavailable (%s); using F.linear", reason)
    _packing["enabled"] = False
