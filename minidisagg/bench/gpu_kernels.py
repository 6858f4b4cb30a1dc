"""Each Triton kernel on the GPU, checked against its torch reference and timed against its roofline.

Elementwise kernels and paged decode attention are judged by bytes moved over the measured copy
bandwidth; prefill attention by FLOPs over the measured matmul rate. Shapes are Llama-8B's.

Kernels are timed on the device (``roofline.time_device_s``: calls replayed from a CUDA graph,
timed by CUDA events), the way the engine's decode runs them; prefill attention, which eager
prefill runs outside graphs, as calls queued back to back, like the ceilings. A Python call of a Triton kernel costs tens of microseconds on the host, which a
synchronised wall-clock timer would charge to the kernel.
"""

from __future__ import annotations

import statistics

from typing import Callable

import torch

from minidisagg.bench.gpu_rows import Row
from minidisagg.config import LLAMA_8B
from minidisagg.kernels.activation import silu_and_mul_reference, silu_and_mul_triton
from minidisagg.kernels.attention import AttentionMetadata, decode_attention_reference, prefill_attention_reference
from minidisagg.kernels.attention_triton import decode_attention_triton, prefill_attention_triton
from minidisagg.kernels.cache_write import write_kv_reference, write_kv_triton
from minidisagg.kernels.norm import rms_norm_reference, rms_norm_triton
from minidisagg.kernels.rope import apply_rope_reference, apply_rope_triton, cos_sin_cache
from minidisagg.roofline import time_device_s, time_fn_s

CUDA = torch.device("cuda")
DTYPE = torch.bfloat16


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _bandwidth_row(name: str, fn: Callable[[], object], nbytes: int, copy_bytes_per_s: float, err: float) -> Row:
    t = time_device_s(fn, CUDA)
    floor = nbytes / copy_bytes_per_s
    return Row(name, round(1e6 * t, 2), "us", round(1e6 * floor, 2), round(floor / t, 3),
               note=f"{nbytes / t / 1e9:.0f} GB/s; max err vs torch {err:.2e}")


def paged_kv_pools(batch: int, ctx: int,
                   block_size: int = 16) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """K/V pools holding ``batch`` sequences of ``ctx`` tokens in shuffled blocks, and their metadata."""
    cfg = LLAMA_8B
    per_seq = -(-ctx // block_size)
    num_blocks = batch * per_seq
    k_cache = torch.randn(num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, device=CUDA, dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_blocks, device=CUDA).view(batch, per_seq)
    meta = AttentionMetadata(
        query_starts=list(range(batch)), query_lens=[1] * batch, context_lens=[ctx] * batch, block_tables=tables,
        context_lens_tensor=torch.full((batch,), ctx, device=CUDA, dtype=torch.long),
        slot_mapping=torch.zeros(batch, device=CUDA, dtype=torch.long),
    )
    return k_cache, v_cache, meta


LAYOUTS_PER_ATTENTION_ROW = 3


def decode_attention_row(batch: int, ctx: int, copy_bytes_per_s: float,
                         num_layouts: int = LAYOUTS_PER_ATTENTION_ROW) -> Row:
    """``attention decode paged bs<batch> ctx<ctx>``: K and V bytes read over copy bandwidth.

    The pages sit in random order in the pool, so the row is the median over ``num_layouts``
    fresh layouts. The note also gives one eager call timed by the wall clock with a
    synchronisation after it (host launch cost included), the way earlier runs timed it.
    """
    cfg = LLAMA_8B
    scale = cfg.head_dim**-0.5
    times_s, wall_s, err, nbytes = [], [], 0.0, 0
    for _ in range(num_layouts):
        k_cache, v_cache, meta = paged_kv_pools(batch, ctx)
        q = torch.randn(batch, cfg.num_heads, cfg.head_dim, device=CUDA, dtype=DTYPE)
        err = max(err, _max_err(decode_attention_triton(q, k_cache, v_cache, meta, scale),
                                decode_attention_reference(q, k_cache, v_cache, meta, scale)))
        nbytes = 2 * batch * ctx * cfg.num_kv_heads * cfg.head_dim * k_cache.element_size()
        def call() -> torch.Tensor:
            return decode_attention_triton(q, k_cache, v_cache, meta, scale)
        times_s.append(time_device_s(call, CUDA))
        wall_s.append(time_fn_s(call, CUDA, warmup=10, iters=50))
        del k_cache, v_cache
    t = statistics.median(times_s)
    floor = nbytes / copy_bytes_per_s
    return Row(f"attention decode paged bs{batch} ctx{ctx}", round(1e6 * t, 2), "us", round(1e6 * floor, 2),
               round(floor / t, 3), note=f"{nbytes / t / 1e9:.0f} GB/s, median of {num_layouts} page layouts "
                                         f"({', '.join(f'{floor / x:.2f}' for x in times_s)}); eager call with "
                                         f"host launch and sync {1e6 * statistics.median(wall_s):.0f} us; "
                                         f"max err vs torch {err:.2e}")


def prefill_attention_row(num_tokens: int, mm_flops_per_s: float) -> Row:
    """``attention prefill varlen <T>``: causal attention FLOPs over the matmul rate (two sequences)."""
    cfg = LLAMA_8B
    lens = [num_tokens // 2, num_tokens - num_tokens // 2]
    block_size = 16
    per_seq = [-(-n // block_size) for n in lens]
    k_cache = torch.zeros(sum(per_seq), block_size, cfg.num_kv_heads, cfg.head_dim, device=CUDA, dtype=DTYPE)
    v_cache = torch.zeros_like(k_cache)
    k = torch.randn(num_tokens, cfg.num_kv_heads, cfg.head_dim, device=CUDA, dtype=DTYPE)
    v = torch.randn_like(k)
    q = torch.randn(num_tokens, cfg.num_heads, cfg.head_dim, device=CUDA, dtype=DTYPE)
    tables = torch.zeros(2, max(per_seq), dtype=torch.long, device=CUDA)
    tables[0, : per_seq[0]] = torch.arange(per_seq[0])
    tables[1, : per_seq[1]] = torch.arange(per_seq[0], per_seq[0] + per_seq[1])
    slots = torch.cat([tables[i, torch.arange(n, device=CUDA) // block_size] * block_size
                       + torch.arange(n, device=CUDA) % block_size for i, n in enumerate(lens)])
    meta = AttentionMetadata([0, lens[0]], lens, lens, tables, torch.tensor(lens, device=CUDA), slots)
    write_kv_reference(k, v, k_cache, v_cache, slots)
    scale = cfg.head_dim**-0.5
    err = _max_err(prefill_attention_triton(q, k_cache, v_cache, meta, scale),
                   prefill_attention_reference(q, k, v, k_cache, v_cache, meta, scale))
    # not capturable (it builds its tile list on the host, as eager prefill does): calls queued back to back
    t = time_device_s(lambda: prefill_attention_triton(q, k_cache, v_cache, meta, scale), CUDA, graph=False)
    flops = sum(2 * 2 * cfg.num_heads * cfg.head_dim * n * (n + 1) / 2 for n in lens)
    floor = flops / mm_flops_per_s
    return Row(f"attention prefill varlen {num_tokens}", round(1e6 * t, 2), "us", round(1e6 * floor, 2),
               round(floor / t, 3), note=f"{flops / t / 1e12:.0f} TFLOP/s; max err vs torch {err:.2e}")


def elementwise_rows(num_tokens: int, copy_bytes_per_s: float) -> list[Row]:
    """RMSNorm (+ residual), RoPE, SwiGLU and the KV write at ``num_tokens`` tokens of Llama-8B."""
    cfg = LLAMA_8B
    h, e = cfg.hidden_size, 2  # bf16 bytes
    rows = []
    x, res = torch.randn(num_tokens, h, device=CUDA, dtype=DTYPE), torch.randn(num_tokens, h, device=CUDA, dtype=DTYPE)
    w = torch.rand(h, device=CUDA, dtype=DTYPE) + 0.5
    err = max(_max_err(a, b) for a, b in zip(rms_norm_triton(x, w, 1e-5, res), rms_norm_reference(x, w, 1e-5, res)))
    rows.append(_bandwidth_row(f"rmsnorm+residual {num_tokens}x{h}", lambda: rms_norm_triton(x, w, 1e-5, res),
                               4 * num_tokens * h * e, copy_bytes_per_s, err))  # read x, res; write out, res

    qkv = torch.randn(num_tokens, cfg.q_size + 2 * cfg.kv_size, device=CUDA, dtype=DTYPE)
    q = qkv[:, : cfg.q_size].view(num_tokens, cfg.num_heads, cfg.head_dim)
    k = qkv[:, cfg.q_size: cfg.q_size + cfg.kv_size].view(num_tokens, cfg.num_kv_heads, cfg.head_dim)
    positions = torch.randint(0, cfg.max_position, (num_tokens,), device=CUDA)
    table = cos_sin_cache(cfg.max_position, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, CUDA)
    want = apply_rope_reference(q, k, positions, table)
    got = apply_rope_triton(q.clone(), k.clone(), positions, table)
    err = max(_max_err(a, b) for a, b in zip(got, want))
    rope_bytes = 2 * num_tokens * (cfg.q_size + cfg.kv_size) * e + num_tokens * cfg.head_dim * 4
    rows.append(_bandwidth_row(f"rope q+k {num_tokens}", lambda: apply_rope_triton(q, k, positions, table),
                               rope_bytes, copy_bytes_per_s, err))

    gate_up = torch.randn(num_tokens, 2 * cfg.intermediate_size, device=CUDA, dtype=DTYPE)
    err = _max_err(silu_and_mul_triton(gate_up), silu_and_mul_reference(gate_up))
    rows.append(_bandwidth_row(f"swiglu {num_tokens}x{cfg.intermediate_size}", lambda: silu_and_mul_triton(gate_up),
                               3 * num_tokens * cfg.intermediate_size * e, copy_bytes_per_s, err))

    k_new = torch.randn(num_tokens, cfg.num_kv_heads, cfg.head_dim, device=CUDA, dtype=DTYPE)
    v_new = torch.randn_like(k_new)
    k_cache = torch.zeros(-(-num_tokens // 16) + 8, 16, cfg.num_kv_heads, cfg.head_dim, device=CUDA, dtype=DTYPE)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(k_cache.shape[0] * 16, device=CUDA)[:num_tokens]
    write_kv_triton(k_new, v_new, k_cache, v_cache, slots)
    k_ref, v_ref = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    write_kv_reference(k_new, v_new, k_ref, v_ref, slots)
    err = max(_max_err(k_cache, k_ref), _max_err(v_cache, v_ref))
    rows.append(_bandwidth_row(f"kv write {num_tokens}", lambda: write_kv_triton(k_new, v_new, k_cache, v_cache, slots),
                               4 * num_tokens * cfg.kv_size * e, copy_bytes_per_s, err))
    return rows
