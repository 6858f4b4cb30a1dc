"""The opt-in C++ decode step (``minidisagg/accel``): the model's bits, taken only when asked and where it
applies, and refused, with a log line, for a model that is not the stock one."""

from __future__ import annotations

import logging
import random

import pytest
import torch

from conftest import make_engine, run_all, token_prompts
from minidisagg.accel import native_decode, stock
from minidisagg.config import EngineConfig
from minidisagg.engine.batch import BatchItem
from minidisagg.engine.sampling import SamplingParams
from minidisagg.models import llama

pytestmark = pytest.mark.skipif(not native_decode.load_decode_step(), reason="the C++ decode step does not build here")
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
ACCEL = {"native_cpu_decode": True}


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
def test_native_step_has_the_models_bits(dtype, layout, batch, seed):
    # the model's kernels in the model's order: logits and pool bit-equal, step after step (1 row: F.linear,
    # or the native GEMV / mv in bf16; 2 rows: F.linear; 5 rows: oneDNN's packed weights, fp32 and bf16 alike)
    loaded = random_model(dtype, seed % 1000)
    rng = random.Random(seed)
    pool_blocks = batch * 6 + 8
    model = make_engine(loaded, num_blocks=pool_blocks).runner
    native = make_engine(loaded, num_blocks=pool_blocks, **ACCEL).runner
    calls = count_native_steps(native)
    items = decode_batch(rng, loaded, batch, layout, pool_blocks)
    prefill = [BatchItem([rng.randrange(loaded.config.vocab_size) for _ in range(it.start_pos)] or [1], 0,
                         it.block_table, False) for it in items if it.start_pos]
    for runner in (model, native):
        if prefill:
            runner.execute(prefill)
    for step in range(4):
        want = model.execute(items)
        got = native.execute(items)
        where = f"seed {seed}, step {step}, positions {[it.start_pos for it in items]}"
        assert torch.equal(got, want), f"{where}: max diff {(got - want).abs().max()}"
        assert torch.equal(native.kv_cache.kv, model.kv_cache.kv), f"{where}: pools differ"
        items = [BatchItem([int(row.argmax())], it.start_pos + 1, it.block_table, True) for it, row in zip(items, want)
                 if (it.start_pos + 1) // 16 < len(it.block_table)]
        if not items:
            break
    assert calls[0] == step + 1, "decode steps did not go through the native step"


def test_engine_takes_the_native_step_only_when_asked(tiny_loaded, seed):
    # off by default; asked for, decode steps go native, alone or batched; prefills run the model; same tokens
    prompts = token_prompts(seed, 3)
    default = make_engine(tiny_loaded)
    assert default.runner.native_decode() is None
    want = one_by_one(default, prompts)
    engine = make_engine(tiny_loaded, **ACCEL)
    calls = count_native_steps(engine.runner)
    assert one_by_one(engine, prompts) == want, f"seed {seed}"
    assert calls[0] == len(prompts) * (GREEDY.max_tokens - 1)
    calls[0] = 0
    ids = [engine.add_request(p, GREEDY) for p in prompts]  # all three at once: batched decode steps
    outs = run_all(engine)
    assert [outs[i].token_ids for i in ids] == want, f"seed {seed}"
    assert GREEDY.max_tokens - 1 <= calls[0] < len(prompts) * (GREEDY.max_tokens - 1)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


@pytest.mark.parametrize("case", ["not asked", "batch invariant", "block_major pool", "torch kernels",
                                  "triton on cpu", "no build", "layer hook"])
def test_model_step_where_the_native_one_does_not_apply(tiny_loaded, monkeypatch, case):
    overrides = {"not asked": {}, "batch invariant": {**ACCEL, "batch_invariant": True},
                 "block_major pool": {**ACCEL, "layout": "block_major"}}.get(case, ACCEL)
    if case == "torch kernels":
        monkeypatch.setenv("MINIDISAGG_KERNELS", "torch")
    if case == "triton on cpu":  # the dispatch points ask for Triton's kernels (tests run them interpreted)
        monkeypatch.setattr(native_decode, "use_triton", lambda t: True)
    if case == "no build":
        monkeypatch.setattr(native_decode, "load_decode_step", lambda: False)
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


def scale_mlp(factor: float):
    """A replacement for ``LlamaLayer.mlp`` whose output is the stock one times ``factor``."""
    stock_mlp = llama.LlamaLayer.mlp

    def mlp(self, x, batch_invariant=False):
        return stock_mlp(self, x, batch_invariant) * factor

    return mlp


@pytest.mark.parametrize("change", ["LlamaLayer.forward", "LlamaLayer.mlp", "instance forward", "layer subclass",
                                    "model subclass", "forward hook", "kernel name", "edited source"])
def test_native_step_refuses_a_model_that_is_not_stock(tiny_loaded, monkeypatch, caplog, change, seed):
    # with the model changed, the C++ copy must not run: one log line says why, the tokens follow the model
    prompts = token_prompts(seed, 2)
    engine = make_engine(tiny_loaded, **ACCEL)
    calls = count_native_steps(engine.runner)
    layer0 = engine.runner.model.layers[0]
    if change == "LlamaLayer.forward":
        stock_forward = llama.LlamaLayer.forward
        monkeypatch.setattr(llama.LlamaLayer, "forward",
                            lambda self, *args: (lambda h, r: (h * 1.5, r))(*stock_forward(self, *args)))
    elif change == "LlamaLayer.mlp":
        monkeypatch.setattr(llama.LlamaLayer, "mlp", scale_mlp(3.0))
    elif change == "instance forward":
        monkeypatch.setattr(layer0, "forward", lambda *args: llama.LlamaLayer.forward(layer0, *args), raising=False)
    elif change == "layer subclass":
        monkeypatch.setattr(layer0, "__class__", type("MyLayer", (llama.LlamaLayer,), {}))
    elif change == "model subclass":
        monkeypatch.setattr(engine.runner.model, "__class__", type("MyModel", (llama.LlamaModel,), {}))
    elif change == "forward hook":
        handle = layer0.register_forward_hook(lambda module, args, out: (out[0] * 0.5, out[1]))
    elif change == "kernel name":
        from minidisagg.kernels.activation import silu_and_mul

        monkeypatch.setattr(llama, "silu_and_mul", lambda gate_up: silu_and_mul(gate_up) * 2)
    else:
        monkeypatch.setattr(stock, "STOCK_SOURCE_SHA256", "0" * 64)  # as if models/llama.py had been edited
    reference = make_engine(tiny_loaded)
    want = one_by_one(reference, prompts)
    with caplog.at_level(logging.WARNING, logger="minidisagg.accel.native_decode"):
        got = one_by_one(engine, prompts)
    if change == "forward hook":
        handle.remove()
    assert got == want, f"{change}: tokens do not follow the changed model (seed {seed})"
    assert calls[0] == 0, f"{change}: the C++ step ran"
    refusals = [r.getMessage() for r in caplog.records if "not running the C++ decode step" in r.getMessage()]
    assert len(refusals) == 1, f"{change}: expected one log line, got {refusals}"


def test_native_step_resumes_once_the_model_is_stock_again(tiny_loaded, monkeypatch, seed):
    prompts = token_prompts(seed, 1)
    engine = make_engine(tiny_loaded, **ACCEL)
    calls = count_native_steps(engine.runner)
    with monkeypatch.context() as patch:
        patch.setattr(llama.LlamaLayer, "mlp", scale_mlp(2.0))
        one_by_one(engine, prompts)
    assert calls[0] == 0
    assert one_by_one(engine, prompts) == one_by_one(make_engine(tiny_loaded), prompts), f"seed {seed}"
    assert calls[0] == GREEDY.max_tokens - 1


def test_recorded_source_is_the_models(tiny_loaded):
    assert stock.stock_source_sha256() == stock.STOCK_SOURCE_SHA256, (
        "models/llama.py's replicated methods changed: check that accel/csrc/decode_step.cpp still does what they do "
        "(this file's bit-equality tests), then set accel/stock.py's STOCK_SOURCE_SHA256 to "
        f"{stock.stock_source_sha256()}")
    assert stock.why_not_stock(tiny_loaded.model) is None


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_native_cpu_decode_must_be_bool(value):
    with pytest.raises(ValueError, match="native_cpu_decode must be True or False"):
        EngineConfig(native_cpu_decode=value)


def test_decode_step_refuses_bad_inputs(tiny_loaded):
    native = make_engine(tiny_loaded, **ACCEL).runner.native_decode()
    weights, cfg = native.weights, tiny_loaded.config
    shape = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps, cfg.head_dim**-0.5, 0)

    def step(weights, packed, lens):
        ids = torch.tensor([7, 8])
        return torch.ops.minidisagg_accel.decode_step(weights, packed, native.kv_cache.kv, tiny_loaded.model.cos_sin,
                                                      ids, ids, ids, torch.tensor([[0], [1]]), lens, *shape)

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
    native = make_engine(tiny_loaded, num_blocks=8, **ACCEL).runner
    model = make_engine(tiny_loaded, num_blocks=8).runner
    assert native.native_decode().linear_kind(4, torch.float32) == "packed"

    def broken(weight):
        raise RuntimeError("oneDNN exploded")

    monkeypatch.setattr(native_decode, "packed_weight", broken)
    got = native.execute(items)
    assert "oneDNN exploded" in caplog.text
    assert native.native_decode().linear_kind(4, torch.float32) == "plain"
    assert torch.equal(got, model.execute(items)), f"seed {seed}"  # the model now on plain F.linear too
    assert torch.equal(native.kv_cache.kv, model.kv_cache.kv), f"seed {seed}"
