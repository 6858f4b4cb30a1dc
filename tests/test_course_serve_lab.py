"""Lab 4's HTTP part: the server process starts, answers, fails clearly and always stops; both drivers measure."""

from __future__ import annotations

import os
import statistics

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from minidisagg import LLM  # noqa: E402
from minidisagg.bench.serve_data import synthetic  # noqa: E402
from minidisagg.course.serve_lab import arrivals_s, direct_run, http_run, serving, start_server  # noqa: E402
from serve_process import child_pids, running  # noqa: E402

FLAGS = ["--device", "cpu", "--dtype", "float32", "--num-kv-blocks", "64", "--threads", "1"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def test_colocated_server_is_measured_like_the_engine_in_process_and_stops():
    requests = synthetic(6, 10, 5, seed=3)
    with serving("tiny", "colocated", FLAGS, env=ONE_THREAD) as server:
        assert server.url.startswith("http://127.0.0.1:")
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        over_http = http_run(server, "tiny", requests, 50.0, 3, "HTTP", warm_up=1)
    assert server.proc.poll() is not None, "the server outlived its with block"
    with pytest.raises(httpx.HTTPError):
        httpx.get(server.url + "/health", timeout=2)
    with LLM("tiny", device="cpu", dtype="float32", num_kv_blocks=64) as llm:
        direct = direct_run(llm.engine, requests, 50.0, 3, "direct")
        assert not llm.engine.has_unfinished() and llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks
    for sample in (over_http, direct):
        assert len(sample.ttft_s) == 6 and sample.failed == 0 and all(t > 0 for t in sample.ttft_s)
    assert len(direct.itl_s) == 6 * 4  # the engine stamps every token
    assert 0 < len(over_http.itl_s) <= 6 * 4  # the client stamps text chunks (a token may end mid-character)


def test_disaggregated_server_takes_its_worker_processes_with_it():
    with serving("tiny", "disagg", FLAGS, env=ONE_THREAD) as server:
        workers = child_pids(server.proc.pid)
        assert len(workers) >= 2, "a 1P1D server runs a prefill and a decode worker process"
        sample = http_run(server, "tiny", synthetic(3, 8, 4, seed=1), 100.0, 1, "HTTP 1P1D", warm_up=1)
        assert len(sample.ttft_s) == 3
    assert server.proc.returncode == 0  # SIGTERM is a graceful stop
    assert not [pid for pid in workers if running(pid)], "worker processes outlived the server"


def test_a_server_that_cannot_start_is_reported_with_its_log_and_stopped():
    with pytest.raises(RuntimeError, match="exited with code .*its log:(.|\n)*no-such-model"):
        start_server("no-such-model", start_timeout_s=120)
    before = {pid for pid in child_pids(os.getpid()) if running(pid)}
    with pytest.raises(TimeoutError, match="after 0.5 s"):
        start_server("tiny", serve_args=FLAGS, start_timeout_s=0.5)
    assert {pid for pid in child_pids(os.getpid()) if running(pid)} <= before, "the late server was left running"
    with pytest.raises(ValueError, match="mode must be"):
        start_server("tiny", mode="replicas")


def test_arrivals_follow_the_load_generators_poisson_schedule():
    times = arrivals_s(2000, 20.0, seed=7)
    assert times[0] == 0.0 and times == sorted(times) and times == arrivals_s(2000, 20.0, seed=7)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert statistics.fmean(gaps) == pytest.approx(1 / 20.0, rel=0.1)
    assert arrivals_s(5, float("inf"), seed=7) == [0.0] * 5  # all at once
    assert arrivals_s(50, 20.0, seed=8) != times[:50]
