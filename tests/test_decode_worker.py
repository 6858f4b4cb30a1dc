"""The decode worker serves transport calls promptly while its loop is busy decoding."""

from __future__ import annotations

import threading
import time

import pytest

from minidisagg.config import CacheConfig, EngineConfig
from minidisagg.disagg.decode_worker import DecodeWorker
from minidisagg.engine.clock import WallClock

STEP_S = 0.02  # a decode step that holds the engine this long, as a GPU step would


def test_reserve_is_not_starved_by_a_busy_decode_loop(tiny_loaded, monkeypatch):
    """Python locks are not fair; without the worker's hand-over, reserve waits many steps (seconds)."""
    worker = DecodeWorker("d0", tiny_loaded, EngineConfig(cache=CacheConfig(num_blocks=256)), WallClock(),
                          sink=lambda out: None)
    busy = threading.Event()

    def slow_step():  # the engine always has work and each step holds the engine lock, like a GPU step
        busy.set()
        t_end = time.perf_counter() + STEP_S
        while time.perf_counter() < t_end:  # spin holding the GIL now and then, as Python launch code does
            pass
        return []

    monkeypatch.setattr(worker.engine, "has_unfinished", lambda: True)
    monkeypatch.setattr(worker.engine, "step", slow_step)
    worker.start()
    try:
        assert busy.wait(5.0)
        waits = []
        for i in range(20):
            t0 = time.perf_counter()
            assert worker.reserve(f"t{i}", 16)
            waits.append(time.perf_counter() - t0)
            worker.cancel(f"t{i}")
        assert max(waits) < 5 * STEP_S, f"reserve waited up to {max(waits):.3f} s behind {STEP_S} s steps"
    finally:
        worker.stop()
    assert worker.engine.blocks.num_free_blocks == worker.engine.blocks.num_blocks


def test_commits_during_a_step_return_at_once_and_are_adopted_together(tiny_loaded, monkeypatch):
    """A commit that finds the loop mid-step is queued, not made to wait; the loop adopts the queue before
    its next step, an aborted one stops, and one under an id already there is refused at commit (its sender
    alone hears of it: no error output reaches the routers under the first request's id)."""
    from minidisagg.engine.sequence import SequenceState

    outputs = []
    worker = DecodeWorker("d0", tiny_loaded, EngineConfig(cache=CacheConfig(num_blocks=64)), WallClock(),
                          sink=outputs.append)
    total = worker.engine.blocks.num_free_blocks
    for i in range(4):
        assert worker.reserve(f"t{i}", 20)
    steps = []
    busy = threading.Event()

    def slow_step():
        steps.append(sorted(s.request_id for s in worker.engine.scheduler.running))
        busy.set()
        t_end = time.perf_counter() + STEP_S
        while time.perf_counter() < t_end:
            pass
        return []

    monkeypatch.setattr(worker.engine, "has_unfinished", lambda: True)
    monkeypatch.setattr(worker.engine, "step", slow_step)
    worker.start()
    try:
        assert busy.wait(5.0)
        held, done = threading.Event(), threading.Event()

        def hold_engine():  # another thread holds the engine as a step does
            with worker._lock:
                held.set()
                done.wait(5.0)

        holder = threading.Thread(target=hold_engine)
        holder.start()
        assert held.wait(5.0)
        request_ids = ["r0", "r1", "r2", "r0"]  # t3 reuses r0's id: refused to its sender, never adopted
        for i, rid in enumerate(request_ids):
            t0 = time.perf_counter()
            state = SequenceState(rid, [1] * 20, [2], {"max_tokens": 4}, {"arrival_s": 0.0})
            if i == 3:
                with pytest.raises(ValueError, match="'r0' is already decoding"):
                    worker.commit(f"t{i}", state, 0)
            else:
                worker.commit(f"t{i}", state, 0)
            assert time.perf_counter() - t0 < STEP_S / 2, "commit waited for the engine"
        assert not outputs
        aborter = threading.Thread(target=worker.abort, args=("r2",))
        aborter.start()  # it waits for the engine, and the loop lets it in before its next step
        time.sleep(STEP_S)
        done.set()
        holder.join(5.0)
        aborter.join(5.0)
        worker.cancel("t3")  # as a KV link does with a refused DONE
        deadline = time.monotonic() + 5.0
        while len(outputs) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        firsts = {o.request_id: o.token_ids for o in outputs if o.error is None}
        errors = [o for o in outputs if o.error is not None]
        firsts.pop("r2", None)  # adopted before the abort got in, or dropped from the queue: either way it ends
        assert firsts == {"r0": [2], "r1": [2]}, outputs
        assert not errors, "a refused duplicate must not reach the routers as r0's failure"
        deadline = time.monotonic() + 5.0
        while not any(s == ["r0", "r1"] for s in steps) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert any(s == ["r0", "r1"] for s in steps), "the adopted sequences never joined a step together"
        assert not worker._reserved, "an aborted or failed reservation was kept"
    finally:
        worker.stop()
    for rid in ("r0", "r1"):
        worker.engine.abort(rid)
        worker.engine.release(rid)
    assert worker.engine.blocks.num_free_blocks == total, "a queued commit leaked blocks"


def test_an_abort_drops_a_queued_commit_and_frees_its_blocks(tiny_loaded):
    """Aborted between its commit and the loop's next step, a request is never adopted and keeps no block."""
    from minidisagg.engine.sequence import SequenceState

    outputs = []
    worker = DecodeWorker("d0", tiny_loaded, EngineConfig(cache=CacheConfig(num_blocks=64)), WallClock(),
                          sink=outputs.append)
    total = worker.engine.blocks.num_free_blocks
    assert worker.reserve("t0", 20) and worker.reserve("t1", 20)
    held, done = threading.Event(), threading.Event()

    def hold_engine():
        with worker._lock:
            held.set()
            done.wait(5.0)

    holder = threading.Thread(target=hold_engine)
    holder.start()
    assert held.wait(5.0)
    for tid, rid in (("t0", "a"), ("t1", "b")):
        worker.commit(tid, SequenceState(rid, [1] * 20, [2], {"max_tokens": 4}, {"arrival_s": 0.0}), 0)
    done.set()
    holder.join(5.0)
    worker.abort("a")
    assert worker.step() and {o.request_id for o in outputs} == {"b"}, outputs  # b's first token, then a step
    assert outputs[0].token_ids == [2], outputs
    with pytest.raises(KeyError):
        worker.engine.sequence("a")
    worker.abort("b")
    assert worker.engine.blocks.num_free_blocks == total and not worker._reserved
