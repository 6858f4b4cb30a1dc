"""When the Triton kernels may run: one place that every dispatch point asks.

Triton kernels run on CUDA tensors. On CPU the torch reference runs, except when Triton's
interpreter is on and ``MINIDISAGG_TRITON_ON_CPU=1`` asks for the Triton path anyway: that is
how tests exercise the kernels without a GPU. ``MINIDISAGG_KERNELS=torch`` forces the torch
reference everywhere, for A/B comparisons.

Nothing here imports triton at import time: the package must import where Triton is missing
(macOS), and ``TRITON_INTERPRET=1`` only takes effect if it is in the environment when triton
is first imported (Triton decides compiler or interpreter when a function is decorated with
``triton.jit``, its own ``tl.sum`` and friends included). So kernel modules build their
kernels on first use, through :func:`triton_modules`.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` succeeds here (tried once, on first call)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or an install that breaks while importing
        return False
    return True


def triton_modules() -> tuple[ModuleType, ModuleType]:
    """``(triton, triton.language)``, imported now; call only once :func:`use_triton` said yes."""
    import triton
    import triton.language as tl

    return triton, tl


def interpreter_on() -> bool:
    """Whether Triton's CPU interpreter is requested (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_triton(t: torch.Tensor) -> bool:
    """Whether the dispatch points should run the Triton kernel for tensor ``t``."""
    if not t.is_cuda and os.environ.get("MINIDISAGG_TRITON_ON_CPU") != "1":
        return False  # the common CPU case first, with a single environment lookup (it runs ~150 times a step)
    if os.environ.get("MINIDISAGG_KERNELS", "").lower() == "torch":
        return False
    if not t.is_cuda and not interpreter_on():
        return False
    return triton_available()  # checked last: it imports triton


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (Triton block shapes must be powers of two)."""
    return 1 << max(n - 1, 0).bit_length()
