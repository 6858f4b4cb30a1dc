"""Sweep the paged decode attention kernel's launch settings on one GPU, against copy bandwidth.

Times ``decode_attention_triton`` (Llama-8B attention shapes, shuffled 16-token pages, as in
``bench gpu``'s ``attention decode paged`` row) for each key tile size, split count, warp count
and pipeline depth, beside the card's copy bandwidth measured in the same run, and prints the
fraction of it each setting reaches, best first. Times are device time (``time_device_s``: calls
replayed from a CUDA graph), as the engine's decode runs the kernel.

    python benchmarks/sweep_decode_attention.py --cases 32x8192,1x8192,8x2048
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

from minidisagg.bench.gpu_kernels import paged_kv_pools
from minidisagg.config import LLAMA_8B
from minidisagg.kernels.attention import decode_attention_reference
from minidisagg.kernels.attention_triton import decode_attention_triton, decode_num_splits, num_sms_of
from minidisagg.roofline import measure_copy_bandwidth, time_device_s


def sweep_case(batch: int, ctx: int, copy_bytes_per_s: float) -> list[dict]:
    """Every setting for one (batch, context) case, best first."""
    cfg = LLAMA_8B
    k_cache, v_cache, meta = paged_kv_pools(batch, ctx)
    q = torch.randn(batch, cfg.num_heads, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
    scale = cfg.head_dim**-0.5
    want = decode_attention_reference(q, k_cache, v_cache, meta, scale).float()
    nbytes = 2 * batch * ctx * cfg.num_kv_heads * cfg.head_dim * k_cache.element_size()
    default_splits = decode_num_splits(ctx, batch, cfg.num_kv_heads, num_sms_of(q.device))
    rows = []
    for block_n, splits, warps, stages in itertools.product(
            (32, 64, 128), sorted({default_splits, 2 * default_splits, max(1, default_splits // 2)}), (2, 4, 8), (1, 2, 3, 4)):
        def run():
            return decode_attention_triton(q, k_cache, v_cache, meta, scale, num_splits=splits, block_n=block_n,
                                           num_warps=warps, num_stages=stages)
        try:
            err = float((run().float() - want).abs().max())
            t = time_device_s(run, q.device)
        except Exception as exc:  # noqa: BLE001 - a setting the compiler refuses (e.g. out of shared memory)
            rows.append({"block_n": block_n, "splits": splits, "warps": warps, "stages": stages, "error": str(exc)[:200]})
            continue
        rows.append({"block_n": block_n, "splits": splits, "warps": warps, "stages": stages, "us": round(1e6 * t, 1),
                     "fraction": round(nbytes / copy_bytes_per_s / t, 3), "max_err": err,
                     "default": (block_n, splits, warps, stages) == (64, default_splits, 4, 3)})
    return sorted(rows, key=lambda r: -r.get("fraction", 0))


def main(argv: list[str] | None = None) -> int:
    """Parse ``--cases`` (batch x context, comma separated) and print each case's best settings as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="32x8192,1x8192,8x2048")
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args(argv)
    copy = measure_copy_bandwidth("cuda")
    out = {"card": torch.cuda.get_device_name(), "copy_GBps": copy / 1e9, "cases": {}}
    for case in args.cases.split(","):
        batch, ctx = (int(x) for x in case.split("x"))
        rows = sweep_case(batch, ctx, copy)
        out["cases"][case] = {"top": rows[:args.top], "default": [r for r in rows if r.get("default")]}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
