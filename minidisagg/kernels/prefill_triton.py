"""Flash-attention prefill in Triton: packed varlen causal batches with GQA over a paged KV context.

One program handles BLOCK_M consecutive queries of one sequence for one query head (grid: heads,
query tiles, sequences; heads vary fastest, so the GROUP heads that share a KV head run side by
side and read the same K/V tiles from L2). A sequence's keys come in three ranges, each its own
loop so that only the last one pays for masks:

1. the cached prefix ``[0, ctx - q_len)``, read from the pages (every query sees every key);
2. this step's tokens before the tile's first query: every query sees them, no mask;
3. the diagonal: this step's tokens up to the tile's last query, causally masked.

Tiles past the diagonal are never visited (block-sparse skipping). This step's tokens are read
from the ``k``/``v`` projections when the caller passes them (plain strided rows: no block-table
lookups), otherwise from the pages like the prefix. Query tiles are visited last-first, so the
longest programs of a causal batch start first. On a GPU, ``triton.autotune`` picks the tile
sizes, warps and pipeline stages per (head_dim, group, block size, query and context length
bucket); under the interpreter a single config runs.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from minidisagg.kernels.attention_metadata import AttentionMetadata
from minidisagg.kernels.attention_triton import LOG2_E, MIN_DOT_ROWS, check_inputs
from minidisagg.kernels.triton_support import interpreter_on, next_pow2

SMALL_QUERY_TOKENS = 64  # batches whose longest query run is shorter skip autotuning (one small-tile config)
INTERPRETER_BLOCK = 32  # BLOCK_M = BLOCK_N under the interpreter


@triton.jit
def _fold_tiles(
    q, m, l, acc, k_base, v_base, table_ptr, key0, key_start, key_end, key_limit, query_idx, scale_log2,
    stride_kt, stride_cb, stride_ct,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGED: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fold key tiles [key_start, key_end) into the online softmax (m, l, acc) of one query tile.

    Key index ``j`` lives at position ``key0 + j`` of the sequence: in the pages
    ``table_ptr[pos // BLOCK_SIZE]`` (PAGED) or at row ``j`` of ``k_base``/``v_base`` (rows
    ``stride_kt`` apart). With MASKED, key j is visible to query row i iff
    ``j <= query_idx[i]`` and ``j < key_limit``; without, every key is visible.
    """
    dims = tl.arange(0, HEAD_DIM_P)
    for start in range(key_start, key_end, BLOCK_N):
        idx = start + tl.arange(0, BLOCK_N)
        if PAGED:
            pos = key0 + idx
            page = tl.load(table_ptr + pos // BLOCK_SIZE, mask=idx < key_limit, other=0).to(tl.int64)
            rows = page * stride_cb + (pos % BLOCK_SIZE) * stride_ct
        else:
            rows = idx.to(tl.int64) * stride_kt
        offsets = rows[:, None] + dims[None, :]
        if MASKED or HEAD_DIM != HEAD_DIM_P:
            load_ok = (idx < key_limit)[:, None] & (dims < HEAD_DIM)[None, :]
            k = tl.load(k_base + offsets, mask=load_ok, other=0.0)
        else:
            k = tl.load(k_base + offsets)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASKED:
            visible = (idx[None, :] <= query_idx[:, None]) & (idx < key_limit)[None, :]
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1) * scale_log2)  # finite: an earlier tile or this one shows a key to each row
        p = tl.exp2(s * scale_log2 - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        if MASKED or HEAD_DIM != HEAD_DIM_P:
            v = tl.load(v_base + offsets, mask=load_ok, other=0.0)
        else:
            v = tl.load(v_base + offsets)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new
    return m, l, acc


@triton.jit
def _flash_prefill_kernel(
    q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_info_ptr, out_ptr, scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cb, stride_ct, stride_ch, stride_bt, stride_ot, stride_oh,
    q_len_bucket, ctx_bucket,  # autotuning keys only
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    NEW_FROM_PAGES: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One (head, query tile, sequence): BLOCK_M queries of one sequence, causal over its prefix and new tokens."""
    head = tl.program_id(0)
    m_block = tl.num_programs(1) - 1 - tl.program_id(1)  # the longest (last) tiles of a causal sequence first
    seq = tl.program_id(2)
    q_start = tl.load(seq_info_ptr + seq * 3)
    q_len = tl.load(seq_info_ptr + seq * 3 + 1)
    ctx = tl.load(seq_info_ptr + seq * 3 + 2)
    m0 = m_block * BLOCK_M
    if m0 < q_len:
        prefix = ctx - q_len
        kv_head = head // GROUP
        rows = tl.arange(0, BLOCK_M)
        dims = tl.arange(0, HEAD_DIM_P)
        query_idx = m0 + rows  # index among this step's tokens
        io_mask = (query_idx < q_len)[:, None] & (dims < HEAD_DIM)[None, :]
        token_rows = (q_start + query_idx).to(tl.int64)
        q = tl.load(q_ptr + token_rows[:, None] * stride_qt + head * stride_qh + dims[None, :], mask=io_mask, other=0.0)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
        table = block_tables_ptr + seq * stride_bt
        k_pages = k_cache_ptr + kv_head * stride_ch
        v_pages = v_cache_ptr + kv_head * stride_ch
        # 1. the cached prefix, whole tiles unmasked, then its partial last tile
        prefix_full = (prefix // BLOCK_N) * BLOCK_N
        m, l, acc = _fold_tiles(q, m, l, acc, k_pages, v_pages, table, 0, 0, prefix_full, prefix, query_idx,
                                scale_log2, 0, stride_cb, stride_ct, HEAD_DIM, HEAD_DIM_P, BLOCK_SIZE, BLOCK_N,
                                True, False, DOT_PRECISION)
        m, l, acc = _fold_tiles(q, m, l, acc, k_pages, v_pages, table, 0, prefix_full, prefix, prefix,
                                query_idx + prefix, scale_log2, 0, stride_cb, stride_ct, HEAD_DIM, HEAD_DIM_P,
                                BLOCK_SIZE, BLOCK_N, True, True, DOT_PRECISION)
        # 2. new tokens every query of the tile sees; 3. the diagonal tiles, masked
        new_full = (m0 // BLOCK_N) * BLOCK_N
        diag_end = tl.minimum(m0 + BLOCK_M, q_len)
        if NEW_FROM_PAGES:
            m, l, acc = _fold_tiles(q, m, l, acc, k_pages, v_pages, table, prefix, 0, new_full, q_len, query_idx,
                                    scale_log2, 0, stride_cb, stride_ct, HEAD_DIM, HEAD_DIM_P, BLOCK_SIZE, BLOCK_N,
                                    True, False, DOT_PRECISION)
            m, l, acc = _fold_tiles(q, m, l, acc, k_pages, v_pages, table, prefix, new_full, diag_end, q_len,
                                    query_idx, scale_log2, 0, stride_cb, stride_ct, HEAD_DIM, HEAD_DIM_P, BLOCK_SIZE,
                                    BLOCK_N, True, True, DOT_PRECISION)
        else:
            k_new = k_ptr + q_start.to(tl.int64) * stride_kt + kv_head * stride_kh
            v_new = v_ptr + q_start.to(tl.int64) * stride_kt + kv_head * stride_kh
            m, l, acc = _fold_tiles(q, m, l, acc, k_new, v_new, table, 0, 0, new_full, q_len, query_idx,
                                    scale_log2, stride_kt, stride_cb, stride_ct, HEAD_DIM, HEAD_DIM_P, BLOCK_SIZE,
                                    BLOCK_N, False, False, DOT_PRECISION)
            m, l, acc = _fold_tiles(q, m, l, acc, k_new, v_new, table, 0, new_full, diag_end, q_len, query_idx,
                                    scale_log2, stride_kt, stride_cb, stride_ct, HEAD_DIM, HEAD_DIM_P, BLOCK_SIZE,
                                    BLOCK_N, False, True, DOT_PRECISION)
        out = acc / l[:, None]
        tl.store(out_ptr + token_rows[:, None] * stride_ot + head * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=io_mask)


# (BLOCK_M, BLOCK_N, num_warps, num_stages): the shapes FlashAttention-2 in Triton favours on Ampere/Hopper
TUNING_CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (128, 64, 8, 4), (64, 64, 4, 3), (64, 128, 4, 2)]


def _prune(configs: list, named_args: dict, **kwargs: object) -> list:
    """Drop query tiles longer than the longest query run (they would compute mostly padding)."""
    fits = [c for c in configs if c.kwargs["BLOCK_M"] <= named_args["q_len_bucket"]]
    return fits or configs[-1:]


_autotuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
             for bm, bn, w, s in TUNING_CONFIGS],
    key=["HEAD_DIM", "GROUP", "BLOCK_SIZE", "NEW_FROM_PAGES", "DOT_PRECISION", "q_len_bucket", "ctx_bucket"],
    prune_configs_by={"early_config_prune": _prune},
)(_flash_prefill_kernel)


def autotuning_on(q: torch.Tensor, max_query_len: int) -> bool:
    """Whether a call autotunes: 16-bit q on a GPU, query runs of SMALL_QUERY_TOKENS or more, and
    ``MINIDISAGG_PREFILL_AUTOTUNE`` not ``0`` (tests set it to skip compiling every config per shape)."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and max_query_len >= SMALL_QUERY_TOKENS
            and os.environ.get("MINIDISAGG_PREFILL_AUTOTUNE", "1") != "0")


def prefill_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
    k: torch.Tensor | None = None, v: torch.Tensor | None = None, block_m: int | None = None,
    block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
) -> torch.Tensor:
    """Packed varlen causal attention over the paged cache: q [T, H, D], returns [T, H, D].

    Works for any mix of fresh prompts, chunks over a cached prefix (ctx > q_len) and decodes.
    This step's K/V must already be in the cache; with ``k``, ``v`` ([T, KH, D], rows may be
    strided views of a fused projection) the new tokens are read from there instead. ``block_m``
    and ``block_n`` pin the tiles (no autotuning); by default the autotuner picks them on a GPU.
    """
    check_inputs(q, k_cache, v_cache)
    num_heads, head_dim = q.shape[1:]
    group = num_heads // k_cache.shape[2]
    out = torch.empty_like(q)
    if q.shape[0] == 0:
        return out
    from_pages = k is None or v is None
    if from_pages:
        k = v = k_cache  # unused
    else:
        assert k.shape == v.shape == (q.shape[0], k_cache.shape[2], head_dim), f"k {tuple(k.shape)} v {tuple(v.shape)}"
        assert k.stride() == v.stride() and k.stride(-1) == 1, "k and v must share one layout, unit stride on head_dim"
        assert k.dtype == q.dtype, f"k {k.dtype} vs q {q.dtype}"
    max_q = max(meta.query_lens)
    args = (
        q, k, v, k_cache, v_cache, meta.block_tables, meta.seq_info, out, scale * LOG2_E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        meta.block_tables.stride(0), out.stride(0), out.stride(1),
        min(next_pow2(max_q), 2048), min(next_pow2(max(meta.context_lens)), 16384),
    )
    fixed = dict(GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_P=next_pow2(head_dim), BLOCK_SIZE=k_cache.shape[1],
                 NEW_FROM_PAGES=from_pages, DOT_PRECISION="ieee" if q.dtype == torch.float32 else None)
    if block_m is None and block_n is None and autotuning_on(q, max_q):
        _autotuned[lambda c: (num_heads, triton.cdiv(max_q, c["BLOCK_M"]), meta.num_seqs)](*args, **fixed)
        return out
    if block_m is None:
        block_m = INTERPRETER_BLOCK if interpreter_on() else min(64, max(MIN_DOT_ROWS, next_pow2(max_q)))
    block_n = block_n or (INTERPRETER_BLOCK if interpreter_on() else 64)
    launch = {name: n for name, n in (("num_warps", num_warps), ("num_stages", num_stages)) if n is not None}
    if not interpreter_on():
        launch = {"num_warps": 4, "num_stages": 2, **launch}  # fits shared memory even in float32 at head_dim 128
    _flash_prefill_kernel[(num_heads, triton.cdiv(max_q, block_m), meta.num_seqs)](
        *args, **fixed, BLOCK_M=block_m, BLOCK_N=block_n, **launch)
    return out
