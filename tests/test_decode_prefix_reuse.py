"""Prefix reuse on the decode side: a decode worker whose prefix cache holds a prompt's leading blocks shares
them, and only the rest of the pages cross the link; shared blocks are counted so that nothing leaks and
nothing is freed twice, on faults too (aborts, a link cut mid-transfer, a dead prefill loop, lease expiry,
a refused commit).
"""

from __future__ import annotations

import random
import socket
import threading
import time
from dataclasses import replace

import pytest

from cluster_requests import run_request
from conftest import make_engine, run_all
from minidisagg.config import CacheConfig, EngineConfig, LinkConfig
from minidisagg.disagg.cluster import DisaggCluster
from minidisagg.disagg.decode_worker import DecodeWorker
from minidisagg.disagg.router_server import RemoteCluster
from minidisagg.disagg.serve import DecodeServer, PrefillServer
from minidisagg.engine.clock import WallClock
from minidisagg.engine.sampling import SamplingParams
from minidisagg.engine.sequence import SequenceState
from minidisagg.kv.prefix_cache import hash_chain
from minidisagg.transport.base import TransferError
from minidisagg.transport.inproc import InprocSender

HOST = "127.0.0.1"
BS = 16
PREFIX_TOKENS = 512
GREEDY_ARGS = {"temperature": 0, "max_tokens": 4, "ignore_eos": True}
GREEDY = SamplingParams(**GREEDY_ARGS)
CONFIG = EngineConfig(batch_invariant=True, cache=CacheConfig(block_size=BS, num_blocks=96, enable_prefix_caching=True))
TIMEOUT_S = 60.0


@pytest.fixture
def rng():
    seed = random.SystemRandom().randrange(1 << 30)
    return random.Random(seed), seed


def colocated(loaded, prompts, params=GREEDY, block_size=BS):
    engine = make_engine(loaded, batch_invariant=True, block_size=block_size)
    ids = [engine.add_request({"prompt_token_ids": p}, params) for p in prompts]
    done = run_all(engine)
    return [done[i].token_ids for i in ids]


def shared_prompts(r: random.Random, n: int = 2) -> list[list[int]]:
    """``n`` prompts: one random 512-token prefix, each with its own random tail of 1..40 tokens."""
    prefix = [r.randrange(100, 49000) for _ in range(PREFIX_TOKENS)]
    return [prefix + [r.randrange(100, 49000) for _ in range(r.randint(1, 40))] for _ in range(n)]


def assert_pool_whole(blocks) -> None:
    """No block held, every reference dropped, and every block handed out exactly once by a full allocation."""
    assert not blocks.owners(), f"blocks still held by {blocks.owners()}"
    assert [b for b in range(blocks.num_blocks) if blocks.ref_count(b)] == [], "a block kept a reference"
    assert blocks.num_free_blocks == blocks.num_blocks
    table = list(blocks.grow("probe", blocks.capacity_tokens))  # a block freed twice would come out twice
    assert sorted(table) == list(range(blocks.num_blocks)), "the free list holds a block twice"
    blocks.free("probe")


def check_two_requests(loaded, layout, outs, sent_bytes, prompts) -> None:
    """The second request moved only the blocks after the shared 512-token prefix: <= 0.1x the first's bytes."""
    assert [o.error for o in outs] == [None, None]
    assert [o.token_ids for o in outs] == colocated(loaded, prompts)
    first, second = (o.metrics for o in outs)
    assert sent_bytes == [first.kv_transfer_bytes, second.kv_transfer_bytes], "the counters disagree with the wire"
    assert first.kv_transfer_bytes == layout.request_nbytes(-(-len(prompts[0]) // BS))
    assert (first.kv_reused_tokens, second.kv_reused_tokens) == (0, PREFIX_TOKENS)
    assert second.kv_transfer_bytes == layout.request_nbytes(-(-len(prompts[1]) // BS) - PREFIX_TOKENS // BS)
    assert second.kv_transfer_bytes <= 0.1 * first.kv_transfer_bytes


@pytest.mark.parametrize("overlap", [False, True])
def test_inproc_second_request_moves_only_the_blocks_the_decode_cache_lacks(tiny_loaded, rng, overlap):
    r, seed = rng
    prompts = shared_prompts(r)
    cluster = DisaggCluster(tiny_loaded, CONFIG, overlap=overlap)
    try:
        sender = cluster.prefill_workers[0].senders["d0"]
        outs, sent = [], []
        for prompt in prompts:
            before = sender.stats.bytes_sent
            outs.append(run_request(cluster, prompt, GREEDY_ARGS, timeout_s=TIMEOUT_S))
            sent.append(sender.stats.bytes_sent - before)
        check_two_requests(tiny_loaded, cluster.decode_workers[0].layout, outs, sent, prompts)
    finally:
        cluster.shutdown()
    for worker in cluster.prefill_workers + cluster.decode_workers:
        assert_pool_whole(worker.engine.blocks)


def test_socket_second_request_moves_only_the_blocks_the_decode_cache_lacks(tiny_loaded, rng):
    r, seed = rng
    prompts = shared_prompts(r)
    decode = DecodeServer(tiny_loaded, CONFIG)
    threading.Thread(target=decode.serve_forever, daemon=True).start()
    prefill = PrefillServer(tiny_loaded, CONFIG, {"d0": (HOST, decode.port)})
    threading.Thread(target=prefill.serve_forever, daemon=True).start()
    cluster = RemoteCluster(tiny_loaded, CONFIG, {"p0": (HOST, prefill.port)}, {"d0": (HOST, decode.port)},
                            request_timeout_s=TIMEOUT_S)
    try:
        outs, sent = [], []
        for prompt in prompts:
            sender = prefill.worker.senders.get("d0")
            before = sender.stats.bytes_sent if sender is not None else 0
            outs.append(run_request(cluster, prompt, GREEDY_ARGS, timeout_s=TIMEOUT_S))
            sent.append(prefill.worker.senders["d0"].stats.bytes_sent - before)  # payload bytes written to the socket
        check_two_requests(tiny_loaded, decode.worker.layout, outs, sent, prompts)
    finally:
        cluster.shutdown()
        prefill.stop()
        decode.stop()
    for worker in (prefill.worker, decode.worker):
        assert_pool_whole(worker.engine.blocks)


def test_without_prefix_caching_every_block_travels(tiny_loaded, rng):
    r, seed = rng
    prompts = shared_prompts(r)
    config = replace(CONFIG, cache=replace(CONFIG.cache, enable_prefix_caching=False))
    cluster = DisaggCluster(tiny_loaded, config)
    try:
        outs = [run_request(cluster, p, GREEDY_ARGS, timeout_s=TIMEOUT_S) for p in prompts]
        layout = cluster.decode_workers[0].layout
        assert [o.metrics.kv_transfer_bytes for o in outs] == [layout.request_nbytes(-(-len(p) // BS)) for p in prompts]
        assert [o.metrics.kv_reused_tokens for o in outs] == [0, 0]
        assert [o.token_ids for o in outs] == colocated(tiny_loaded, prompts)
    finally:
        cluster.shutdown()


def test_random_interleavings_with_aborts_leave_both_pools_whole(tiny_loaded, rng):
    """Requests from three stems arrive while others run; a third are aborted at random moments (queued, prefilling,
    in transfer, decoding). The rest get the colocated tokens; afterwards no block is held or was freed twice."""
    r, seed = rng
    bs = 4
    stems = [[r.randrange(100, 49000) for _ in range(r.randint(8, 32))] for _ in range(3)]
    prompts = [r.choice(stems) + [r.randrange(100, 49000) for _ in range(r.randint(1, 8))] for _ in range(14)]
    params = SamplingParams(temperature=0, max_tokens=r.randint(2, 8), ignore_eos=True)
    num_blocks = r.choice([40, 96])  # 40: reservations wait for credit and cached blocks are evicted
    config = EngineConfig(batch_invariant=True, max_num_seqs=3,
                          cache=CacheConfig(block_size=bs, num_blocks=num_blocks, enable_prefix_caching=True))
    cluster = DisaggCluster(tiny_loaded, config, overlap=r.random() < 0.5)
    ids, aborted, done = [], set(), {}
    try:
        waiting = list(enumerate(prompts))
        deadline = time.monotonic() + 2 * TIMEOUT_S
        while waiting or cluster.has_unfinished():
            assert time.monotonic() < deadline, f"seed {seed}: the cluster did not finish"
            if waiting and r.random() < 0.5:
                i, prompt = waiting.pop(0)
                ids.append((i, cluster.add_request({"prompt_token_ids": prompt}, params)))
            live = [rid for _, rid in ids if rid not in done and rid not in aborted]
            if live and r.random() < 0.08:
                victim = r.choice(live)
                cluster.abort(victim)
                aborted.add(victim)
            for out in cluster.step():
                if out.finished:
                    done[out.request_id] = out
            time.sleep(r.choice([0, 0, 0.002]))
        served = [(i, done[rid]) for i, rid in ids if rid not in aborted]
        want = colocated(tiny_loaded, [prompts[i] for i, _ in served], params, block_size=bs)
        assert [o.token_ids for _, o in served] == want, f"seed {seed}"
        assert any(o.metrics.kv_reused_tokens for _, o in served), f"seed {seed}: no decode-side reuse happened"
        time.sleep(0.3)  # the workers reap their last acknowledgements and aborts
    finally:
        cluster.shutdown()
    for worker in cluster.prefill_workers + cluster.decode_workers:
        assert_pool_whole(worker.engine.blocks)
    assert not cluster.decode_workers[0]._reserved


def test_a_link_cut_mid_transfer_leaves_both_pools_whole(tiny_loaded, rng):
    """The second request's shared reservation is made, then the socket dies as its pages go out: the decode side
    drops the shared blocks' references with the link, once; the link heals and the next request reuses them."""
    r, seed = rng
    prompts = shared_prompts(r, 3)
    config = replace(CONFIG, link=LinkConfig(reconnect_initial_s=0.05, reconnect_max_s=0.2))
    decode = DecodeServer(tiny_loaded, config)
    threading.Thread(target=decode.serve_forever, daemon=True).start()
    prefill = PrefillServer(tiny_loaded, config, {"d0": (HOST, decode.port)})
    threading.Thread(target=prefill.serve_forever, daemon=True).start()
    cluster = RemoteCluster(tiny_loaded, CONFIG, {"p0": (HOST, prefill.port)}, {"d0": (HOST, decode.port)},
                            request_timeout_s=TIMEOUT_S)
    try:
        first = run_request(cluster, prompts[0], GREEDY_ARGS, timeout_s=TIMEOUT_S)
        sender = prefill.worker.senders["d0"]
        real_send, cut = sender.send_layers, []

        def cutting_send(transfer_id, first_layer, pages):
            if not cut:
                cut.append(decode.worker.num_shared_blocks(transfer_id))
                sender.sock.shutdown(socket.SHUT_RDWR)
            return real_send(transfer_id, first_layer, pages)

        sender.send_layers = cutting_send
        second = run_request(cluster, prompts[1], GREEDY_ARGS, timeout_s=TIMEOUT_S)
        assert cut == [PREFIX_TOKENS // BS], f"seed {seed}: the cut transfer did not share the prefix"
        assert second.error is not None and "d0" in second.error
        blocks = decode.worker.engine.blocks
        deadline = time.monotonic() + 10
        while blocks.owners() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not blocks.owners() and blocks.num_free_blocks == blocks.num_blocks
        third = run_request(cluster, prompts[2], GREEDY_ARGS, timeout_s=TIMEOUT_S)  # over the healed link
        assert third.error is None and third.metrics.kv_reused_tokens == PREFIX_TOKENS
        assert [first.token_ids, third.token_ids] == colocated(tiny_loaded, [prompts[0], prompts[2]])
    finally:
        cluster.shutdown()
        prefill.stop()
        decode.stop()
    for worker in (prefill.worker, decode.worker):
        assert_pool_whole(worker.engine.blocks)


def test_a_prefill_loop_that_dies_after_reserving_gives_the_shared_blocks_back(tiny_loaded, rng):
    r, seed = rng
    prompts = shared_prompts(r)
    cluster = DisaggCluster(tiny_loaded, CONFIG)
    try:
        assert run_request(cluster, prompts[0], GREEDY_ARGS, timeout_s=TIMEOUT_S).error is None
        prefill, decode = cluster.prefill_workers[0], cluster.decode_workers[0]
        shared_seen = []

        def crash(*_args, **_kwargs):
            shared_seen.extend(t.num_shared_blocks for t in prefill._transfers.values()  # the first request's
                               if list(t.submission.prompt_token_ids) == prompts[1])  # may linger until acked
            raise RuntimeError("injected crash")

        prefill.engine.step = crash  # the reservation is made (in admission), then the step dies
        out = run_request(cluster, prompts[1], GREEDY_ARGS, timeout_s=TIMEOUT_S)
        assert out.error is not None and shared_seen == [PREFIX_TOKENS // BS], f"seed {seed}"
        blocks = decode.engine.blocks
        deadline = time.monotonic() + 10
        while blocks.owners() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(blocks.cached_prefix(prompts[1])) == PREFIX_TOKENS // BS  # still cached, held by none
    finally:
        cluster.shutdown()
    assert_pool_whole(cluster.decode_workers[0].engine.blocks)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def cached_decode_worker(loaded, prompt, clock):
    """A decode worker (not started) whose prefix cache holds ``prompt``'s full blocks, after one request decoded."""
    config = replace(CONFIG, link=LinkConfig(kv_lease_s=5.0))
    worker = DecodeWorker("d", loaded, config, WallClock(), lambda out: None, lease_clock=clock)
    assert worker.reserve("warm", len(prompt))
    worker.commit("warm", SequenceState("warm", list(prompt), [7], {"max_tokens": 2, "temperature": 0},
                                        {"arrival_s": 0.0}), 0)
    for _ in range(10):
        worker.step()
    assert not worker.engine.blocks.owners() and worker.engine.blocks.prefix_cache.num_cached_blocks
    return worker


def test_lease_expiry_a_refused_commit_and_a_closed_link_drop_shared_references_once(tiny_loaded, rng):
    r, seed = rng
    prompt = shared_prompts(r, 1)[0]
    clock = FakeClock()
    worker = cached_decode_worker(tiny_loaded, prompt, clock)
    blocks = worker.engine.blocks
    n = (len(prompt) - 1) // BS
    keys = hash_chain(prompt, BS, n)
    cached_before = blocks.prefix_cache.num_cached_blocks

    assert worker.reserve("expiring", len(prompt), block_keys=keys)
    assert worker.num_shared_blocks("expiring") == n and blocks.ref_count(blocks.block_table(
        "transfer:expiring")[0]) == 1
    clock.now_s += 10
    assert worker.expire_leases() == ["expiring"]
    assert_pool_whole_but_cached(blocks, cached_before)

    other = list(prompt)
    other[3] += 1  # the first block differs: the keys no longer name this prompt
    assert worker.reserve("mislabelled", len(prompt), block_keys=keys)
    with pytest.raises(ValueError, match="another prompt's KV"):
        worker.commit("mislabelled", SequenceState("m", other, [7], {"max_tokens": 2, "temperature": 0},
                                                   {"arrival_s": 0.0}), 0)
    worker.cancel("mislabelled")  # what a transport does with a refused DONE
    worker.cancel("mislabelled")  # twice: nothing more is freed
    assert_pool_whole_but_cached(blocks, cached_before)

    peer = worker.open_peer("a link")
    assert peer.reserve("held", len(prompt), block_keys=keys) and worker.num_shared_blocks("held") > 0
    assert peer.close() == -(-len(prompt) // BS) - n  # the blocks it wrote into, not the shared
    assert_pool_whole_but_cached(blocks, cached_before)

    sender = InprocSender(worker)
    with pytest.raises(ValueError, match="block_keys"):
        sender.reserve("bad", len(prompt), 1.0, [b"short"])
    with pytest.raises(ValueError, match="block_keys"):
        worker.reserve("toomany", 2 * BS, block_keys=keys)
    assert_pool_whole_but_cached(blocks, cached_before)
    assert_pool_whole(blocks)


def assert_pool_whole_but_cached(blocks, num_cached: int) -> None:
    """Nothing held, every reference dropped, and the prefix cache still holds what it held."""
    assert not blocks.owners() and blocks.num_free_blocks == blocks.num_blocks
    assert [b for b in range(blocks.num_blocks) if blocks.ref_count(b)] == []
    assert blocks.prefix_cache.num_cached_blocks == num_cached


def test_garbage_block_keys_over_the_socket_are_refused_and_the_link_stays_up(tiny_loaded):
    from minidisagg.transport.socket import SocketSender, make_hello

    decode = DecodeServer(tiny_loaded, CONFIG)
    threading.Thread(target=decode.serve_forever, daemon=True).start()
    try:
        hello = make_hello("prefill", tiny_loaded.config.fingerprint(), decode.worker.layout)
        sender = SocketSender(HOST, decode.port, hello)
        with pytest.raises(TransferError, match="block_keys"):
            sender.reserve("a", 40, 5.0, [b"\x01" * 3])
        assert sender.reserve("b", 40, 5.0, [b"\x01" * 16]) and sender.take_num_shared_blocks("b") == 0
        sender.cancel("b")
        sender.close()
        deadline = time.monotonic() + 5
        while decode.worker.engine.blocks.owners() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not decode.worker.engine.blocks.owners()
    finally:
        decode.stop()
