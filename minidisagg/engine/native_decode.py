"""A batch-1 CPU decode step in C++: the eager engine's ops, without Python's cost per op.

On the CPU a batch-1 decode step of a small model runs some 1,800 small torch ops besides its
matmuls, and from Python each costs several microseconds of interpreter and argument parsing
before any work. ``minidisagg_cpu.decode_step`` (``kernels/csrc/cpu_decode.cpp``) is
``engine/compiled.decode_forward`` written out in C++: the same ATen calls in the same order, so
the same bits as the eager engine, called once per step. It needs the C++ compiler only once, to
build the op (a few seconds, cached); nothing is compiled per model or per process, unlike
``compile_cpu``.

Measured on a 2-core Xeon with SmolLM2-135M, steps of one sequence at position 100 side by side:
float32 42.8 -> 31.8 ms, bfloat16 39.2 -> 27.7 ms with the same bits, and 18.6 ms with the
native bf16 GEMV (a CPU with AVX512-BF16), whose sums run in another order.

The engine takes this step by default (``EngineConfig.native_cpu_decode``) for one decode
sequence on the CPU whenever the op builds; elsewhere, or with ``MINIDISAGG_KERNELS=torch`` or
``MINIDISAGG_CPU_NATIVE=0``, it stays in Python.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from minidisagg.engine.compiled import StepKernels, decode_step_inputs
from minidisagg.kernels import cpu_native
from minidisagg.kv.cache import PagedKVCache
from minidisagg.models.llama import LlamaModel

log = logging.getLogger(__name__)


def step_weights(model: LlamaModel) -> list[torch.Tensor]:
    """The weights in the order ``decode_step`` reads them: embedding, final norm, LM head, then six per layer."""
    weights = [model.embed, model.norm, model.lm_head]
    for layer in model.layers:
        weights += [layer.input_norm, layer.qkv_proj, layer.o_proj, layer.post_attn_norm, layer.gate_up_proj,
                    layer.down_proj]
    return weights


class NativeCpuDecode:
    """Runs decode steps of one sequence through ``torch.ops.minidisagg_cpu.decode_step``."""

    def __init__(self, model: LlamaModel, kv_cache: PagedKVCache, kernels: StepKernels) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.kernels = kernels
        self.weights = step_weights(model)
        cfg = model.cfg
        self._shape = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps, cfg.head_dim**-0.5)

    def run(self, token_id: int, position: int, block_table: list[int]) -> torch.Tensor:
        """Float32 logits [1, vocab] of one decode step; writes the token's KV into the pool."""
        inputs = decode_step_inputs(self.kv_cache.block_size, token_id, position, block_table)
        with torch.inference_mode():
            return torch.ops.minidisagg_cpu.decode_step(self.weights, self.kv_cache.kv, self.model.cos_sin, *inputs,
                                                        *self._shape, self.kernels.native_gemv)


def native_cpu_decode(model: LlamaModel, kv_cache: PagedKVCache) -> Optional[NativeCpuDecode]:
    """A :class:`NativeCpuDecode` where it applies and the op builds, else None (the engine stays in Python).

    It applies to float32 and bfloat16 models on the CPU with a ``layer_major`` pool (its attention
    slices a layer's pages), unless ``MINIDISAGG_KERNELS=torch`` asks for torch's references.
    """
    if (model.device.type != "cpu" or model.dtype not in (torch.float32, torch.bfloat16)
            or kv_cache.layout != "layer_major" or os.environ.get("MINIDISAGG_KERNELS", "").lower() == "torch"):
        return None
    if not cpu_native.load_cpu_ops():
        return None
    kernels = StepKernels.best_available(model.dtype)
    log.info("native CPU decode step: native bf16 GEMV %s", kernels.native_gemv)
    return NativeCpuDecode(model, kv_cache, kernels)
