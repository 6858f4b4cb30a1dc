"""``run_one`` / ``run_one_on_thread``: one request stepped to its end, with a deadline that frees what it held."""

from __future__ import annotations

import dataclasses
import random

import pytest

from conftest import make_engine, run_all, token_prompts
from minidisagg.engine.sampling import SamplingParams
from minidisagg.engine.steppable import run_one, run_one_on_thread

GREEDY8 = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.mark.parametrize("runner", [run_one, run_one_on_thread])
def test_run_one_returns_the_tokens_a_plain_run_gives_and_steps_the_others_along(tiny_loaded, seed, runner):
    prompts = token_prompts(seed, 3)
    reference = make_engine(tiny_loaded)
    ids = [reference.add_request(p, GREEDY8) for p in prompts]
    expected = run_all(reference)

    engine = make_engine(tiny_loaded)
    other = engine.add_request(prompts[0], GREEDY8)  # already in the engine: stepped along, not lost
    others: list = []
    out = runner(engine, prompts[1], GREEDY8, timeout_s=60.0, other_outputs=others)
    assert out.finished and out.error is None
    assert out.token_ids == expected[ids[1]].token_ids, f"seed={seed}"
    assert out.request_id not in engine.live_request_ids()  # released
    rest = run_all(engine)
    # the other request's outputs while it ran were kept for the caller (it may have finished there)
    assert others and all(o.request_id == other for o in others)
    rest.update({o.request_id: o for o in others if o.finished})
    assert rest[other].token_ids == expected[ids[0]].token_ids, f"seed={seed}"


def test_a_request_past_its_deadline_is_aborted_and_frees_its_blocks(tiny_loaded, seed):
    engine = make_engine(tiny_loaded, num_blocks=64, block_size=16)
    free_before = engine.blocks.num_free_blocks
    prompt = token_prompts(seed, 1, lo=20, hi=40)[0]
    long = SamplingParams(temperature=0, max_tokens=900, ignore_eos=True)
    with pytest.raises(TimeoutError, match="did not finish within 0.05 s; it was aborted"):
        run_one(engine, prompt, long, timeout_s=0.05)
    assert not engine.has_unfinished()
    assert engine.live_request_ids() == []
    assert engine.blocks.num_free_blocks == free_before
    # the engine still serves the next request
    assert len(run_one(engine, prompt, GREEDY8, timeout_s=60.0).token_ids) == 8


class _FakeEngine:
    """Steppable enough for ``run_one``: one request whose final output carries ``error``, or none at all."""

    def __init__(self, base, error: str | None, finishes: bool) -> None:
        self.base, self.error, self.finishes = base, error, finishes
        self.steps, self.released = 0, []
        self.rid = f"r{random.randrange(1000)}"

    def add_request(self, prompt, params=None, arrival_time=None, request_id=None) -> str:
        return self.rid

    def has_unfinished(self) -> bool:
        return self.steps < 3

    def step(self):
        self.steps += 1
        if self.steps == 3 and self.finishes:
            return [dataclasses.replace(self.base, request_id=self.rid, finished=True, error=self.error,
                                        finish_reason="error" if self.error else "length")]
        return []

    def abort(self, request_id: str) -> None:
        raise AssertionError("nothing to abort here")

    def release(self, request_id: str) -> None:
        self.released.append(request_id)


@pytest.fixture(scope="module")
def finished_output(tiny_loaded):
    engine = make_engine(tiny_loaded)
    return run_one(engine, [5, 6, 7], GREEDY8)


def test_an_error_is_returned_or_raised_as_asked(finished_output):
    fake = _FakeEngine(finished_output, "decode worker d0 died", finishes=True)
    assert run_one(fake, [1], timeout_s=5.0).error == "decode worker d0 died"
    assert fake.released == [fake.rid]
    fake = _FakeEngine(finished_output, "decode worker d0 died", finishes=True)
    with pytest.raises(RuntimeError, match=f"request {fake.rid} failed: decode worker d0 died"):
        run_one_on_thread(fake, [1], timeout_s=5.0, raise_on_error=True)
    assert fake.released == [fake.rid]


def test_an_engine_that_runs_dry_without_the_output_raises(finished_output):
    fake = _FakeEngine(finished_output, None, finishes=False)
    with pytest.raises(RuntimeError, match="left the engine without a final output"):
        run_one(fake, [1], timeout_s=5.0)
    with pytest.raises(ValueError, match="timeout_s must be positive"):
        run_one(fake, [1], timeout_s=0)
