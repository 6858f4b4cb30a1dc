"""The C++ CPU decode step: the eager engine's bits (or, with the bf16 GEMV at one row, its logits within
bf16 tolerance), taken by default where it applies, and never where it does not."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import make_engine, run_all, token_prompts
from minidisagg.config import EngineConfig
from minidisagg.engine import native_decode
from minidisagg.engine.compiled import StepKernels
from minidisagg.engine.batch import BatchItem
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


def decode_batch(rng: random.Random, loaded, batch: int, layout: str, pool_blocks: int) -> list[BatchItem]:
    """``batch`` sequences at random positions, each with its own blocks (consecutive, or scattered over the pool)."""
    free = list(range(pool_blocks))
    rng.shuffle(free)
    items, next_run = [], 0
    for _ in range(batch):
        position = rng.randint(0, 70)
        blocks = position // 16 + 1 + rng.randint(0, 1)  # tables may run a block ahead
        if layout == "consecutive":
            table, next_run = list(range(next_run, next_run + blocks)), next_run + blocks
        else:
            table = [free.pop() for _ in range(blocks)]
        items.append(BatchItem([rng.randrange(loaded.config.vocab_size)], position, table, True))
    return items


@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("layout", ["consecutive", "scattered"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_native_step_has_the_eager_bits(dtype, layout, batch, seed):
    # the same ops as the Python layer in the same order: logits and pool bit-equal, step after step
    # (1 row: F.linear or mv; 2 rows: F.linear; 5 rows: oneDNN's packed weights, fp32 and bf16 alike)
    loaded = random_model(dtype, seed % 1000)
    rng = random.Random(seed)
    pool_blocks = batch * 6 + 8
    eager = make_engine(loaded, num_blocks=pool_blocks, native_cpu_decode=False).runner
    native = make_engine(loaded, num_blocks=pool_blocks).runner
    native.native_decode().kernels = StepKernels(native_gemv=False, native_attend=True)  # torch's mv: same bits
    calls = count_native_steps(native)
    items = decode_batch(rng, loaded, batch, layout, pool_blocks)
    prefill = [BatchItem([rng.randrange(loaded.config.vocab_size) for _ in range(it.start_pos)] or [1], 0,
                         it.block_table, False) for it in items if it.start_pos]
    for runner in (eager, native):
        if prefill:
            runner.execute(prefill)
    for step in range(4):
        want = eager.execute(items)
        got = native.execute(items)
        where = f"seed {seed}, step {step}, positions {[it.start_pos for it in items]}"
        assert torch.equal(got, want), f"{where}: max diff {(got - want).abs().max()}"
        assert torch.equal(native.kv_cache.kv, eager.kv_cache.kv), f"{where}: pools differ"
        items = [BatchItem([int(row.argmax())], it.start_pos + 1, it.block_table, True) for it, row in zip(items, want)
                 if (it.start_pos + 1) // 16 < len(it.block_table)]
        if not items:
            break
    assert calls[0] == step + 1, "decode steps did not go through the native step"


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
    # decode steps go native, alone or batched; prefills stay in Python; tokens equal the Python engine's
    prompts = token_prompts(seed, 3)
    want = one_by_one(make_engine(tiny_loaded, native_cpu_decode=False), prompts)
    engine = make_engine(tiny_loaded)
    calls = count_native_steps(engine.runner)
    assert one_by_one(engine, prompts) == want, f"seed {seed}"
    assert calls[0] == len(prompts) * (GREEDY.max_tokens - 1)
    calls[0] = 0
    ids = [engine.add_request(p, GREEDY) for p in prompts]  # all three at once: batched decode steps
    outs = run_all(engine)
    assert [outs[i].token_ids for i in ids] == want, f"seed {seed}"
    assert GREEDY.max_tokens - 1 <= calls[0] < len(prompts) * (GREEDY.max_tokens - 1)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


@pytest.mark.parametrize("case", ["switched off", "batch invariant", "block_major pool", "torch kernels",
                                  "triton on cpu", "no build", "layer hook"])
def test_python_step_where_the_native_one_does_not_apply(tiny_loaded, monkeypatch, case):
    overrides = {"switched off": {"native_cpu_decode": False}, "batch invariant": {"batch_invariant": True},
                 "block_major pool": {"layout": "block_major"}}.get(case, {})
    if case == "torch kernels":
        monkeypatch.setenv("MINIDISAGG_KERNELS", "torch")
    if case == "triton on cpu":  # the dispatch points ask for Triton's kernels (tests run them interpreted)
        monkeypatch.setattr(native_decode, "use_triton", lambda t: True)
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


def test_decode_step_refuses_bad_inputs(tiny_loaded):
    native = make_engine(tiny_loaded).runner.native_decode()
    weights, cfg = native.weights, tiny_loaded.config
    shape = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps, cfg.head_dim**-0.5, 0)

    def step(weights, packed, lens):
        ids = torch.tensor([7, 8])
        return torch.ops.minidisagg_cpu.decode_step(weights, packed, native.kv_cache.kv, tiny_loaded.model.cos_sin,
                                                    ids, ids, ids, torch.tensor([[0], [1]]), lens, -1, *shape)

    with pytest.raises(RuntimeError, match="decode_step takes 3 \\+ 6 weights per layer"):
        step(weights[:-1], weights[:-1], torch.tensor([8, 9]))
    with pytest.raises(RuntimeError, match="as many packed weights as weights"):
        step(weights, weights[:-1], torch.tensor([8, 9]))
    with pytest.raises(RuntimeError, match="one position, slot, block table row and context length per token"):
        step(weights, weights, torch.tensor([8]))


def test_packed_weights_that_fail_fall_back_to_plain_products(tiny_loaded, monkeypatch, caplog, seed):
    # an unusual build or CPU where oneDNN's packed weights fail: the step reruns on F.linear, for good
    from minidisagg.kernels import linear as linear_module

    monkeypatch.setitem(linear_module._packing, "enabled", None)
    rng = random.Random(seed)
    items = [BatchItem([rng.randrange(1000)], 0, [i], True) for i in range(4)]  # 4 fp32 rows: packed
    native = make_engine(tiny_loaded, num_blocks=8).runner
    eager = make_engine(tiny_loaded, num_blocks=8, native_cpu_decode=False).runner
    assert native.native_decode().linear_kind(4) == "packed"

    def broken(weight):
        raise RuntimeError("oneDNN exploded")

    monkeypatch.setattr(native_decode, "packed_weight", broken)
    got = native.execute(items)
    assert "oneDNN exploded" in caplog.text
    assert native.native_decode().linear_kind(4) == "plain"
    assert torch.equal(got, eager.execute(items)), f"seed {seed}"  # eager now on plain F.linear too
    assert torch.equal(native.kv_cache.kv, eager.kv_cache.kv), f"seed {seed}"
