"""Names and units of the transport benchmark: its transports and their ceilings, message sizes, the pages."""

from __future__ import annotations

import torch

from minidisagg.kv.pages import KVLayout

KiB, MiB = 1 << 10, 1 << 20
SIZES = (64 * KiB, 1 * MiB, 16 * MiB, 64 * MiB)
QUICK_SIZES = (64 * KiB, 1 * MiB)
# Llama-8B's per-layer pages: 16 tokens x 8 KV heads x 128 dims x K,V x bf16 = 64 KiB a block.
BENCH_LAYOUT = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16)
TCP, SOCKET, GLOO, DIST, COPY, INPROC = ("raw TCP sendall/recv_into", "socket", "raw gloo send/recv", "dist (gloo)",
                                         "tensor copy_", "inproc")
TCP_POOL = "raw TCP, recv_into pool-sized memory"  # a second reference for socket: no cache-hot reused buffer
CEILING_OF = {SOCKET: TCP, DIST: GLOO, INPROC: COPY}  # each transport -> the plain loop it is measured against


def round_sig(x: float, digits: int = 4) -> float:
    """``x`` rounded to ``digits`` significant digits."""
    return float(f"{x:.{digits}g}")


def size_label(n: int) -> str:
    """A byte count as ``64 KiB`` or ``16 MiB``."""
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"
