"""The native CPU kernels of the compiled decode step (``kernels/cpu_native.py``): values, errors, fallbacks."""

from __future__ import annotations

import logging

import pytest
import torch

from minidisagg.engine import compiled
from minidisagg.kernels import cpu_native

needs_gemv = pytest.mark.skipif(compiled.cxx_compiler() is None or not cpu_native.cpu_has_avx512_bf16(),
                                reason="needs a C++ compiler and a CPU with AVX512-BF16")

# (out, in): SmolLM2-135M's projections and LM head, then shapes off the kernel's 4-row / 32-column tiles
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576), (7, 37), (1, 1), (5, 64), (130, 1000)]


@pytest.fixture(scope="module")
def native_ops():
    if not cpu_native.load_cpu_ops():
        pytest.fail("the native CPU kernels did not build (see the warning above)")


@needs_gemv
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{o}x{i}" for o, i in SHAPES])
def test_gemv_bf16_matches_float64_reference(native_ops, shape, seed):
    out_features, in_features = shape
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(out_features, in_features, generator=gen) * in_features**-0.5).to(torch.bfloat16)
    x = torch.randn(in_features, generator=gen).to(torch.bfloat16)
    got = torch.ops.minidisagg_cpu.gemv_bf16(weight, x)
    assert got.dtype == torch.bfloat16 and got.shape == (out_features,)
    want = weight.double() @ x.double()
    # float32 accumulation, then one rounding to bf16 (2**-8 relative); torch.mv is held to the same bound
    bound = 2**-8 * want.abs() + 1e-6 * in_features * want.abs().max()
    assert ((got.double() - want).abs() <= bound).all(), f"seed {seed}"
    assert ((torch.mv(weight, x).double() - want).abs() <= bound).all(), f"seed {seed}"


@needs_gemv
def test_gemv_bf16_takes_strided_inputs(native_ops, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(96, 64, generator=gen).to(torch.bfloat16).t()  # a transposed view: [64, 96], not contiguous
    x = torch.randn(192, generator=gen).to(torch.bfloat16)[::2]
    want = torch.ops.minidisagg_cpu.gemv_bf16(weight.contiguous(), x.contiguous())
    assert torch.equal(torch.ops.minidisagg_cpu.gemv_bf16(weight, x), want)


@needs_gemv
@pytest.mark.parametrize("weight, x, message", [
    (torch.zeros(4, 8), torch.zeros(8), "bfloat16"),
    (torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(9, dtype=torch.bfloat16), r"weight \[out, in\]"),
    (torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(1, 8, dtype=torch.bfloat16), r"vector \[in\]"),
], ids=["float32", "in-mismatch", "row-not-vector"])
def test_gemv_bf16_rejects_bad_input(native_ops, weight, x, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.minidisagg_cpu.gemv_bf16(weight, x)


@needs_gemv
def test_native_gemv_compiles_under_ci(native_ops, monkeypatch, seed):
    """Inside the compiled graph (``CI`` set: inductor is strict about fallbacks) the op gives its eager bits."""
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("CI", "1")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 96, generator=gen).to(torch.bfloat16)
    weight = torch.randn(80, 96, generator=gen).to(torch.bfloat16)
    kernels = compiled.StepKernels(native_gemv=True)
    torch._dynamo.reset()
    with inductor_config.patch(fx_graph_cache=False):
        step = torch.compile(lambda a, w: compiled.decode_linear(a, w, kernels) * 2, fullgraph=True,
                             backend=compiled.inductor_keeping_addmv)
        got = step(x, weight)
    assert torch.equal(got, cpu_native.linear_one_row_bf16(x, weight) * 2)


def test_failed_build_keeps_torch_ops(monkeypatch, caplog):
    import torch.utils.cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("Error building extension 'minidisagg_cpu_decode'\nmore lines")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", broken)
    cpu_native.load_cpu_ops.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            assert not cpu_native.load_cpu_ops()
            assert compiled.StepKernels.best_available(torch.bfloat16) == compiled.StepKernels(False, False)
    finally:
        cpu_native.load_cpu_ops.cache_clear()
    assert "could not build the native CPU kernels (Error building extension" in caplog.text


def test_switch_keeps_torch_ops(monkeypatch):
    monkeypatch.setenv(cpu_native.DISABLE_ENV, "0")
    cpu_native.load_cpu_ops.cache_clear()
    try:
        assert not cpu_native.load_cpu_ops() and not cpu_native.gemv_bf16_available()
    finally:
        cpu_native.load_cpu_ops.cache_clear()


@needs_gemv
def test_bench_ceiling_takes_the_native_gemv_for_one_bf16_row(native_ops, seed):
    """``bench cpu``'s matmul ceiling must have the decode step's fastest kernel, or it is no ceiling."""
    from minidisagg.bench.cpu import chain_linear
    from minidisagg.kernels.linear import linear

    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(48, 64, generator=gen).to(torch.bfloat16)
    one, eight = (torch.randn(rows, 64, generator=gen).to(torch.bfloat16) for rows in (1, 8))
    fastest = chain_linear(native_gemv=True)
    assert torch.equal(fastest(one, weight), cpu_native.linear_one_row_bf16(one, weight))
    assert torch.equal(fastest(eight, weight), linear(eight, weight))
    assert chain_linear(native_gemv=False) is linear
