"""Hostile inputs against live worker processes (``disagg.fuzz``), and a decode worker stopped by SIGSTOP.

A decode, a prefill and a router process share one fresh secret. A short run of seeded inputs
(malformed frames and control messages, id attacks, stalls, floods, bad handshakes; most from
peers that proved the secret) is checked after each input: every process alive, both KV pools
whole, a greedy request through the router, and every victim request of our own router, equal
to the colocated engine's. ``minidisagg bench fuzz`` runs hundreds.
"""

from __future__ import annotations

import math
import os
import random

import pytest

from minidisagg.disagg.fuzz import CATEGORIES, generate_inputs
from minidisagg.disagg.fuzz_checks import FuzzDeployment, FuzzSettings, run_fuzz
from minidisagg.disagg.fuzz_stall import DEADLINE_SLACK_S, stall_decode

CI_INPUTS = 30  # three of each category
STOP_S = float(os.environ.get("MINIDISAGG_SIGSTOP_S", "40"))
DEADLINE_S = 12.0


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """Decode, prefill and router processes (one secret), with the oracle and a router of our own beside them."""
    dep = FuzzDeployment(FuzzSettings(), log_dir=tmp_path_factory.mktemp("fuzz"))
    yield dep
    dep.stop()


def test_the_generator_is_seeded_and_covers_every_category():
    names = [i.name for i in generate_inputs(5, 40)]
    assert names == [i.name for i in generate_inputs(5, 40)], "the same seed must give the same inputs"
    assert names != [i.name for i in generate_inputs(6, 40)]
    assert {i.category for i in generate_inputs(random.randrange(1 << 30), len(CATEGORIES))} == set(CATEGORIES)
    with pytest.raises(ValueError, match="unknown fuzz categories"):
        generate_inputs(0, 1, ("prefix", "bogus"))


def test_hostile_inputs_leave_every_process_serving_and_every_pool_whole(deployment, seed):
    results = run_fuzz(deployment, generate_inputs(seed, CI_INPUTS))
    assert len(results) == CI_INPUTS, f"seed {seed}: a process died at input {results[-1].index}: {results[-1]}"
    broken = [r for r in results if not r.alive or not r.pools_whole or r.lost or r.notes]
    assert not broken, f"seed {seed}: " + "\n".join(f"#{r.index} {r.category} {r.name}: {r.notes}" for r in broken)
    assert {r.category for r in results} == set(CATEGORIES)
    assert sum(r.requests for r in results) >= CI_INPUTS, "every input must be followed by a good request"
    logs = "".join(p.log_path.read_text(errors="replace") for p in deployment.processes.values())
    assert "Traceback" not in logs, "a hostile input reached an unexpected error path:\n" + logs[-4000:]


def test_a_router_that_floods_pings_and_never_reads_is_dropped_by_each_worker(deployment):
    """However much the kernel's socket buffers absorb on this machine, the worker must hang up on it."""
    floods = {i.name: i for i in generate_inputs(random.randrange(1 << 30), 200, ("flood",))
              if i.name.startswith("PINGs it never reads")}
    assert sorted(floods) == ["PINGs it never reads (20000) to decode", "PINGs it never reads (20000) to prefill"]
    results = run_fuzz(deployment, list(floods.values()))
    assert len(results) == 2, results
    for r in results:
        assert r.alive and r.pools_whole and not r.lost and not r.notes, r


@pytest.mark.slow
def test_a_decode_worker_stopped_by_sigstop_fails_its_requests_in_time_and_serves_after(deployment):
    """The stop lasts STOP_S (40 s; ``MINIDISAGG_SIGSTOP_S`` shortens it, never below the deadline)."""
    assert STOP_S > DEADLINE_S + 3 * DEADLINE_SLACK_S, "the stop must outlast the held requests' deadline"
    report = stall_decode(deployment, stop_s=STOP_S, deadline_s=DEADLINE_S, policy="fail")
    assert len(report.held) == 3 and len(report.during) == 1, report
    for rid, seconds, error in report.held + report.during:
        assert seconds <= DEADLINE_S + DEADLINE_SLACK_S and math.isfinite(seconds), (rid, seconds, report)
        assert error is not None and "request_timeout_s" in error, (rid, error)
    assert report.after_ok, f"after SIGCONT: {report.after}"
    assert report.pools_whole, report.pools
    assert all(report.alive.values()), report.alive
