"""Colocated replicas: N independent colocated engines, each in its own process (and device), behind a router.

The data-parallel baseline a disaggregated deployment is measured against: the same GPUs,
each running prefill and decode together. ``ReplicaCluster`` has the steppable surface of
``LLMEngine`` and ``DisaggCluster`` (``add_request``, ``step``, ``abort``, ``shutdown``), routes
each request when it arrives to a replica with the existing ``Router`` (least loaded by
default), and enforces a deadline on every request. A replica reports a request once, when
it finishes, with its whole timeline. Replica processes exit when the parent does.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing as mp
import queue
import time
import traceback
from dataclasses import dataclass
from typing import Any, Optional, Sequence as Seq

from minidisagg.config import EngineConfig
from minidisagg.disagg.placement import check_placement, child_environment, placement
from minidisagg.disagg.router import Router
from minidisagg.engine.clock import WallClock
from minidisagg.engine.llm_engine import PromptInput, RequestOutput, validate_prompt
from minidisagg.engine.sampling import SamplingParams
from minidisagg.metrics import RequestTimeline
from minidisagg.models.registry import load_model

POLL_S = 0.02
READY_TIMEOUT_S = 300.0
CONTROL_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ReplicaSpec:
    """What a replica process needs to build its engine."""

    model: str
    device: Optional[str]  # "cpu", "cuda:N" (pinned, see ``placement``) or None (the loader's "auto")
    dtype: str
    random_weights: bool
    seed: int
    config: EngineConfig
    clock_origin_s: float
    threads: int = 0


def _replica_main(index: int, spec: ReplicaSpec, inbox: Any, outbox: Any) -> None:
    """A replica process: build the engine, then admit, step and report until told to stop."""
    device_args, _ = placement(spec.device)  # the parent set this child's CUDA_VISIBLE_DEVICES already
    import gc

    import torch

    from minidisagg.engine.llm_engine import LLMEngine

    try:
        if spec.threads:
            torch.set_num_threads(spec.threads)
        loaded = load_model(spec.model, device=device_args[-1] if device_args else "auto", dtype=spec.dtype,
                            seed=spec.seed, random_weights=spec.random_weights)
        engine = LLMEngine(loaded, spec.config, clock=WallClock(spec.clock_origin_s))
        engine.capture_cuda_graphs()  # before "ready": no measured request pays for a capture
        outbox.put(("ready", index, str(loaded.device)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails loudly
        outbox.put(("error", index, traceback.format_exc()))
        return
    parent = mp.parent_process()
    while parent is None or parent.is_alive():
        try:
            msg = inbox.get_nowait() if engine.has_unfinished() else inbox.get(timeout=POLL_S)
        except queue.Empty:
            msg = None
        while msg is not None:
            kind = msg[0]
            if kind == "stop":
                return
            if kind == "submit":
                _, rid, ids, params, arrival_s = msg
                engine.add_request({"prompt_token_ids": ids}, params, arrival_time=arrival_s, request_id=rid)
            elif kind == "abort":
                engine.abort(msg[1])
                engine.release(msg[1])
            elif kind == "policy":  # a fresh engine (KV pool, graphs) with another config; only while idle
                del engine
                gc.collect()  # free the old KV pool before sizing the new one
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                engine = LLMEngine(loaded, msg[1], clock=WallClock(spec.clock_origin_s))
                engine.capture_cuda_graphs()
                outbox.put(("policy", index, msg[1].policy))
            elif kind == "ping":
                outbox.put(("pong", index, engine.has_unfinished()))
            try:
                msg = inbox.get_nowait()
            except queue.Empty:
                msg = None
        if engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    engine.release(out.request_id)
                    outbox.put(("out", index, out))


@dataclass
class _Pending:
    request_id: str
    ids: list[int]
    params: SamplingParams
    arrival_s: float
    prompt: Optional[str]


class ReplicaCluster:
    """``num_replicas`` colocated engines in their own processes, one per entry of ``devices``."""

    def __init__(self, model: str, config: EngineConfig, devices: Seq[str], dtype: str = "auto",
                 random_weights: bool = False, seed: int = 0, routing: str = "least_loaded",
                 request_timeout_s: float = 600.0, threads: int = 0, ready_timeout_s: float = READY_TIMEOUT_S) -> None:
        devices = check_placement(devices, len(devices), "replica")
        if not devices:
            raise ValueError("a ReplicaCluster needs at least one device")
        if request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {request_timeout_s}")
        if routing == "cache_aware":
            raise ValueError("routing='cache_aware' picks prefill workers of mode='disagg'; replicas take "
                             "'least_loaded' or 'round_robin'")
        self.loaded = load_model(model, device=devices[0] if devices[0] == "cpu" else "auto", dtype=dtype,
                                 seed=seed, random_weights=random_weights, weights=False)
        self.model_config = self.loaded.config
        self.config = config
        self.max_model_len = min(config.max_model_len or self.model_config.max_position, self.model_config.max_position)
        self.clock = WallClock()
        self.router = Router(len(devices), 1, routing)
        self.request_timeout_s = request_timeout_s
        ctx = mp.get_context("spawn")
        self._outbox = ctx.Queue()
        self._inboxes = [ctx.Queue() for _ in devices]
        self.devices = list(devices)
        dtype_name = str(self.loaded.dtype).removeprefix("torch.")
        self.processes = [ctx.Process(target=_replica_main, name=f"replica-{i}", daemon=True, args=(
            i, ReplicaSpec(model, d, dtype_name, self.loaded.random_weights, seed, config, self.clock.origin_s, threads),
            self._inboxes[i], self._outbox)) for i, d in enumerate(devices)]
        self._live: dict[str, tuple[int, float, _Pending]] = {}  # request id -> (replica, deadline, request)
        self.assignment: dict[str, int] = {}  # request id -> the replica it was routed to
        self._future: dict[str, _Pending] = {}
        self._replies: list[tuple] = []
        self._ids = itertools.count()
        self._dead: set[int] = set()
        for proc, device in zip(self.processes, devices):
            with child_environment(placement(device)[1]):  # CUDA_VISIBLE_DEVICES before the child imports torch
                proc.start()
        try:
            self._await("ready", set(range(len(devices))), ready_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    # ---- control ------------------------------------------------------------------------------
    def _await(self, kind: str, replicas: set[int], timeout_s: float) -> dict[int, Any]:
        """Collect one ``kind`` reply from each replica (outputs meanwhile are kept for ``step``)."""
        got: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        while set(got) != replicas:
            for i in replicas - set(got):
                if not self.processes[i].is_alive():
                    raise RuntimeError(f"replica {i} exited with code {self.processes[i].exitcode}")
            try:
                msg = self._outbox.get(timeout=0.1)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"replicas {sorted(replicas - set(got))} sent no {kind!r} within {timeout_s} s")
                continue
            if msg[0] == "error":
                raise RuntimeError(f"replica {msg[1]} failed to start:\n{msg[2]}")
            if msg[0] == kind:
                got[msg[1]] = msg[2]
            else:
                self._replies.append(msg)
        return got

    def set_config(self, config: EngineConfig, timeout_s: float = CONTROL_TIMEOUT_S) -> None:
        """Rebuild every replica's engine with ``config`` (for example another policy); needs an idle cluster."""
        if self._live or self._future:
            raise RuntimeError("set_config needs an idle cluster; requests are still in flight")
        for inbox in self._inboxes:
            inbox.put(("policy", config))
        self._await("policy", set(range(len(self._inboxes))), timeout_s)
        self.config = config

    def wait_idle(self, timeout_s: float = CONTROL_TIMEOUT_S) -> bool:
        """Wait until no replica has unfinished work (after aborts); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for inbox in self._inboxes:
                inbox.put(("ping",))
            busy = self._await("pong", set(range(len(self._inboxes))), max(0.1, deadline - time.monotonic()))
            if not any(busy.values()):
                return True
            time.sleep(POLL_S)
        return False

    # ---- the engine surface -------------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptInput) -> tuple[Optional[str], list[int]]:
        """Validate and tokenize a prompt as the colocated engine does."""
        return validate_prompt(prompt, lambda: self.loaded.tokenizer, self.model_config.vocab_size, self.max_model_len)

    def add_request(self, prompt: PromptInput, params: Optional[SamplingParams] = None,
                    arrival_time: Optional[float] = None, request_id: Optional[str] = None) -> str:
        """Queue a request; it is routed to a replica when it arrives."""
        text, ids = self.tokenize_prompt(prompt)
        request_id = request_id if request_id is not None else f"r{next(self._ids)}"
        if request_id in self._live or request_id in self._future:
            raise ValueError(f"request id {request_id!r} is already in use")
        arrival = self.clock.now() if arrival_time is None else float(arrival_time)
        self._future[request_id] = _Pending(request_id, ids, params or SamplingParams(), arrival, text)
        self._admit_arrivals()
        return request_id

    def _admit_arrivals(self) -> None:
        now = self.clock.now()
        for rid, req in list(self._future.items()):
            if req.arrival_s <= now:
                del self._future[rid]
                loads = [0] * len(self._inboxes)
                for replica, _, _ in self._live.values():
                    loads[replica] += 1
                replica, _ = self.router.pick(loads, [0], sorted(self._dead))
                self._live[rid] = (replica, req.arrival_s + self.request_timeout_s, req)
                self.assignment[rid] = replica
                self._inboxes[replica].put(("submit", rid, req.ids, req.params, req.arrival_s))

    def has_unfinished(self) -> bool:
        """Whether any request is still waiting to arrive or in flight."""
        return bool(self._live or self._future)

    def step(self) -> list[RequestOutput]:
        """Route arrivals, collect finished requests (waiting at most until the next arrival), enforce deadlines."""
        self._admit_arrivals()
        outputs = self._check_replicas()
        next_arrival_s = min((req.arrival_s for req in self._future.values()), default=math.inf)
        wait_s = min(POLL_S, max(0.0, next_arrival_s - self.clock.now()))
        messages, self._replies = self._replies, []
        try:
            messages.append(self._outbox.get(timeout=wait_s) if wait_s > 0 else self._outbox.get_nowait())
            while True:
                messages.append(self._outbox.get_nowait())
        except queue.Empty:
            pass
        for msg in messages:
            if msg[0] == "out" and msg[2].request_id in self._live:
                del self._live[msg[2].request_id]
                outputs.append(msg[2])
        now = self.clock.now()
        for rid in [rid for rid, (_, deadline, _) in self._live.items() if now > deadline]:
            outputs.append(self._fail(rid, f"no result within request_timeout_s={self.request_timeout_s}"))
        return outputs

    def _check_replicas(self) -> list[RequestOutput]:
        failed = []
        for i, proc in enumerate(self.processes):
            if i not in self._dead and not proc.is_alive():
                self._dead.add(i)
                mine = [rid for rid, (replica, _, _) in self._live.items() if replica == i]
                failed += [self._fail(rid, f"replica {i} died (exit code {proc.exitcode})") for rid in mine]
        return failed

    def _fail(self, request_id: str, error: str) -> RequestOutput:
        replica, _, req = self._live.pop(request_id)
        if replica not in self._dead:
            self._inboxes[replica].put(("abort", request_id))
        tl = RequestTimeline(arrival_s=req.arrival_s, finish_s=self.clock.now())
        return RequestOutput(request_id, req.prompt, list(req.ids), "", [], True, "error", None, tl, error=error)

    def abort(self, request_id: str) -> None:
        """Give up on a request (the replica stops it and frees its blocks)."""
        self._future.pop(request_id, None)
        if request_id in self._live:
            self._fail(request_id, "aborted")

    def release(self, request_id: str) -> None:
        """Nothing to forget: finished requests leave as they finish."""

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop every replica process (terminate, then kill); safe to call twice."""
        for inbox, proc in zip(self._inboxes, self.processes):
            if proc.is_alive():
                inbox.put(("stop",))
        deadline = time.monotonic() + timeout_s
        for proc in self.processes:
            if proc.pid is None:
                continue
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)

    def __enter__(self) -> "ReplicaCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

