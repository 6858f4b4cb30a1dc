"""Workers and the router against a hostile peer: each bad field is refused by name, nothing dies, nothing leaks.

After every bad message: its sender alone got an ERROR naming the field (with the request id
where it had one), every worker process is alive and healthy, every KV pool is whole, and a
normal greedy request through a well-behaved router still matches the colocated engine.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest

from cluster_requests import run_request
from minidisagg import LLM, SamplingParams
from minidisagg.config import CacheConfig, EngineConfig
from minidisagg.disagg.launch import WorkerProcess, spawn_worker, stop_processes
from minidisagg.disagg.router_server import RemoteCluster, RouterServer
from minidisagg.disagg.serve import DecodeServer, PrefillServer
from minidisagg.kv.pages import KVLayout
from minidisagg.transport.framing import MAGIC, PREFIX, WIRE_VERSION, Frame, FrameKind, recv_frame
from minidisagg.transport.handshake import client_handshake
from minidisagg.transport.socket import make_hello

HOST = "127.0.0.1"
NUM_BLOCKS = 32
MODEL_ARGS = ["--model", "tiny", "--device", "cpu", "--dtype", "float32", "--random-weights", "--batch-invariant",
              "--num-kv-blocks", str(NUM_BLOCKS)]
CONFIG = EngineConfig(batch_invariant=True, cache=CacheConfig(num_blocks=NUM_BLOCKS))
TIMEOUT_S = 30.0
GREEDY = {"temperature": 0, "max_tokens": 5, "ignore_eos": True}
MISSING = object()  # a mutation that deletes the field
NESTED_DEPTH = 10**5
NESTED_VALUE = json.loads("[" * 500 + "]" * 500)  # nested, yet within what a JSON parser takes
BAD_TOKENS = [10**9, -1, 1.5, True, None, "7", [3], NESTED_VALUE]
BAD_TIMES = [math.nan, math.inf, -math.inf, 1e18, -5.0, "0", True, None, NESTED_VALUE]
BAD_IDS = [None, MISSING, "", 7, True, ["x"], {"a": 1}, "x" * 1000, NESTED_VALUE]


@pytest.fixture(scope="module")
def seed(module_seed) -> int:
    return module_seed


@pytest.fixture(scope="module")
def reference():
    """The colocated engine on the workers' random weights: the oracle."""
    return LLM("tiny", device="cpu", batch_invariant=True)


def layout_of(loaded) -> KVLayout:
    cfg = loaded.config
    return KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, CONFIG.cache.block_size, loaded.dtype)


class Peer:
    """A raw connection to a worker in some role: any header goes out (NaN too), frames come back."""

    def __init__(self, port: int, role: str, loaded) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=TIMEOUT_S)
        client_handshake(self.sock, make_hello(role, loaded.config.fingerprint(), layout_of(loaded)), TIMEOUT_S)
        self.sock.settimeout(TIMEOUT_S)

    def send(self, kind: FrameKind, header: dict[str, Any] | bytes) -> None:
        body = header if isinstance(header, bytes) else json.dumps(header).encode()  # NaN/Infinity allowed
        self.sock.sendall(PREFIX.pack(MAGIC, WIRE_VERSION, int(kind), 0, len(body), 0) + body)

    def reply(self, *kinds: FrameKind) -> Frame:
        """The next frame of one of ``kinds``, skipping broadcast outputs; any other kind fails the test."""
        while True:
            frame = recv_frame(self.sock, TIMEOUT_S)
            if frame.kind in kinds:
                return frame
            assert frame.kind == FrameKind.TOKENS, f"unexpected {frame.kind.name} {frame.header}"

    def health(self) -> dict[str, Any]:
        """PING -> HEALTH; an ERROR before it means someone else's bad message reached this bystander."""
        self.send(FrameKind.PING, {})
        return self.reply(FrameKind.HEALTH).header

    def close(self) -> None:
        self.sock.close()


@dataclass
class Live:
    """Worker processes, a well-behaved router over them, and a bystander router connection to each."""

    decode: WorkerProcess
    prefill: WorkerProcess
    cluster: RemoteCluster
    bystanders: dict[str, Peer]


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_loaded):
    log_dir = tmp_path_factory.mktemp("hardening")
    procs: list[WorkerProcess] = []
    cluster = None
    bystanders: dict[str, Peer] = {}
    try:
        procs.append(spawn_worker("decode", "d0", MODEL_ARGS, log_dir))
        procs.append(spawn_worker("prefill", "p0", [*MODEL_ARGS, "--peers", f"d0={HOST}:{procs[0].port}"], log_dir))
        decode, prefill = procs
        cluster = RemoteCluster(tiny_loaded, CONFIG, {"p0": (HOST, prefill.port)}, {"d0": (HOST, decode.port)},
                                request_timeout_s=60)
        bystanders = {"decode": Peer(decode.port, "router", tiny_loaded),
                      "prefill": Peer(prefill.port, "router", tiny_loaded)}
        yield Live(decode, prefill, cluster, bystanders)
    finally:
        for peer in bystanders.values():
            peer.close()
        if cluster is not None:
            cluster.shutdown()
        stop_processes(procs, timeout_s=20)



def assert_unharmed(live: Live, reference, label: str) -> None:
    """Processes alive, pools whole, nobody else told, and a normal request still matches the colocated engine."""
    for proc in (live.decode, live.prefill):
        assert proc.proc.poll() is None, f"{label}: {proc.name} exited\n{proc.log_tail()}"
    for role, bystander in live.bystanders.items():
        deadline = time.monotonic() + 5.0
        while True:  # the prefill frees a request's blocks once the decode side acknowledged it: allow a moment
            health = bystander.health()
            assert health["healthy"] is True, f"{label}: {role} unhealthy: {health}"
            if health["num_free_blocks"] == health["num_blocks"] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert health["num_free_blocks"] == health["num_blocks"], f"{label}: {role} KV pool not whole: {health}"
    assert all(w.error is None for w in [*live.cluster.prefill_workers, *live.cluster.decode_workers]), \
        f"{label}: the good router lost a worker: {[w.error for w in live.cluster.prefill_workers]}"
    prompt = [11, 12, 13, 14, 15]
    out = run_request(live.cluster, prompt, GREEDY)
    want = reference.generate({"prompt_token_ids": prompt}, SamplingParams(**GREEDY), use_tqdm=False)[0]
    assert out.error is None and out.token_ids == want.token_ids, f"{label}: {out.error} {out.token_ids}"


def mutated(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``obj`` with the dotted ``path`` set to ``value`` (deleted for MISSING)."""
    obj = copy.deepcopy(obj)
    *parents, last = path.split(".")
    node = obj
    for name in parents:
        node = node[name]
    if value is MISSING:
        node.pop(last, None)
    else:
        node[last] = value
    return obj


def with_bad_token(rng: random.Random, bad: Any, length: int = 5) -> list[Any]:
    """Valid token ids with ``bad`` at a random position."""
    ids: list[Any] = [rng.randrange(1, 1000) for _ in range(length)]
    ids[rng.randrange(length)] = bad
    return ids


def nested(depth: int) -> bytes:
    """A JSON header nested ``depth`` arrays deep (valid JSON, far past any parser's recursion limit)."""
    return b'{"request_id": "deep", "x": ' + b"[" * depth + b"]" * depth + b"}"


def prefill_cases(rng: random.Random) -> list[tuple[str, Any, str]]:
    """(path, bad value, the field the ERROR must name) for a REQUEST to a prefill worker."""
    cases: list[tuple[str, Any, str]] = [("request_id", v, "request_id") for v in BAD_IDS]
    cases += [("submission.prompt_token_ids", with_bad_token(rng, t), "submission.prompt_token_ids[")
              for t in BAD_TOKENS]
    cases += [("submission.prompt_token_ids", v, "submission.prompt_token_ids") for v in ([], [1] * 2048, "1 2 3")]
    cases += [("submission.arrival_s", v, "submission.arrival_s") for v in [*BAD_TIMES, MISSING]]
    cases += [("submission.params.max_tokens", v, "submission.params.max_tokens") for v in (True, 0, 2.5, None)]
    cases += [("submission.params.temperature", v, "submission.params.temperature") for v in (math.nan, math.inf, -1, "0")]
    cases += [("submission.params.seed", 2**70, "submission.params.seed"), ("submission.params.stop", [["x"]],
              "submission.params.stop"), ("submission.params.frobnicate", 1, "submission.params.frobnicate")]
    cases += [("submission.decode_target", v, "submission.decode_target") for v in ("d9", 7, None)]
    cases += [("submission.request_id", "someone-else", "submission.request_id"), ("submission.extra", 1,
              "submission.extra"), ("extra", 1, "REQUEST.extra")]
    cases += [("submission", v, "submission") for v in ("x", None, [])]
    rng.shuffle(cases)
    return cases


def test_bad_requests_to_a_prefill_worker(live, reference, tiny_loaded, seed):
    rng = random.Random(seed)
    hostile = Peer(live.prefill.port, "router", tiny_loaded)
    try:
        for i, (path, value, field) in enumerate(prefill_cases(rng)):
            rid = f"hostile-{i}"
            good = {"request_id": rid, "submission": {"request_id": rid, "prompt_token_ids": [5, 6, 7, 8],
                                                      "params": dict(GREEDY), "arrival_s": 0.0, "decode_target": "d0",
                                                      "prompt": None}}
            label = f"seed {seed}: {path}={value!r}"[:200]
            hostile.send(FrameKind.REQUEST, mutated(good, path, value))
            error = hostile.reply(FrameKind.ERROR).header
            assert field in error["message"], f"{label}: {error}"
            valid_id = path != "request_id"
            assert error["request_id"] == (rid if valid_id else None), f"{label}: {error}"
            assert_unharmed(live, reference, label)
        for body, words in [(nested(NESTED_DEPTH), "deeply"), (b'{"request_id": "\xff"}', "JSON")]:  # not UTF-8
            hostile.send(FrameKind.REQUEST, body)
            error = hostile.reply(FrameKind.ERROR).header
            assert "header" in error["message"] and words in error["message"], error
            assert_unharmed(live, reference, f"seed {seed}: header {body[:30]!r}")
    finally:
        hostile.close()


def decode_cases(rng: random.Random) -> list[tuple[str, Any, str]]:
    """(path, bad value, the field the ERROR must name) for a DONE frame on a KV link."""
    cases: list[tuple[str, Any, str]] = [("state.output_token_ids", [t], "state.output_token_ids[0]") for t in BAD_TOKENS]
    cases += [("state.output_token_ids", v, "state.output_token_ids") for v in ([], "7")]
    cases += [("state.prompt_token_ids", with_bad_token(rng, t), "state.prompt_token_ids[") for t in BAD_TOKENS]
    cases += [("state.prompt_token_ids", [1] * 3000, "state.prompt_token_ids")]
    cases += [("state.timeline.arrival_s", v, "state.timeline.arrival_s") for v in BAD_TIMES]
    cases += [("state.timeline.token_times_s", [v], "state.timeline.token_times_s[0]") for v in (1e18, math.nan, -1.0)]
    cases += [("state.timeline.prefill_start_s", v, "state.timeline.prefill_start_s") for v in ("x", math.inf, 1e18)]
    cases += [("state.timeline.kv_transfer_bytes", v, "state.timeline.kv_transfer_bytes") for v in (-1, 1.5, True)]
    cases += [("state.timeline.bogus", 1, "state.timeline.bogus")]
    cases += [("state.request_id", v, "request_id") for v in BAD_IDS]
    cases += [("state.params.top_k", 1.5, "state.params.top_k"), ("state.params.bogus", 1, "state.params.bogus"),
              ("state.params.max_tokens", True, "state.params.max_tokens"),
              ("state.generator_state_b64", "!!!", "state.generator_state_b64"),
              ("state.generator_state_b64", 5, "state.generator_state_b64"), ("state.bogus", 1, "bogus")]
    cases += [("state", v, "state") for v in ("x", None, [])]
    cases += [("num_bytes", v, "num_bytes") for v in (-1, "x", True, 1.5)]
    rng.shuffle(cases)
    return cases


def test_bad_done_frames_on_a_kv_link(live, reference, tiny_loaded, seed):
    """Finding 1: a DONE carrying out-of-vocabulary tokens or absurd times is refused, not adopted."""
    rng = random.Random(seed)
    link = Peer(live.decode.port, "prefill", tiny_loaded)
    try:
        for i, (path, value, field) in enumerate(decode_cases(rng)):
            tid, rid = f"hostile-t{i}", f"hostile-r{i}"
            label = f"seed {seed}: {path}={value!r}"[:200]
            link.send(FrameKind.RESERVE, {"transfer_id": tid, "num_tokens": 5})
            grant = link.reply(FrameKind.GRANT).header
            assert grant == {"transfer_id": tid, "ok": True}, f"{label}: {grant}"
            state = {"request_id": rid, "prompt_token_ids": [5, 6, 7, 8, 9], "output_token_ids": [10],
                     "params": dict(GREEDY), "timeline": {"arrival_s": 0.0}, "prompt": None,
                     "generator_state_b64": None}
            link.send(FrameKind.DONE, mutated({"transfer_id": tid, "state": state, "num_bytes": 0}, path, value))
            error = link.reply(FrameKind.ERROR, FrameKind.ACK)
            assert error.kind == FrameKind.ERROR and field in error.header["message"], f"{label}: {error}"
            assert error.header["transfer_id"] == tid, f"{label}: {error.header}"
            assert_unharmed(live, reference, label)
        others: list[tuple[FrameKind, dict[str, Any] | bytes, str]] = [
            *[(FrameKind.RESERVE, {"transfer_id": "r", "num_tokens": v}, "num_tokens") for v in (True, -1, 1.5, 10**9, "3")],
            *[(FrameKind.RESERVE, {"transfer_id": v, "num_tokens": 3}, "transfer_id") for v in (None, 5, "")],
            (FrameKind.DONE, {"transfer_id": "never-reserved", "state": {}}, "transfer_id"),
            (FrameKind.DONE, nested(NESTED_DEPTH), "deeply")]
        for kind, header, field in others:
            link.send(kind, header)
            assert field in link.reply(FrameKind.ERROR).header["message"], header
            assert_unharmed(live, reference, f"seed {seed}: {kind.name} {str(header)[:60]}")
    finally:
        link.close()


def test_bad_aborts_to_a_decode_worker(live, reference, tiny_loaded, seed):
    hostile = Peer(live.decode.port, "router", tiny_loaded)
    try:
        for header, field in [({"abort": None}, "abort"), ({"abort": 5}, "abort"), ({}, "REQUEST.abort"),
                              ({"abort": "x", "y": 1}, "REQUEST.y"), ({"abort": ["x"]}, "abort")]:
            hostile.send(FrameKind.REQUEST, header)
            assert field in hostile.reply(FrameKind.ERROR).header["message"], header
            assert_unharmed(live, reference, f"seed {seed}: abort {header}")
        hostile.send(FrameKind.REQUEST, {"abort": "no-such-request"})  # unknown ids are fine: aborts are best effort
        assert_unharmed(live, reference, f"seed {seed}: abort of an unknown id")
    finally:
        hostile.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_router_survives_deeply_nested_lines(live, reference, tiny_loaded):
    """Finding 7: each nested line gets an error line; no thread or descriptor is left behind."""
    cluster = RemoteCluster(tiny_loaded, CONFIG, {"p0": (HOST, live.prefill.port)}, {"d0": (HOST, live.decode.port)},
                            request_timeout_s=60)
    server = RouterServer(cluster, HOST, 0)
    server.start()
    try:
        def one_nested_line() -> dict:
            with socket.create_connection((HOST, server.port), timeout=TIMEOUT_S) as sock:
                sock.sendall(b"[" * NESTED_DEPTH + b"]" * NESTED_DEPTH + b"\n")
                sock.shutdown(socket.SHUT_WR)
                reply = json.loads(sock.makefile("rb").readline())
                assert sock.recv(1) == b"", "the router kept the connection open after its input ended"
                return reply

        one_nested_line()  # warm up lazily made threads and files
        threads, fds = threading.active_count(), _open_fds()
        for _ in range(10):
            reply = one_nested_line()
            assert reply["finish_reason"] == "error" and "nested too deeply" in reply["error"], reply
        deadline = time.monotonic() + 5.0
        while (threading.active_count() > threads or _open_fds() > fds) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert threading.active_count() <= threads and _open_fds() <= fds, "threads or descriptors leaked"
        with socket.create_connection((HOST, server.port), timeout=TIMEOUT_S) as sock:
            sock.sendall(json.dumps({"id": "a", "prompt_token_ids": [11, 12, 13], **GREEDY}).encode() + b"\n")
            sock.shutdown(socket.SHUT_WR)
            lines = [json.loads(line) for line in sock.makefile("rb")]
        want = reference.generate({"prompt_token_ids": [11, 12, 13]}, SamplingParams(**GREEDY), use_tqdm=False)[0]
        assert lines[-1]["token_ids"] == want.token_ids, lines[-1]
    finally:
        server.stop()


# ---- an engine loop that dies -------------------------------------------------------------------


@pytest.fixture
def in_process(tiny_loaded):
    """Two decode servers and a prefill server in this process (so a test can break one's engine loop)."""
    servers = [DecodeServer(tiny_loaded, CONFIG) for _ in range(2)]
    peers = {f"d{i}": (HOST, s.port) for i, s in enumerate(servers)}
    for server in servers:  # decodes accept before the prefill server connects to them
        threading.Thread(target=server.serve_forever, daemon=True).start()
    servers.append(PrefillServer(tiny_loaded, CONFIG, peers))
    threading.Thread(target=servers[-1].serve_forever, daemon=True).start()
    yield servers
    for server in servers:
        server.stop()


def _drive(cluster, ids: list[str], timeout_s: float) -> dict[str, Any]:
    done: dict[str, Any] = {}
    deadline = time.monotonic() + timeout_s
    while set(ids) - set(done):
        assert time.monotonic() < deadline, f"requests {sorted(set(ids) - set(done))} still running after {timeout_s} s"
        for out in cluster.step():
            if out.finished:
                done[out.request_id] = out
    return done


@pytest.mark.parametrize("policy", ["fail", "recompute"])
def test_a_decode_loop_that_raises_fails_its_requests_at_once(in_process, tiny_loaded, reference, monkeypatch, policy):
    d0, d1, prefill = in_process
    calls = {"n": 0}
    real_step = d1.worker.engine.step

    def failing_step():
        calls["n"] += 1
        if calls["n"] > 2:
            raise IndexError("injected: index out of range in the decode step")
        return real_step()

    monkeypatch.setattr(d1.worker.engine, "step", failing_step)
    deadline_s = 120.0
    cluster = RemoteCluster(tiny_loaded, CONFIG, {"p0": (HOST, prefill.port)},
                            {"d0": (HOST, d0.port), "d1": (HOST, d1.port)}, kv_failure_policy=policy,
                            request_timeout_s=deadline_s)
    try:
        params = {"temperature": 0, "max_tokens": 40, "ignore_eos": True}
        prompts = [[i + 1, i + 2, i + 3, 40 + i] for i in range(4)]
        want = [o.token_ids for o in reference.generate([{"prompt_token_ids": p} for p in prompts],
                                                        SamplingParams(**params), use_tqdm=False)]
        t0 = time.monotonic()
        ids = [cluster.add_request({"prompt_token_ids": p}, SamplingParams(**params)) for p in prompts]
        done = _drive(cluster, ids, timeout_s=20.0)
        elapsed_s = time.monotonic() - t0
        assert elapsed_s < deadline_s / 10, f"took {elapsed_s:.1f} s: the router waited for a dead worker"
        outs = [done[i] for i in ids]
        errors = [o for o in outs if o.finish_reason == "error"]
        if policy == "fail":
            assert errors and all("d1" in o.error and "injected" in o.error for o in errors), [o.error for o in outs]
        else:
            assert not errors, [o.error for o in errors]
        for out, tokens in zip(outs, want):
            if out.finish_reason != "error":
                assert out.token_ids == tokens
        # the router hears (HEALTH) before the worker has failed and freed what it held: give it a moment
        assert d1.worker.health.dead.wait(5.0) and d1.failed and "injected" in (d1.failure or "")
        blocks = d1.worker.engine.blocks
        assert blocks.num_free_blocks == blocks.num_blocks, "the dead worker's requests kept their KV blocks"
        assert cluster.decode_workers[1].error is not None and cluster.decode_workers[0].error is None
        later = _drive(cluster, [cluster.add_request({"prompt_token_ids": p}, SamplingParams(**params))
                                 for p in prompts], timeout_s=20.0)
        assert [o.token_ids for o in later.values()] == want, [o.error for o in later.values()]
    finally:
        cluster.shutdown()


def test_a_prefill_loop_that_raises_fails_its_requests_and_new_ones_clearly(in_process, tiny_loaded, monkeypatch):
    d0, _, prefill = in_process
    real_step = prefill.worker.engine.step
    held = {"blocks": 0}

    def failing_step():  # prefill the batch, keep its blocks here (nothing is shipped), then fail
        prefill.worker.engine.handoff = lambda seq: None
        real_step()
        blocks = prefill.worker.engine.blocks
        held["blocks"] = blocks.num_blocks - blocks.num_free_blocks
        raise RuntimeError("injected prefill failure")

    monkeypatch.setattr(prefill.worker.engine, "step", failing_step)
    cluster = RemoteCluster(tiny_loaded, CONFIG, {"p0": (HOST, prefill.port)}, {"d0": (HOST, d0.port)},
                            request_timeout_s=120.0)
    try:
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        ids = [cluster.add_request({"prompt_token_ids": [1, 2, 3 + i]}, params) for i in range(3)]
        outs = _drive(cluster, ids, timeout_s=10.0)
        assert all(o.finish_reason == "error" and "p0" in o.error for o in outs.values()), [o.error for o in outs.values()]
        assert prefill.worker.health.dead.wait(5.0) and "injected" in (prefill.failure or "") and held["blocks"] > 0
        blocks = prefill.worker.engine.blocks
        assert blocks.num_free_blocks == blocks.num_blocks
        deadline = time.monotonic() + 5.0  # reservations made on the decode side come back
        while d0.worker.num_free_blocks < d0.worker.engine.blocks.num_blocks and time.monotonic() < deadline:
            time.sleep(0.05)
        assert d0.worker.num_free_blocks == d0.worker.engine.blocks.num_blocks
        with pytest.raises(RuntimeError, match="no prefill worker is alive"):
            cluster.add_request({"prompt_token_ids": [1, 2, 3]}, params)
    finally:
        cluster.shutdown()


def test_adopt_refuses_what_it_cannot_continue(tiny_loaded):
    """LLMEngine.adopt checks token ids, lengths and the reservation before it changes anything."""
    from conftest import make_engine
    from minidisagg.engine.sequence import SequenceState

    engine = make_engine(tiny_loaded, num_blocks=8)
    vocab = tiny_loaded.config.vocab_size
    assert engine.reserve("k", 5) is not None

    def state(prompt, output, params=None, generator_state_b64=None):
        return SequenceState("r", prompt, output, params or {"temperature": 0}, {"arrival_s": 0.0},
                             generator_state_b64=generator_state_b64)

    cases = [(state([1, 2, 3], [vocab]), "output_token_ids"), (state([1, -1, 3], [4]), "prompt_token_ids"),
             (state([1, 2, 3], [True]), "output_token_ids"), (state([1, 2, 3], [1.5]), "output_token_ids"),
             (state([1, 2, 3], []), "first token"), (state([], [3]), "prompt is empty"),
             (state([1] * 40, [2]), "too small"), (state([1] * engine.max_model_len, [2]), "context"),
             (state([1, 2], [3], params={"top_k": "x"}), "malformed"),
             (state([1, 2], [3], generator_state_b64="AAAA"), "generator_state_b64")]
    for bad, words in cases:
        with pytest.raises(ValueError, match=words):
            engine.adopt(bad, "k")
    assert engine.request_ids() == [] and len(engine.blocks.block_table("k")) == 1
    assert engine.adopt(state([1, 2, 3], [4]), "k").num_computed_tokens == 3


def test_an_inproc_decode_loop_that_raises_moves_requests_elsewhere(tiny_loaded, reference, monkeypatch):
    """In one process the cluster reads the worker's ``error``: its requests are recomputed on the healthy one."""
    from minidisagg.disagg.cluster import DisaggCluster

    cluster = DisaggCluster(tiny_loaded, CONFIG, transport="inproc", num_decode=2, kv_failure_policy="recompute",
                            request_timeout_s=120.0)
    try:
        def failing_step():
            raise IndexError("injected: index out of range in the decode step")

        monkeypatch.setattr(cluster.decode_workers[1].engine, "step", failing_step)
        params = {"temperature": 0, "max_tokens": 12, "ignore_eos": True}
        prompts = [[i + 1, i + 2, i + 3, 40 + i] for i in range(4)]
        want = [o.token_ids for o in reference.generate([{"prompt_token_ids": p} for p in prompts],
                                                        SamplingParams(**params), use_tqdm=False)]
        t0 = time.monotonic()
        ids = [cluster.add_request({"prompt_token_ids": p}, SamplingParams(**params)) for p in prompts]
        done = _drive(cluster, ids, timeout_s=20.0)
        assert time.monotonic() - t0 < 12.0, "the cluster waited for a dead worker"
        assert [done[i].token_ids for i in ids] == want, [done[i].error for i in ids]
        dead = cluster.decode_workers[1]
        assert isinstance(dead.error, IndexError) and dead.health.dead.wait(5.0)
        assert dead.num_free_blocks == dead.engine.blocks.num_blocks
        with pytest.raises(ValueError, match="unhealthy"):
            dead.reserve("late", 4)
    finally:
        cluster.shutdown()


def test_a_prefill_worker_refuses_an_id_it_already_holds(tiny_loaded):
    """Another router reusing an id in flight must not be able to fail or confuse that request."""
    from minidisagg.disagg.prefill_requests import Submission
    from minidisagg.disagg.prefill_worker import PrefillWorker
    from minidisagg.engine.clock import WallClock

    worker = PrefillWorker("p", tiny_loaded, CONFIG, WallClock(), {}, lambda item: None)
    sub = Submission("r1", [1, 2, 3], SamplingParams(**GREEDY), 0.0, "d0")
    worker.submit(sub)
    with pytest.raises(ValueError, match="already in flight"):
        worker.submit(sub)


SERVE_WITH_A_FAILING_LOOP = """
import sys
from minidisagg.cli import main
from minidisagg.disagg.decode_worker import DecodeWorker

def failing_step(self):
    raise IndexError("injected decode failure")

DecodeWorker.step = failing_step
sys.exit(main(sys.argv[1:]))
"""


def test_serve_exits_non_zero_when_its_engine_loop_dies():
    import subprocess
    import sys
    from pathlib import Path

    cmd = [sys.executable, "-c", SERVE_WITH_A_FAILING_LOOP, "serve", "--role", "decode", "--port", "0", *MODEL_ARGS]
    repo_root = Path(__file__).resolve().parent.parent  # this checkout's package, not an installed one
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=repo_root)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "injected decode failure" in out.stdout + out.stderr
    assert "Traceback" in out.stderr, "the failure was not logged with its traceback"


def test_the_engine_refuses_arrival_times_it_could_never_wait_for(tiny_loaded):
    from conftest import make_engine

    engine = make_engine(tiny_loaded, num_blocks=8)
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="arrival_time"):
            engine.add_request({"prompt_token_ids": [1, 2]}, SamplingParams(**GREEDY), arrival_time=bad)
    assert not engine.has_unfinished()


def test_the_router_reads_a_bad_worker_frame_as_that_requests_failure_only(tiny_loaded):
    """Finding 3 on the router side: an ERROR without an id is no lost connection; a malformed TOKENS frame
    fails its request only; HEALTH {"healthy": false} marks the worker gone at once."""
    import queue

    from minidisagg.disagg.remote_worker import RemoteWorker
    from minidisagg.transport.handshake import server_handshake
    from minidisagg.transport.listener import listen

    layout = layout_of(tiny_loaded)
    fingerprint = tiny_loaded.config.fingerprint()
    listener = listen(HOST, 0)
    accepted: dict[str, socket.socket] = {}

    def accept() -> None:
        sock, _ = listener.accept()
        server_handshake(sock, make_hello("decode", fingerprint, layout), TIMEOUT_S, {"router"})
        accepted["sock"] = sock

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    outputs: queue.Queue = queue.Queue()
    worker = RemoteWorker("d0", HOST, listener.getsockname()[1], make_hello("router", fingerprint, layout), outputs,
                          timeout_s=TIMEOUT_S, vocab_size=tiny_loaded.config.vocab_size)
    thread.join(TIMEOUT_S)
    fake = accepted["sock"]

    def send(kind: FrameKind, header: dict[str, Any] | bytes) -> None:
        body = header if isinstance(header, bytes) else json.dumps(header).encode()
        fake.sendall(PREFIX.pack(MAGIC, WIRE_VERSION, int(kind), 0, len(body), 0) + body)

    def tokens(rid: str, **changes: Any) -> dict[str, Any]:
        return {"request_id": rid, "prompt": None, "prompt_token_ids": [1, 2], "text": "", "token_ids": [3, 4],
                "finished": True, "finish_reason": "length", "timeline": {"arrival_s": 0.0, "token_times_s": [0.1, 0.2], "finish_s": 0.2},
                "num_preemptions": 0, "error": None, **changes}

    try:
        send(FrameKind.ERROR, {"message": "header: nested too deeply"})  # about a frame, not a request
        send(FrameKind.TOKENS, tokens("a@1", token_ids=[3, 10**9]))
        send(FrameKind.TOKENS, tokens("b@1", timeline={"arrival_s": math.nan}))
        send(FrameKind.TOKENS, tokens("c@1", finished="yes"))
        send(FrameKind.TOKENS, tokens("d@1"))
        got = [outputs.get(timeout=TIMEOUT_S) for _ in range(4)]
        assert [type(g).__name__ for g in got] == ["FailedRequest"] * 3 + ["RequestOutput"], got
        assert [g.request_id for g in got] == ["a@1", "b@1", "c@1", "d@1"]
        assert "token_ids[1]" in got[0].error and "timeline.arrival_s" in got[1].error and "finished" in got[2].error
        assert got[3].token_ids == [3, 4] and got[3].metrics is not None
        assert worker.error is None, worker.error
        send(FrameKind.HEALTH, {"healthy": False, "reason": "decode loop failed: IndexError"})
        deadline = time.monotonic() + 5.0
        while worker.error is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.error is not None and "unhealthy" in worker.error and "IndexError" in worker.error
    finally:
        worker.stop()
        fake.close()
        listener.close()
