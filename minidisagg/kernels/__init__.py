"""Kernels: one module per op, each a torch reference plus the single dispatch point the model calls.

The torch reference runs everywhere (and is what CPU uses). GPU Triton implementations
slot in behind the same dispatch functions.
"""
