"""Leases and quotas on decode reservations, KV links that heal, and output subscribers that cannot stall a worker.

Each test checks behaviour a user can see: blocks back in the pool, an ERROR that names the
field to change, greedy tokens equal to the colocated engine's. Lease expiry runs on a fake
clock where a live wait would be slow; the links are real sockets to in-process servers.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import threading
import time
from dataclasses import replace
from typing import Any, Optional

import pytest
import torch

from cluster_requests import run_request
from minidisagg import LLM, SamplingParams
from minidisagg.config import CacheConfig, EngineConfig, LinkConfig
from minidisagg.disagg.decode_worker import DecodeWorker
from minidisagg.disagg.outbox import Outbox, Subscribers
from minidisagg.disagg.router_server import RemoteCluster, RouterServer
from minidisagg.disagg.serve import DecodeServer, PrefillServer
from minidisagg.engine.clock import WallClock
from minidisagg.engine.llm_engine import RequestOutput
from minidisagg.engine.sequence import SequenceState
from minidisagg.metrics import RequestTimeline
from minidisagg.transport.backoff import ReconnectPolicy
from minidisagg.transport.base import TransferError
from minidisagg.transport.framing import MAGIC, PREFIX, WIRE_VERSION, FrameKind, recv_frame
from minidisagg.transport.handshake import client_handshake
from minidisagg.transport.inproc import InprocSender
from minidisagg.transport.socket import SocketSender, make_hello

HOST = "127.0.0.1"
NUM_BLOCKS = 32
TIMEOUT_S = 30.0
CONFIG = EngineConfig(batch_invariant=True, cache=CacheConfig(num_blocks=NUM_BLOCKS))
GREEDY = {"temperature": 0, "max_tokens": 6, "ignore_eos": True}


@pytest.fixture(scope="module")
def reference():
    """The colocated engine on the same random weights: the oracle."""
    return LLM("tiny", device="cpu", batch_invariant=True)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


def pool_whole(worker: DecodeWorker, timeout_s: float = 10.0) -> bool:
    """Whether every block of the worker's pool is free (waiting up to ``timeout_s`` for links to catch up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if worker.num_free_blocks == worker.engine.blocks.num_blocks:
            return True
        time.sleep(0.02)
    return worker.num_free_blocks == worker.engine.blocks.num_blocks


def state(request_id: str, num_prompt: int, max_tokens: int = 1) -> SequenceState:
    """A prefilled request's state as a prefill worker would commit it."""
    return SequenceState(request_id, list(range(1, num_prompt + 1)), [7], {"max_tokens": max_tokens, "temperature": 0},
                         {"arrival_s": 0.0})


def serve(server) -> threading.Thread:
    """Accept connections on a thread of this process; the thread ends once the server is stopped."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def decode_server(tiny_loaded, request):
    """A decode server in this process; ``@pytest.mark.parametrize('decode_server', [LinkConfig(...)], indirect=True)``."""
    link = getattr(request, "param", LinkConfig())
    server = DecodeServer(tiny_loaded, replace(CONFIG, link=link))
    serve(server)
    yield server
    server.stop()


def sender_to(loaded, server, **kwargs) -> SocketSender:
    hello = make_hello("prefill", loaded.config.fingerprint(), server.worker.layout)
    return SocketSender(HOST, server.port, hello, **kwargs)


# ---- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, named", [
    ({"kv_lease_s": 0}, "kv_lease_s"), ({"kv_lease_s": float("nan")}, "kv_lease_s"),
    ({"kv_lease_s": -1.0}, "kv_lease_s"), ({"max_reserved_share_per_peer": 0}, "max_reserved_share_per_peer"),
    ({"max_reserved_share_per_peer": 1.5}, "max_reserved_share_per_peer"),
    ({"max_reserved_share_per_peer": True}, "max_reserved_share_per_peer"),
    ({"subscriber_queue_size": 0}, "subscriber_queue_size"), ({"reconnect_deadline_s": -1}, "reconnect_deadline_s"),
    ({"reconnect_initial_s": 2.0, "reconnect_max_s": 1.0}, "reconnect_max_s")])
def test_link_config_names_the_bad_field(fields, named):
    with pytest.raises(ValueError, match=named):
        LinkConfig(**fields)
    assert LinkConfig().kv_lease_s == 30.0 and 0 < LinkConfig().max_reserved_share_per_peer <= 1


# ---- leases -------------------------------------------------------------------------------------


def test_a_lease_without_progress_expires_and_the_pool_is_whole(tiny_loaded, caplog):
    clock = FakeClock()
    config = replace(CONFIG, link=LinkConfig(kv_lease_s=5.0))
    outputs: list[RequestOutput] = []
    worker = DecodeWorker("d0", tiny_loaded, config, WallClock(), outputs.append, lease_clock=clock)
    layout = worker.layout
    assert worker.reserve("stalled", 40) and worker.reserve("busy", 40)
    assert worker.num_free_blocks < NUM_BLOCKS
    expired: list[str] = []
    for _ in range(3):  # a transfer that keeps sending pages keeps its lease
        clock.advance(4.0)
        worker.write_layer("busy", 0, torch.zeros(layout.layer_shape(3)))
        expired += worker.expire_leases()
    assert expired == ["stalled"], expired
    with caplog.at_level(logging.WARNING):
        clock.advance(5.0)
        assert worker.expire_leases() == ["busy"]
    assert pool_whole(worker, 0.0), "expired leases kept their blocks"
    assert "lease expired" in caplog.text and "kv_lease_s=5" in caplog.text
    for late in (lambda: worker.write_layer("stalled", 0, torch.zeros(layout.layer_shape(3))),
                 lambda: worker.commit("busy", state("r-busy", 40), 0)):
        with pytest.raises(ValueError, match="lease expired.*kv_lease_s"):
            late()
    assert pool_whole(worker, 0.0) and outputs == []


def test_an_in_process_sender_renews_its_leases_until_it_stops(tiny_loaded):
    clock = FakeClock()
    worker = DecodeWorker("d0", tiny_loaded, replace(CONFIG, link=LinkConfig(kv_lease_s=5.0)), WallClock(),
                          lambda out: None, lease_clock=clock)
    sender = InprocSender(worker, heartbeat_s=0.0)
    assert sender.reserve("queued", 40, TIMEOUT_S)
    for _ in range(4):  # twenty seconds of heartbeats: the prefill is still working through its queue
        clock.advance(4.0)
        sender.renew_leases()
        assert worker.expire_leases() == []
    clock.advance(5.0)  # the heartbeats stop (a stuck prefill loop)
    assert worker.expire_leases() == ["queued"] and pool_whole(worker, 0.0)
    with pytest.raises(TransferError, match="lease expired"):
        sender.commit("queued", state("r", 40), 0, TIMEOUT_S)


def test_a_committed_transfer_never_expires(tiny_loaded):
    clock = FakeClock()
    outputs: list[RequestOutput] = []
    worker = DecodeWorker("d0", tiny_loaded, replace(CONFIG, link=LinkConfig(kv_lease_s=1.0)), WallClock(),
                          outputs.append, lease_clock=clock)
    assert worker.reserve("t", 40)
    worker.commit("t", state("r", 40, max_tokens=3), 0)
    clock.advance(100.0)
    assert worker.expire_leases() == []
    while worker.step():
        pass
    assert outputs[-1].finished and outputs[-1].error is None and len(outputs[-1].token_ids) == 3
    assert pool_whole(worker, 0.0)


class RawLink:
    """A raw prefill-role connection to a decode server: frames out, frames back."""

    def __init__(self, loaded, server) -> None:
        self.sock = socket.create_connection((HOST, server.port), timeout=TIMEOUT_S)
        client_handshake(self.sock, make_hello("prefill", loaded.config.fingerprint(), server.worker.layout), TIMEOUT_S)

    def send(self, kind: FrameKind, header: dict[str, Any]) -> None:
        body = json.dumps(header).encode()
        self.sock.sendall(PREFIX.pack(MAGIC, WIRE_VERSION, int(kind), 0, len(body), 0) + body)

    def recv(self) -> tuple[FrameKind, dict[str, Any]]:
        frame = recv_frame(self.sock, TIMEOUT_S)
        return frame.kind, frame.header

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("decode_server", [LinkConfig(kv_lease_s=0.5)], indirect=True)
def test_a_stalled_transfer_is_told_its_lease_expired_and_its_link_lives_on(tiny_loaded, decode_server, caplog):
    link = RawLink(tiny_loaded, decode_server)
    try:
        with caplog.at_level(logging.WARNING):
            link.send(FrameKind.RESERVE, {"transfer_id": "stalled", "num_tokens": 40})
            assert link.recv() == (FrameKind.GRANT, {"transfer_id": "stalled", "ok": True})
            kind, notice = link.recv()  # unasked, once the lease ran out
        assert kind == FrameKind.ERROR and notice["transfer_id"] == "stalled", notice
        assert notice["event"] == "lease_expired" and "kv_lease_s" in notice["message"], notice
        assert pool_whole(decode_server.worker), "the expired reservation kept its blocks"
        assert "lease expired" in caplog.text
        link.send(FrameKind.DONE, {"transfer_id": "stalled", "state": state("r", 40).to_dict(), "num_bytes": 0})
        kind, refusal = link.recv()
        assert kind == FrameKind.ERROR and "lease expired" in refusal["message"], refusal
        link.send(FrameKind.RESERVE, {"transfer_id": "next", "num_tokens": 10})  # the link is still up
        assert link.recv() == (FrameKind.GRANT, {"transfer_id": "next", "ok": True})
        link.send(FrameKind.CANCEL, {"transfer_id": "next"})
        assert pool_whole(decode_server.worker)
    finally:
        link.close()


@pytest.mark.parametrize("decode_server", [LinkConfig(kv_lease_s=0.5)], indirect=True)
def test_pages_after_an_expired_lease_are_refused_by_name(tiny_loaded, decode_server):
    sender = sender_to(tiny_loaded, decode_server)
    try:
        assert sender.reserve("late", 40, TIMEOUT_S)
        assert pool_whole(decode_server.worker), "the expired reservation kept its blocks"
        layout = decode_server.worker.layout
        sender.send_layer("late", 0, torch.zeros(layout.layer_shape(3)))  # read and dropped by the decode side
        with pytest.raises(TransferError, match="lease expired"):
            sender.commit("late", state("r", 40), 0, TIMEOUT_S)
        assert sender.reserve("fresh", 10, TIMEOUT_S) and not sender.is_broken
        sender.cancel("fresh")
        assert pool_whole(decode_server.worker)
    finally:
        sender.close()


@pytest.mark.parametrize("decode_server", [LinkConfig(kv_lease_s=0.5)], indirect=True)
def test_heartbeats_keep_a_waiting_transfer_alive(tiny_loaded, decode_server):
    sender = sender_to(tiny_loaded, decode_server, heartbeat_s=0.05)
    try:
        assert sender.reserve("queued", 40, TIMEOUT_S)
        until = time.monotonic() + 1.5  # three leases long: its prefill is still queued
        while time.monotonic() < until:
            sender.renew_leases()
            time.sleep(0.02)
        sender.send_layers("queued", 0, torch.zeros(decode_server.worker.layout.num_layers,
                                                    *decode_server.worker.layout.layer_shape(3)))
        sender.commit("queued", state("r", 40), 0, TIMEOUT_S)  # adopted: the lease held
        assert pool_whole(decode_server.worker)
    finally:
        sender.close()


def test_a_long_prefill_queue_keeps_its_reservations(tiny_loaded, reference, monkeypatch, caplog):
    """One prompt per prefill step, each step slower than a third of the lease: the last waits several leases."""
    link = LinkConfig(kv_lease_s=0.5)
    decode = DecodeServer(tiny_loaded, replace(CONFIG, link=link))
    serve(decode)
    prefill = PrefillServer(tiny_loaded, replace(CONFIG, link=link, max_num_seqs=1), {"d0": (HOST, decode.port)})
    serve(prefill)
    real_step = prefill.worker.engine.step

    def slow_step():
        time.sleep(0.3)
        return real_step()

    monkeypatch.setattr(prefill.worker.engine, "step", slow_step)
    cluster = RemoteCluster(tiny_loaded, CONFIG, {"p0": (HOST, prefill.port)}, {"d0": (HOST, decode.port)},
                            request_timeout_s=60)
    try:
        prompts = [[5 + i, 6, 7, 8, 9] for i in range(4)]
        with caplog.at_level(logging.WARNING):
            ids = [cluster.add_request({"prompt_token_ids": p}, SamplingParams(**GREEDY)) for p in prompts]
            done: dict[str, RequestOutput] = {}
            deadline = time.monotonic() + TIMEOUT_S
            while len(done) < len(ids) and time.monotonic() < deadline:
                done.update((o.request_id, o) for o in cluster.step() if o.finished)
        assert [done[i].error for i in ids] == [None] * 4, "a queued transfer lost its reservation"
        assert [done[i].token_ids for i in ids] == [colocated(reference, p) for p in prompts]
        assert "lease expired" not in caplog.text
        assert pool_whole(decode.worker)
    finally:
        cluster.shutdown()
        prefill.stop()
        decode.stop()


# ---- quotas and closed links --------------------------------------------------------------------


def test_a_peer_over_its_quota_is_refused_and_others_still_reserve(tiny_loaded, decode_server):
    worker = decode_server.worker  # 32 blocks, share 0.5: a peer may hold 16 blocks in reservations
    greedy, other = RawLink(tiny_loaded, decode_server), sender_to(tiny_loaded, decode_server)
    try:
        greedy.send(FrameKind.RESERVE, {"transfer_id": "g1", "num_tokens": 160})  # 10 blocks
        assert greedy.recv() == (FrameKind.GRANT, {"transfer_id": "g1", "ok": True})
        greedy.send(FrameKind.RESERVE, {"transfer_id": "g2", "num_tokens": 160})
        kind, refusal = greedy.recv()
        assert kind == FrameKind.ERROR and refusal["transfer_id"] == "g2" and refusal["over_quota"] is True
        assert "max_reserved_share_per_peer" in refusal["message"], refusal
        assert other.reserve("o1", 160, TIMEOUT_S), "a second peer was refused because of the first"
        assert not other.reserve("o2", 160, TIMEOUT_S)  # over its own quota: "not now", the link stays up
        greedy.send(FrameKind.RESERVE, {"transfer_id": "g3", "num_tokens": 64})  # 4 more blocks fit the quota
        assert greedy.recv() == (FrameKind.GRANT, {"transfer_id": "g3", "ok": True})
        for tid in ("g1", "g3"):
            greedy.send(FrameKind.CANCEL, {"transfer_id": tid})
        other.cancel("o1")
        assert pool_whole(worker)
        assert other.reserve("big", 400, TIMEOUT_S), "a peer holding nothing may take one bigger than its share"
        other.cancel("big")
        assert pool_whole(worker)
    finally:
        greedy.close()
        other.close()


def test_a_closed_link_frees_every_reservation_it_held(tiny_loaded, decode_server, caplog):
    sender = sender_to(tiny_loaded, decode_server)
    assert sender.reserve_many([("a", 40), ("b", 17), ("c", 1)], TIMEOUT_S) == [True, True, True]
    assert decode_server.worker.num_free_blocks == NUM_BLOCKS - 6
    with caplog.at_level(logging.INFO):
        sender.sock.close()  # no BYE, no CANCEL: the connection just ends
        assert pool_whole(decode_server.worker), "a closed link leaked its reservations"
    assert "freed 6 block(s) of 3 reservation(s)" in caplog.text


# ---- links that heal ----------------------------------------------------------------------------


def test_reconnect_waits_double_up_to_the_cap_with_jitter():
    policy = ReconnectPolicy(initial_s=0.1, max_s=1.0, deadline_s=60.0)
    delays = policy.delays(random.Random(7))
    bounds = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    waits = [next(delays) for _ in bounds]
    assert all(b / 2 <= w <= b for w, b in zip(waits, bounds)), waits
    assert len(set(waits[4:])) > 1, "capped waits should still be jittered"
    assert not ReconnectPolicy(deadline_s=0).enabled


def test_a_broken_link_fails_its_transfers_and_heals_for_new_ones(tiny_loaded, decode_server):
    sender = sender_to(tiny_loaded, decode_server, reconnect=ReconnectPolicy(initial_s=0.05, max_s=0.2))
    try:
        assert sender.reserve("before", 40, TIMEOUT_S)
        sender.sock.shutdown(socket.SHUT_RDWR)  # the connection breaks under a transfer in flight
        with pytest.raises(TransferError):
            sender.send_layer("before", 0, torch.zeros(decode_server.worker.layout.layer_shape(3)))
        deadline = time.monotonic() + TIMEOUT_S
        while not sender.reserve("after", 40, TIMEOUT_S):  # "not now" while it heals
            assert time.monotonic() < deadline, "the link did not heal"
            time.sleep(0.05)
        with pytest.raises(TransferError, match="broke"):  # the old transfer stays failed on the new connection
            sender.commit("before", state("r", 40), 0, TIMEOUT_S)
        sender.cancel("before")  # a no-op: nothing of it is left on the healed connection
        assert decode_server.worker.num_free_blocks == NUM_BLOCKS - 3, "the broken connection's blocks came back"
        sender.cancel("after")
        assert pool_whole(decode_server.worker)
    finally:
        sender.close()


def test_a_link_that_cannot_heal_gives_up_after_its_deadline(tiny_loaded, decode_server):
    sender = sender_to(tiny_loaded, decode_server, reconnect=ReconnectPolicy(initial_s=0.05, max_s=0.1, deadline_s=0.5))
    try:
        decode_server.stop()  # nothing listens any more
        sender.sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            try:
                assert not sender.reserve("x", 10, TIMEOUT_S)
            except TransferError as exc:
                assert "reconnect_deadline_s" in str(exc), exc
                break
            assert time.monotonic() < deadline, "the link never gave up"
            time.sleep(0.05)
        assert sender.is_broken
    finally:
        sender.close()



def colocated(reference, prompt: list[int]) -> list[int]:
    return reference.generate({"prompt_token_ids": prompt}, SamplingParams(**GREEDY), use_tqdm=False)[0].token_ids


def test_a_dropped_and_a_restarted_decode_link_heal_and_serve_greedy_tokens(tiny_loaded, reference):
    link = LinkConfig(reconnect_initial_s=0.05, reconnect_max_s=0.2)
    config = replace(CONFIG, link=link)
    decode = DecodeServer(tiny_loaded, config)
    accepting = serve(decode)
    prefill = PrefillServer(tiny_loaded, config, {"d0": (HOST, decode.port)})
    serve(prefill)
    servers = [decode, prefill]
    cluster: Optional[RemoteCluster] = None
    try:
        cluster = RemoteCluster(tiny_loaded, CONFIG, {"p0": (HOST, prefill.port)}, {"d0": (HOST, decode.port)},
                                request_timeout_s=60)
        prompts = [[11, 12, 13, 14, 15], [3, 1, 4, 1, 5, 9, 2, 6], [42] * 20]
        out = run_request(cluster, prompts[0])
        assert out.error is None and out.token_ids == colocated(reference, prompts[0])
        prefill.worker.senders["d0"].sock.shutdown(socket.SHUT_RDWR)  # the KV link drops
        out = run_request(cluster, prompts[1])
        assert out.error is None and out.token_ids == colocated(reference, prompts[1]), out.error
        cluster.shutdown()
        decode.stop()  # the decode worker goes away; another starts on the same port
        accepting.join(TIMEOUT_S)  # its listening socket is gone once its accept loop has ended
        decode = DecodeServer(tiny_loaded, config, port=decode.port)
        serve(decode)
        servers.append(decode)
        cluster = RemoteCluster(tiny_loaded, CONFIG, {"p0": (HOST, prefill.port)}, {"d0": (HOST, decode.port)},
                                request_timeout_s=60)
        out = run_request(cluster, prompts[2])
        assert out.error is None and out.token_ids == colocated(reference, prompts[2]), out.error
        assert prefill.worker.senders["d0"].num_reconnects == 2
        assert pool_whole(decode.worker)
    finally:
        if cluster is not None:
            cluster.shutdown()
        for server in servers:
            server.stop()


@pytest.mark.parametrize("policy", ["fail", "recompute"])
def test_a_transfer_cut_by_a_broken_link_follows_the_failure_policy(tiny_loaded, reference, policy):
    config = replace(CONFIG, link=LinkConfig(reconnect_initial_s=0.05, reconnect_max_s=0.2))
    decode = DecodeServer(tiny_loaded, config)
    serve(decode)
    prefill = PrefillServer(tiny_loaded, config, {"d0": (HOST, decode.port)})
    serve(prefill)
    sender = prefill.worker.senders["d0"]
    real_send_layers, cuts = sender.send_layers, []

    def cut_once(*args: Any) -> None:  # the link breaks just as the first request's pages leave
        if not cuts:
            cuts.append(args[0])
            sender.sock.shutdown(socket.SHUT_RDWR)
        real_send_layers(*args)

    sender.send_layers = cut_once  # type: ignore[method-assign]
    cluster = RemoteCluster(tiny_loaded, CONFIG, {"p0": (HOST, prefill.port)}, {"d0": (HOST, decode.port)},
                            kv_failure_policy=policy, request_timeout_s=60)
    try:
        prompts = [[21, 22, 23, 24], [31, 32, 33, 34, 35, 36]]
        first = run_request(cluster, prompts[0])
        if policy == "fail":
            assert first.finish_reason == "error" and "KV transfer to d0 failed" in (first.error or ""), first.error
        else:
            assert first.error is None and first.token_ids == colocated(reference, prompts[0]), first.error
        later = run_request(cluster, prompts[1])  # over the healed link
        assert later.error is None and later.token_ids == colocated(reference, prompts[1]), later.error
        assert cuts and sender.num_reconnects == 1 and pool_whole(decode.worker)
    finally:
        cluster.shutdown()
        prefill.stop()
        decode.stop()


# ---- subscribers that fall behind ---------------------------------------------------------------


def test_an_outbox_drops_a_subscriber_that_stops_reading_and_never_blocks(caplog):
    released = threading.Event()  # set only by the outbox's interrupt: until then a write blocks, as on a full socket
    dropped: list[str] = []

    def blocked_write(message: int) -> None:
        if not released.wait(TIMEOUT_S):
            raise OSError("timed out")
        raise OSError("shut down")

    received: list[int] = []
    slow = Outbox("slow", blocked_write, 4, released.set, dropped.append)
    fast = Outbox("fast", received.append, 4, lambda: None, lambda reason: None)
    slow.start()
    fast.start()
    results: list[bool] = []

    def produce() -> None:
        for i in range(200):
            results.append(slow.put(i))
            deadline = time.monotonic() + TIMEOUT_S
            while len(received) < i - 2 and time.monotonic() < deadline:  # the reading subscriber keeps up
                time.sleep(0.001)
            assert fast.put(i)

    with caplog.at_level(logging.WARNING):
        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        producer.join(TIMEOUT_S)
        assert not producer.is_alive(), "putting into an outbox blocked"
        fast.close()
        fast.join(TIMEOUT_S)
        slow.join(TIMEOUT_S)
    assert received == list(range(200)), "the subscriber that reads lost messages"
    assert len(dropped) == 1 and "subscriber_queue_size" in dropped[0], dropped
    assert results[:5] == [True] * 5 and results[-1] is False
    assert "dropping subscriber slow" in caplog.text


def test_worker_subscribers_drop_a_router_that_never_reads(caplog):
    """Real sockets: one router never reads, another does; the worker's broadcasts never wait."""
    dropped: list[tuple[str, str, int]] = []
    subscribers = Subscribers(queue_size=8, on_drop=lambda peer, reason, left: dropped.append((peer, reason, left)))
    pairs = [socket.socketpair() for _ in range(2)]
    for ours, theirs in pairs:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        ours.settimeout(TIMEOUT_S)
    (deaf, _), (reader, reader_peer) = pairs
    subscribers.add(deaf, "deaf")
    subscribers.add(reader, "reader")
    got: list[int] = []

    def read() -> None:
        reader_peer.settimeout(TIMEOUT_S)
        while len(got) < 2000:
            got.append(recv_frame(reader_peer, TIMEOUT_S).header["n"])

    reading = threading.Thread(target=read, daemon=True)
    reading.start()
    padding = "x" * 512
    with caplog.at_level(logging.WARNING):
        for n in range(2000):
            subscribers.send(FrameKind.TOKENS, {"n": n, "pad": padding})
            while len(got) < n - 4:  # keep the reading router within its queue: it must never be dropped
                time.sleep(0.001)
        reading.join(TIMEOUT_S)
    assert got == list(range(2000)), "the reading router missed outputs"
    assert [(peer, left) for peer, _, left in dropped] == [("router deaf", 1)], dropped
    assert "overflowed" in dropped[0][1] and len(subscribers) == 1
    for pair in pairs:
        for sock in pair:
            sock.close()


def test_a_decode_worker_whose_last_router_stops_reading_aborts_its_requests(tiny_loaded, caplog):
    """The only router never reads; once its queue overflows it is dropped, and nobody is left to read the
    outputs, so the requests are aborted and their blocks freed long before max_tokens. (Bulky frames stand
    in for a long stream of outputs: they fill the socket's buffers in a moment.)"""
    decode = DecodeServer(tiny_loaded, replace(CONFIG, link=LinkConfig(subscriber_queue_size=2)))
    serve(decode)
    sender = sender_to(tiny_loaded, decode)
    deaf = socket.socket()
    try:
        with caplog.at_level(logging.WARNING):
            # committed before the router subscribes: its queue of two frames would overflow (a frame per
            # decode step) before the last commit, and a request committed with no router left is not this test's
            for i in range(4):
                assert sender.reserve(f"t{i}", 40, TIMEOUT_S)
                sender.commit(f"t{i}", state(f"r{i}", 40, max_tokens=1900), 0, TIMEOUT_S)
            deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            deaf.connect((HOST, decode.port))
            client_handshake(deaf, make_hello("router", tiny_loaded.config.fingerprint(), decode.worker.layout),
                             TIMEOUT_S)
            deadline = time.monotonic() + TIMEOUT_S
            while len(decode.subscribers) < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            bulky = {"request_id": "bulk", "pad": "x" * (500 << 10)}
            for _ in range(100):  # 50 MB, far more than any socket buffer; never blocks the caller
                if len(decode.subscribers) == 0:
                    break
                decode.subscribers.send(FrameKind.TOKENS, bulky)
                time.sleep(0.01)
            assert pool_whole(decode.worker), f"the requests of a dropped router kept their blocks: {caplog.text[-1500:]}"
        assert "overflowed" in caplog.text and "aborted its 4 request(s)" in caplog.text
    finally:
        sender.close()
        deaf.close()
        decode.stop()


class FloodCluster:
    """Stands in for a ``RemoteCluster``: each step gives every live request one more token.

    The engine runs as fast as the reading client reads (a step needs one credit; the reader
    gives one back per line), so only the client that never reads can fall behind.
    """

    shared_clock = False

    def __init__(self, max_tokens: int, window: int) -> None:
        self.max_tokens = max_tokens
        self.credit = threading.Semaphore(window)
        self.live: dict[str, list[int]] = {}
        self.aborted: list[str] = []
        self.lock = threading.Lock()

    def add_request(self, prompt: dict, params: SamplingParams, request_id: str) -> str:
        with self.lock:
            self.live[request_id] = []
        return request_id

    def has_unfinished(self) -> bool:
        return bool(self.live)

    def step(self) -> list[RequestOutput]:
        if not self.credit.acquire(timeout=0.01):
            return []
        outputs = []
        with self.lock:
            for rid, tokens in list(self.live.items()):
                tokens.append(len(tokens) % 50 + 1)
                finished = len(tokens) >= self.max_tokens
                outputs.append(RequestOutput(rid, None, [1, 2], "", tokens, finished,
                                             "length" if finished else None, None, RequestTimeline(arrival_s=0.0)))
                if finished:
                    del self.live[rid]
        return outputs

    def abort(self, request_id: str) -> None:
        with self.lock:
            if self.live.pop(request_id, None) is not None:
                self.aborted.append(request_id)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        pass


def test_a_router_client_that_never_reads_is_dropped_and_others_get_every_line(caplog):
    cluster = FloodCluster(max_tokens=20_000, window=8)
    server = RouterServer(cluster, HOST, 0, queue_size=64)  # type: ignore[arg-type]
    server.start()
    long_id = "x" * 2000  # long lines fill the deaf client's socket buffers sooner
    try:
        with caplog.at_level(logging.WARNING), socket.create_connection((HOST, server.port), timeout=TIMEOUT_S) as good, \
                socket.socket() as deaf:
            good.sendall(b'{"id": "g", "prompt_token_ids": [1, 2]}\n')  # first, so the engine's steps all serve it
            deadline = time.monotonic() + TIMEOUT_S
            while not cluster.live and time.monotonic() < deadline:
                time.sleep(0.01)
            deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            deaf.connect((HOST, server.port))
            deaf.sendall(b"".join(json.dumps({"id": f"{i}{long_id}", "prompt_token_ids": [1, 2]}).encode() + b"\n"
                                  for i in range(2)))
            tokens: list[int] = []
            for line in good.makefile("rb"):
                cluster.credit.release()
                message = json.loads(line)
                assert message.get("error") is None, message
                if message["finished"]:
                    assert message["token_ids"] == tokens
                    break
                tokens += message["token_ids"]
        assert len(tokens) == cluster.max_tokens, "the reading client lost tokens"
        assert len(cluster.aborted) == 2, "the deaf client's requests were not aborted"
        assert "overflowed" in caplog.text and "subscriber_queue_size=64" in caplog.text
    finally:
        server.stop()
