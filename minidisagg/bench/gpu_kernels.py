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
from minidisagg.kernels.attention_triton import decode_attention_triton
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


def prefill_attention_inputs(lens: list[int], prefix: int = 0, block_size: int = 16):
    """Llama-8B prefill attention inputs: sequences of ``lens`` new tokens, each after ``prefix`` cached ones.

    The new tokens' q/k/v are views of one fused projection, as in the engine; every sequence's
    pages (prefix and new tokens) sit in shuffled blocks of the pool. Returns (q, k, v, k_cache, v_cache, meta).
    """
    cfg = LLAMA_8B
    ctx = [prefix + n for n in lens]
    per_seq = [-(-c // block_size) for c in ctx]
    k_cache = torch.randn(sum(per_seq), block_size, cfg.num_kv_heads, cfg.head_dim, device=CUDA, dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    blocks = torch.randperm(sum(per_seq), device=CUDA)
    tables = torch.zeros(len(lens), max(per_seq), dtype=torch.long, device=CUDA)
    for i, start in enumerate([sum(per_seq[:i]) for i in range(len(lens))]):
        tables[i, : per_seq[i]] = blocks[start : start + per_seq[i]]
    fused = torch.randn(sum(lens), cfg.num_heads + 2 * cfg.num_kv_heads, cfg.head_dim, device=CUDA, dtype=DTYPE)
    q, k, v = fused.split([cfg.num_heads, cfg.num_kv_heads, cfg.num_kv_heads], dim=1)
    slots = torch.cat([tables[i, torch.arange(prefix, c, device=CUDA) // block_size] * block_size
                       + torch.arange(prefix, c, device=CUDA) % block_size for i, c in enumerate(ctx)])
    starts = [sum(lens[:i]) for i in range(len(lens))]
    meta = AttentionMetadata(starts, list(lens), ctx, tables, torch.tensor(ctx, device=CUDA), slots)
    write_kv_reference(k, v, k_cache, v_cache, slots)
    return q, k, v, k_cache, v_cache, meta


def sdpa_flash_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int) -> Callable[[], torch.Tensor]:
    """One sequence through torch SDPA's fused kernels, K/V heads repeated beforehand: flash for a fresh
    prompt; with a ``prefix``, a lower-right causal mask, which torch runs in its memory-efficient kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    group = q.shape[1] // k.shape[1]
    qh = q.transpose(0, 1).contiguous()[None]
    kh = k.repeat_interleave(group, dim=1).transpose(0, 1).contiguous()[None]
    vh = v.repeat_interleave(group, dim=1).transpose(0, 1).contiguous()[None]
    mask = causal_lower_right(qh.shape[2], kh.shape[2]) if prefix else None

    def call() -> torch.Tensor:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=not prefix)
    return call


def prefill_attention_row(name: str, lens: list[int], mm_flops_per_s: float, prefix: int = 0) -> Row:
    """``attention prefill <name>``: causal attention FLOPs over the matmul rate, beside torch SDPA.

    ``lens`` new tokens per sequence after ``prefix`` cached tokens each (a chunk over a paged
    context when ``prefix`` > 0); the engine's call: new K/V from the projection, the prefix from pages.
    """
    from minidisagg.kernels.prefill_triton import prefill_attention_triton

    cfg = LLAMA_8B
    q, k, v, k_cache, v_cache, meta = prefill_attention_inputs(lens, prefix)
    scale = cfg.head_dim**-0.5
    call = lambda: prefill_attention_triton(q, k_cache, v_cache, meta, scale, k, v)  # noqa: E731
    flops = sum(2 * 2 * cfg.num_heads * cfg.head_dim * n * (prefix + (n + 1) / 2) for n in lens)
    reps = {"calls_per_sample": 3, "samples": 7} if flops > 1e12 else {}
    sdpa = None
    if len(lens) == 1:  # one sequence: torch's fused kernel is both the reference and the speed to compare with
        keys, values = _gathered(k_cache, v_cache, meta) if prefix else (k, v)
        sdpa = sdpa_flash_call(q, keys, values, prefix)
        err = _max_err(call(), sdpa()[0].transpose(0, 1))
    else:
        err = _max_err(call(), prefill_attention_reference(q, k, v, k_cache, v_cache, meta, scale))
    # eager prefill runs it outside graphs (and autotuning is not capturable): calls queued back to back
    t = time_device_s(call, CUDA, graph=False, **reps)
    note = f"{flops / t / 1e12:.0f} TFLOP/s; max err vs torch {err:.2e}"
    if sdpa is not None:
        t_sdpa = time_device_s(sdpa, CUDA, graph=False, **reps)
        note += (f"; torch SDPA {'efficient' if prefix else 'flash'} {1e6 * t_sdpa:.0f} us "
                 f"({flops / t_sdpa / mm_flops_per_s:.3f} of the matmul rate)")
    floor = flops / mm_flops_per_s
    return Row(f"attention prefill {name}", round(1e6 * t, 2), "us", round(1e6 * floor, 2), round(floor / t, 3),
               note=note)


def _gathered(k_cache: torch.Tensor, v_cache: torch.Tensor,
              meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """The first sequence's whole context [ctx, KH, D] gathered from its pages (SDPA needs it contiguous)."""
    ctx, bs = meta.context_lens[0], k_cache.shape[1]
    blocks = meta.block_tables[0, : -(-ctx // bs)]
    return k_cache[blocks].flatten(0, 1)[:ctx], v_cache[blocks].flatten(0, 1)[:ctx]


PREFILL_ATTENTION_CASES: list[tuple[str, list[int], int]] = [
    ("varlen 2048", [1024, 1024], 0), ("causal 2048", [2048], 0), ("causal 8192", [8192], 0),
    ("causal 32768", [32768], 0), ("chunk 512 ctx 8192", [512], 8192),
]


def prefill_attention_rows(mm_flops_per_s: float) -> list[Row]:
    """Every case of ``PREFILL_ATTENTION_CASES``: fresh prompts at 2k (two sequences, one), 8k, 32k; a chunk."""
    rows = []
    for name, lens, prefix in PREFILL_ATTENTION_CASES:
        rows.append(prefill_attention_row(name, lens, mm_flops_per_s, prefix))
        torch.cuda.empty_cache()
    return rows


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
