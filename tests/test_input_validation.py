"""Bad input at the API boundary: a clear ValueError naming the argument, and nothing queued, leaked or lost."""

from __future__ import annotations

import dataclasses
import math
import random
import time

import pytest

from conftest import token_prompts
from minidisagg import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", device="cpu", dtype="float32", batch_invariant=True, seed=0, num_kv_blocks=64)


@pytest.fixture(scope="module")
def disagg_llm():
    with LLM("tiny", device="cpu", dtype="float32", batch_invariant=True, seed=0, num_kv_blocks=64,
             mode="disagg") as llm:
        yield llm


def _bad_params(rng: random.Random) -> list[tuple[dict, str]]:
    """Constructor arguments that must be refused, each with the field name the message must carry."""
    return [
        ({"seed": "abc"}, "seed"),
        ({"seed": 2**64 + rng.randrange(1 << 40)}, "seed"),
        ({"seed": -(2**63) - 1 - rng.randrange(1 << 40)}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": -math.inf}, "temperature"),
        ({"temperature": 1e-30}, "temperature"),
        ({"temperature": "0.5"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": True}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_k": True}, "top_k"),
        ({"stop": 5}, "stop"),
        ({"stop_token_ids": 5}, "stop_token_ids"),
        ({"stop_token_ids": [rng.randrange(100), False]}, "stop_token_ids"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ]


def test_sampling_params_refuse_bad_values_naming_the_field(seed):
    for kwargs, field in _bad_params(random.Random(seed)):
        with pytest.raises(ValueError) as info:
            SamplingParams(**kwargs)
        assert field in str(info.value), f"seed {seed}: {kwargs} -> {info.value}"


def test_sampling_params_accept_the_edges(seed):
    rng = random.Random(seed)
    for value in (0, 2**64 - 1, -(2**63), rng.randrange(-(2**63), 2**64)):
        assert SamplingParams(seed=value).seed == value
    assert SamplingParams(temperature=rng.uniform(1e-5, 100)).temperature > 0
    assert SamplingParams(stop=("a", "b"), stop_token_ids=(1, 2)).stop == ["a", "b"]


def assert_clean(llm: LLM) -> None:
    """Nothing queued, nothing live, every KV block free."""
    engine = llm.engine
    assert not engine.has_unfinished()
    assert engine.live_request_ids() == []
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def _bad_calls(rng: random.Random, n: int) -> list[tuple[object, str]]:
    """sampling_params arguments for ``n`` prompts, each wrong in its last entry only, with the name to expect."""
    late_seed = dataclasses.replace(GREEDY)
    late_seed.seed = "abc"  # changed after construction: caught at the boundary
    huge_seed = SamplingParams(temperature=0.7, max_tokens=4)
    huge_seed.seed = 2**70 + rng.randrange(1 << 20)
    hot = SamplingParams(temperature=0.7)
    hot.temperature = math.inf
    return [
        ([GREEDY] * (n - 1) + [late_seed], "seed"),
        ([GREEDY] * (n - 1) + [huge_seed], "seed"),
        ([GREEDY] * (n - 1) + [hot], "temperature"),
        ([GREEDY] * (n - 1) + ["temperature=0"], "sampling_params"),
        ([GREEDY] * (n - 1) + [None], "sampling_params"),
        ([GREEDY] * (n - 1), "sampling_params"),
        ("GREEDY_PARAMS", "sampling_params"),
        ({"temperature": 0}, "sampling_params"),
    ]


def test_generate_checks_everything_before_queueing(llm, seed):
    rng = random.Random(seed)
    prompts = token_prompts(seed, rng.randint(2, 4))
    before = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    assert_clean(llm)
    for params, name in _bad_calls(rng, len(prompts)):
        with pytest.raises(ValueError) as info:
            llm.generate(prompts, params)
        assert name in str(info.value), f"seed {seed}: {params!r:.80} -> {info.value}"
        assert_clean(llm)
    bad_ids = [dict(p) for p in prompts]
    bad_ids[-1] = {"prompt_token_ids": [*bad_ids[-1]["prompt_token_ids"], True]}
    for bad in (bad_ids, [*prompts[:-1], [True, False]], [*prompts[:-1], {"prompt_token_ids": 7}],
                [*prompts[:-1], {"prompt_token_ids": [llm.loaded.config.vocab_size]}]):
        with pytest.raises(ValueError, match="prompt_token_ids") as info:
            llm.generate(bad, GREEDY)
        assert f"prompt {len(prompts) - 1}" in str(info.value) or len(bad) == 1, f"seed {seed}: {info.value}"
        assert_clean(llm)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate([True, False], GREEDY)
    beyond = SamplingParams(temperature=0, stop_token_ids=[llm.loaded.config.vocab_size + rng.randrange(1000)])
    with pytest.raises(ValueError, match=r"sampling_params\[\d+\]\.stop_token_ids"):
        llm.generate(prompts, [GREEDY] * (len(prompts) - 1) + [beyond])
    with pytest.raises(ValueError, match="prompts must be"):
        llm.generate(3.5, GREEDY)  # type: ignore[arg-type]
    assert_clean(llm)
    after = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    assert after == before, f"seed {seed}"
    assert_clean(llm)


def _fail_on_call(monkeypatch, engine, k: int) -> None:
    """Make ``engine.add_request`` raise on its ``k``-th call (1-based)."""
    real = engine.add_request
    calls = []

    def add_request(*args, **kwargs):
        calls.append(1)
        if len(calls) == k:
            raise RuntimeError("queue refused the request")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "add_request", add_request)


def test_engine_add_request_checks_params_changed_after_construction(llm):
    params = SamplingParams(temperature=0.5, max_tokens=3)
    params.seed = "abc"
    with pytest.raises(ValueError, match="seed"):
        llm.engine.add_request([5, 6, 7], params)
    assert_clean(llm)


def test_generate_aborts_what_it_queued_when_queueing_fails_midway(llm, seed, monkeypatch):
    rng = random.Random(seed)
    prompts = token_prompts(seed, rng.randint(3, 5))
    before = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    with monkeypatch.context() as patch:
        _fail_on_call(patch, llm.engine, rng.randint(2, len(prompts)))
        with pytest.raises(RuntimeError, match="queue refused"):
            llm.generate(prompts, GREEDY)
    assert_clean(llm)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == before, f"seed {seed}"
    assert_clean(llm)


def test_chat_refuses_bad_messages_naming_the_key(llm):
    good = {"role": "user", "content": "hi"}
    cases = [
        ([{"role": "user", "content": None}], "'content'"),
        ([{"role": "user"}], "'content'"),
        ([{"role": 3, "content": "hi"}], "'role'"),
        ([good, "hello"], "message 1"),
        ([[good], [good, {"role": "assistant", "content": None}]], "conversation 1"),
        ("hello", "chat() needs"),
        ([], "chat() needs"),
    ]
    for messages, fragment in cases:
        with pytest.raises(ValueError) as info:
            llm.chat(messages, GREEDY)  # type: ignore[arg-type]
        assert fragment in str(info.value), f"{messages!r} -> {info.value}"
        assert_clean(llm)


def _disagg_settled(llm: LLM, timeout_s: float = 10.0) -> None:
    """The cluster tracks nothing, and every worker's KV pool is whole again (workers reap acknowledgements late)."""
    cluster = llm.engine
    assert not cluster.has_unfinished()
    deadline = time.monotonic() + timeout_s
    while True:
        held = [w.name for w in cluster.prefill_workers + cluster.decode_workers
                if w.engine.blocks.num_free_blocks != w.engine.blocks.num_blocks]
        if not held:
            return
        assert time.monotonic() < deadline, f"KV blocks still held on {held}"
        time.sleep(0.05)


def test_disagg_generate_checks_everything_before_queueing(disagg_llm, seed, monkeypatch):
    rng = random.Random(seed)
    prompts = token_prompts(seed, rng.randint(2, 4))
    before = [o.token_ids for o in disagg_llm.generate(prompts, GREEDY)]
    _disagg_settled(disagg_llm)
    for params, name in _bad_calls(rng, len(prompts))[:4]:
        with pytest.raises(ValueError, match=name):
            disagg_llm.generate(prompts, params)
        _disagg_settled(disagg_llm)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        disagg_llm.generate([*prompts, [True]], GREEDY)
    _disagg_settled(disagg_llm)
    with monkeypatch.context() as patch:
        _fail_on_call(patch, disagg_llm.engine, len(prompts))
        with pytest.raises(RuntimeError, match="queue refused"):
            disagg_llm.generate(prompts, GREEDY)
    _disagg_settled(disagg_llm)
    assert [o.token_ids for o in disagg_llm.generate(prompts, GREEDY)] == before, f"seed {seed}"
    _disagg_settled(disagg_llm)
