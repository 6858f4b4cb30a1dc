"""Attention over the paged KV cache: packed variable-length prefill and batched decode.

Every query token belongs to one sequence; its keys are that sequence's cached tokens up to
and including its own position. The cache is [num_blocks, block_size, num_kv_heads, head_dim]
per layer, and a sequence's block table lists the blocks that hold its tokens in order.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from minidisagg.kernels.attention_metadata import AttentionMetadata
from minidisagg.kernels.cpu_native import in_cpu_graph, use_cpu_native
from minidisagg.kernels.triton_support import use_triton

INVARIANT_QUERY_TILE = 16
INVARIANT_KEY_BLOCK = 64


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    """One sequence's cached tokens [context_len, KH, D], in order."""
    block_size = cache.shape[1]
    num_blocks = -(-context_len // block_size)
    return cache[block_table[:num_blocks]].flatten(0, 1)[:context_len]


def _lone_block_run(meta: AttentionMetadata, num_blocks: int) -> Optional[int]:
    """The first block of the lone sequence's first ``num_blocks`` blocks if they are consecutive, else None."""
    table = meta.host_block_tables[0][:num_blocks]
    return table[0] if table == list(range(table[0], table[0] + num_blocks)) else None


def decode_attention_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Batched decode attention: q [B, H, D], one query per sequence, returns [B, H, D].

    Gathers every sequence's pages into a padded [B, KV heads, L, D] batch and runs SDPA with a
    padding mask (none when all sequences have the same length). A lone sequence on the CPU whose
    blocks are consecutive in the pool (the block manager hands them out in order, so a batch-1
    decode nearly always is) needs no gather: its pages are a slice of the cache. On a CPU the
    dispatch point runs ``minidisagg_cpu::decode_attention`` instead (``kernels/cpu_native.py``),
    which reads every sequence's pages in place.
    """
    num_seqs, num_heads, head_dim = q.shape
    max_len = max(meta.context_lens)
    max_blocks = -(-max_len // k_cache.shape[1])
    first = _lone_block_run(meta, max_blocks) if num_seqs == 1 and q.device.type == "cpu" else None
    flat = meta.block_tables[:, :max_blocks].reshape(-1) if first is None else None

    def gather(cache: torch.Tensor) -> torch.Tensor:
        if first is None:
            pages = cache.index_select(0, flat)  # index_select of whole blocks: a fast gather
        else:
            pages = cache[first : first + max_blocks]
        pages = pages.reshape(num_seqs, max_blocks * cache.shape[1], *cache.shape[2:])  # a view in layer_major
        return pages[:, :max_len].transpose(1, 2)  # [B, KH, L, D]

    keys, values = gather(k_cache), gather(v_cache)
    mask = None
    if min(meta.context_lens) != max_len:
        positions = torch.arange(max_len, device=q.device)
        mask = (positions[None, :] < meta.context_lens_tensor[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.squeeze(2)


def prefill_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Packed varlen causal attention with torch SDPA, one sequence at a time.

    q [T, H, D]; k, v [T, KH, D] are this step's new tokens (already in the cache too).
    A sequence with earlier tokens in the cache (a later prefill chunk) reads them from its pages.
    """
    out = torch.empty_like(q)
    for i, (start, n, ctx) in enumerate(zip(meta.query_starts, meta.query_lens, meta.context_lens)):
        qs = q[start : start + n].transpose(0, 1)
        if ctx == n:
            ks, vs, mask, causal = k[start : start + n], v[start : start + n], None, True
        else:
            ks = _gather_context(k_cache, meta.block_tables[i], ctx)
            vs = _gather_context(v_cache, meta.block_tables[i], ctx)
            query_pos = torch.arange(ctx - n, ctx, device=q.device)
            mask = torch.arange(ctx, device=q.device)[None, :] <= query_pos[:, None]
            causal = False
        o = F.scaled_dot_product_attention(
            qs, ks.transpose(0, 1), vs.transpose(0, 1), attn_mask=mask, is_causal=causal, scale=scale,
            enable_gqa=True,
        )
        out[start : start + n] = o.transpose(0, 1)
    return out


def invariant_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Batch-invariant attention for any mix of prefill chunks and decodes.

    Each query row is computed in fixed-shape tiles (INVARIANT_QUERY_TILE queries against
    INVARIANT_KEY_BLOCK keys at absolute positions), with an online softmax over key blocks in
    a fixed order, so its bits depend only on its own sequence, never on batching or chunking.
    """
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    tile, kblock = INVARIANT_QUERY_TILE, INVARIANT_KEY_BLOCK
    for i, (start, n, ctx) in enumerate(zip(meta.query_starts, meta.query_lens, meta.context_lens)):
        keys = _gather_context(k_cache, meta.block_tables[i], ctx).float()
        values = _gather_context(v_cache, meta.block_tables[i], ctx).float()
        padded_ctx = -(-ctx // kblock) * kblock
        keys = F.pad(keys, (0, 0, 0, 0, 0, padded_ctx - ctx)).permute(1, 2, 0)  # [KH, D, Lp]
        values = F.pad(values, (0, 0, 0, 0, 0, padded_ctx - ctx)).transpose(0, 1)  # [KH, Lp, D]
        for t0 in range(0, n, tile):
            rows = min(tile, n - t0)
            qt = q.new_zeros(tile, num_heads, head_dim, dtype=torch.float32)
            qt[:rows] = q[start + t0 : start + t0 + rows].float()
            qt = qt.view(tile, num_kv_heads, group, head_dim).permute(1, 0, 2, 3).reshape(num_kv_heads, tile * group, head_dim)
            query_pos = (ctx - n + t0 + torch.arange(tile, device=q.device)).repeat_interleave(group)
            run_max = torch.full((num_kv_heads, tile * group, 1), float("-inf"), device=q.device)
            run_sum = torch.zeros((num_kv_heads, tile * group, 1), device=q.device)
            acc = torch.zeros((num_kv_heads, tile * group, head_dim), device=q.device)
            last_key = ctx - n + t0 + rows  # keys at positions >= last_key are never visible to this tile
            for k0 in range(0, last_key, kblock):
                scores = torch.bmm(qt, keys[:, :, k0 : k0 + kblock]) * scale
                key_pos = k0 + torch.arange(kblock, device=q.device)
                visible = (key_pos[None, :] <= query_pos[:, None]) & (key_pos[None, :] < ctx)
                scores = scores.masked_fill(~visible, float("-inf"))
                new_max = torch.maximum(run_max, scores.amax(-1, keepdim=True))
                safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
                p = torch.exp(scores - safe_max)
                correction = torch.exp(torch.where(torch.isinf(run_max), torch.full_like(run_max, float("-inf")), run_max - safe_max))
                run_sum = run_sum * correction + p.sum(-1, keepdim=True)
                acc = acc * correction + torch.bmm(p, values[:, k0 : k0 + kblock])
                run_max = new_max
            res = (acc / run_sum).view(num_kv_heads, tile, group, head_dim).permute(1, 0, 2, 3)
            out[start + t0 : start + t0 + rows] = res.reshape(tile, num_heads, head_dim)[:rows].to(q.dtype)
    return out


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Dispatch point for attention. The new k, v must already be written to the cache."""
    if meta.batch_invariant:
        return invariant_attention(q, k_cache, v_cache, meta, scale)
    if use_triton(q):
        from minidisagg.kernels import attention_triton  # imports triton, so only when it is used

        if meta.is_decode:
            return attention_triton.decode_attention_triton(q, k_cache, v_cache, meta, scale, meta.num_splits)
        from minidisagg.kernels import prefill_triton

        # this step's K/V straight from the projection (no block-table lookups) where its layout allows
        direct = k.dtype == q.dtype and k.stride() == v.stride() and k.stride(-1) == 1 and k.shape == v.shape
        new_kv = (k, v) if direct else (None, None)
        return prefill_triton.prefill_attention_triton(q, k_cache, v_cache, meta, scale, *new_kv)
    if meta.is_decode:
        if use_cpu_native(q) or in_cpu_graph(q):  # pages read in place, in C++ (kernels/cpu_native.py)
            return torch.ops.minidisagg_cpu.decode_attention(q, k_cache, v_cache, meta.block_tables,
                                                             meta.context_lens_tensor, scale)
        return decode_attention_reference(q, k_cache, v_cache, meta, scale)
    return prefill_attention_reference(q, k, v, k_cache, v_cache, meta, scale)
