"""Kernels: one module per op, each a torch reference plus the single dispatch point the model calls.

The torch reference runs everywhere (and is what CPU uses). GPU Triton implementations
slot in behind the same dispatch functions.
"""

import torch


def settle_cpu_vector_math() -> None:
    """Make the process's first CPU ``exp``/``cos``/``sin`` run on one thread; called once, at import.

    With MKL, torch hands chunks of a large tensor's ``exp``, ``cos`` or ``sin`` to MKL's vector
    math library, which picks its code path on first use. When two threads make that first call
    at once, one chunk can take another path and differ by an ulp. Seen on a 2-core Xeon with
    torch 2.13: in about one fresh process in three, a first and a second ``exp`` of the same
    8192 floats differed; ``cos`` and ``sin`` of them in about one in twenty. That broke
    batch-invariant attention's run-to-run bits, and could give two processes RoPE tables an ulp
    apart. A tiny call on one thread settles the choice for the whole library.
    """
    torch.exp(torch.zeros(8))


settle_cpu_vector_math()
