"""The KV link part of ``minidisagg bench disagg``: a plain send/recv ceiling, the transport's achieved bandwidth
on one long request, and the greedy-equality check (disaggregated tokens == colocated tokens).

Ceiling: two fresh processes on the same two devices as the deployment (NCCL between GPUs,
gloo on CPU) send the pages of one request with plain ``torch.distributed`` send/recv, the ways
the transport can: one message per layer (layer-wise overlap), one message for the whole
request, and one batch of a piece per layer and K/V (a finished prefill sent straight from the
pool, one run of blocks); timed on the receiver from a barrier until the last page has landed.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import queue
import statistics
import time
import traceback
from typing import Any, Optional, Sequence

import torch

from minidisagg.bench.disagg_sweep import run_requests
from minidisagg.disagg.launch import free_ports
from minidisagg.disagg.placement import child_environment, placement
from minidisagg.engine.sampling import SamplingParams
from minidisagg.kv.pages import KVLayout
from minidisagg.workload import TimedRequest

CEILING_TIMEOUT_S = 120.0


def _ceiling_rank(rank: int, device: str, init: str, layer_shape: tuple[int, ...], num_layers: int,
                  dtype: torch.dtype, repeats: int, results: Any) -> None:
    """One side of the plain send/recv loop (rank 0 sends, rank 1 receives and times)."""
    import torch.distributed as dist

    args, _ = placement(device)  # the parent set this child's CUDA_VISIBLE_DEVICES already
    try:
        dev = torch.device(args[-1] if args else "cpu")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=CEILING_TIMEOUT_S))
        layers = [torch.ones(layer_shape, dtype=dtype, device=dev) for _ in range(num_layers)]
        whole = torch.ones((num_layers, *layer_shape), dtype=dtype, device=dev)
        pieces = [layer[half] for layer in layers for half in (0, 1)]
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
        timings: dict[str, list[float]] = {"per_layer": [], "one_message": [], "one_batch": []}
        barrier = (lambda: dist.barrier(device_ids=[dev.index])) if backend == "nccl" else dist.barrier
        for i in range(repeats + 1):  # the first round warms the connection up
            for kind, tensors in (("per_layer", layers), ("one_message", [whole]), ("one_batch", pieces)):
                barrier()
                sync()
                t0 = time.perf_counter()
                if kind == "one_batch":
                    op = dist.isend if rank == 0 else dist.irecv
                    for work in dist.batch_isend_irecv([dist.P2POp(op, t, 1 - rank) for t in tensors]):
                        work.wait()
                else:
                    for t in tensors:
                        dist.send(t, 1) if rank == 0 else dist.recv(t, 0)
                sync()
                if i:
                    timings[kind].append(time.perf_counter() - t0)
        barrier()
        if rank == 1:
            results.put(("ok", timings))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put(("error", traceback.format_exc()))


def measure_ceiling(layout: KVLayout, num_tokens: int, devices: Sequence[str], repeats: int = 5) -> dict[str, Any]:
    """Plain send/recv of one request's pages between ``devices[0]`` and ``devices[1]``; GB/s (1e9 bytes/s)."""
    num_blocks = -(-num_tokens // layout.block_size)
    shape = layout.layer_shape(num_blocks)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init = f"tcp://127.0.0.1:{free_ports('127.0.0.1', 1)[0]}"
    procs = [ctx.Process(target=_ceiling_rank, daemon=True,
                         args=(rank, devices[rank], init, shape, layout.num_layers, layout.dtype, repeats, results))
             for rank in (0, 1)]
    for p, device in zip(procs, devices):
        with child_environment(placement(device)[1]):
            p.start()
    try:
        status, payload = results.get(timeout=CEILING_TIMEOUT_S)
    except queue.Empty:
        status, payload = "error", f"no result within {CEILING_TIMEOUT_S} s"
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
    nbytes = layout.request_nbytes(num_blocks)
    if status != "ok":
        return {"error": str(payload)[-2000:], "kv_bytes": nbytes}
    out: dict[str, Any] = {"kv_bytes": nbytes, "num_messages": layout.num_layers,
                           "message_bytes": layout.layer_nbytes(num_blocks), "repeats": repeats}
    for kind, seconds in payload.items():
        out[f"{kind}_s"] = statistics.median(seconds)
        out[f"{kind}_GBps"] = nbytes / out[f"{kind}_s"] / 1e9
    return out


def probe_transfer(cluster: Any, num_tokens: int, repeats: int = 3, seed: int = 0) -> dict[str, Any]:
    """Send ``repeats`` lone requests of ``num_tokens`` prompt tokens through a disaggregated deployment.

    Two times per request. ``kv_move_s``: from the pages being complete on the prefill device to
    their being in the decode pool, both read off device events (announced transfers, see
    ``transport/dist.py``): the data path, gathers and scatters included, which is what the
    bandwidth (``achieved_GBps``) and the plain send/recv ceiling (``ceiling: one_message``, one
    send of the same bytes) compare. ``transfer_s``: from the end of the prefill step to the
    decode worker adopting the request, what the hand-off adds to TTFT (pages still in flight,
    DONE, adoption). Without announced transfers, bandwidth falls back to ``transfer_s``.
    """
    rows = []
    for i in range(repeats):
        run = run_requests(cluster, [TimedRequest(0.0, num_tokens, 2)], 120.0, seed + i)
        out = run["outputs"][0]
        if out is None or out.metrics is None or out.metrics.transfer_s is None:
            return {"error": getattr(out, "error", None) or "no output", "prompt_tokens": num_tokens}
        m = out.metrics
        rows.append((m.kv_transfer_bytes, m.transfer_s, m.ttft_s, m.kv_move_s))
    kv_bytes = rows[0][0]
    transfer_s = statistics.median(r[1] for r in rows)
    moves = [r[3] for r in rows]
    timed = moves if all(t is not None for t in moves) else [r[1] for r in rows]
    timed_s = statistics.median(timed)
    return {"prompt_tokens": num_tokens, "kv_bytes": kv_bytes, "transfer_s": transfer_s,
            "kv_move_s": timed_s if timed is moves else None, "best_kv_move_s": min(timed) if timed is moves else None,
            "bandwidth_over": "kv_move_s" if timed is moves else "transfer_s",
            "achieved_GBps": kv_bytes / timed_s / 1e9, "best_GBps": kv_bytes / min(timed) / 1e9,
            "transfer_over_ttft": statistics.median(r[1] / r[2] for r in rows), "repeats": repeats,
            "ceiling": "one_message"}


def greedy_tokens(engine: Any, prompts: list[list[int]], max_tokens: int) -> list[Optional[list[int]]]:
    """Greedy tokens of each prompt, one request at a time (so batch shapes match across deployments)."""
    tokens = []
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for ids in prompts:
        rid = engine.add_request({"prompt_token_ids": ids}, params)
        deadline = time.monotonic() + 120.0
        out = None
        while out is None and time.monotonic() < deadline:
            out = next((o for o in engine.step() if o.request_id == rid and o.finished), None)
        if out is None:
            engine.abort(rid)
        tokens.append(None if out is None or out.error else list(out.token_ids))
    return tokens


def greedy_prompts(vocab_size: int, num: int, seed: int, lengths: tuple[int, int] = (16, 200)) -> list[list[int]]:
    """Seeded random prompts of ordinary token ids."""
    gen = torch.Generator().manual_seed(seed)
    high = min(vocab_size, 49152)
    out = []
    for _ in range(num):
        n = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=gen))
        out.append([int(t) for t in torch.randint(100, high, (n,), generator=gen)])
    return out


def compare_greedy(reference: list[Optional[list[int]]], other: list[Optional[list[int]]]) -> dict[str, Any]:
    """Whether every prompt produced the same tokens, with the first mismatches."""
    mismatches = [{"prompt": i, "first_difference": next((k for k, (a, b) in enumerate(zip(r, o)) if a != b), None)
                   if r is not None and o is not None else None}
                  for i, (r, o) in enumerate(zip(reference, other)) if r is None or o is None or r != o]
    return {"num_prompts": len(reference), "equal": not mismatches and len(reference) == len(other),
            "mismatches": mismatches[:5]}
