"""A compiled batch-1 CPU decode step: the whole forward pass as one ``torch.compile`` graph.

On the CPU a batch-1 decode step of a small model is bound by per-op cost: besides its matmuls,
every layer runs a dozen small elementwise ops (residual adds, RMSNorm, RoPE, SwiGLU), each a
separate pass over a few kilobytes. Inductor's CPU backend fuses them into a few C++ loops per
layer and its C++ wrapper calls them without Python in between. The paged KV write and the
attention stay one opaque op (their context grows every step, and the graph keeps static shapes):
registered through ``torch.library`` as a plain CPU kernel, which costs a few microseconds a call
where a ``torch.library.custom_op`` costs about fifty.

Only float32 models use it: in bfloat16 the fused kernels keep intermediates in float32 instead of
rounding after every op as eager does, so greedy tokens drift from the eager engine's, and the
step gained 6% where fp32 gained 15-20% (``benchmarks/NOTES.md``). Inductor needs a C++ compiler at
run time; without one, or when compilation fails, the engine stays eager and logs why.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from minidisagg.kernels.activation import silu_and_mul_reference
from minidisagg.kernels.attention import AttentionMetadata, decode_attention_reference
from minidisagg.kernels.cache_write import write_kv_reference
from minidisagg.kernels.norm import rms_norm_reference
from minidisagg.kernels.rope import rotate, rotation_tables
from minidisagg.kv.cache import PagedKVCache
from minidisagg.models.llama import LlamaModel

log = logging.getLogger(__name__)
INDUCTOR_OPTIONS = {"cpp_wrapper": True}  # kernels called from C++: 1.20x over eager, against 1.15x without

_OPS = torch.library.Library("minidisagg", "DEF")  # the op registry of this module (one op)
_OPS.define("write_kv_and_attend(Tensor q, Tensor k, Tensor v, Tensor(a!) kv, int layer, Tensor slot_mapping, "
            "Tensor block_tables, Tensor context_lens, float scale) -> Tensor")


def write_kv_and_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, layer: int,
                        slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """Write one layer's new k, v into the pool ``kv`` and return decode attention [B, H, D] (eager kernels)."""
    k_cache, v_cache = kv[layer, 0], kv[layer, 1]
    write_kv_reference(k, v, k_cache, v_cache, slot_mapping)
    num_seqs, lens = q.shape[0], context_lens.tolist()
    used_blocks = block_tables[:, : -(-max(lens) // k_cache.shape[1])]  # the table is padded to a fixed width
    meta = AttentionMetadata(list(range(num_seqs)), [1] * num_seqs, lens, used_blocks, context_lens, slot_mapping)
    return decode_attention_reference(q, k_cache, v_cache, meta, scale)


def _write_kv_and_attend_shape(q: torch.Tensor, *args: Any) -> torch.Tensor:
    """What the compiler sees of the op: an output shaped like ``q``."""
    return q.new_empty(q.shape)


_OPS.impl("write_kv_and_attend", write_kv_and_attend, "CPU")
_OPS.impl("write_kv_and_attend", _write_kv_and_attend_shape, "Meta")


def cxx_compiler() -> Optional[str]:
    """Path of the C++ compiler inductor would call (``$CXX``, else ``g++``/``c++``/``clang++``), or None."""
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return next((path for path in map(shutil.which, candidates) if path), None)


def decode_forward(model: LlamaModel, kv: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor,
                   slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
    """Float32 logits [B, vocab] of one decode step: ``LlamaModel.forward`` then ``compute_logits``, traceable.

    The layer's steps are the engine's own torch references (RMSNorm, RoPE, SwiGLU), in the order
    ``LlamaLayer.forward`` runs them; only the dispatch around them is left out, since the graph
    fixes the device and dtype once, and ``F.linear`` stands for ``kernels.linear`` (inductor
    plans its own one-row matmuls).
    """
    cfg = model.cfg
    heads = [cfg.num_heads, cfg.num_kv_heads, cfg.num_kv_heads]
    hidden, residual = model.embed[input_ids], None
    tables = rotation_tables(positions, model.cos_sin)
    for index, layer in enumerate(model.layers):
        x, residual = rms_norm_reference(hidden, layer.input_norm, cfg.rms_norm_eps, residual)
        q, k, v = F.linear(x, layer.qkv_proj).view(-1, sum(heads), cfg.head_dim).split(heads, dim=1)
        q, k = rotate(q, k, *tables)
        attn = torch.ops.minidisagg.write_kv_and_attend(q, k, v, kv, index, slot_mapping, block_tables,
                                                        context_lens, cfg.head_dim**-0.5)
        hidden = F.linear(attn.reshape(-1, cfg.q_size), layer.o_proj)
        x, residual = rms_norm_reference(hidden, layer.post_attn_norm, cfg.rms_norm_eps, residual)
        hidden = F.linear(silu_and_mul_reference(F.linear(x, layer.gate_up_proj)), layer.down_proj)
    hidden, _ = rms_norm_reference(hidden, model.norm, cfg.rms_norm_eps, residual)
    return F.linear(hidden, model.lm_head).float()


class CompiledCpuDecode:
    """Runs batch-1 CPU decode steps through one compiled graph; compiled on the first step.

    The block table is padded to the longest sequence the engine allows, so every step has the
    same shapes and the graph is compiled once (tens of seconds on a laptop; inductor caches it
    on disk, so later processes take a few seconds). If compilation fails, ``run`` returns None
    from then on and the caller stays eager.
    """

    def __init__(self, model: LlamaModel, kv_cache: PagedKVCache, max_model_len: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.max_blocks = -(-max_model_len // kv_cache.block_size)
        self.failed = False
        self._step: Callable[..., torch.Tensor] = torch.compile(
            self._forward, dynamic=False, fullgraph=True, options=INDUCTOR_OPTIONS)

    def _forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return decode_forward(self.model, self.kv_cache.kv, *inputs)

    def run(self, token_id: int, position: int, block_table: list[int]) -> Optional[torch.Tensor]:
        """Logits [1, vocab] of one decode step of one sequence, or None once compiling has failed."""
        if self.failed:
            return None
        block_size = self.kv_cache.block_size
        slot = block_table[position // block_size] * block_size + position % block_size
        padded_table = block_table + [0] * (self.max_blocks - len(block_table))
        inputs = (torch.tensor([token_id]), torch.tensor([position]), torch.tensor([slot]),
                  torch.tensor([padded_table]), torch.tensor([position + 1]))
        try:
            with torch.inference_mode():
                return self._step(*inputs)
        except Exception as exc:  # a broken toolchain shows up as any error from inside the compiler
            log.warning("compiled CPU decode failed (%s: %s); decoding eagerly from now on",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            self.failed = True
            return None


def compiled_cpu_decode(model: LlamaModel, kv_cache: PagedKVCache, max_model_len: int) -> Optional[CompiledCpuDecode]:
    """A :class:`CompiledCpuDecode` for a float32 CPU model, or None (with a warning saying why) if it cannot be."""
    if model.device.type != "cpu" or model.dtype != torch.float32:
        log.warning("compile_cpu applies to float32 models on the CPU; this one is %s on %s, decoding eagerly",
                    model.dtype, model.device)
        return None
    if cxx_compiler() is None:
        log.warning("compile_cpu needs a C++ compiler (set $CXX or install g++/clang++); decoding eagerly")
        return None
    return CompiledCpuDecode(model, kv_cache, max_model_len)
