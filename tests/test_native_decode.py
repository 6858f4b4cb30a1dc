"""The C++ batch-1 CPU decode step: the eager engine's bits (or, with the bf16 GEMV, its logits within
bf16 tolerance), taken by default where it applies, and never where it does not."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import make_engine, run_all, token_prompts
from minidisagg.config import EngineConfig
from minidisagg.engine import native_decode
from minidisagg.engine.compiled import StepKernels
from minidisagg.engine.runner import BatchItem
from minidisagg.engine.sampling import SamplingParams
from minidisagg.kernels import cpu_native

pytestmark = pytest.mark.skipif(not cpu_native.load_cpu_ops(), reason="the native CPU ops do not build here")
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def random_model(dtype: str, seed: int):
    """The ``tiny`` preset with fresh random weights (GQA, tied embeddings) in ``dtype``."""
    from minidisagg.models.registry import load_model

    return load_model("tiny", device="cpu", dtype=dtype, seed=seed, random_weights=True)


def count_native_steps(runner) -> list[int]:
    """Wrap the runner's native step so its calls are counted; returns the counter."""
    native = runner.native_decode()
    assert native is not None, "the native step did not set up"
    calls, run = [0], native.run

    def counted(*args):
        calls[0] += 1
        return run(*args)

    native.run = counted
    return calls


def one_by_one(engine, prompts: list[dict]) -> list[list[int]]:
    """Greedy tokens of each prompt, run alone (so every decode step is a batch of one)."""
    outputs = []
    for prompt in prompts:
        request_id = engine.add_request(prompt, GREEDY)
        outputs.append(run_all(engine)[request_id].token_ids)
    return outputs


def scattered_table(rng: random.Random, num_blocks: int, pool_blocks: int) -> list[int]:
    """``num_blocks`` distinct blocks of the pool in random order (rarely consecutive)."""
    return rng.sample(range(pool_blocks), num_blocks)


@pytest.mark.parametrize("layout", ["consecutive", "scattered"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_native_step_has_the_eager_bits(dtype, layout, seed):
    # the same ops as the Python layer in the same order: logits and pool bit-equal, step by step
    loaded = random_model(dtype, seed % 1000)
    rng = random.Random(seed)
    prompt = [rng.randrange(loaded.config.vocab_size) for _ in range(rng.randint(1, 40))]
    steps = 20
    eager = make_engine(loaded, num_blocks=16, native_cpu_decode=False).runner
    native = make_engine(loaded, num_blocks=16).runner
    native.native_decode().kernels = StepKernels(native_gemv=False, native_attend=True)  # torch's GEMV: same bits
    calls = count_native_steps(native)
    blocks = -(-(len(prompt) + steps) // eager.kv_cache.block_size)
    table = list(range(blocks)) if layout == "consecutive" else scattered_table(rng, blocks, 16)
    tokens = prompt
    for step in range(steps + 1):
        start = 0 if step == 0 else len(prompt) + step - 1
        want = eager.execute([BatchItem(tokens, start, table, True)])
        got = native.execute([BatchItem(tokens, start, table, True)])
        assert torch.equal(got, want), f"seed {seed}, step {step}: max diff {(got - want).abs().max()}"
        assert torch.equal(native.kv_cache.kv, eager.kv_cache.kv), f"seed {seed}, step {step}: pools differ"
        tokens = [int(want[0].argmax())]
    assert calls[0] == steps, "decode steps did not go through the native step"


BF16_LOGIT_REL_TOL = 0.05  # of the largest logit: the GEMV adds in another order than torch's mv


def test_native_step_with_bf16_gemv_close_to_eager(seed):
    if not cpu_native.gemv_bf16_available():
        pytest.skip("this CPU has no AVX512-BF16: the step keeps torch's products")
    loaded = random_model("bfloat16", seed % 1000)
    rng = random.Random(seed)
    prompt = [rng.randrange(loaded.config.vocab_size) for _ in range(rng.randint(1, 40))]
    eager = make_engine(loaded, native_cpu_decode=False).runner
    native = make_engine(loaded).runner
    assert native.native_decode().kernels.native_gemv
    table = list(range(4))
    tokens = prompt
    for step in range(9):
        start = 0 if step == 0 else len(prompt) + step - 1
        want = eager.execute([BatchItem(tokens, start, table, True)])
        got = native.execute([BatchItem(tokens, start, table, True)])
        assert (got - want).abs().max() <= BF16_LOGIT_REL_TOL * want.abs().max(), f"seed {seed}, step {step}"
        tokens = [int(want[0].argmax())]  # both fed the eager token (teacher forcing)


def test_engine_takes_the_native_step_by_default(tiny_loaded, seed):
    # batch-1 decodes go native; batched decodes and prefills stay in Python; tokens equal the Python engine's
    prompts = token_prompts(seed, 3)
    python_engine = make_engine(tiny_loaded, native_cpu_decode=False)
    want = one_by_one(python_engine, prompts)
    engine = make_engine(tiny_loaded)
    calls = count_native_steps(engine.runner)
    got = one_by_one(engine, prompts)
    assert got == want, f"seed {seed}"
    assert calls[0] == len(prompts) * (GREEDY.max_tokens - 1)
    calls[0] = 0
    ids = [engine.add_request(p, GREEDY) for p in prompts]  # all three at once: batched decode steps
    outs = run_all(engine)
    assert [outs[i].token_ids for i in ids] == want, f"seed {seed}"
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


@pytest.mark.parametrize("case", ["switched off", "batch invariant", "block_major pool", "torch kernels",
                                  "no build", "layer hook"])
def test_python_step_where_the_native_one_does_not_apply(tiny_loaded, monkeypatch, case):
    overrides = {"switched off": {"native_cpu_decode": False}, "batch invariant": {"batch_invariant": True},
                 "block_major pool": {"layout": "block_major"}}.get(case, {})
    if case == "torch kernels":
        monkeypatch.setenv("MINIDISAGG_KERNELS", "torch")
    if case == "no build":
        monkeypatch.setattr(cpu_native, "load_cpu_ops", lambda: False)
    engine = make_engine(tiny_loaded, **overrides)
    if case == "layer hook":
        engine.runner.layer_hook = lambda layer: None
    ran = []
    monkeypatch.setattr(native_decode.NativeCpuDecode, "run", lambda *args: ran.append(args))
    request_id = engine.add_request(token_prompts(5, 1)[0], GREEDY)
    assert len(run_all(engine)[request_id].token_ids) == GREEDY.max_tokens
    assert not ran, f"{case}: the native step ran"
    if case != "layer hook":
        assert engine.runner.native_decode() is None


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_native_cpu_decode_must_be_bool(value):
    with pytest.raises(ValueError, match="native_cpu_decode must be True or False"):
        EngineConfig(native_cpu_decode=value)


def test_decode_step_refuses_a_short_weight_list(tiny_loaded):
    runner = make_engine(tiny_loaded).runner
    native = runner.native_decode()
    native.weights = native.weights[:-1]
    with pytest.raises(RuntimeError, match="decode_step takes 3 \\+ 6 weights per layer"):
        native.run(7, 0, [0])
