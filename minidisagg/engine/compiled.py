"""A compiled batch-1 CPU decode step: the whole forward pass as one ``torch.compile`` graph.

On the CPU a batch-1 decode step of a small model is bound by per-op cost: besides its matmuls,
every layer runs a dozen small elementwise ops (residual adds, RMSNorm, RoPE, SwiGLU), each a
separate pass over a few kilobytes. Inductor's CPU backend fuses them into a few C++ loops per
layer and its C++ wrapper calls them without Python in between. The paged KV write and the
attention stay one opaque op (their context grows every step, and the graph keeps static shapes).

Inductor needs a C++ compiler at run time, so the step also builds two native ops of its own with
it (``kernels/cpu_native.py``) and calls them from the graph through the dispatcher, with no Python
in between:

- the KV write and attention, ``minidisagg_cpu.write_kv_and_attend``: the same ATen calls as this
  module's Python op :func:`write_kv_and_attend` (so the same bits), which stays as the fallback;
- in bfloat16, every one-row product, ``minidisagg_cpu.gemv_bf16`` (on a CPU with AVX512-BF16): a
  bf16 step is bound by streaming the weights, and this GEMV streams them faster than torch's
  ``mv``, whose bf16 kernel is compute-bound. Without it the graph writes the products as ``addmv`` with inductor told not
  to decompose it, a direct call of torch's kernel (inductor's own plans, a multiply and a sum
  or a one-row ``mm``, are slower still).

Without a compile, ``engine/native_decode.py`` (the engine's default) runs the same layer as one
C++ op with eager's unfused ops; this graph goes further by fusing them.

What the native attention and the GEMV each save is measured in ``benchmarks/NOTES.md``
("Native kernels in the compiled step"). The fused kernels round to bf16 where
eager's ops do (``emulate_precision_casts``), but their reductions, and the GEMV's, add in another
order, so a step's logits are within a few percent of eager's, and greedy tokens can part from
eager's after some tens of tokens. Without a compiler, or when compilation fails, the engine
stays eager and logs why; when only the native ops fail to build, the graph uses torch's.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from minidisagg.kernels import cpu_native
from minidisagg.kernels.activation import silu_and_mul_reference
from minidisagg.kernels.norm import rms_norm_reference
from minidisagg.kernels.rope import rotate, rotation_tables
from minidisagg.kv.cache import PagedKVCache
from minidisagg.models.llama import LlamaModel

log = logging.getLogger(__name__)
# cpp_wrapper: kernels called from C++, no Python between them (faster than without: benchmarks/NOTES.md, "A compiled
# batch-1 step"); emulate_precision_casts: fused bf16 kernels round where eager rounds
INDUCTOR_OPTIONS = {"cpp_wrapper": True, "emulate_precision_casts": True}

_OPS = torch.library.Library("minidisagg", "DEF")  # the op registry of this module (one op)
_OPS.define("write_kv_and_attend(Tensor q, Tensor k, Tensor v, Tensor(a!) kv, int layer, Tensor slot_mapping, "
            "Tensor block_table, Tensor window, float scale) -> Tensor")


def write_kv_and_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, layer: int,
                        slot_mapping: torch.Tensor, block_table: torch.Tensor, window: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """Write one sequence's new k, v into layer ``layer`` of the pool ``kv``; return its attention [1, H, D].

    ``window`` is (context length, first block), the first block -1 unless the sequence's blocks are
    consecutive in the pool (then its keys are a slice of the cache, else a gather by ``block_table``).
    The same ops, in the same layout, as ``decode_attention_reference`` for a lone sequence, with
    none of its bookkeeping: this runs 30 times a step.
    """
    keys, values = kv[layer, 0], kv[layer, 1]  # [blocks, block_size, KH, D]
    keys.view(-1, *keys.shape[2:]).index_copy_(0, slot_mapping, k.to(keys.dtype))
    values.view(-1, *values.shape[2:]).index_copy_(0, slot_mapping, v.to(values.dtype))
    context_len, first_block = window.tolist()
    num_blocks = -(-context_len // keys.shape[1])
    if first_block >= 0:
        keys, values = keys[first_block : first_block + num_blocks], values[first_block : first_block + num_blocks]
    else:
        used = block_table[0, :num_blocks]
        keys, values = keys.index_select(0, used), values.index_select(0, used)
    keys, values = (t.flatten(0, 1)[:context_len].transpose(0, 1).unsqueeze(0) for t in (keys, values))
    out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, scale=scale, enable_gqa=True)
    return out.squeeze(2)


def _write_kv_and_attend_shape(q: torch.Tensor, *args: Any) -> torch.Tensor:
    """What the compiler sees of the op: an output shaped like ``q``."""
    return q.new_empty(q.shape)


_OPS.impl("write_kv_and_attend", write_kv_and_attend, "CPU")
_OPS.impl("write_kv_and_attend", _write_kv_and_attend_shape, "Meta")


def inductor_keeping_addmv(graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
    """Inductor with ``INDUCTOR_OPTIONS`` and ``aten.addmv`` left whole (a call of torch's kernel, not a loop)."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.lowering import lowerings, make_fallback

    kept = {torch.ops.aten.addmv.default, torch.ops.aten.addmv.out}
    for op in kept - lowerings.keys():
        # Registered here, as a deliberate fallback: the implicit one inductor would create raises
        # when the environment variable CI is set, because addmv has a decomposition.
        make_fallback(op, warn=False, override_decomp=True)
    table = {op: fn for op, fn in select_decomp_table().items() if op not in kept}
    return compile_fx(graph, example_inputs, config_patches=INDUCTOR_OPTIONS, decompositions=table)


@dataclass(frozen=True)
class StepKernels:
    """Which kernels the graph calls: the native ops of ``kernels/cpu_native.py``, or torch's.

    ``native_gemv``: bf16 one-row products through ``minidisagg_cpu.gemv_bf16`` instead of ``addmv``.
    ``native_attend``: the KV write and attention through ``minidisagg_cpu.write_kv_and_attend``
    (C++, the same ATen calls) instead of this module's Python op.
    """

    native_gemv: bool = False
    native_attend: bool = False

    @classmethod
    def best_available(cls, dtype: torch.dtype) -> "StepKernels":
        """The native ops wherever they build (and, for the GEMV, where the model is bf16 and the CPU has AVX512-BF16)."""
        native = cpu_native.load_cpu_ops()
        return cls(native_gemv=native and dtype == torch.bfloat16 and cpu_native.cpu_has_avx512_bf16(),
                   native_attend=native)


def decode_linear(x: torch.Tensor, weight: torch.Tensor, kernels: StepKernels = StepKernels()) -> torch.Tensor:
    """``x @ weight.T`` inside the graph: bf16 one-row products as the native GEMV or ``addmv`` (``linear_cpu_gemv``'s kernel)."""
    if x.dtype == torch.bfloat16 and x.shape[0] == 1:
        if kernels.native_gemv:
            return cpu_native.linear_one_row_bf16(x, weight)
        return torch.addmv(x.new_zeros(()), weight, x.view(-1), beta=0).view(1, -1)
    return F.linear(x, weight)  # float32: MKL's one-row path, planned by inductor


def cxx_compiler() -> Optional[str]:
    """Path of the C++ compiler inductor would call (``$CXX``, else ``g++``/``c++``/``clang++``), or None."""
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return next((path for path in map(shutil.which, candidates) if path), None)


def decode_forward(model: LlamaModel, kv: torch.Tensor, kernels: StepKernels, input_ids: torch.Tensor,
                   positions: torch.Tensor, slot_mapping: torch.Tensor, block_table: torch.Tensor,
                   window: torch.Tensor) -> torch.Tensor:
    """Float32 logits [B, vocab] of one decode step: ``LlamaModel.forward`` then ``compute_logits``, traceable.

    The layer's steps are the engine's own torch references (RMSNorm, RoPE, SwiGLU), in the order
    ``LlamaLayer.forward`` runs them; only the dispatch around them is left out, since the graph
    fixes the device and dtype once, and :func:`decode_linear` stands for ``kernels.linear``.
    """
    cfg = model.cfg
    heads = [cfg.num_heads, cfg.num_kv_heads, cfg.num_kv_heads]
    attend = torch.ops.minidisagg_cpu.write_kv_and_attend if kernels.native_attend else \
        torch.ops.minidisagg.write_kv_and_attend
    hidden, residual = model.embed[input_ids], None
    tables = rotation_tables(positions, model.cos_sin)
    for index, layer in enumerate(model.layers):
        x, residual = rms_norm_reference(hidden, layer.input_norm, cfg.rms_norm_eps, residual)
        q, k, v = decode_linear(x, layer.qkv_proj, kernels).view(-1, sum(heads), cfg.head_dim).split(heads, dim=1)
        q, k = rotate(q, k, *tables)
        attn = attend(q, k, v, kv, index, slot_mapping, block_table, window, cfg.head_dim**-0.5)
        hidden = decode_linear(attn.reshape(-1, cfg.q_size), layer.o_proj, kernels)
        x, residual = rms_norm_reference(hidden, layer.post_attn_norm, cfg.rms_norm_eps, residual)
        gate_up = decode_linear(x, layer.gate_up_proj, kernels)
        hidden = decode_linear(silu_and_mul_reference(gate_up), layer.down_proj, kernels)
    hidden, _ = rms_norm_reference(hidden, model.norm, cfg.rms_norm_eps, residual)
    return decode_linear(hidden, model.lm_head, kernels).float()


def decode_step_inputs(block_size: int, token_id: int, position: int, block_table: list[int],
                       pad_blocks: int = 0) -> tuple[torch.Tensor, ...]:
    """:func:`decode_forward`'s tensor inputs for one token: ids, positions, slot, block table [1, n], window.

    The block table is padded with zeros to ``pad_blocks`` (a compiled graph's static shape). The
    window is (context length, first block), the first block -1 unless the blocks the sequence
    uses are consecutive in the pool.
    """
    slot = block_table[position // block_size] * block_size + position % block_size
    padded_table = block_table + [0] * (pad_blocks - len(block_table))
    return (torch.tensor([token_id]), torch.tensor([position]), torch.tensor([slot]),
            torch.tensor([padded_table]), torch.tensor([position + 1, first_block(block_table, position, block_size)]))


def first_block(block_table: list[int], position: int, block_size: int) -> int:
    """The first block of a sequence whose blocks up to ``position`` are consecutive in the pool, else -1."""
    used = block_table[: position // block_size + 1]
    return used[0] if used == list(range(used[0], used[0] + len(used))) else -1


class CompiledCpuDecode:
    """Runs batch-1 CPU decode steps through one compiled graph; compiled on the first step.

    The block table is padded to the longest sequence the engine allows, so every step has the
    same shapes and the graph is compiled once (tens of seconds on a laptop; inductor caches it
    on disk, so later processes take a few seconds). If compilation fails, ``run`` returns None
    from then on and the caller stays eager.
    """

    def __init__(self, model: LlamaModel, kv_cache: PagedKVCache, max_model_len: int,
                 kernels: Optional[StepKernels] = None) -> None:
        self.model = model
        self.kernels = StepKernels.best_available(model.dtype) if kernels is None else kernels
        log.info("compiled CPU decode: native attention %s, native bf16 GEMV %s",
                 self.kernels.native_attend, self.kernels.native_gemv)
        self.kv_cache = kv_cache
        self.max_blocks = -(-max_model_len // kv_cache.block_size)
        self.failed = False
        self._step: Callable[..., torch.Tensor] = torch.compile(
            self._forward, dynamic=False, fullgraph=True, backend=inductor_keeping_addmv)

    def _forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return decode_forward(self.model, self.kv_cache.kv, self.kernels, *inputs)

    def run(self, token_id: int, position: int, block_table: list[int]) -> Optional[torch.Tensor]:
        """Logits [1, vocab] of one decode step of one sequence, or None once compiling has failed."""
        if self.failed:
            return None
        inputs = decode_step_inputs(self.kv_cache.block_size, token_id, position, block_table, self.max_blocks)
        try:
            with torch.inference_mode():
                return self._step(*inputs)
        except Exception as exc:  # a broken toolchain shows up as any error from inside the compiler
            log.warning("compiled CPU decode failed (%s: %s); decoding eagerly from now on",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            self.failed = True
            return None


def compiled_cpu_decode(model: LlamaModel, kv_cache: PagedKVCache, max_model_len: int) -> Optional[CompiledCpuDecode]:
    """A :class:`CompiledCpuDecode` for a float32 or bfloat16 CPU model, or None (with a warning saying why)."""
    if model.device.type != "cpu" or model.dtype not in (torch.float32, torch.bfloat16):
        log.warning("compile_cpu applies to float32 and bfloat16 models on the CPU; this one is %s on %s, "
                    "decoding eagerly", model.dtype, model.device)
        return None
    if kv_cache.layout != "layer_major":
        log.warning("compile_cpu needs the layer_major KV pool (its attention slices a layer's pages); this one is "
                    "%s, decoding eagerly", kv_cache.layout)
        return None
    if cxx_compiler() is None:
        log.warning("compile_cpu needs a C++ compiler (set $CXX or install g++/clang++); decoding eagerly")
        return None
    return CompiledCpuDecode(model, kv_cache, max_model_len)
