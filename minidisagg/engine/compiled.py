"""A compiled batch-1 CPU decode step: the model's own forward pass traced into one ``torch.compile`` graph.

On the CPU a batch-1 decode step of a small model is bound by per-op cost: besides its matmuls,
every layer runs a dozen small elementwise ops (residual adds, RMSNorm, RoPE, SwiGLU), each a
separate pass over a few kilobytes. ``compile_cpu=True`` traces ``LlamaModel.forward`` and
``compute_logits`` themselves (``models/llama.py``; there is no second copy of the layer), and
inductor's CPU backend fuses those ops into a few C++ loops per layer, called from its C++ wrapper
without Python in between. A change to the model's code is traced like the rest.

The model's dispatch points know when they are traced (``kernels/cpu_native.py``, ``in_cpu_graph``):

- the torch references of RMSNorm, RoPE and SwiGLU are traced, and fused;
- the paged KV write and the decode attention stay two opaque native ops,
  ``minidisagg_cpu::write_kv`` and ``minidisagg_cpu::decode_attention`` (their context grows every
  step, while the graph keeps static shapes: the block table is padded to ``max_model_len``);
  the KV write mutates the pool in place, with no copy of it;
- the products are ``kernels.linear.linear_in_graph``: ``F.linear`` in float32 and, for one bf16
  row, the native GEMV (on a CPU with AVX512-BF16) or ``addmv``, which :func:`inductor_keeping_addmv`
  keeps whole as a call of torch's ``mv`` kernel (inductor's own plans, a multiply and a sum or a
  one-row ``mm``, are slower; ``benchmarks/NOTES.md``, "The compiled step in bfloat16").

The fused kernels round to bf16 where eager's ops do (``emulate_precision_casts``), but their
reductions add in another order, so a step's bf16 logits are within a few percent of eager's, and
greedy tokens can part from eager's after some tens of tokens. Inductor and the native ops need a
C++ compiler at run time; without one, or when compilation fails, the engine stays eager and logs why.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Callable, Optional

import torch

from minidisagg.kernels import cpu_native
from minidisagg.kernels.attention_metadata import AttentionMetadata
from minidisagg.kv.cache import PagedKVCache
from minidisagg.models.llama import LlamaModel

log = logging.getLogger(__name__)
# cpp_wrapper: kernels called from C++, no Python between them (faster than without: benchmarks/NOTES.md, "A compiled
# batch-1 step"); emulate_precision_casts: fused bf16 kernels round where eager rounds
INDUCTOR_OPTIONS = {"cpp_wrapper": True, "emulate_precision_casts": True}


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


def cxx_compiler() -> Optional[str]:
    """Path of the C++ compiler inductor would call (``$CXX``, else ``g++``/``c++``/``clang++``), or None."""
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return next((path for path in map(shutil.which, candidates) if path), None)


def decode_step_inputs(block_size: int, token_id: int, position: int, block_table: list[int],
                       pad_blocks: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """The model's inputs for one decode token: ids [1], positions [1] and its ``AttentionMetadata``.

    The block table is padded with zeros to ``pad_blocks`` blocks, so that every step has the same
    shapes (the attention reads only the blocks the context needs).
    """
    slot = block_table[position // block_size] * block_size + position % block_size
    meta = AttentionMetadata(
        query_starts=[0], query_lens=[1], context_lens=[position + 1],
        block_tables=torch.tensor([block_table + [0] * (pad_blocks - len(block_table))]),
        context_lens_tensor=torch.tensor([position + 1]), slot_mapping=torch.tensor([slot]))
    return torch.tensor([token_id]), torch.tensor([position]), meta


class CompiledCpuDecode:
    """Runs batch-1 CPU decode steps through one compiled graph of the model; compiled on the first step.

    The graph is compiled once (tens of seconds on a laptop; inductor caches it on disk, so later
    processes take a few seconds). If compilation fails, ``run`` returns None from then on and the
    caller stays eager.
    """

    def __init__(self, model: LlamaModel, kv_cache: PagedKVCache, max_model_len: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.max_blocks = -(-max_model_len // kv_cache.block_size)
        self.failed = False
        log.info("compiled CPU decode: native GEMV %s", cpu_native.gemv_available(model.dtype))
        self._step: Callable[..., torch.Tensor] = torch.compile(
            self._forward, dynamic=False, fullgraph=True, backend=inductor_keeping_addmv)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model.compute_logits(self.model(input_ids, positions, self.kv_cache, meta))

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
        log.warning("compile_cpu needs the layer_major KV pool (the graph writes a layer's pages in place); this one "
                    "is %s, decoding eagerly", kv_cache.layout)
        return None
    if cxx_compiler() is None:
        log.warning("compile_cpu needs a C++ compiler (set $CXX or install g++/clang++); decoding eagerly")
        return None
    if not cpu_native.load_cpu_ops():
        log.warning("compile_cpu needs the native CPU ops (its KV write and attention), which did not build; "
                    "decoding eagerly")
        return None
    return CompiledCpuDecode(model, kv_cache, max_model_len)
