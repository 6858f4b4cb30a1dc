"""Disaggregated serving over TCP between real processes, and the faults it must survive."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from conftest import token_prompts
from minidisagg import LLM, SamplingParams
from minidisagg.config import CacheConfig, EngineConfig
from minidisagg.disagg.serve import DecodeServer
from minidisagg.engine.sequence import SequenceState
from minidisagg.kv.pages import KVLayout
from minidisagg.transport.base import TransferError
from minidisagg.transport.framing import FrameKind, HandshakeError, recv_frame
from minidisagg.transport.socket import SocketSender, make_hello

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def seed(module_seed) -> int:
    return module_seed


@pytest.fixture(scope="module")
def reference(seed):
    llm = LLM("tiny", device="cpu", batch_invariant=True, seed=seed)
    prompts = token_prompts(seed, 6)
    return prompts, [o.token_ids for o in llm.generate(prompts, GREEDY)]


def test_two_processes_equal_colocated_and_leave_no_orphans(reference, seed):
    prompts, ref = reference
    llm = LLM("tiny", device="cpu", batch_invariant=True, seed=seed, mode="disagg", transport="socket", num_prefill=1,
              num_decode=2, kv_overlap=True)
    procs = list(llm.engine.processes)
    try:
        assert len(procs) == 3 and all(p.proc.poll() is None for p in procs)
        outs = llm.generate(prompts, GREEDY)
        assert [o.token_ids for o in outs] == ref, f"seed {seed}"
        for o, p in zip(outs, prompts):
            layout_bytes = 2 * 2 * 2 * 32 * 4 * 16 * -(-len(p["prompt_token_ids"]) // 16)  # layers*kv*heads*dim*fp32*block
            assert o.metrics.kv_transfer_bytes == layout_bytes
            assert o.metrics.transfer_s > 0 and o.timeline.prefill_end_s <= o.timeline.transfer_end_s
    finally:
        llm.shutdown()
    assert all(p.proc.poll() is not None for p in procs), "worker processes outlived shutdown"


def test_two_prefill_processes_share_a_decode_process(reference, seed):
    """Transfer ids key the decode side's reservations, so two prefill processes must never reuse one."""
    prompts, ref = reference
    with LLM("tiny", device="cpu", batch_invariant=True, seed=seed, mode="disagg", transport="socket", num_prefill=2,
             num_decode=1, request_timeout_s=120) as llm:
        for _ in range(2):  # rounds, so both prefill processes reserve while the other's transfers are held
            outs = llm.generate(prompts, GREEDY)
            assert [o.error for o in outs if o.finish_reason == "error"] == [], f"seed {seed}"
            assert [o.token_ids for o in outs] == ref, f"seed {seed}"


def test_killed_decode_process_fails_only_its_requests(reference, seed):
    prompts, ref = reference
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    with LLM("tiny", device="cpu", batch_invariant=True, seed=seed, mode="disagg", transport="socket", num_decode=2,
             request_timeout_s=120) as llm:
        victim = next(p for p in llm.engine.processes if p.name == "d1")
        ids = [llm.engine.add_request(p, params) for p in prompts]
        time.sleep(1.0)
        victim.proc.kill()
        done, t0 = {}, time.monotonic()
        while llm.engine.has_unfinished():
            assert time.monotonic() - t0 < 120, "hung after a decode process died"
            for out in llm.engine.step():
                if out.finished:
                    done[out.request_id] = out
        errors = [done[i] for i in ids if done[i].finish_reason == "error"]
        fine = [done[i] for i in ids if done[i].finish_reason != "error"]
        assert fine, "no request survived on the healthy decode worker"
        assert all(len(o.token_ids) == 200 for o in fine)
        assert all("d1" in o.error for o in errors)


def test_recompute_policy_moves_requests_off_a_dead_decode(reference, seed):
    prompts, _ = reference
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    ref = [o.token_ids for o in LLM("tiny", device="cpu", batch_invariant=True, seed=seed).generate(prompts, params)]
    with LLM("tiny", device="cpu", batch_invariant=True, seed=seed, mode="disagg", transport="socket", num_decode=2,
             kv_failure_policy="recompute", request_timeout_s=120) as llm:
        next(p for p in llm.engine.processes if p.name == "d1").proc.kill()
        outs = llm.generate(prompts, params)
        assert [o.token_ids for o in outs] == ref, f"seed {seed}"


def test_full_decode_pool_over_sockets(reference, seed):
    prompts, ref = reference
    with LLM("tiny", device="cpu", batch_invariant=True, seed=seed, mode="disagg", transport="socket",
             num_kv_blocks=8) as llm:
        assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == ref, f"seed {seed}"


@pytest.fixture
def decode_server(tiny_loaded):
    server = DecodeServer(tiny_loaded, EngineConfig(cache=CacheConfig(num_blocks=32)))
    import threading

    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.stop()


def _hello(loaded, server, fingerprint=None, block_size=None):
    layout = server.worker.layout
    if block_size is not None:
        layout = KVLayout(layout.num_layers, layout.num_kv_heads, layout.head_dim, block_size, layout.dtype)
    return make_hello("prefill", fingerprint or loaded.config.fingerprint(), layout)


def _all_free(server, timeout_s=5.0) -> bool:
    blocks = server.worker.engine.blocks
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if blocks.num_free_blocks == blocks.num_blocks:
            return True
        time.sleep(0.05)
    return False


def test_handshake_mismatch_is_refused_clearly(tiny_loaded, decode_server):
    hello = _hello(tiny_loaded, decode_server, fingerprint="0" * 16, block_size=8)
    with pytest.raises(HandshakeError, match="fingerprint.*block_size"):
        SocketSender("127.0.0.1", decode_server.port, hello)


def test_garbage_and_cut_connections_leak_nothing(tiny_loaded, decode_server):
    # garbage bytes instead of a HELLO: dropped, server keeps serving
    with socket.create_connection(("127.0.0.1", decode_server.port), timeout=5) as raw:
        raw.sendall(os.urandom(4096))
        raw.settimeout(5)
        try:
            raw.recv(1024)
        except OSError:
            pass
    # a prefill link that reserves blocks, then vanishes mid-transfer: the reservation comes back
    sender = SocketSender("127.0.0.1", decode_server.port, _hello(tiny_loaded, decode_server))
    assert sender.reserve("t1", 40, timeout_s=5)
    assert decode_server.worker.engine.blocks.num_free_blocks < 32
    sender.sock.close()
    assert _all_free(decode_server), "a cut connection leaked its reservation"
    # a link that sends pages of the wrong shape is dropped, and its reservation freed
    sender = SocketSender("127.0.0.1", decode_server.port, _hello(tiny_loaded, decode_server))
    assert sender.reserve("t2", 40, timeout_s=5)
    import torch

    sender.send_layer("t2", 0, torch.zeros(2, 1, 16, 2, 32))  # 1 block, but 3 were reserved
    with pytest.raises(TransferError):
        sender.commit("t2", SequenceState("r", [1], [2], {}, {"arrival_s": 0.0}), 0, timeout_s=5)
    assert _all_free(decode_server)
    # and a well-behaved link still works afterwards
    sender = SocketSender("127.0.0.1", decode_server.port, _hello(tiny_loaded, decode_server))
    assert sender.reserve("t3", 10, timeout_s=5)
    sender.cancel("t3")
    assert _all_free(decode_server)
    sender.close()


def test_pipelined_reservations_and_stacked_layers_land_exactly(tiny_loaded, decode_server, seed):
    """reserve_many answers each request in order (grant, full, refusal); send_layers' one message lands
    byte for byte in the reserved blocks; a stacked header that overruns the model drops only its link."""
    import torch

    WAIT_S = 30.0  # a round trip on loopback; generous, as a loaded machine can take seconds to schedule it

    layout, worker = decode_server.worker.layout, decode_server.worker
    sender = SocketSender("127.0.0.1", decode_server.port, _hello(tiny_loaded, decode_server))
    answers = sender.reserve_many([("a", 40), ("b", 17), ("c", 10_000), ("d", 500)], timeout_s=WAIT_S)
    assert answers[:2] == [True, True] and answers[3] is False, answers  # d: 32 blocks, 27 left
    assert isinstance(answers[2], TransferError) and "never fit" in str(answers[2])
    gen = torch.Generator().manual_seed(seed)
    pages_a = torch.randn(layout.num_layers, *layout.layer_shape(3), generator=gen)
    pages_b = torch.randn(*layout.layer_shape(2), generator=gen)
    sender.send_layers("a", 0, pages_a)
    sender.send_layer("b", 1, pages_b)
    assert sender.reserve("z", 1, timeout_s=WAIT_S)  # a round trip: the link has handled both LAYER frames
    kv = worker.engine.kv_cache.kv
    assert torch.equal(kv[:, :, worker._reserved["a"]], pages_a)
    assert torch.equal(kv[1, :, worker._reserved["b"]], pages_b)
    sender.commit("a", SequenceState("ra", [1] * 40, [2], {"max_tokens": 1}, {"arrival_s": 0.0}), pages_a.nbytes, WAIT_S)
    for tid in ("b", "z"):
        sender.cancel(tid)
    bad = SocketSender("127.0.0.1", decode_server.port, _hello(tiny_loaded, decode_server))
    assert bad.reserve("e", 20, timeout_s=WAIT_S)
    bad.send_layers("e", 1, torch.zeros(layout.num_layers, *layout.layer_shape(2)))  # layers 1..N overrun
    reply = recv_frame(bad.sock, WAIT_S)  # the decode side says why, then drops this link only
    assert reply.kind == FrameKind.ERROR and "num_layers" in reply.header["message"], reply
    bad.sock.close()
    sender.close()
    assert _all_free(decode_server), "a reservation leaked"


def test_forgotten_llm_still_stops_its_processes(tmp_path):
    """An LLM dropped without shutdown() leaves no orphans once the interpreter exits."""
    import subprocess
    import sys

    script = (
        "from minidisagg import LLM, SamplingParams\n"
        "llm = LLM('tiny', device='cpu', mode='disagg', transport='socket')\n"
        "llm.generate([{'prompt_token_ids': [5, 6, 7]}], SamplingParams(temperature=0, max_tokens=2))\n"
        "print(' '.join(str(p.proc.pid) for p in llm.engine.processes))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "orphaned worker processes"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead, just not reaped
        return f.read().split()[2] != "Z"


@pytest.mark.parametrize("policy", ["fail", "recompute"])
def test_killed_prefill_process(reference, seed, policy):
    """Killing one of two prefill workers fails (or reroutes) only the requests it still held."""
    prompts, ref = reference
    with LLM("tiny", device="cpu", batch_invariant=True, seed=seed, mode="disagg", transport="socket", num_prefill=2,
             kv_failure_policy=policy, request_timeout_s=120) as llm:
        victim = next(p for p in llm.engine.processes if p.name == "p1")
        victim.proc.send_signal(signal.SIGSTOP)  # frozen: whatever was routed to it is stuck there
        ids = [llm.engine.add_request(p, GREEDY) for p in prompts]
        victim.proc.kill()
        done, t0 = {}, time.monotonic()
        while llm.engine.has_unfinished():
            assert time.monotonic() - t0 < 120, "hung after a prefill process died"
            for out in llm.engine.step():
                if out.finished:
                    done[out.request_id] = out
        outs = [done[i] for i in ids]
        errors = [o for o in outs if o.finish_reason == "error"]
        if policy == "fail":
            assert errors and all("p1" in o.error for o in errors), [o.error for o in errors]
        else:
            assert not errors
        for i, out in enumerate(outs):
            if out.finish_reason != "error":
                assert out.token_ids == ref[i], f"seed {seed}, request {i}"
