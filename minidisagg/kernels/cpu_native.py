"""Native CPU kernels (``csrc/cpu_ops.cpp``), built with the C++ compiler on first use; the CPU's dispatch choice.

On the CPU a decode step of a small model is bound by its weights' bytes and by per-op cost: besides
its matmuls each layer runs a few dozen small torch ops (RMSNorm, RoPE, the KV write, the
attention's page bookkeeping, SwiGLU), and from Python each costs microseconds of interpreter and
argument parsing before any work. So each dispatch point of ``kernels/`` that the model calls has,
beside its torch reference, one C++ op (``csrc/cpu_kernels.h``) that it calls on a CPU:

- ``minidisagg_cpu::rms_norm`` / ``add_rms_norm`` for ``kernels.norm.rms_norm``,
  ``minidisagg_cpu::silu_and_mul`` for ``kernels.activation.silu_and_mul`` and
  ``minidisagg_cpu::rope_and_write_kv`` for ``kernels.rope_cache.rope_and_write_kv``: the reference's
  ATen calls in the same order, with the same bits, in one call from Python;
- ``minidisagg_cpu::write_kv``, the KV write alone, which a ``torch.compile`` graph of the model
  calls (``engine/compiled.py``) so that it writes the pool in place;
- ``minidisagg_cpu::decode_attention`` for decode batches in ``kernels.attention.paged_attention``,
  a kernel of its own: each sequence's pages read in place through its block table (the reference
  gathers them into a padded batch for SDPA), float32 math, sums in another order;
- ``minidisagg_cpu::gemv``, for one-row products in ``kernels.linear``, a kernel of its own: a
  matrix-vector product that keeps several weight rows in flight (AVX512 FMAs in float32,
  AVX512-BF16 dot instructions in bf16) with software prefetch, so it streams the weights near the
  memory's rate, where torch's one-row kernels reach about half of it (``benchmarks/NOTES.md``,
  "One model path"); its sums run in another order than torch's.

The build goes through ``torch.utils.cpp_extension.load`` (cached in torch's extensions folder,
``$TORCH_EXTENSIONS_DIR``, and rebuilt when the source changes; a few seconds the first time). If
it fails, :func:`load_cpu_ops` logs why and returns False, and every dispatch point keeps its
torch reference. ``MINIDISAGG_CPU_NATIVE=0`` keeps them too, as does ``MINIDISAGG_KERNELS=torch``.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Sequence

import torch

log = logging.getLogger(__name__)
CSRC = Path(__file__).with_name("csrc")
SOURCE_PATH = CSRC / "cpu_ops.cpp"
EXTENSION_NAME = "minidisagg_cpu_ops"
DISABLE_ENV = "MINIDISAGG_CPU_NATIVE"  # set to 0 to keep torch's references on the CPU
# set once the ops are registered (and whether the GEMV can run): read by dispatch points, inside compiled graphs too
_LOADED = {"ops": False, "gemv_float32": False, "gemv_bfloat16": False}


@functools.cache
def cpu_model_and_flags() -> tuple[str, frozenset[str]]:
    """The CPU's model name and instruction-set flags as Linux's ``/proc/cpuinfo`` lists them (elsewhere: none)."""
    model, flags = platform.processor(), frozenset()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = frozenset(value.split())
    except OSError:
        pass
    return model, flags


@functools.cache
def cpu_has_avx512_bf16() -> bool:
    """Whether this CPU runs AVX512-BF16 instructions (what the bf16 ``gemv`` is compiled for)."""
    return "avx512_bf16" in cpu_model_and_flags()[1]


@functools.cache
def cpu_has_avx512f() -> bool:
    """Whether this CPU runs AVX512F instructions (what the float32 ``gemv`` is compiled for)."""
    return "avx512f" in cpu_model_and_flags()[1]


def _put_ninja_on_path() -> None:
    """torch's extension builder runs ``ninja`` from ``$PATH``: add the pip package's binary when a venv was not activated."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def build_cpu_extension(name: str, sources: Sequence[Path]) -> None:
    """Build (or load the cached build of) a C++ extension that registers its ops; ``csrc/`` is on its include path.

    Raises whatever the build raises (a compiler error surfaces as any of several exception types).
    """
    from torch.utils.cpp_extension import load

    _put_ninja_on_path()
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]  # at::parallel_for runs serially without it
    # -ffp-contract=off: a product and a sum stay two roundings, as in torch's separate ops (never one FMA)
    load(name, sources=[str(s) for s in sources], extra_cflags=["-O3", "-ffp-contract=off", *openmp],
         extra_ldflags=openmp,
         extra_include_paths=[str(CSRC)], is_python_module=False, verbose=False)


@functools.cache
def load_cpu_ops() -> bool:
    """Build (or load the cached build of) ``csrc/cpu_ops.cpp``; True once its ops are registered.

    False, with a log line that says why, when the switch ``MINIDISAGG_CPU_NATIVE=0`` is set or the
    build fails (no compiler, no OpenMP, an unusual platform).
    """
    if os.environ.get(DISABLE_ENV, "1") == "0":
        log.info("%s=0: the CPU keeps torch's reference kernels", DISABLE_ENV)
        return False
    try:
        build_cpu_extension(EXTENSION_NAME, [SOURCE_PATH])
    except Exception as exc:  # a compiler error surfaces as any of several exception types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("could not build the native CPU kernels (%s); the CPU keeps torch's reference kernels", first_line)
        return False
    _LOADED.update(ops=True, gemv_float32=cpu_has_avx512f(), gemv_bfloat16=cpu_has_avx512_bf16())
    return True


def native_enabled() -> bool:
    """Whether the CPU dispatch points may call the native ops (built, and ``MINIDISAGG_KERNELS=torch`` not set)."""
    return os.environ.get("MINIDISAGG_KERNELS", "").lower() != "torch" and load_cpu_ops()


def use_cpu_native(t: torch.Tensor) -> bool:
    """Whether a dispatch point should call its native op for CPU tensor ``t`` (eager mode; ask after ``use_triton``).

    False inside a ``torch.compile`` graph: there the torch references are traced and fused, and the
    dispatch points that must stay opaque ask :func:`in_cpu_graph`.
    """
    return t.is_cpu and not torch.compiler.is_compiling() and native_enabled()


def in_cpu_graph(t: torch.Tensor) -> bool:
    """Whether a CPU op is being traced into a ``torch.compile`` graph with the native ops loaded (``engine/compiled.py``)."""
    return t.is_cpu and torch.compiler.is_compiling() and _LOADED["ops"]


def gemv_in_cpu_graph(t: torch.Tensor) -> bool:
    """Whether a one-row product of ``t``'s dtype traced into a ``torch.compile`` graph should call ``gemv``."""
    return in_cpu_graph(t) and _LOADED.get(f"gemv_{str(t.dtype).removeprefix('torch.')}", False)


def gemv_available(dtype: torch.dtype) -> bool:
    """Whether ``minidisagg_cpu::gemv`` runs ``dtype`` here (built and enabled; float32 needs AVX512F, bf16 AVX512-BF16)."""
    if dtype == torch.float32:
        return cpu_has_avx512f() and native_enabled()
    return dtype == torch.bfloat16 and cpu_has_avx512_bf16() and native_enabled()


def linear_one_row(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for one row ``x`` [1, in] through the native ``gemv`` (call :func:`gemv_available` first)."""
    return torch.ops.minidisagg_cpu.gemv(weight, x.view(-1)).view(1, -1)
