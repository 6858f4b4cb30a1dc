"""Triton RMSNorm, RoPE, SwiGLU and KV-cache write against their torch references.

Inputs are fresh random draws (odd sizes included); every message carries the seed and
``MINIDISAGG_TEST_SEED`` replays a run. With CUDA the kernels run on the GPU. Without it they
run under Triton's interpreter, which only works if ``TRITON_INTERPRET=1`` was in the
environment when triton was first imported. This file sets it before importing anything that
could import triton, so run alone (or first) it tests in this process. In a full run some
earlier test may already have imported triton without the interpreter (``minidisagg doctor``
does); then the cases skip here and ``test_cases_in_fresh_process`` re-runs this file in a
fresh interpreter, so CI always exercises the kernels.

Interpreter limitation: it rounds float32 -> bfloat16 by truncation, not to nearest even as
GPUs and torch do, so on CPU bfloat16 results may differ from the reference by one ulp per
rounding (the loose bfloat16 tolerance covers that; bit equality in bf16 is checked on GPU).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of triton (importing torch does not)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from minidisagg.kernels import activation, cache_write, norm, rope  # noqa: E402
from minidisagg.kernels.triton_support import use_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}  # (atol, rtol)


def why_triton_cannot_run_here() -> str | None:
    """None when the Triton kernels can run in this process; otherwise the reason."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if torch.cuda.is_available():
        return None
    import triton.language as tl

    if type(tl.sum).__name__ != "InterpretedFunction":
        return "triton was imported here before TRITON_INTERPRET=1; test_cases_in_fresh_process runs these cases"
    return None


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (or ``MINIDISAGG_TEST_SEED`` to replay one)."""
    fixed = os.environ.get("MINIDISAGG_TEST_SEED")
    return int(fixed) if fixed else random.SystemRandom().randrange(1 << 31)


@pytest.fixture
def forced_triton(monkeypatch) -> None:
    """Make the dispatch points choose Triton (on CPU: under the interpreter), or skip saying why not."""
    reason = why_triton_cannot_run_here()
    if reason:
        pytest.skip(reason)
    monkeypatch.delenv("MINIDISAGG_KERNELS", raising=False)
    monkeypatch.setenv("MINIDISAGG_TRITON_ON_CPU", "1")


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal draw from ``gen`` (on CPU, so seeds replay anywhere), moved to DEVICE."""
    return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)


def check_close(actual: torch.Tensor, expected: torch.Tensor, what: str, seed: int) -> None:
    """Compare in float64 with the tolerance of the expected dtype; the message names the check and seed."""
    atol, rtol = TOL[expected.dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, f"{what} (seed {seed})"
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=atol, rtol=rtol,
        msg=lambda m: f"{what} (seed {seed}, {expected.dtype}): {m}",
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, hidden", [(1, 576), (7, 65), (33, 1000)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_triton_matches_reference(forced_triton, seed, dtype, tokens, hidden, with_residual):
    gen = torch.Generator().manual_seed(seed)
    x = randn(gen, tokens, hidden, dtype=dtype) * 3
    weight = (1 + 0.5 * randn(gen, hidden)).to(dtype)
    residual = randn(gen, tokens, hidden, dtype=dtype) if with_residual else None
    eps = random.Random(seed).choice([1e-5, 1e-6])
    expected, expected_residual = norm.rms_norm_reference(x, weight, eps, residual)
    normed, new_residual = norm.rms_norm_triton(x, weight, eps, residual)
    check_close(normed, expected, "rms_norm_triton vs reference", seed)
    if dtype == torch.float32 or DEVICE == "cuda":  # the interpreter truncates to bf16 (see module doc)
        assert torch.equal(new_residual, expected_residual), f"new residual != x + residual (seed {seed}, {dtype})"
    check_close(new_residual, expected_residual, "rms_norm_triton new residual", seed)
    if not with_residual:
        assert new_residual is x, "without a residual the reference returns x itself"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, heads, head_dim", [(1, (9, 3), 64), (7, (4, 4), 32), (33, (8, 1), 64)])
def test_rope_triton_matches_reference_in_place_on_fused_qkv(forced_triton, seed, dtype, tokens, heads, head_dim):
    gen = torch.Generator().manual_seed(seed)
    (num_heads, num_kv_heads), max_pos = heads, 300
    theta = random.Random(seed).choice([10000.0, 100000.0, 500000.0])
    table = rope.cos_sin_cache(max_pos, head_dim, theta, None, DEVICE)
    positions = torch.randint(0, max_pos, (tokens,), generator=gen).to(DEVICE)
    qkv = randn(gen, tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype)
    q, k, _ = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, num_heads, head_dim), k.view(tokens, num_kv_heads, head_dim)  # strided views
    expected_q, expected_k = rope.apply_rope_reference(q.clone(), k.clone(), positions, table)
    out_q, out_k = rope.apply_rope_triton(q, k, positions, table)
    check_close(out_q, expected_q, "rope q", seed)
    check_close(out_k, expected_k, "rope k", seed)
    assert out_q.data_ptr() == q.data_ptr() and torch.equal(out_q, q), f"rope q not in place (seed {seed})"
    assert out_k.data_ptr() == k.data_ptr() and torch.equal(out_k, k), f"rope k not in place (seed {seed})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, ffn", [(1, 1536), (7, 100), (33, 1100)])
def test_silu_and_mul_triton_matches_reference(forced_triton, seed, dtype, tokens, ffn):
    gen = torch.Generator().manual_seed(seed)
    gate_up = randn(gen, tokens, 2 * ffn, dtype=dtype) * 3
    expected = activation.silu_and_mul_reference(gate_up)
    check_close(activation.silu_and_mul_triton(gate_up), expected, "silu_and_mul_triton vs reference", seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, num_kv_heads, head_dim, block_size", [(1, 3, 64, 16), (7, 4, 32, 5), (33, 1, 64, 5)])
def test_write_kv_triton_matches_reference(forced_triton, seed, dtype, tokens, num_kv_heads, head_dim, block_size):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = -(-tokens // block_size) + 3
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens].to(DEVICE)
    kv = randn(gen, tokens, 3, num_kv_heads, head_dim, dtype=dtype)  # k and v as strided views, like a fused QKV
    k, v = kv[:, 1], kv[:, 2]
    noise = randn(gen, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype)  # untouched slots keep it
    expected_k, expected_v = noise[0].clone(), noise[1].clone()
    cache_write.write_kv_reference(k, v, expected_k, expected_v, slots)
    k_cache, v_cache = noise[0].clone(), noise[1].clone()
    cache_write.write_kv_triton(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected_k), f"k cache differs (seed {seed}, {dtype})"
    assert torch.equal(v_cache, expected_v), f"v cache differs (seed {seed}, {dtype})"
    # a block_major pool (2 layers, this is the second): the layer's caches are strided views; both writers
    for write in (cache_write.write_kv_triton, cache_write.write_kv_reference):
        pool = noise.permute(1, 0, 2, 3, 4).unsqueeze(1).repeat(1, 2, 1, 1, 1, 1).contiguous()
        write(k, v, pool[:, 1, 0], pool[:, 1, 1], slots)
        assert torch.equal(pool[:, 1, 0], expected_k) and torch.equal(pool[:, 1, 1], expected_v), \
            f"{write.__name__} into a block_major pool (seed {seed}, {dtype})"
        assert torch.equal(pool[:, 0], noise.permute(1, 0, 2, 3, 4)), f"{write.__name__} wrote into another layer"


def test_write_kv_triton_skips_negative_slots(forced_triton, seed):
    gen = torch.Generator().manual_seed(seed)
    k, v = randn(gen, 4, 2, 32), randn(gen, 4, 2, 32)
    k_cache, v_cache = torch.zeros(3, 5, 2, 32, device=DEVICE), torch.zeros(3, 5, 2, 32, device=DEVICE)
    slots = torch.tensor([7, -1, 0, -1], device=DEVICE)  # padded tokens (as in a CUDA graph batch) carry -1
    cache_write.write_kv_triton(k, v, k_cache, v_cache, slots)
    expected_k, expected_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    cache_write.write_kv_reference(k[[0, 2]], v[[0, 2]], expected_k, expected_v, slots[[0, 2]])
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v), f"seed {seed}"


@pytest.mark.parametrize(
    "kernels_env, on_cpu_env, expect_triton_on_cpu",
    [(None, "1", True), (None, None, False), ("torch", "1", False)],
)
def test_dispatch_picks_triton_only_when_asked(monkeypatch, kernels_env, on_cpu_env, expect_triton_on_cpu):
    expect_triton = kernels_env != "torch" and (DEVICE == "cuda" or expect_triton_on_cpu)
    if expect_triton and why_triton_cannot_run_here():
        pytest.skip(why_triton_cannot_run_here())
    for name, value in [("MINIDISAGG_KERNELS", kernels_env), ("MINIDISAGG_TRITON_ON_CPU", on_cpu_env)]:
        monkeypatch.delenv(name, raising=False) if value is None else monkeypatch.setenv(name, value)
    calls: list[str] = []
    for module, name in [(norm, "rms_norm_triton"), (rope, "apply_rope_triton"),
                         (activation, "silu_and_mul_triton"), (cache_write, "write_kv_triton")]:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **kw: (calls.append(_name), _real(*a, **kw))[1])
    x = torch.randn(3, 64, device=DEVICE)
    q, k = torch.randn(3, 2, 32, device=DEVICE), torch.randn(3, 1, 32, device=DEVICE)
    norm.rms_norm(x, torch.ones(64, device=DEVICE), 1e-6, x)
    rope.apply_rope(q, k, torch.arange(3, device=DEVICE), rope.cos_sin_cache(8, 32, 10000.0, None, DEVICE))
    activation.silu_and_mul(x)
    cache_write.write_kv(k, k, torch.zeros(2, 4, 1, 32, device=DEVICE), torch.zeros(2, 4, 1, 32, device=DEVICE),
                         torch.tensor([0, 5, 2], device=DEVICE))
    assert use_triton(x) == expect_triton
    assert calls == (["rms_norm_triton", "apply_rope_triton", "silu_and_mul_triton", "write_kv_triton"] if expect_triton else [])


def test_cases_in_fresh_process():
    reason = why_triton_cannot_run_here()
    if reason is None or reason == "triton is not installed":
        pytest.skip(reason or "the cases ran in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-m", "not gpu"],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=300,
    )
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, f"cases failed in a fresh interpreter:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 30, f"the fresh process ran too few cases: {summary}"


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 257])
def test_kernels_bf16_llama8b_shapes_on_gpu(forced_triton, seed, tokens):
    """Real shapes in bf16 on the GPU: the residual and KV copy bit-exact, the rest within bf16 tolerance."""
    gen = torch.Generator().manual_seed(seed)
    hidden, heads, kv_heads, head_dim, ffn, dtype = 4096, 32, 8, 128, 14336, torch.bfloat16
    x, residual, weight = randn(gen, tokens, hidden, dtype=dtype), randn(gen, tokens, hidden, dtype=dtype), randn(gen, hidden, dtype=dtype)
    (a, ar), (b, br) = norm.rms_norm_triton(x, weight, 1e-5, residual), norm.rms_norm_reference(x, weight, 1e-5, residual)
    check_close(a, b, "rms_norm bf16 gpu", seed)
    assert torch.equal(ar, br), f"residual not bit-exact (seed {seed})"
    table = rope.cos_sin_cache(8192, head_dim, 500000.0, None, DEVICE)
    positions = torch.randint(0, 8192, (tokens,), generator=gen).to(DEVICE)
    q, k = randn(gen, tokens, heads, head_dim, dtype=dtype), randn(gen, tokens, kv_heads, head_dim, dtype=dtype)
    eq, ek = rope.apply_rope_reference(q, k, positions, table)
    oq, ok = rope.apply_rope_triton(q.clone(), k.clone(), positions, table)
    check_close(oq, eq, "rope q bf16 gpu", seed)
    check_close(ok, ek, "rope k bf16 gpu", seed)
    gate_up = randn(gen, tokens, 2 * ffn, dtype=dtype)
    check_close(activation.silu_and_mul_triton(gate_up), activation.silu_and_mul_reference(gate_up), "silu bf16 gpu", seed)
    k_cache = torch.zeros(-(-tokens // 16) + 2, 16, kv_heads, head_dim, dtype=dtype, device=DEVICE)
    slots = torch.randperm(k_cache.shape[0] * 16, generator=gen)[:tokens].to(DEVICE)
    ek_cache, ev_cache, ok_cache, ov_cache = (k_cache.clone() for _ in range(4))
    cache_write.write_kv_reference(k, q[:, :kv_heads], ek_cache, ev_cache, slots)
    cache_write.write_kv_triton(k, q[:, :kv_heads], ok_cache, ov_cache, slots)
    assert torch.equal(ok_cache, ek_cache) and torch.equal(ov_cache, ev_cache), f"kv write (seed {seed})"
