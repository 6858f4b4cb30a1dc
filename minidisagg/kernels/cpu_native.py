"""Native CPU kernels (``csrc/cpu_decode.cpp``), built with the C++ compiler on first use.

Three ops, registered with the PyTorch dispatcher:

- ``torch.ops.minidisagg_cpu.decode_step(...)``: one decode step of one sequence, the eager
  layer's ATen calls written out in C++ in the same order (so the same bits), called once a step
  instead of ~1,800 small ops from Python. The engine's default for batch-1 CPU decode
  (``engine/native_decode.py``).
- ``torch.ops.minidisagg_cpu.gemv_bf16(weight, x)``: a bf16 matrix-vector product that keeps
  several weight rows in flight with AVX512-BF16 dot instructions and software prefetch, so it
  streams the weights at the memory's rate, where ``torch.mv``'s bf16 kernel is compute-bound
  (even on a matrix that sits in L2; ``benchmarks/NOTES.md``, "Native kernels in the compiled
  step"). Only on a CPU with the ``avx512_bf16`` instructions.
- ``torch.ops.minidisagg_cpu.write_kv_and_attend(...)``: the paged KV write and attention of one
  sequence, the Python op of ``engine/compiled.py`` in C++ (the same ATen calls in the same order),
  which the compiled graph and ``decode_step`` call once per layer.

The build goes through ``torch.utils.cpp_extension.load`` (cached in torch's extensions folder,
``$TORCH_EXTENSIONS_DIR``, and rebuilt when the source changes; a few seconds the first time).
If it fails, :func:`load_cpu_ops` logs why and returns False, and the caller keeps torch's ops.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE_PATH = Path(__file__).with_name("csrc") / "cpu_decode.cpp"
EXTENSION_NAME = "minidisagg_cpu_decode"
DISABLE_ENV = "MINIDISAGG_CPU_NATIVE"  # set to 0 to keep torch's ops (and the Python decode step)


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


def cpu_has_avx512_bf16() -> bool:
    """Whether this CPU runs AVX512-BF16 instructions (what ``gemv_bf16`` is compiled for)."""
    return "avx512_bf16" in cpu_model_and_flags()[1]


def _put_ninja_on_path() -> None:
    """torch's extension builder runs ``ninja`` from ``$PATH``: add the pip package's binary when a venv was not activated."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


@functools.cache
def load_cpu_ops() -> bool:
    """Build (or load the cached build of) ``csrc/cpu_decode.cpp``; True once its ops are registered.

    False, with a warning that says why, when the switch ``MINIDISAGG_CPU_NATIVE=0`` is set or the
    build fails (no compiler, no OpenMP, an unusual platform).
    """
    if os.environ.get(DISABLE_ENV, "1") == "0":
        log.info("%s=0: the decode step keeps torch's ops", DISABLE_ENV)
        return False
    from torch.utils.cpp_extension import load

    _put_ninja_on_path()
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]  # at::parallel_for runs serially without it
    try:
        load(EXTENSION_NAME, sources=[str(SOURCE_PATH)], extra_cflags=["-O3", *openmp], extra_ldflags=openmp,
             is_python_module=False, verbose=False)
    except Exception as exc:  # a compiler error surfaces as any of several exception types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("could not build the native CPU kernels (%s); decode steps keep torch's ops, from Python",
                    first_line)
        return False
    return True


def gemv_bf16_available() -> bool:
    """Whether ``torch.ops.minidisagg_cpu.gemv_bf16`` can run here (built, and the CPU has AVX512-BF16)."""
    return cpu_has_avx512_bf16() and load_cpu_ops()


def linear_one_row_bf16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for one bf16 row ``x`` [1, in] through ``gemv_bf16`` (call :func:`gemv_bf16_available` first)."""
    return torch.ops.minidisagg_cpu.gemv_bf16(weight, x.view(-1)).view(1, -1)
