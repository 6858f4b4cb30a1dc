"""``compile_cpu``: the compiled batch-1 CPU decode step, traced from the model's own code, gives the eager
engine's greedy tokens (and follows a changed model), or stays eager."""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from conftest import make_engine, run_all, token_prompts
from minidisagg.config import EngineConfig
from minidisagg.engine import compiled
from minidisagg.engine.batch import BatchItem
from minidisagg.engine.sampling import SamplingParams
from minidisagg.kernels.linear import linear_in_graph

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def generate_one_by_one(engine, prompts: list[dict]) -> list[list[int]]:
    """Greedy tokens of each prompt, run alone (so every decode step is a batch of one)."""
    outputs = []
    for prompt in prompts:
        request_id = engine.add_request(prompt, GREEDY)
        outputs.append(run_all(engine)[request_id].token_ids)
    return outputs


def count_compiled_steps(runner) -> list[int]:
    """Wrap the runner's compiled step so each call that returns logits is counted; returns the counter."""
    calls = [0]
    run = runner.compiled_decode.run

    def counted(*args):
        logits = run(*args)
        calls[0] += logits is not None
        return logits

    runner.compiled_decode.run = counted
    return calls


COMPILED_LAYERS = 4  # compiling all 30 layers costs ~35-50 s here; every layer is the same code


def first_layers(dtype: str):
    """SmolLM2-135M's real weights on CPU in ``dtype``, cut to its first ``COMPILED_LAYERS`` layers."""
    from minidisagg.models.registry import load_model

    loaded = load_model("smollm2-135m", device="cpu", dtype=dtype)
    config = dataclasses.replace(loaded.config, num_layers=COMPILED_LAYERS)
    loaded.model.layers = loaded.model.layers[:COMPILED_LAYERS]
    loaded.model.cfg = loaded.config = config
    return loaded


@pytest.fixture(scope="module")
def smollm2_fp32_cut(smollm2_gguf):
    """``first_layers`` in float32."""
    return first_layers("float32")


@pytest.fixture(scope="module")
def smollm2_bf16(smollm2_gguf):
    """``first_layers`` in bfloat16."""
    return first_layers("bfloat16")


def decode_logits(runner, prompt_ids: list[int], num_steps: int,
                  forced_ids: Optional[list[int]] = None) -> tuple[list[torch.Tensor], list[int]]:
    """Logits of the prefill and of ``num_steps`` decode steps, each fed ``forced_ids`` or else the last argmax."""
    block_size = runner.kv_cache.block_size
    table = list(range(-(-(len(prompt_ids) + num_steps) // block_size)))  # blocks 0, 1, ... of the runner's pool
    logits, tokens = [runner.execute([BatchItem(prompt_ids, 0, table, True)])[0]], []
    for step in range(num_steps):
        tokens.append(forced_ids[step] if forced_ids is not None else int(logits[-1].argmax()))
        logits.append(runner.execute([BatchItem([tokens[-1]], len(prompt_ids) + step, table, True)])[0])
    return logits, tokens


@pytest.mark.skipif(compiled.cxx_compiler() is None, reason="needs a C++ compiler")
def test_compiled_greedy_equals_eager_real_weights(smollm2_fp32_cut, module_seed):
    prompts = token_prompts(module_seed, 2, lo=5, hi=40)
    eager = generate_one_by_one(make_engine(smollm2_fp32_cut, max_model_len=256), prompts)
    engine = make_engine(smollm2_fp32_cut, max_model_len=256)
    engine.runner.enable_compiled_cpu_decode()
    calls = count_compiled_steps(engine.runner)
    assert generate_one_by_one(engine, prompts) == eager, f"seed {module_seed}"
    assert calls[0] == 2 * (GREEDY.max_tokens - 1), "decode steps did not go through the compiled graph"


BF16_LOGIT_REL_TOL = 0.05  # of the largest logit: fused reductions add in another order (measured up to 0.03)
BF16_GREEDY_PREFIX = 4  # greedy tokens that must equal eager's (over 64 tokens they can part after ~10)


@pytest.mark.skipif(compiled.cxx_compiler() is None, reason="needs a C++ compiler")
def test_compiled_bf16_close_to_eager_real_weights(smollm2_bf16, module_seed):
    prompt_ids = token_prompts(module_seed, 1, lo=5, hi=40)[0]["prompt_token_ids"]
    want, forced = decode_logits(make_engine(smollm2_bf16, max_model_len=256).runner, prompt_ids, 8)
    engine = make_engine(smollm2_bf16, max_model_len=256)
    engine.runner.enable_compiled_cpu_decode()
    calls = count_compiled_steps(engine.runner)
    got, _ = decode_logits(engine.runner, prompt_ids, 8, forced)
    assert calls[0] == len(forced), "decode steps did not go through the compiled graph"
    for step, (w, g) in enumerate(zip(want, got)):
        assert (w - g).abs().max() <= BF16_LOGIT_REL_TOL * w.abs().max(), f"seed {module_seed}, step {step}"

    prompts = token_prompts(module_seed, 2, lo=5, hi=40)
    eager_tokens = generate_one_by_one(make_engine(smollm2_bf16, max_model_len=256), prompts)
    calls[0] = 0
    compiled_tokens = generate_one_by_one(engine, prompts)
    assert calls[0] == 2 * (GREEDY.max_tokens - 1), "decode steps did not go through the compiled graph"
    for want_ids, got_ids in zip(eager_tokens, compiled_tokens):
        assert got_ids[:BF16_GREEDY_PREFIX] == want_ids[:BF16_GREEDY_PREFIX], f"seed {module_seed}"


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_compile_cpu_must_be_bool(value):
    with pytest.raises(ValueError, match="compile_cpu must be True or False"):
        EngineConfig(compile_cpu=value)


def test_no_compiler_stays_eager(tiny_loaded, monkeypatch, caplog):
    monkeypatch.setattr(compiled, "cxx_compiler", lambda: None)
    prompts = token_prompts(3, 2)
    eager = generate_one_by_one(make_engine(tiny_loaded), prompts)
    engine = make_engine(tiny_loaded)
    with caplog.at_level(logging.WARNING):
        engine.runner.enable_compiled_cpu_decode()
    assert engine.runner.compiled_decode is None
    assert "needs a C++ compiler" in caplog.text
    assert generate_one_by_one(engine, prompts) == eager


def test_failed_compile_falls_back_to_eager(tiny_loaded, monkeypatch, caplog):
    def broken(*inputs):
        raise RuntimeError("compiler exploded")

    prompts = token_prompts(4, 2)
    eager = generate_one_by_one(make_engine(tiny_loaded), prompts)
    engine = make_engine(tiny_loaded)
    engine.runner.enable_compiled_cpu_decode()
    if engine.runner.compiled_decode is None:
        pytest.skip("no C++ compiler: the fallback is the other test's")
    monkeypatch.setattr(engine.runner.compiled_decode, "_step", broken)
    with caplog.at_level(logging.WARNING):
        assert generate_one_by_one(engine, prompts) == eager
    assert engine.runner.compiled_decode.failed
    assert "compiler exploded" in caplog.text and "decoding eagerly" in caplog.text


@pytest.mark.skipif(compiled.cxx_compiler() is None, reason="needs a C++ compiler")
def test_compiled_step_follows_a_changed_model(tiny_loaded, monkeypatch, seed):
    """The graph is traced from ``LlamaLayer``'s own methods: a patched MLP shows in the compiled tokens too."""
    from minidisagg.models import llama

    prompts = token_prompts(seed, 2)
    stock = generate_one_by_one(make_engine(tiny_loaded), prompts)
    stock_mlp = llama.LlamaLayer.mlp
    monkeypatch.setattr(llama.LlamaLayer, "mlp", lambda self, x, inv=False: stock_mlp(self, x, inv) * -3.0)
    eager = generate_one_by_one(make_engine(tiny_loaded), prompts)
    engine = make_engine(tiny_loaded)
    engine.runner.enable_compiled_cpu_decode()
    calls = count_compiled_steps(engine.runner)
    assert generate_one_by_one(engine, prompts) == eager, f"seed {seed}"
    assert calls[0] == 2 * (GREEDY.max_tokens - 1), "decode steps did not go through the compiled graph"
    assert eager != stock, f"seed {seed}: the patch changed nothing"


@pytest.mark.skipif(compiled.cxx_compiler() is None, reason="needs a C++ compiler")
def test_addmv_backend_compiles_under_ci_and_keeps_eager_bits(monkeypatch):
    """The kept-whole ``addmv`` (one bf16 row where the native GEMV does not run) compiles with ``CI`` set
    (inductor is strict about fallbacks there), with eager's bits."""
    import torch._inductor.config as inductor_config

    from minidisagg.kernels import cpu_native

    monkeypatch.setenv("CI", "1")
    monkeypatch.setitem(cpu_native._LOADED, "gemv", False)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    x = torch.randn(1, 96, generator=gen).to(torch.bfloat16)
    weight = torch.randn(80, 96, generator=gen).to(torch.bfloat16)
    torch._dynamo.reset()
    with inductor_config.patch(fx_graph_cache=False):
        step = torch.compile(lambda a, w: linear_in_graph(a, w) * 2, fullgraph=True,
                             backend=compiled.inductor_keeping_addmv)
        got = step(x, weight)
    assert torch.equal(got, F.linear(x, weight) * 2)


def test_block_major_pool_stays_eager(tiny_loaded, caplog):
    """The compiled step writes a layer's pages in place, which it does only in a layer_major pool: block_major says so."""
    prompts = token_prompts(5, 2)
    eager = generate_one_by_one(make_engine(tiny_loaded), prompts)
    engine = make_engine(tiny_loaded, layout="block_major")
    with caplog.at_level(logging.WARNING):
        engine.runner.enable_compiled_cpu_decode()
    assert engine.runner.compiled_decode is None and "layer_major" in caplog.text
    assert generate_one_by_one(engine, prompts) == eager
