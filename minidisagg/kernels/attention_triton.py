"""Triton attention over the paged KV cache: flash-decoding for decode (prefill: ``prefill_triton.py``).

The torch references live in ``attention.py``; ``paged_attention`` there routes here when
``use_triton`` says so. This module imports triton at import time, so it is imported only then
(the whole module is "built on first use"; ``TRITON_INTERPRET`` must be set before that).

The kernel reads keys straight from the pages: token ``pos`` of a sequence sits in block
``block_table[pos // block_size]`` at row ``pos % block_size``. Addresses are formed per token,
so a key tile (BLOCK_N tokens) may span several pages and any block size works (5 as well as 16).
Softmax runs online in base 2 (scores pre-multiplied by scale * log2(e)) with float32 state.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from minidisagg.kernels.attention_metadata import AttentionMetadata
from minidisagg.kernels.triton_support import next_pow2

LOG2_E = 1.4426950408889634
MIN_SPLIT_TOKENS = 64  # a decode split never covers fewer keys than one key tile (unless forced)
MAX_SPLITS = 64
DECODE_BLOCK_N = 64
MIN_DOT_ROWS = 16  # tl.dot needs at least 16 rows on GPUs


@triton.jit
def _attend_keys(
    q, m, l, acc, query_pos, k_cache_ptr, v_cache_ptr, table_ptr, key_start, key_end, kv_head, scale_log2,
    stride_cb, stride_ct, stride_ch,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fold keys [key_start, key_end) of one sequence into the online-softmax state (m, l, acc)."""
    dims = tl.arange(0, HEAD_DIM_P)
    dim_ok = dims < HEAD_DIM
    for tile in range(key_start, key_end, BLOCK_N):
        pos = tile + tl.arange(0, BLOCK_N)
        key_ok = pos < key_end
        block = tl.load(table_ptr + pos // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        token = block * stride_cb + (pos % BLOCK_SIZE) * stride_ct + kv_head * stride_ch  # [BLOCK_N]
        # K loaded key-major like V (each key's head_dim values are contiguous), transposed in registers
        k = tl.load(k_cache_ptr + token[:, None] + dims[None, :], mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [rows, BLOCK_N]
        visible = key_ok[None, :]
        if CAUSAL:
            visible = visible & (pos[None, :] <= query_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: every tile holds a key visible to every row
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + token[:, None] + dims[None, :], mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new
    return m, l, acc


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_max_ptr, part_sum_ptr, part_acc_ptr,
    scale_log2, num_splits, num_heads,
    stride_qb, stride_qh, stride_cb, stride_ct, stride_ch, stride_bt, stride_ob, stride_oh,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One (sequence, kv head, split): all GROUP query heads against this split's share of the keys."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + seq).to(tl.int32)
    # this sequence's keys divided evenly between the splits, in whole key tiles (later splits may be empty)
    split_len = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N
    key_start = split * split_len
    key_end = tl.minimum(key_start + split_len, ctx)

    rows = tl.arange(0, GROUP_P)
    dims = tl.arange(0, HEAD_DIM_P)
    heads = kv_head * GROUP + rows
    row_ok = rows < GROUP
    io_mask = row_ok[:, None] & (dims < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :], mask=io_mask, other=0.0)
    m = tl.full([GROUP_P], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, HEAD_DIM_P], tl.float32)
    m, l, acc = _attend_keys(
        q, m, l, acc, rows, k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * stride_bt, key_start, key_end,
        kv_head, scale_log2, stride_cb, stride_ct, stride_ch,
        HEAD_DIM, HEAD_DIM_P, BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION,
    )
    if SINGLE_SPLIT:
        out = acc / l[:, None]
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=io_mask)
    else:  # partials [B, H, S] and [B, H, S, D]; an empty split leaves (-inf, 0, 0)
        part = (seq * num_heads + heads) * num_splits + split
        tl.store(part_max_ptr + part, m, mask=row_ok)
        tl.store(part_sum_ptr + part, l, mask=row_ok)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=io_mask)


@triton.jit
def _decode_combine_kernel(
    part_max_ptr, part_sum_ptr, part_acc_ptr, out_ptr, num_splits, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, SPLITS_P: tl.constexpr,
):
    """One (sequence, head): rescale each split's partial to the global max and normalise."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_P)
    dims = tl.arange(0, HEAD_DIM_P)
    split_ok = splits < num_splits
    dim_ok = dims < HEAD_DIM
    part = (seq * tl.num_programs(1) + head) * num_splits + splits
    m = tl.load(part_max_ptr + part, mask=split_ok, other=float("-inf"))
    l = tl.load(part_sum_ptr + part, mask=split_ok, other=0.0)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=split_ok[:, None] & dim_ok[None, :], other=0.0)
    weight = tl.exp2(m - tl.max(m, 0))  # split 0 is never empty, so the max is finite; empty splits weigh 0
    out = tl.sum(acc * weight[:, None], 0) / tl.sum(l * weight, 0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty), mask=dim_ok)


def decode_num_splits(max_context_len: int, num_seqs: int, num_kv_heads: int, num_sms: int) -> int:
    """Context splits for decode: enough programs to fill the device twice, none under MIN_SPLIT_TOKENS keys."""
    by_length = math.ceil(max_context_len / MIN_SPLIT_TOKENS)
    by_occupancy = math.ceil(2 * num_sms / (num_seqs * num_kv_heads))
    return max(1, min(by_length, by_occupancy, MAX_SPLITS))


def num_sms_of(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter runs programs one by one)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def check_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """The layouts the kernels assume: unit stride along head_dim, K and V caches alike, q in the cache dtype."""
    assert q.dtype == k_cache.dtype == v_cache.dtype, f"q {q.dtype} vs cache {k_cache.dtype}/{v_cache.dtype}"
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    assert q.shape[1] % k_cache.shape[2] == 0, "num_heads must be a multiple of num_kv_heads"


def decode_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
    num_splits: int | None = None, block_n: int = DECODE_BLOCK_N, num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Paged decode attention (flash-decoding): q [B, H, D], one query per sequence, returns [B, H, D].

    ``num_splits`` defaults to ``decode_num_splits``; pin it (e.g. for a CUDA graph) and any
    context length still works, since each sequence divides its own keys between the splits.
    """
    check_inputs(q, k_cache, v_cache)
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    if num_splits is None:
        num_splits = decode_num_splits(max(meta.context_lens), num_seqs, num_kv_heads, num_sms_of(q.device))
    out = torch.empty_like(q)
    single = num_splits == 1
    if single:
        part_max = part_sum = part_acc = out  # unused
    else:
        part_max = torch.empty(num_seqs, num_heads, num_splits, device=q.device, dtype=torch.float32)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty(num_seqs, num_heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
    precision = "ieee" if q.dtype == torch.float32 else None  # fp32: no tf32 rounding
    launch = {k: v for k, v in (("num_warps", num_warps), ("num_stages", num_stages)) if v is not None}
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, meta.block_tables, meta.context_lens_tensor,
        out, part_max, part_sum, part_acc,
        scale * LOG2_E, num_splits, num_heads,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        meta.block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_P=max(MIN_DOT_ROWS, next_pow2(group)), HEAD_DIM=head_dim, HEAD_DIM_P=next_pow2(head_dim),
        BLOCK_SIZE=k_cache.shape[1], BLOCK_N=block_n, SINGLE_SPLIT=single, DOT_PRECISION=precision, **launch,
    )
    if not single:
        _decode_combine_kernel[(num_seqs, num_heads)](
            part_max, part_sum, part_acc, out, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_P=next_pow2(head_dim), SPLITS_P=next_pow2(num_splits),
        )
    return out
