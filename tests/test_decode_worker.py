"""The decode worker serves transport calls promptly while its loop is busy decoding."""

from __future__ import annotations

import threading
import time

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
