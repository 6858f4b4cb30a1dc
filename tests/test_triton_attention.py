"""Triton paged attention (flash-decoding decode, flash-attention prefill) against a float64 naive reference.

Inputs are fresh random paged batches (random block tables, noise in unused slots); every
message carries the seed and ``MINIDISAGG_TEST_SEED`` replays a run. Without CUDA the kernels
run under Triton's interpreter in a subprocess, because ``TRITON_INTERPRET=1`` must be set
before triton is imported and this pytest process may already have imported it. By hand:
``TRITON_INTERPRET=1 MINIDISAGG_TRITON_ON_CPU=1 python tests/test_triton_attention.py decode SEED``.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# (num_heads, num_kv_heads), head_dim, block_size: GQA 3:1, MHA and MQA, both head dims, both block sizes
SHAPES = [((9, 3), 64, 16), ((9, 3), 32, 5), ((4, 4), 32, 16), ((8, 1), 64, 5), ((8, 1), 32, 16)]
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 2e-2)}


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (or ``MINIDISAGG_TEST_SEED`` to replay one)."""
    fixed = os.environ.get("MINIDISAGG_TEST_SEED")
    return int(fixed) if fixed else random.SystemRandom().randrange(1 << 31)


def build_batch(gen: torch.Generator, specs: list[tuple[int, int]], heads: tuple[int, int], head_dim: int,
                block_size: int, dtype: torch.dtype, device: str):
    """A paged batch for (context_len, query_len) specs: (q, k_cache, v_cache, meta, per-sequence K, V)."""
    from minidisagg.kernels.attention import AttentionMetadata

    num_heads, num_kv_heads = heads
    needed = [-(-ctx // block_size) for ctx, _ in specs]
    spare = [int(torch.randint(0, 3, (1,), generator=gen)) for _ in specs]  # tables may run ahead
    num_blocks = sum(needed) + sum(spare) + 2
    draw = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    k_cache, v_cache = draw(num_blocks, block_size, num_kv_heads, head_dim), draw(num_blocks, block_size, num_kv_heads, head_dim)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables, keys, values, queries = [], [], [], []
    for i, (ctx, n) in enumerate(specs):
        table = [free.pop() for _ in range(needed[i] + spare[i])]
        seq_k, seq_v = draw(ctx, num_kv_heads, head_dim), draw(ctx, num_kv_heads, head_dim)
        for p in range(ctx):
            k_cache[table[p // block_size], p % block_size] = seq_k[p]
            v_cache[table[p // block_size], p % block_size] = seq_v[p]
        tables.append(table)
        keys.append(seq_k)
        values.append(seq_v)
        queries.append(draw(n, num_heads, head_dim))
    block_tables = torch.zeros(len(specs), max(len(t) for t in tables), dtype=torch.long)
    for i, table in enumerate(tables):
        block_tables[i, : len(table)] = torch.tensor(table)
    lens = [n for _, n in specs]
    starts = [sum(lens[:i]) for i in range(len(specs))]
    ctx_lens = [ctx for ctx, _ in specs]
    meta = AttentionMetadata(
        query_starts=starts, query_lens=lens, context_lens=ctx_lens, block_tables=block_tables.to(device),
        context_lens_tensor=torch.tensor(ctx_lens, dtype=torch.long, device=device),
        slot_mapping=torch.zeros(sum(lens), dtype=torch.long, device=device),  # unused by attention
    )
    return torch.cat(queries).to(device), k_cache.to(device), v_cache.to(device), meta, keys, values


def naive_attention(q: torch.Tensor, meta, keys: list[torch.Tensor], values: list[torch.Tensor], scale: float) -> torch.Tensor:
    """Float64 causal attention per sequence on its contiguous K/V, kv heads repeated for GQA."""
    outs = []
    for i, (start, n, ctx) in enumerate(zip(meta.query_starts, meta.query_lens, meta.context_lens)):
        qs = q[start : start + n].cpu().double()
        group = qs.shape[1] // keys[i].shape[1]
        k = keys[i].double().repeat_interleave(group, dim=1)
        v = values[i].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qs, k) * scale
        visible = torch.arange(ctx)[None, :] <= torch.arange(ctx - n, ctx)[:, None]
        outs.append(torch.einsum("hqk,khd->qhd", torch.softmax(scores.masked_fill(~visible, float("-inf")), -1), v))
    return torch.cat(outs)


def new_tokens(meta, per_seq: list[torch.Tensor]) -> torch.Tensor:
    """This step's rows [T, KH, D] of per-sequence K (or V): each sequence's last ``query_len`` positions."""
    return torch.cat([x[ctx - n :] for x, n, ctx in zip(per_seq, meta.query_lens, meta.context_lens)])


def check_close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, seed: int) -> None:
    """Compare in float64 with ``dtype``'s tolerance; the message names the case and the seed."""
    assert got.dtype == dtype and got.shape == expected.shape, f"{what}: {got.dtype} {tuple(got.shape)} (seed {seed})"
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.cpu().double(), expected, atol=atol, rtol=rtol,
                               msg=lambda m: f"{what} (seed {seed}, {dtype}): {m}")


def run_checks(kind: str, seed: int, device: str, dtype: torch.dtype, large: bool = False) -> list[str]:
    """Every decode or prefill case for ``seed``; raises AssertionError on a mismatch, returns one line per case."""
    from minidisagg.kernels.attention import invariant_attention, paged_attention
    from minidisagg.kernels.attention_triton import decode_attention_triton
    from minidisagg.kernels.prefill_triton import prefill_attention_triton
    from minidisagg.kernels.triton_support import use_triton

    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    lines = []
    for heads, head_dim, block_size in SHAPES:
        scale = head_dim**-0.5
        if kind == "decode":
            specs = [(ctx, 1) for ctx in rnd.sample([1, 17, 300] + ([2000, 5000, 8192] if large else []), 6 if large else 3)]
        else:
            prefix = lambda: rnd.randint(1, 3000 if large else 80)  # noqa: E731
            lens = [1, 7, 33] + ([512, 129, 1024] if large else [70])
            specs = [(n, n) for n in lens] + [(n + prefix(), n) for n in lens]
            rnd.shuffle(specs)
        q, k_cache, v_cache, meta, keys, values = build_batch(gen, specs, heads, head_dim, block_size, dtype, device)
        expected = naive_attention(q, meta, keys, values, scale)
        where = f"{kind} heads {heads} head_dim {head_dim} block_size {block_size} specs (ctx, q_len) {specs}"
        # the same pages in a block_major pool (3 layers, this is the middle one): strided, the same bits
        pool = torch.zeros(k_cache.shape[0], 3, 2, *k_cache.shape[1:], dtype=dtype, device=device)
        pool[:, 1, 0], pool[:, 1, 1] = k_cache, v_cache
        k_strided, v_strided = pool[:, 1, 0], pool[:, 1, 1]
        if kind == "decode":
            got = decode_attention_triton(q, k_cache, v_cache, meta, scale)
            check_close(got, expected, dtype, f"decode_attention_triton, default splits, {where}", seed)
            strided = decode_attention_triton(q, k_strided, v_strided, meta, scale)
            assert torch.equal(strided, got), f"decode_attention_triton, block_major pool, {where} (seed {seed})"
            splits = rnd.choice([3, 4, 7])  # a 300-key context over several splits, some of them empty
            forced = decode_attention_triton(q, k_cache, v_cache, meta, scale, num_splits=splits, block_n=16)
            check_close(forced, expected, dtype, f"decode_attention_triton, {splits} splits, {where}", seed)
            lines.append(f"ok {where}, splits default and {splits}")
        else:
            got = prefill_attention_triton(q, k_cache, v_cache, meta, scale)
            check_close(got, expected, dtype, f"prefill_attention_triton, {where}", seed)
            strided = prefill_attention_triton(q, k_strided, v_strided, meta, scale)
            assert torch.equal(strided, got), f"prefill_attention_triton, block_major pool, {where} (seed {seed})"
            # this step's K/V read from strided views of one fused q/k/v projection instead of the pages
            fused = torch.cat([q, new_tokens(meta, keys).to(device), new_tokens(meta, values).to(device)], dim=1)
            q_view, k_view, v_view = fused.split([heads[0], heads[1], heads[1]], dim=1)
            direct = prefill_attention_triton(q_view, k_cache, v_cache, meta, scale, k_view, v_view)
            check_close(direct, expected, dtype, f"prefill_attention_triton, new K/V from the projection, {where}", seed)
            # pinned tiles: query tiles shorter and longer than key tiles, key tiles across page edges
            block_m, block_n = rnd.choice([(16, 16), (16, 64), (64, 16), (16, 32)])
            for k_arg, v_arg in ((None, None), (k_view, v_view)):
                pinned = prefill_attention_triton(q, k_cache, v_cache, meta, scale, k_arg, v_arg, block_m=block_m,
                                                  block_n=block_n)
                check_close(pinned, expected, dtype, f"prefill_attention_triton, {block_m}x{block_n} tiles, "
                            f"new K/V from {'pages' if k_arg is None else 'the projection'}, {where}", seed)
            lines.append(f"ok {where}, tiles default and {block_m}x{block_n}")

    # the dispatch point takes the Triton kernel here, and the torch path in batch-invariant mode
    assert use_triton(q), f"use_triton(q) is False on {device} (seed {seed})"
    k_new, v_new = new_tokens(meta, keys).to(device), new_tokens(meta, values).to(device)
    routed = paged_attention(q, k_new, v_new, k_cache, v_cache, meta, scale)
    if kind == "prefill":
        got = prefill_attention_triton(q, k_cache, v_cache, meta, scale, k_new, v_new)
    assert torch.equal(routed, got), f"paged_attention did not take the Triton {kind} kernel (seed {seed})"
    meta.batch_invariant = True
    routed = paged_attention(q, k_new, v_new, k_cache, v_cache, meta, scale)
    assert torch.equal(routed, invariant_attention(q, k_cache, v_cache, meta, scale)), f"batch_invariant (seed {seed})"
    lines.append(f"ok paged_attention dispatch ({kind})")
    return lines


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_triton_attention_matches_naive(kind, seed):
    if torch.cuda.is_available():
        run_checks(kind, seed, "cuda", torch.float32)
        return
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "MINIDISAGG_TRITON_ON_CPU": "1"}
    env.pop("MINIDISAGG_KERNELS", None)
    proc = subprocess.run([sys.executable, str(Path(__file__)), kind, str(seed)], env=env,
                          capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "PASS" in proc.stdout, f"interpreter run failed (seed {seed}):\n{output[-4000:]}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_triton_attention_large_on_gpu(kind, dtype, seed):
    run_checks(kind, seed, "cuda", dtype, large=True)


if __name__ == "__main__":
    kind_arg, seed_arg = sys.argv[1], int(sys.argv[2])
    print(f"{kind_arg} checks under the Triton interpreter, seed {seed_arg}")
    for line in run_checks(kind_arg, seed_arg, "cpu", torch.float32):
        print(line)
    print("PASS")
