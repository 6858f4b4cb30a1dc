"""Aborts reach the prefill worker: one 1P1D deployment over the socket (servers in this process, a router beside).

A long prompt aborted during its prefill, and a request aborted while its KV waits to be committed
to the decode worker, never reach the decode worker. Afterwards no KV block (nor reservation) is
held on either worker, and the deployment serves the colocated engine's greedy tokens.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from cluster_requests import run_request
from minidisagg import LLM, SamplingParams
from minidisagg.config import CacheConfig, EngineConfig
from minidisagg.disagg.router_server import RemoteCluster
from minidisagg.disagg.serve import DecodeServer, PrefillServer
from minidisagg.transport.auth import LinkSecurity, new_secret

HOST = "127.0.0.1"
NUM_BLOCKS = 64
CONFIG = EngineConfig(batch_invariant=True, cache=CacheConfig(num_blocks=NUM_BLOCKS))
TIMEOUT_S = 30.0


def wait_until(predicate, what: str, cluster=None, timeout_s: float = TIMEOUT_S) -> None:
    """Step ``cluster`` (if given) until ``predicate()``; AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        if cluster is not None:
            cluster.step()
        else:
            time.sleep(0.01)


class Gate:
    """Holds the first call that ``wants`` at the gate until ``open``; ``entered`` is set once one waits there."""

    def __init__(self, wants=lambda: True) -> None:
        self.wants, self.entered, self.opened = wants, threading.Event(), threading.Event()

    def wrap(self, call):
        def gated(*args, **kwargs):
            if not self.entered.is_set() and self.wants():
                self.entered.set()
                assert self.opened.wait(TIMEOUT_S), "the test never opened the gate"
            return call(*args, **kwargs)
        return gated


@pytest.fixture
def deployment(tiny_loaded):
    """A decode and a prefill server (one secret), and a router over them."""
    security = LinkSecurity(secret=new_secret())
    decode = DecodeServer(tiny_loaded, CONFIG, security=security)
    threading.Thread(target=decode.serve_forever, daemon=True).start()
    prefill = PrefillServer(tiny_loaded, CONFIG, {"d0": (HOST, decode.port)}, security=security)
    threading.Thread(target=prefill.serve_forever, daemon=True).start()
    cluster = RemoteCluster(tiny_loaded, CONFIG, {"p0": (HOST, prefill.port)}, {"d0": (HOST, decode.port)},
                            request_timeout_s=60, security=security)
    yield prefill, decode, cluster
    cluster.shutdown()
    prefill.stop()
    decode.stop()


def test_aborts_mid_prefill_and_before_done_free_every_block(deployment, seed):
    """A long prompt aborted during its prefill step (its DONE then leaves through the sender thread's queue), and
    a short one aborted while the DONE before its own waits for an ACK: neither reaches the decode worker."""
    prefill, decode, cluster = deployment
    rng = random.Random(seed)
    reference = LLM("tiny", device="cpu", batch_invariant=True)
    greedy = {"temperature": 0, "ignore_eos": True}
    long_prompt = [rng.randrange(1, 49152) for _ in range(rng.randrange(300, 600))]
    short_a, short_b = ([rng.randrange(1, 49152) for _ in range(rng.randrange(3, 7))] for _ in range(2))
    committed: list[str] = []  # request ids the decode worker was handed
    real_commit = decode.worker.commit

    def recording_commit(transfer_id, state, *args, **kwargs):
        committed.append(state.request_id)
        return real_commit(transfer_id, state, *args, **kwargs)

    decode.worker.commit = recording_commit
    aborts_seen: list[str] = []
    real_abort = prefill.worker.abort

    def recording_abort(request_id):
        real_abort(request_id)
        aborts_seen.append(request_id)

    prefill.worker.abort = recording_abort
    step_gate = Gate(lambda: bool(prefill.worker.engine.request_ids()))  # the step that prefills the long prompt
    prefill.worker.engine.step = step_gate.wrap(prefill.worker.engine.step)
    done_gate = Gate()  # the first DONE (the short request a's) waits for its ACK a while
    sender = prefill.worker.senders["d0"]
    sender.commit = done_gate.wrap(sender.commit)

    long_id = cluster.add_request({"prompt_token_ids": long_prompt}, SamplingParams(max_tokens=4, **greedy))
    wait_until(step_gate.entered.is_set, "the long prompt's prefill step", cluster)
    long_seq = prefill.worker.engine.sequence(cluster.wire_id(long_id, 1))
    a = cluster.add_request({"prompt_token_ids": short_a}, SamplingParams(max_tokens=4, **greedy))
    b = cluster.add_request({"prompt_token_ids": short_b}, SamplingParams(max_tokens=40, **greedy))
    cluster.abort(long_id)
    wait_until(lambda: cluster.wire_id(long_id, 1) in aborts_seen, "the abort to reach the prefill worker", cluster)
    assert long_seq.num_computed_tokens == 0, "the long prompt must still be in its prefill step"
    step_gate.opened.set()
    wait_until(done_gate.entered.is_set, "the short request a's DONE", cluster)
    cluster.abort(b)
    wait_until(lambda: cluster.wire_id(b, 1) in aborts_seen, "the abort of b to reach the prefill worker", cluster)
    done_gate.opened.set()
    out_a = None
    deadline = time.monotonic() + TIMEOUT_S
    while out_a is None and time.monotonic() < deadline:
        out_a = next((o for o in cluster.step() if o.request_id == a and o.finished), None)
    want_a = reference.generate({"prompt_token_ids": short_a}, SamplingParams(max_tokens=4, **greedy),
                                use_tqdm=False)[0].token_ids
    assert out_a is not None and out_a.error is None and out_a.token_ids == want_a, f"seed {seed}: {out_a}"

    def whole() -> bool:
        return (prefill.worker.engine.blocks.num_free_blocks == NUM_BLOCKS
                and decode.worker.num_free_blocks == NUM_BLOCKS and len(prefill.worker.owners) == 0
                and not decode.worker._reserved and len(decode.worker.owners) == 0)

    wait_until(whole, "both KV pools to be whole, with nothing reserved or held", cluster, timeout_s=5.0)
    assert committed == [cluster.wire_id(a, 1)], \
        f"seed {seed}: an aborted request still reached the decode worker: {committed}"
    prompt = [rng.randrange(1, 49152) for _ in range(rng.randrange(3, 40))]
    out = run_request(cluster, prompt, {"max_tokens": 8, **greedy})
    want = reference.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=8, **greedy),
                              use_tqdm=False)[0].token_ids
    assert out.error is None and out.token_ids == want, f"seed {seed}: {out.token_ids} != {want}"
    wait_until(whole, "both KV pools to be whole after the normal request", cluster, timeout_s=5.0)
