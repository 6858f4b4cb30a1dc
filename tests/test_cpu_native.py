"""The native CPU kernels (``kernels/cpu_native.py``): each op is its torch reference's bits, the dispatch
points call them by default on a CPU, the GEMV's values, errors and fallbacks."""

from __future__ import annotations

import logging
import random

import pytest
import torch

from minidisagg.engine import compiled
from minidisagg.kernels import cpu_native
from minidisagg.kernels.activation import silu_and_mul_reference
from minidisagg.kernels.attention import AttentionMetadata, decode_attention_reference
from minidisagg.kernels.linear import linear_in_graph
from minidisagg.kernels.norm import rms_norm_reference
from minidisagg.kernels.rope import cos_sin_cache
from minidisagg.kernels.rope_cache import rope_and_write_kv_reference

DTYPES = [torch.float32, torch.bfloat16]
OPS = torch.ops.minidisagg_cpu

# (out, in): SmolLM2-135M's projections and LM head, then shapes off the kernel's 4-row / 32-column tiles
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576), (7, 37), (1, 1), (5, 64), (130, 1000)]


@pytest.fixture(scope="module")
def native_ops():
    if compiled.cxx_compiler() is None:
        pytest.skip("needs a C++ compiler")
    if not cpu_native.load_cpu_ops():
        pytest.fail("the native CPU kernels did not build (see the warning above)")


def paged_pool(gen: torch.Generator, layout: str, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
               dtype: torch.dtype) -> torch.Tensor:
    """A noisy two-layer pool ``kv`` [2, 2, blocks, block_size, KH, D] in ``layout`` (as ``PagedKVCache`` holds it)."""
    noise = torch.randn(num_blocks, 2, 2, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    if layout == "block_major":
        return noise.permute(1, 2, 0, 3, 4, 5)
    return noise.permute(1, 2, 0, 3, 4, 5).contiguous()


# --------------------------------------------------------------------------- each op is its reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_ops_equal_the_reference(native_ops, dtype, with_residual, seed):
    gen = torch.Generator().manual_seed(seed)
    rows, hidden = 1 + seed % 9, 8 + seed % 600
    x = torch.randn(rows, hidden, generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    residual = torch.randn(rows, hidden, generator=gen).to(dtype) if with_residual else None
    want = rms_norm_reference(x, weight, 1e-5, residual)
    got = (OPS.add_rms_norm(x, residual, weight, 1e-5) if with_residual else (OPS.rms_norm(x, weight, 1e-5), x))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"seed {seed}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_op_equals_the_reference(native_ops, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(1 + seed % 7, 2 * (1 + seed % 800), generator=gen).to(dtype) * 3
    assert torch.equal(OPS.silu_and_mul(gate_up), silu_and_mul_reference(gate_up)), f"seed {seed}"


@pytest.mark.parametrize("layout", ["layer_major", "block_major"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_and_kv_write_ops_equal_the_reference(native_ops, dtype, layout, seed):
    # q, k, v are views of one fused projection, as in the model; every token lands in its slot
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    heads, kv_heads, head_dim, block_size, num_blocks = 9, 3, 64, rng.choice([4, 16]), 12
    tokens = rng.randint(1, 20)
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, generator=gen).to(dtype)
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
    positions = torch.tensor(sorted(rng.sample(range(500), tokens)))
    slots = torch.tensor(rng.sample(range(num_blocks * block_size), tokens))
    cos_sin = cos_sin_cache(512, head_dim, 100000.0, None, "cpu")
    want_kv = paged_pool(gen, layout, num_blocks, block_size, kv_heads, head_dim, dtype)
    got_kv, write_kv = want_kv.clone(), want_kv.clone()
    want_q, want_k = rope_and_write_kv_reference(q, k, v, positions, cos_sin, want_kv[1, 0], want_kv[1, 1], slots)
    rotated = OPS.rope_and_write_kv(q, k, v, positions, cos_sin, got_kv[1, 0], got_kv[1, 1], slots)
    assert torch.equal(rotated[:, :heads], want_q) and torch.equal(rotated[:, heads:], want_k), f"seed {seed}"
    assert torch.equal(got_kv, want_kv), f"seed {seed}: the pools differ"
    OPS.write_kv(want_k, v, write_kv[1, 0], write_kv[1, 1], slots)  # the write alone (compiled graphs call it)
    assert torch.equal(write_kv, want_kv), f"seed {seed}: write_kv differs"


@pytest.mark.parametrize("layout", ["layer_major", "block_major"])
@pytest.mark.parametrize("blocks", ["consecutive", "scattered"])
@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_op_matches_the_reference(native_ops, dtype, batch, blocks, layout, seed):
    # the op reads each sequence's pages in place through its table; the reference gathers (or slices) them
    # and masks where lengths differ: the same math, summed in another order
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    heads, kv_heads, head_dim, block_size = rng.choice([(9, 3, 64), (4, 4, 32), (8, 1, 32)]) + (rng.choice([5, 16]),)
    lens = [rng.randint(1, 70) for _ in range(batch)]
    needed = [-(-n // block_size) + rng.randint(0, 1) for n in lens]  # tables may run a block ahead
    num_blocks = sum(needed) + 4
    order = list(range(num_blocks)) if blocks == "consecutive" else rng.sample(range(num_blocks), num_blocks)
    tables, start = [], rng.randint(0, 3) if blocks == "consecutive" else 0
    for n in needed:
        tables.append(order[start : start + n])
        start += n
    width = max(needed)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    kv = paged_pool(gen, layout, num_blocks + 4, block_size, kv_heads, head_dim, dtype)
    q = torch.randn(batch, heads, head_dim, generator=gen).to(dtype)
    meta = AttentionMetadata(list(range(batch)), [1] * batch, lens, block_tables, torch.tensor(lens),
                             torch.zeros(batch, dtype=torch.long))
    want = decode_attention_reference(q, kv[0, 0], kv[0, 1], meta, head_dim**-0.5)
    got = OPS.decode_attention(q, kv[0, 0], kv[0, 1], block_tables, torch.tensor(lens), head_dim**-0.5)
    exact = torch.stack([float64_attention(q[b], kv[0, 0], kv[0, 1], tables[b], n, head_dim**-0.5)
                         for b, n in enumerate(lens)])
    where = f"seed {seed}, lens {lens}, tables {tables}"
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(got.double(), exact, **tol, msg=lambda m: f"{where}: against float64: {m}")
    torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{where}: against the reference: {m}")


def float64_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: list[int], length: int,
                      scale: float) -> torch.Tensor:
    """One sequence's decode attention [H, D] in float64, its keys read token by token through ``table``."""
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    slots = [(table[t // block_size], t % block_size) for t in range(length)]
    keys = torch.stack([k_cache[b, o] for b, o in slots]).double()  # [L, KH, D]
    values = torch.stack([v_cache[b, o] for b, o in slots]).double()
    group = q.shape[0] // kv_heads
    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    probs = torch.softmax(torch.einsum("hd,lhd->hl", q.double(), keys) * scale, dim=-1)
    return torch.einsum("hl,lhd->hd", probs, values)


def test_decode_attention_op_refuses_a_short_block_table(native_ops):
    kv = torch.zeros(4, 4, 1, 8)
    with pytest.raises(RuntimeError, match="needs 3 blocks; the block table has 2"):
        OPS.decode_attention(torch.zeros(1, 2, 8), kv, kv, torch.tensor([[0, 1]]), torch.tensor([9]), 1.0)


MODEL_LOGIT_TOL = {torch.float32: 1e-4, torch.bfloat16: 0.05}  # of the largest logit


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_on_native_ops_matches_the_model_on_torch_references(native_ops, monkeypatch, dtype, seed):
    # prefill and decode of a random model with the native ops and with MINIDISAGG_KERNELS=torch: the same
    # math (the decode attention and the one-row GEMV sum in another order; every other op is bit-equal)
    from conftest import make_engine
    from minidisagg.engine.batch import BatchItem
    from minidisagg.models.registry import load_model

    loaded = load_model("tiny", device="cpu", dtype=dtype, seed=seed % 1000, random_weights=True)
    rng = random.Random(seed)
    prompts = [[rng.randrange(loaded.config.vocab_size) for _ in range(rng.randint(1, 40))] for _ in range(3)]
    tables = [[4 * i + b for b in range(4)] for i in range(3)]
    forced = [[rng.randrange(loaded.config.vocab_size) for _ in prompts] for _ in range(3)]  # teacher forcing
    runs = {}
    for kernels in ("native", "torch"):
        if kernels == "torch":
            monkeypatch.setenv("MINIDISAGG_KERNELS", "torch")
        runner = make_engine(loaded, num_blocks=16).runner
        logits = [runner.execute([BatchItem(p, 0, t, True) for p, t in zip(prompts, tables)])]
        for step in range(3):  # batched decode, then one sequence alone
            items = [BatchItem([token], len(p) + step, t, True) for p, t, token in zip(prompts, tables, forced[step])]
            logits.append(runner.execute(items if step < 2 else items[:1]))
        runs[kernels] = (logits, runner.kv_cache.kv)
    for step, (got, want) in enumerate(zip(runs["native"][0], runs["torch"][0])):
        bound = MODEL_LOGIT_TOL[dtype] * want.abs().max()
        assert (got - want).abs().max() <= bound, f"seed {seed}, step {step}: max diff {(got - want).abs().max()}"
    assert torch.equal(runs["native"][0][0], runs["torch"][0][0]), f"seed {seed}: the prefill differs"


# --------------------------------------------------------------------------- the GEMV


def needs_gemv(dtype: torch.dtype) -> None:
    """Skip unless the native GEMV runs ``dtype`` here."""
    if compiled.cxx_compiler() is None or not cpu_native.gemv_available(dtype):
        pytest.skip(f"the native GEMV does not run {dtype} here (needs a C++ compiler and AVX512F / AVX512-BF16)")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{o}x{i}" for o, i in SHAPES])
def test_gemv_matches_float64_reference(native_ops, shape, dtype, seed):
    needs_gemv(dtype)
    out_features, in_features = shape
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(out_features, in_features, generator=gen) * in_features**-0.5).to(dtype)
    x = torch.randn(in_features, generator=gen).to(dtype)
    got = OPS.gemv(weight, x)
    assert got.dtype == dtype and got.shape == (out_features,)
    want = weight.double() @ x.double()
    # float32 accumulation, then one rounding to the dtype; torch.mv is held to the same bound
    ulp = 2**-8 if dtype == torch.bfloat16 else 2**-23
    bound = ulp * want.abs() + 1e-6 * in_features * want.abs().max()
    assert ((got.double() - want).abs() <= bound).all(), f"seed {seed}"
    assert ((torch.mv(weight, x).double() - want).abs() <= bound).all(), f"seed {seed}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_takes_strided_inputs(native_ops, dtype, seed):
    needs_gemv(dtype)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(96, 64, generator=gen).to(dtype).t()  # a transposed view: [64, 96], not contiguous
    x = torch.randn(192, generator=gen).to(dtype)[::2]
    want = OPS.gemv(weight.contiguous(), x.contiguous())
    assert torch.equal(OPS.gemv(weight, x), want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_takes_the_gemv_for_one_row(native_ops, dtype, seed):
    from minidisagg.kernels.linear import cpu_linear_kind, linear

    needs_gemv(dtype)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(40, 64, generator=gen).to(dtype)
    x = torch.randn(1, 64, generator=gen).to(dtype)
    assert cpu_linear_kind(1, dtype) == "native_gemv" and cpu_linear_kind(2, dtype) != "native_gemv"
    assert torch.equal(linear(x, weight), cpu_native.linear_one_row(x, weight))


@pytest.mark.parametrize("weight, x, message", [
    (torch.zeros(4, 8, dtype=torch.float16), torch.zeros(8, dtype=torch.float16), "float32 or bfloat16"),
    (torch.zeros(4, 8), torch.zeros(8, dtype=torch.bfloat16), "of one dtype"),
    (torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(9, dtype=torch.bfloat16), r"weight \[out, in\]"),
    (torch.zeros(4, 8), torch.zeros(1, 8), r"vector \[in\]"),
], ids=["float16", "mixed", "in-mismatch", "row-not-vector"])
def test_gemv_rejects_bad_input(native_ops, weight, x, message):
    with pytest.raises(RuntimeError, match=message):
        OPS.gemv(weight, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_native_gemv_compiles_under_ci(native_ops, monkeypatch, dtype, seed):
    """Inside a compiled graph (``CI`` set: inductor is strict about fallbacks) the op gives its eager bits."""
    import torch._inductor.config as inductor_config

    needs_gemv(dtype)
    monkeypatch.setenv("CI", "1")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 96, generator=gen).to(dtype)
    weight = torch.randn(80, 96, generator=gen).to(dtype)
    torch._dynamo.reset()
    with inductor_config.patch(fx_graph_cache=False):
        step = torch.compile(lambda a, w: linear_in_graph(a, w) * 2, fullgraph=True,
                             backend=compiled.inductor_keeping_addmv)
        got = step(x, weight)
    assert torch.equal(got, cpu_native.linear_one_row(x, weight) * 2)


# --------------------------------------------------------------------------- builds, switches, fallbacks


def test_failed_build_keeps_torch_ops(monkeypatch, caplog):
    import torch.utils.cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("Error building extension 'minidisagg_cpu_ops'\nmore lines")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", broken)
    cpu_native.load_cpu_ops.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            assert not cpu_native.load_cpu_ops()
            assert not cpu_native.use_cpu_native(torch.zeros(1))
    finally:
        cpu_native.load_cpu_ops.cache_clear()
    assert "could not build the native CPU kernels (Error building extension" in caplog.text


def test_switches_keep_torch_ops(monkeypatch):
    monkeypatch.setenv(cpu_native.DISABLE_ENV, "0")
    cpu_native.load_cpu_ops.cache_clear()
    try:
        assert not cpu_native.load_cpu_ops() and not cpu_native.gemv_available(torch.bfloat16)
    finally:
        cpu_native.load_cpu_ops.cache_clear()
    monkeypatch.delenv(cpu_native.DISABLE_ENV)
    monkeypatch.setenv("MINIDISAGG_KERNELS", "torch")
    assert not cpu_native.use_cpu_native(torch.zeros(1)) and not cpu_native.gemv_available(torch.float32)


def test_bench_ceiling_takes_the_models_products(native_ops, monkeypatch, seed):
    """``bench cpu``'s matmul ceiling runs the engine's own ``linear``, whatever kernel that picks, or it is no ceiling."""
    from minidisagg.bench import cpu as bench_cpu

    calls = []
    monkeypatch.setattr(bench_cpu, "linear", lambda x, w: calls.append(x.shape[0]) or x.new_zeros(x.shape[0], w.shape[0]))
    bench_cpu.ceiling_generator("ceiling", torch.float32).run(2, 1)
    assert calls and set(calls) == {2}
