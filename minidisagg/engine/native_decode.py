"""The CPU decode step in C++: the eager engine's ops, without Python's cost per op.

On the CPU a decode step of a small model runs some 1,800 small torch ops besides its matmuls,
and from Python each costs several microseconds of interpreter and argument parsing before any
work. ``minidisagg_cpu.decode_step`` (``kernels/csrc/cpu_decode.cpp``) is the eager layer
(``models/llama.py`` with the kernels' torch references) written out in C++: the same ATen calls
in the same order, the same products (``kernels.linear.cpu_linear_kind`` picks ``F.linear``,
``mv`` or oneDNN's packed weights, as ``linear`` would), so the same bits as the eager engine,
called once per step. It needs the C++ compiler only once, to build the op (a few seconds,
cached); nothing is compiled per model or per process, unlike ``compile_cpu``.

The C++ step gives the same bits as the Python step in float32 and bfloat16 at any batch size,
except for a lone bf16 sequence on a CPU with AVX512-BF16, whose products go through the native
GEMV (its sums run in another order). What it saves per step is measured in
``benchmarks/NOTES.md`` ("The decode step in C++").

The engine takes this step by default (``EngineConfig.native_cpu_decode``) for every batch of
decode tokens on the CPU whenever the op builds, except in batch-invariant mode, with a per-layer
hook (layer-wise KV shipping) or a ``block_major`` pool; elsewhere, or with
``MINIDISAGG_KERNELS=torch`` or ``MINIDISAGG_CPU_NATIVE=0``, it stays in Python.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from minidisagg.engine.compiled import StepKernels, first_block
from minidisagg.kernels import cpu_native
from minidisagg.kernels.linear import cpu_linear_kind, disable_cpu_packing, packed_weight
from minidisagg.kernels.triton_support import use_triton
from minidisagg.kv.cache import PagedKVCache
from minidisagg.models.llama import LlamaModel

log = logging.getLogger(__name__)


LINEAR_KINDS = {"plain": 0, "mv": 1, "native_gemv": 2, "packed": 3}  # decode_step's LinearKind
PROJECTIONS = (1, 2, 4, 5)  # of a layer's six weights in ``step_weights``: qkv, o, gate_up, down


def step_weights(model: LlamaModel) -> list[torch.Tensor]:
    """The weights in the order ``decode_step`` reads them: embedding, final norm, LM head, then six per layer."""
    weights = [model.embed, model.norm, model.lm_head]
    for layer in model.layers:
        weights += [layer.input_norm, layer.qkv_proj, layer.o_proj, layer.post_attn_norm, layer.gate_up_proj,
                    layer.down_proj]
    return weights


def _is_projection(index: int) -> bool:
    return index == 2 or (index >= 3 and (index - 3) % 6 in PROJECTIONS)


class NativeCpuDecode:
    """Runs decode steps (one token per sequence) through ``torch.ops.minidisagg_cpu.decode_step``."""

    def __init__(self, model: LlamaModel, kv_cache: PagedKVCache, kernels: StepKernels) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.kernels = kernels
        self.weights = step_weights(model)
        cfg = model.cfg
        self._shape = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps, cfg.head_dim**-0.5)

    def linear_kind(self, num_seqs: int) -> str:
        """The products' kernel for a batch of ``num_seqs``: ``kernels.linear``'s choice, or the native bf16 GEMV."""
        kind = cpu_linear_kind(num_seqs, self.model.dtype)
        return "native_gemv" if kind == "mv" and self.kernels.native_gemv else kind

    def packed_weights(self, kind: str) -> list[torch.Tensor]:
        """``weights`` with the projections in oneDNN's packed layout when ``kind`` is "packed" (else as they are)."""
        if kind != "packed":
            return self.weights
        return [packed_weight(w) if _is_projection(i) else w for i, w in enumerate(self.weights)]

    def run(self, token_ids: list[int], positions: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """Float32 logits [B, vocab] of one decode step of B sequences; writes their tokens' KV into the pool."""
        block_size = self.kv_cache.block_size
        slots = [table[pos // block_size] * block_size + pos % block_size for pos, table in zip(positions, block_tables)]
        width = max(len(table) for table in block_tables)
        lone_first = first_block(block_tables[0], positions[0], block_size) if len(block_tables) == 1 else -1
        inputs = (torch.tensor(token_ids), torch.tensor(positions), torch.tensor(slots),
                  torch.tensor([table + [0] * (width - len(table)) for table in block_tables]),
                  torch.tensor([pos + 1 for pos in positions]), lone_first, *self._shape)
        kind = self.linear_kind(len(token_ids))
        with torch.inference_mode():
            try:
                return self._step(kind, inputs)
            except RuntimeError as exc:
                if kind != "packed":
                    raise
                # as ``kernels.linear`` does: packed weights that fail here are off for good. The step
                # runs again on plain products; the KV slots it had written get the same values again.
                disable_cpu_packing(exc)
                return self._step(self.linear_kind(len(token_ids)), inputs)

    def _step(self, kind: str, inputs: tuple) -> torch.Tensor:
        return torch.ops.minidisagg_cpu.decode_step(self.weights, self.packed_weights(kind), self.kv_cache.kv,
                                                    self.model.cos_sin, *inputs, LINEAR_KINDS[kind])


def native_cpu_decode(model: LlamaModel, kv_cache: PagedKVCache) -> Optional[NativeCpuDecode]:
    """A :class:`NativeCpuDecode` where it applies and the op builds, else None (the engine stays in Python).

    It applies to float32 and bfloat16 models on the CPU with a ``layer_major`` pool (its attention
    slices a layer's pages), unless ``MINIDISAGG_KERNELS=torch`` asks for torch's references or
    ``MINIDISAGG_TRITON_ON_CPU=1`` (with Triton's interpreter) for the Triton kernels.
    """
    if (model.device.type != "cpu" or model.dtype not in (torch.float32, torch.bfloat16)
            or kv_cache.layout != "layer_major" or os.environ.get("MINIDISAGG_KERNELS", "").lower() == "torch"
            or use_triton(model.embed)):  # Triton's interpreter asked for on the CPU: its kernels, not these
        return None
    if not cpu_native.load_cpu_ops():
        return None
    kernels = StepKernels.best_available(model.dtype)
    log.info("native CPU decode step: native bf16 GEMV %s", kernels.native_gemv)
    return NativeCpuDecode(model, kv_cache, kernels)
