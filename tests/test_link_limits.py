"""Limits on links a bad peer could hold, requests tied to their router, and router links that heal.

In-process decode and prefill servers (real sockets, one secret) with short frame deadlines and
a small connection cap; routers in this process. Each test checks what a user sees: a stalled
peer dropped after the deadline while others get the colocated engine's tokens, a refusal that
names the limit, an abort of another router's request refused by id, a router that reconnects
to a worker restarted on its port.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import replace
from typing import Any, Iterator

import pytest

from cluster_requests import run_request
from minidisagg import LLM, SamplingParams
from minidisagg.config import CacheConfig, EngineConfig, LinkConfig
from minidisagg.disagg.router_server import RemoteCluster, RouterServer
from minidisagg.disagg.serve import DecodeServer, PrefillServer
from minidisagg.transport import framing
from minidisagg.transport.auth import REFUSAL, LinkSecurity, new_secret
from minidisagg.transport.framing import MAGIC, PREFIX, FrameError, FrameKind, recv_frame
from minidisagg.transport.handshake import client_handshake
from minidisagg.transport.socket import make_hello

HOST = "127.0.0.1"
DEADLINE_S = 1.0
CAP = 12
LINK = LinkConfig(frame_deadline_s=DEADLINE_S, max_connections=CAP, reconnect_initial_s=0.05, reconnect_max_s=0.2)
CONFIG = EngineConfig(batch_invariant=True, cache=CacheConfig(num_blocks=32), link=LINK)
GREEDY = {"temperature": 0, "max_tokens": 6, "ignore_eos": True}
TIMEOUT_S = 30.0
SLACK_S = 3.0


@pytest.fixture(scope="module")
def reference():
    """The colocated engine on the same random weights: the oracle."""
    return LLM("tiny", device="cpu", batch_invariant=True)


def colocated(reference, prompt: list[int], params: dict[str, Any] = GREEDY) -> list[int]:
    return reference.generate({"prompt_token_ids": prompt}, SamplingParams(**params), use_tqdm=False)[0].token_ids


def serve(server) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


class Servers:
    """A decode and a prefill server in this process, sharing one secret."""

    def __init__(self, loaded) -> None:
        self.loaded = loaded
        self.security = LinkSecurity(secret=new_secret())
        self.decode = DecodeServer(loaded, CONFIG, security=self.security)
        self.accepting = serve(self.decode)
        self.prefill = PrefillServer(loaded, CONFIG, {"d0": (HOST, self.decode.port)}, security=self.security)
        serve(self.prefill)

    def cluster(self, **kwargs: Any) -> RemoteCluster:
        """A well-behaved router over both servers."""
        return RemoteCluster(self.loaded, CONFIG, {"p0": (HOST, self.prefill.port)}, {"d0": (HOST, self.decode.port)},
                             request_timeout_s=60, security=self.security, **kwargs)

    def peer(self, server, role: str = "router") -> socket.socket:
        """A raw connection that proved the secret and said HELLO as ``role``."""
        sock = socket.create_connection((HOST, server.port), timeout=TIMEOUT_S)
        client_handshake(sock, make_hello(role, self.loaded.config.fingerprint(), self.decode.worker.layout),
                         TIMEOUT_S, secret=self.security.secret)
        return sock

    def stop(self) -> None:
        self.prefill.stop()
        self.decode.stop()


@pytest.fixture
def servers(tiny_loaded) -> Iterator[Servers]:
    s = Servers(tiny_loaded)
    yield s
    s.stop()



def closed_within(sock: socket.socket, timeout_s: float) -> float | None:
    """Seconds until the other side closed ``sock`` (what it sent is read and dropped), or None."""
    start = time.monotonic()
    sock.settimeout(timeout_s)
    try:
        while sock.recv(1 << 16):
            pass
    except socket.timeout:
        return None
    except OSError:
        pass
    return time.monotonic() - start


def frames_until_close(sock: socket.socket) -> list[framing.Frame]:
    frames = []
    try:
        while True:
            frames.append(recv_frame(sock, TIMEOUT_S))
    except (OSError, FrameError):
        return frames


# ---- whole-frame deadlines ------------------------------------------------------------------------


def test_a_router_link_that_stalls_mid_frame_is_dropped_and_others_are_served(servers, reference):
    cluster = servers.cluster()
    try:
        for server in (servers.decode, servers.prefill):
            staller = servers.peer(server)
            whole = framing.encode_head(FrameKind.REQUEST, {"abort": "x" * 40}, 0)
            staller.sendall(whole[:len(whole) // 2])
            out = run_request(cluster, [11, 12, 13, 14])  # served while it stalls
            assert out.error is None and out.token_ids == colocated(reference, [11, 12, 13, 14])
            seconds = closed_within(staller, DEADLINE_S + SLACK_S)
            assert seconds is not None, f"{server.role} kept a peer that sent half a frame"
            staller.close()
        out = run_request(cluster, [5, 6, 7])
        assert out.error is None and out.token_ids == colocated(reference, [5, 6, 7])
    finally:
        cluster.shutdown()


def test_a_router_client_that_stalls_mid_line_is_told_and_dropped(servers, reference):
    router = RouterServer(servers.cluster(), HOST, 0, max_connections=CAP, line_deadline_s=DEADLINE_S)
    router.start()
    try:
        with socket.create_connection((HOST, router.port), timeout=TIMEOUT_S) as staller, \
                socket.create_connection((HOST, router.port), timeout=TIMEOUT_S) as good:
            staller.sendall(b'{"prompt_token_ids": [1, 2')
            good.sendall(json.dumps({"id": "g", "prompt_token_ids": [21, 22, 23], **GREEDY}).encode() + b"\n")
            good.shutdown(socket.SHUT_WR)
            lines = [json.loads(line) for line in good.makefile("rb")]
            assert lines[-1]["token_ids"] == colocated(reference, [21, 22, 23]), lines[-1]
            staller.settimeout(DEADLINE_S + SLACK_S)
            told = json.loads(staller.makefile("rb").readline())
            assert told["finish_reason"] == "error" and "incomplete" in told["error"] and "1 s" in told["error"], told
            assert closed_within(staller, SLACK_S) is not None, "the stalled client stayed connected"
    finally:
        router.stop()


# ---- connection caps ------------------------------------------------------------------------------


def open_idle(port: int, count: int) -> list[socket.socket]:
    return [socket.create_connection((HOST, port), timeout=TIMEOUT_S) for _ in range(count)]


def test_200_idle_connections_do_not_make_200_threads_and_the_extra_ones_are_told_why(servers, reference):
    cluster = servers.cluster()  # connected before the flood: it keeps being served
    router = RouterServer(servers.cluster(), HOST, 0, max_connections=CAP, line_deadline_s=DEADLINE_S)
    router.start()
    held: list[socket.socket] = []
    try:
        threads_before = threading.active_count()
        for server in (servers.decode, servers.prefill):
            held += open_idle(server.port, 200)
        held_router = open_idle(router.port, 200)
        held += held_router
        time.sleep(0.5)
        added = threading.active_count() - threads_before
        # a thread per worker connection, two per router client (reader and writer): 4 * CAP at most
        assert added <= 4 * CAP, f"600 idle connections made {added} threads (cap {CAP} per port)"
        refusal = frames_until_close(held[199])  # the last one to the decode server
        assert refusal and refusal[0].kind == FrameKind.ERROR, refusal
        assert f"maximum of {CAP} connections" in refusal[0].header["message"], refusal[0].header
        assert "--max-connections" in refusal[0].header["message"]
        line = json.loads(held_router[-1].makefile("rb").readline())
        assert line["finish_reason"] == "error" and f"maximum of {CAP} connections" in line["error"], line
        out = run_request(cluster, [31, 32, 33])
        assert out.error is None and out.token_ids == colocated(reference, [31, 32, 33])
    finally:
        for sock in held:
            sock.close()
    try:
        deadline = time.monotonic() + 10.0  # once they are gone, new peers are served again
        while servers.decode.connections.active > 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        out = run_request(servers.cluster(), [41, 42])
        assert out.error is None and out.token_ids == colocated(reference, [41, 42])
    finally:
        router.stop()
        cluster.shutdown()


# ---- requests tied to their router ----------------------------------------------------------------


def test_a_router_may_abort_only_its_own_requests(servers, reference):
    mine, theirs = servers.cluster(), servers.cluster()
    long = {"temperature": 0, "max_tokens": 60, "ignore_eos": True}
    try:
        rid = mine.add_request({"prompt_token_ids": [51, 52, 53]}, SamplingParams(**long))
        wire_id = mine.wire_id(rid, 1)
        deadline = time.monotonic() + TIMEOUT_S
        while not servers.decode.worker.owners.owner_of(wire_id) and time.monotonic() < deadline:
            mine.step()  # until it decodes on d0
        other = servers.peer(servers.decode)
        other.sendall(framing.encode_head(FrameKind.REQUEST, {"owner": "f" * 32}, 0))
        other.sendall(framing.encode_head(FrameKind.REQUEST, {"abort": wire_id}, 0))
        error = recv_frame(other, TIMEOUT_S)
        assert error.kind == FrameKind.ERROR and wire_id in error.header["message"], error
        assert "nothing was aborted" in error.header["message"], error.header
        theirs.decode_workers[0].abort(wire_id)  # another router's own link: refused the same way
        out = None
        while out is None and time.monotonic() < deadline:
            out = next((o for o in mine.step() if o.request_id == rid and o.finished), None)
        assert out is not None and out.error is None and out.token_ids == colocated(reference, [51, 52, 53], long)
        other.sendall(framing.encode_head(FrameKind.PING, {}, 0))
        seen = [f for f in frames_before_health(other) if f.kind == FrameKind.TOKENS]
        assert not seen, "a router saw another router's outputs"
        other.close()
        rid = mine.add_request({"prompt_token_ids": [61, 62]}, SamplingParams(**long))  # its own: abort works
        while not servers.decode.worker.owners.owner_of(mine.wire_id(rid, 1)) and time.monotonic() < deadline:
            mine.step()
        mine.abort(rid)
        while servers.decode.worker.num_free_blocks < 32 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert servers.decode.worker.num_free_blocks == 32, "the owner's abort did not free its blocks"
    finally:
        mine.shutdown()
        theirs.shutdown()


def test_a_router_that_leaves_has_its_requests_aborted(servers):
    cluster = servers.cluster()
    long = {"temperature": 0, "max_tokens": 480, "ignore_eos": True}  # about the whole decode pool
    try:
        rid = cluster.add_request({"prompt_token_ids": [91, 92, 93]}, SamplingParams(**long))
        deadline = time.monotonic() + TIMEOUT_S
        while not servers.decode.worker.owners.owner_of(cluster.wire_id(rid, 1)) and time.monotonic() < deadline:
            cluster.step()
    finally:
        cluster.shutdown()  # its link to d0 closes with the request still decoding
    left_s = time.monotonic()
    while servers.decode.worker.num_free_blocks < 32 and time.monotonic() < left_s + 1.5:
        time.sleep(0.02)
    assert servers.decode.worker.num_free_blocks == 32, "a router's requests kept decoding after it left"
    assert len(servers.decode.worker.owners) == 0


def frames_before_health(sock: socket.socket) -> list[framing.Frame]:
    frames = []
    while True:
        frames.append(recv_frame(sock, TIMEOUT_S))
        if frames[-1].kind == FrameKind.HEALTH:
            return frames


# ---- the wire version a peer meets ------------------------------------------------------------------


def test_a_version_1_peer_stops_at_the_first_frame_and_never_meets_health(servers, monkeypatch):
    with socket.create_connection((HOST, servers.decode.port), timeout=TIMEOUT_S) as sock:
        raw = sock.recv(PREFIX.size, socket.MSG_WAITALL)  # the worker's first frame, as bytes
        raw += sock.recv(PREFIX.unpack(raw)[4], socket.MSG_WAITALL)
    mine, theirs = socket.socketpair()
    with mine, theirs:
        theirs.sendall(raw)
        monkeypatch.setattr(framing, "WIRE_VERSION", 1)  # this side now reads as a version 1 peer would
        with pytest.raises(FrameError, match="wrong wire version 2 \\(this side speaks 1\\)"):
            recv_frame(mine, TIMEOUT_S)
        monkeypatch.undo()
    with socket.create_connection((HOST, servers.decode.port), timeout=TIMEOUT_S) as sock:
        challenge = recv_frame(sock, TIMEOUT_S)
        assert challenge.kind == FrameKind.AUTH_CHALLENGE
        body = b'{"role": "router"}'
        sock.sendall(PREFIX.pack(MAGIC, 1, int(FrameKind.PING), 0, len(body), 0) + body)  # a version 1 frame
        reply = recv_frame(sock, TIMEOUT_S)
        assert reply.kind == FrameKind.ERROR and reply.header == {"message": REFUSAL}, reply
    sock = servers.peer(servers.decode)  # version 2 and the secret: PING gets HEALTH
    sock.sendall(framing.encode_head(FrameKind.PING, {}, 0))
    health = recv_frame(sock, TIMEOUT_S)
    assert health.kind == FrameKind.HEALTH and health.header["healthy"] is True
    sock.close()


# ---- router links that heal -----------------------------------------------------------------------


def test_the_router_reconnects_to_a_worker_restarted_on_its_port(servers, tiny_loaded, reference):
    cluster = servers.cluster()
    try:
        out = run_request(cluster, [71, 72, 73])
        assert out.error is None and out.token_ids == colocated(reference, [71, 72, 73])
        port = servers.decode.port
        servers.decode.stop()
        servers.accepting.join(TIMEOUT_S)
        remote = cluster.decode_workers[0]
        deadline = time.monotonic() + TIMEOUT_S
        while remote.error is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert remote.error is not None, "the router did not notice its decode worker go"
        servers.decode = DecodeServer(tiny_loaded, CONFIG, port=port, security=servers.security)
        serve(servers.decode)
        while remote.error is not None and time.monotonic() < deadline:
            cluster.step()
        assert remote.error is None and remote.num_reconnects == 1, remote.error
        out = run_request(cluster, [81, 82, 83, 84])
        assert out.error is None and out.token_ids == colocated(reference, [81, 82, 83, 84]), out.error
        assert servers.decode.worker.num_free_blocks == 32
    finally:
        cluster.shutdown()


def test_link_config_names_the_new_fields():
    for fields, named in [({"frame_deadline_s": 0}, "frame_deadline_s"), ({"max_connections": 0}, "max_connections"),
                          ({"max_connections": True}, "max_connections"), ({"frame_deadline_s": float("nan")},
                                                                            "frame_deadline_s")]:
        with pytest.raises(ValueError, match=named):
            LinkConfig(**fields)
    assert replace(LINK, max_connections=5).max_connections == 5
