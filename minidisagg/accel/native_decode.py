"""An opt-in CPU accelerator: a whole decode step of the stock model as one C++ op.

On the CPU a decode step of a small model runs hundreds of small ops besides its matmuls. The
model (``models/llama.py``) already calls a native C++ op at each of its dispatch points
(``kernels/cpu_native.py``); what remains is Python between them: the layer's methods, the
dispatch, argument parsing, some 250 op calls a step. ``minidisagg_accel::decode_step``
(``csrc/decode_step.cpp``) is ``LlamaModel.forward`` plus ``compute_logits`` for decode tokens written
out in C++: the same kernel functions (``kernels/csrc/cpu_kernels.h``) in the same order and the
same products (``kernels.linear.cpu_linear_kind`` picks them, as ``linear`` would), so its logits
and KV writes are the model's bits, called once per step. What it saves is measured in
``benchmarks/NOTES.md`` ("The decode step in C++").

It is a copy of the model, so it is off by default: ``EngineConfig.native_cpu_decode=True`` turns
it on for every batch of decode tokens on a CPU, except in batch-invariant mode, with a per-layer
hook (layer-wise KV shipping), a ``block_major`` pool, ``MINIDISAGG_KERNELS=torch`` or Triton's
interpreter asked for on the CPU, or where the op does not build. And it refuses to run, with one
log line saying why, for a model that is not the stock one (``accel/stock.py``): a student's
change to the layer then shows in decode as it does without the accelerator.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from minidisagg.accel.stock import why_not_stock
from minidisagg.kernels import cpu_native
from minidisagg.kernels.linear import cpu_linear_kind, disable_cpu_packing, packed_weight
from minidisagg.kernels.triton_support import use_triton
from minidisagg.kv.cache import PagedKVCache
from minidisagg.models.llama import LlamaModel

log = logging.getLogger(__name__)
SOURCE_PATH = Path(__file__).with_name("csrc") / "decode_step.cpp"
EXTENSION_NAME = "minidisagg_accel_decode"
LINEAR_KINDS = {"plain": 0, "mv": 1, "native_gemv": 2, "packed": 3}  # decode_step's LinearKind
PROJECTIONS = (1, 2, 4, 5)  # of a layer's six weights in ``step_weights``: qkv, o, gate_up, down


@functools.cache
def load_decode_step() -> bool:
    """Build (or load the cached build of) ``csrc/decode_step.cpp``, after the kernels it shares; True once registered."""
    if not cpu_native.load_cpu_ops():
        return False
    try:
        cpu_native.build_cpu_extension(EXTENSION_NAME, [SOURCE_PATH])
    except Exception as exc:  # a compiler error surfaces as any of several exception types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("could not build the C++ decode step (%s); decoding through the model", first_line)
        return False
    return True


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
    """Runs decode steps (one token per sequence) of a stock model through ``torch.ops.minidisagg_accel.decode_step``."""

    def __init__(self, model: LlamaModel, kv_cache: PagedKVCache) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.weights = step_weights(model)
        cfg = model.cfg
        self._shape = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps, cfg.head_dim**-0.5)
        self._refusal: Optional[str] = None  # the last reason logged, so each is logged once

    def applies(self) -> bool:
        """Whether the model is still the stock one (checked every step); logs the reason once when it is not."""
        reason = why_not_stock(self.model)
        if reason is not None and reason != self._refusal:
            log.warning("native_cpu_decode: not running the C++ decode step, because %s; decoding through the model",
                        reason)
        self._refusal = reason
        return reason is None

    @staticmethod
    def linear_kind(num_seqs: int, dtype: torch.dtype) -> str:
        """The products' kernel for a batch of ``num_seqs``: ``kernels.linear``'s choice."""
        return cpu_linear_kind(num_seqs, dtype)

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
        inputs = (torch.tensor(token_ids), torch.tensor(positions), torch.tensor(slots),
                  torch.tensor([table + [0] * (width - len(table)) for table in block_tables]),
                  torch.tensor([pos + 1 for pos in positions]), *self._shape)
        kind = self.linear_kind(len(token_ids), self.model.dtype)
        with torch.inference_mode():
            try:
                return self._step(kind, inputs)
            except RuntimeError as exc:
                if kind != "packed":
                    raise
                # as ``kernels.linear`` does: packed weights that fail here are off for good. The step
                # runs again on plain products; the KV slots it had written get the same values again.
                disable_cpu_packing(exc)
                return self._step(self.linear_kind(len(token_ids), self.model.dtype), inputs)

    def _step(self, kind: str, inputs: tuple) -> torch.Tensor:
        return torch.ops.minidisagg_accel.decode_step(self.weights, self.packed_weights(kind), self.kv_cache.kv,
                                                      self.model.cos_sin, *inputs, LINEAR_KINDS[kind])


def native_cpu_decode(model: LlamaModel, kv_cache: PagedKVCache) -> Optional[NativeCpuDecode]:
    """A :class:`NativeCpuDecode` where it applies and the op builds, else None (the engine runs the model).

    It applies to float32 and bfloat16 models on the CPU with a ``layer_major`` pool, unless
    ``MINIDISAGG_KERNELS=torch`` asks for torch's references or ``MINIDISAGG_TRITON_ON_CPU=1`` (with
    Triton's interpreter) for the Triton kernels. Whether the model is the stock one is asked at
    every step (:meth:`NativeCpuDecode.applies`).
    """
    if (model.device.type != "cpu" or model.dtype not in (torch.float32, torch.bfloat16)
            or kv_cache.layout != "layer_major" or os.environ.get("MINIDISAGG_KERNELS", "").lower() == "torch"
            or use_triton(model.embed)):  # Triton's interpreter asked for on the CPU: its kernels, not these
        return None
    if not load_decode_step():
        return None
    log.info("native CPU decode step on (opt-in accelerator): products %s at batch 1",
             cpu_linear_kind(1, model.dtype))
    return NativeCpuDecode(model, kv_cache)
