"""The dist transport: KV pages by torch.distributed between real processes, control frames over sockets."""

from __future__ import annotations

import time

import pytest
import torch

from conftest import token_prompts
from minidisagg import LLM, SamplingParams
from minidisagg.kv.pages import KVLayout
from minidisagg.transport.auth import LinkSecurity
from minidisagg.transport.framing import FrameKind, recv_frame, send_frame
from minidisagg.transport.socket import SocketSender, make_hello

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
BLOCK_SIZE = 16


@pytest.fixture(scope="module")
def seed(module_seed) -> int:
    return module_seed


@pytest.fixture(scope="module")
def reference(seed):
    prompts = token_prompts(seed, 5)
    return prompts, [o.token_ids for o in LLM("tiny", device="cpu", batch_invariant=True, seed=seed).generate(prompts, GREEDY)]


def layout_of(llm: LLM) -> KVLayout:
    cfg = llm.loaded.config
    return KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, BLOCK_SIZE, llm.loaded.dtype)


def check_outputs(llm: LLM, prompts, ref, seed) -> None:
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == ref, f"seed {seed}: dist output differs from colocated"
    for o, p in zip(outs, prompts):
        num_blocks = -(-len(p["prompt_token_ids"]) // BLOCK_SIZE)
        assert o.metrics.kv_transfer_bytes == layout_of(llm).request_nbytes(num_blocks), f"seed {seed}"
        assert o.metrics.transfer_s > 0 and o.timeline.prefill_end_s <= o.timeline.transfer_end_s


def trace_steps(procs) -> list[str]:
    """The KV-trace step names every worker logged (``MINIDISAGG_KV_TRACE=1``)."""
    return [line.split()[1] for p in procs for line in p.log_path.read_text().splitlines()
            if line.startswith("kv-trace ")]


@pytest.mark.parametrize("kv_layout", ["layer_major", "block_major"])
def test_dist_1p2d_equals_colocated_and_leaves_no_orphans(reference, seed, monkeypatch, kv_layout):
    """Without overlap: each request's pages are announced while it prefills, then sent in pieces, block first.

    Requests that stop at their first token were announced too: their pages must keep the
    pair's receives in step, so the requests after them still get their own pages. With
    block_major pools, pieces whose blocks are one range leave and land without copies.
    """
    monkeypatch.setenv("MINIDISAGG_KV_TRACE", "1")
    prompts, ref = reference
    llm = LLM("tiny", device="cpu", batch_invariant=True, seed=seed, mode="disagg", transport="dist", num_prefill=1,
              num_decode=2, kv_overlap=False, kv_layout=kv_layout)
    procs = list(llm.engine.processes)
    try:
        assert len(procs) == 3 and all(p.proc.poll() is None for p in procs)
        check_outputs(llm, prompts, ref, seed)
        stopped = llm.generate(prompts[:3], SamplingParams(temperature=0, max_tokens=1))
        assert [o.token_ids for o in stopped] == [r[:1] for r in ref[:3]], f"seed {seed}"
        check_outputs(llm, prompts, ref, seed)
        moved = [o.metrics for o in llm.generate(prompts[:2], GREEDY)]
        assert all(m.kv_move_s is not None and 0 < m.kv_move_s < m.ttft_s for m in moved), moved
        steps = trace_steps(procs)
        assert steps.count("announce") == 2 * len(prompts) + 5, steps  # every request, the stopped ones too
        assert steps.count("adopted") == 2 * len(prompts) + 2, steps
        if kv_layout == "block_major":  # the FIFO block manager hands out runs: most pieces land in place
            assert steps.count("in-place") >= steps.count("announce"), steps
        else:
            assert "in-place" not in steps, steps
    finally:
        llm.shutdown()
    assert all(p.proc.poll() is not None for p in procs), "worker processes outlived shutdown"


def _prefill_link(llm: LLM, port: int) -> SocketSender:
    security = LinkSecurity(secret=llm.engine.processes[0].secret)  # the launch's secret: its workers ask for it
    return SocketSender("127.0.0.1", port, make_hello("prefill", llm.loaded.config.fingerprint(), layout_of(llm)),
                        security=security)


def _garbage_link(llm: LLM, port: int, header_update: dict, payload: bytes = b"") -> str:
    """Open a prefill link to a decode worker, reserve, send one bad LAYER; return the ERROR it answers."""
    sender = _prefill_link(llm, port)
    try:
        assert sender.reserve("garbage", 20, timeout_s=10)  # 2 blocks, which the dropped link must give back
        header = {"transfer_id": "garbage", "layer": 0, "shape": list(layout_of(llm).layer_shape(2)),
                  "dtype": "float32", "via": "dist", "src_rank": 1, **header_update}
        send_frame(sender.sock, FrameKind.LAYER, header, payload or None, timeout_s=10)
        reply = recv_frame(sender.sock, 10)
        assert reply.kind == FrameKind.ERROR, reply
        with pytest.raises(ConnectionError):  # PeerClosed, or a reset when our payload went unread
            recv_frame(sender.sock, 10)
        return str(reply.header["message"])
    finally:
        sender.sock.close()


def test_dist_1p1d_equals_colocated_and_garbage_drops_only_its_link(reference, seed):
    """Bad src_rank, shape, dtype or via: FrameError on that link only; the real prefill link keeps working."""
    prompts, ref = reference
    num_blocks = 32
    llm = LLM("tiny", device="cpu", batch_invariant=True, seed=seed, mode="disagg", transport="dist", num_prefill=1,
              num_decode=1, num_kv_blocks=num_blocks)
    procs = list(llm.engine.processes)
    try:
        check_outputs(llm, prompts, ref, seed)  # the real link (prefill = rank 1) has now claimed its source
        port = next(p.port for p in procs if p.name == "d0")  # decode = rank 0
        cases = [
            ({"src_rank": 0}, "not a peer"),  # the decode worker itself
            ({"src_rank": 2}, "not a peer"),  # outside a world of 2
            ({"src_rank": "1"}, "non-integer"),
            ({"src_rank": None}, "non-integer"),
            ({"src_rank": 1}, "another link"),  # a live source another link receives from
            ({"shape": [2, 3, BLOCK_SIZE, 1, 1]}, "expected"),
            ({"dtype": "bfloat16"}, "expected"),
            ({"layer": 99}, "layer index"),
            ({"num_layers": 3}, "num_layers"),  # more layers than the model has
            ({"num_layers": True}, "num_layers"),
            ({"via": "pigeon"}, "without pages"),
            ({"num_layers": 2, "pieces": 3}, "pieces 3 for 2 layers"),
            ({"num_layers": 2, "pieces": "2"}, "pieces"),
            ({"pieces": 1}, "need stacked layers"),
            ({"num_layers": 2, "announced": "yes"}, "announced"),
            ({"num_layers": 2, "order": "sideways"}, "unknown order"),
            ({"num_layers": 1, "order": "blocks"}, "must hold all"),
            ({"num_layers": 2, "order": "blocks", "pieces": 3}, "pieces 3 for 2 blocks"),
            ({"num_layers": 2, "order": "blocks", "announced": True}, "expected [2, 2, 2, 16, 2, 32]"),
        ]
        for update, message in cases:
            assert message in _garbage_link(llm, port, update), update
        assert "must not carry a payload" in _garbage_link(llm, port, {}, payload=bytes(layout_of(llm).layer_nbytes(2)))
        probe = _prefill_link(llm, port)  # every dropped link gave its blocks back: the whole pool is free
        try:
            deadline, attempt = time.monotonic() + 10, 0
            while not probe.reserve(f"probe-{attempt}", num_blocks * BLOCK_SIZE - 1, timeout_s=10):
                assert time.monotonic() < deadline, "garbage links leaked KV blocks"
                attempt += 1
                time.sleep(0.1)
            probe.cancel(f"probe-{attempt}")
        finally:
            probe.close()
        check_outputs(llm, prompts, ref, seed)
    finally:
        llm.shutdown()
    assert all(p.proc.poll() is not None for p in procs), "worker processes outlived shutdown"


@pytest.mark.gpu
def test_dist_nccl_equals_colocated_on_gpus(seed):
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL needs a GPU per rank: 1P1D needs 2 GPUs")
    prompts = token_prompts(seed, 5)
    ref = [o.token_ids for o in LLM("tiny", device="cuda", batch_invariant=True, seed=seed).generate(prompts, GREEDY)]
    llm = LLM("tiny", device="cuda", batch_invariant=True, seed=seed, mode="disagg", transport="dist")
    procs = list(llm.engine.processes)
    try:
        check_outputs(llm, prompts, ref, seed)
    finally:
        llm.shutdown()
    assert all(p.proc.poll() is not None for p in procs), "worker processes outlived shutdown"


@pytest.mark.gpu
def test_dist_nccl_with_graphs_and_async_scheduling_equals_colocated(seed):
    """The serving configuration: decode workers replay CUDA graphs and queue each step ahead while KV arrives."""
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL needs a GPU per rank: 1P1D needs 2 GPUs")
    prompts = token_prompts(seed, 6)
    colocated = LLM("tiny", device="cuda", dtype="float32", seed=seed, async_scheduling=True)
    assert colocated.engine.runner.async_scheduling and colocated.engine.runner.decode_graphs is not None
    ref = [o.token_ids for o in colocated.generate(prompts, GREEDY)]
    llm = LLM("tiny", device="cuda", dtype="float32", seed=seed, mode="disagg", transport="dist", async_scheduling=True)
    procs = list(llm.engine.processes)
    try:
        check_outputs(llm, prompts, ref, seed)
    finally:
        llm.shutdown()
    assert all(p.proc.poll() is not None for p in procs), "worker processes outlived shutdown"
