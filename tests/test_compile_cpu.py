"""``compile_cpu``: the compiled batch-1 CPU decode step gives the eager engine's greedy tokens, or stays eager."""

from __future__ import annotations

import logging

import pytest

from conftest import make_engine, run_all, token_prompts
from minidisagg.config import EngineConfig
from minidisagg.engine import compiled
from minidisagg.engine.sampling import SamplingParams

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


@pytest.mark.skipif(compiled.cxx_compiler() is None, reason="needs a C++ compiler")
def test_compiled_greedy_equals_eager_real_model(smollm2_loaded, module_seed):
    prompts = token_prompts(module_seed, 2, lo=5, hi=40)
    eager = generate_one_by_one(make_engine(smollm2_loaded, max_model_len=256), prompts)
    engine = make_engine(smollm2_loaded, max_model_len=256)
    engine.runner.enable_compiled_cpu_decode()
    calls = count_compiled_steps(engine.runner)
    assert generate_one_by_one(engine, prompts) == eager, f"seed {module_seed}"
    assert calls[0] == 2 * (GREEDY.max_tokens - 1), "decode steps did not go through the compiled graph"


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
