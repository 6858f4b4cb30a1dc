"""A disaggregated deployment behind the same steppable surface as ``LLMEngine``.

``DisaggCluster`` owns the prefill and decode workers, routes each request to a pair,
collects the decode workers' outputs, and enforces a deadline on every request so a
caller never hangs. ``LLM(mode="disagg")`` drives it exactly as it drives the colocated engine.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import secrets
import weakref
import queue
import time
from dataclasses import dataclass
from typing import Optional, Sequence as Seq

from minidisagg.config import EngineConfig
from minidisagg.disagg.decode_worker import DecodeWorker
from minidisagg.disagg.prefill_requests import FailedRequest, Submission
from minidisagg.disagg.prefill_worker import PrefillWorker
from minidisagg.disagg.prefix_index import DEFAULT_INDEX_BLOCKS, worker_pool_blocks
from minidisagg.disagg.router import Router
from minidisagg.engine.clock import WallClock
from minidisagg.engine.llm_engine import PromptInput, RequestOutput, validate_prompt
from minidisagg.engine.sampling import SamplingParams
from minidisagg.metrics import RequestTimeline
from minidisagg.models.registry import LoadedModel
from minidisagg.transport.inproc import InprocSender

KV_FAILURE_POLICIES = ("fail", "recompute")
TRANSPORTS = ("inproc", "socket", "dist")
POLL_S = 0.02


def _stop_remote(workers: list, processes: list) -> None:
    from minidisagg.disagg.launch import stop_processes

    for worker in workers:
        worker.stop()
    stop_processes(processes)


@dataclass
class _Live:
    submission: Submission
    prefill: int
    decode: int
    deadline_s: float
    attempts: int = 1
    tokens_seen: int = 0
    on_decode: bool = False  # its KV reached the decode worker: the prefill worker no longer matters
    new_tokens: int = 0  # prompt tokens its prefill worker must compute (cache_aware: less the predicted hit)
    new_kv_tokens: int = 0  # prompt tokens of KV its decode worker must take in (cache_aware: less the predicted reuse)


class DisaggCluster:
    """xPyD serving in one process: worker threads joined by a KV transport."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig, transport: str = "inproc",
                 num_prefill: int = 1, num_decode: int = 1, routing: str = "round_robin", overlap: bool = False,
                 kv_failure_policy: str = "fail", request_timeout_s: float = 600.0, max_attempts: int = 3,
                 model_ref: Optional[str] = None, pin_cores: bool = False, worker_threads: int = 0,
                 prefill_devices: Optional[Seq[str]] = None, decode_devices: Optional[Seq[str]] = None,
                 routing_load_weight: float = 1.0) -> None:
        """``prefill_devices`` / ``decode_devices`` pin each worker process ("cpu", "cuda:N"; not for inproc).

        ``routing_load_weight`` (``routing="cache_aware"`` only) trades cache affinity against load in the
        router's score, ``overlap_blocks - load_weight * queued_tokens / block_size`` (``prefix_index``).
        """
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r}; known: {list(TRANSPORTS)}")
        if kv_failure_policy not in KV_FAILURE_POLICIES:
            raise ValueError(f"kv_failure_policy must be one of {list(KV_FAILURE_POLICIES)}, got {kv_failure_policy!r}")
        if request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {request_timeout_s}")
        if transport == "inproc" and (prefill_devices is not None or decode_devices is not None):
            raise ValueError("inproc workers share this process's model; pin devices with transport 'socket' or 'dist'")
        self.loaded = loaded
        self.model_config = loaded.config
        self.max_model_len = min(config.max_model_len or loaded.config.max_position, loaded.config.max_position)
        self.clock = WallClock()
        self.transport = transport
        self.kv_failure_policy = kv_failure_policy
        self.request_timeout_s = request_timeout_s
        self.max_attempts = max_attempts
        if routing == "cache_aware" and not config.cache.enable_prefix_caching:
            raise ValueError("routing='cache_aware' needs enable_prefix_caching=True: without it no worker keeps "
                             "a prefix to route to")
        if routing != "cache_aware" and routing_load_weight != 1.0:
            raise ValueError(f"routing_load_weight={routing_load_weight!r} weighs load in routing='cache_aware' "
                             f"only; routing={routing!r} has no such score")
        self.router = Router(num_prefill, num_decode, routing, config.cache.block_size,
                             config.cache.num_blocks or DEFAULT_INDEX_BLOCKS, routing_load_weight)
        self.num_prompt_tokens_served = 0  # over finished requests: the realised ``prefix_hit_rate``
        self.num_cached_tokens_served = 0
        self.num_kv_reused_tokens_served = 0  # ... whose KV the decode worker already held: ``decode_reuse_rate``
        self.owner = secrets.token_hex(16)  # this router's owner token on remote workers (``owners``)
        self._id_tag = secrets.token_hex(6)  # in every id workers see: other routers cannot guess ours
        self._outputs: queue.Queue[RequestOutput | FailedRequest | None] = queue.Queue()  # None: ``wake``
        self.processes: list = []
        if transport == "inproc":
            self.decode_workers: list = [DecodeWorker(f"d{i}", loaded, config, self.clock, self._outputs.put)
                                         for i in range(num_decode)]
            heartbeat_s = config.link.kv_lease_s / 3
            senders = lambda: {w.name: InprocSender(w, heartbeat_s, config.link.kv_wire_dtype)  # noqa: E731
                               for w in self.decode_workers}
            self.prefill_workers: list = [
                PrefillWorker(f"p{i}", loaded, config, self.clock, senders(), self._outputs.put, overlap=overlap)
                for i in range(num_prefill)
            ]
            for worker in [*self.decode_workers, *self.prefill_workers]:
                worker.start()
        else:
            self._start_processes(model_ref or loaded.name, config, num_prefill, num_decode, overlap, pin_cores,
                                  worker_threads, prefill_devices, decode_devices)
        self._live: dict[str, _Live] = {}
        self._future: dict[str, Submission] = {}
        self._ids = itertools.count()
        self._dead_decodes: set[int] = set()
        self._dead_prefills: set[int] = set()
        self._failures_seen: dict[tuple[str, int], int] = {}  # (kind, index) -> the worker's failures handled

    def _start_processes(self, model_ref: str, config: EngineConfig, num_prefill: int, num_decode: int,
                         overlap: bool, pin_cores: bool, worker_threads: int, prefill_devices: Optional[Seq[str]],
                         decode_devices: Optional[Seq[str]]) -> None:
        from minidisagg.disagg.launch import launch_local, stop_processes
        from minidisagg.disagg.remote_worker import RemoteWorker
        from minidisagg.kv.pages import KVLayout
        from minidisagg.transport.auth import LinkSecurity, new_secret
        from minidisagg.transport.socket import make_hello

        loaded = self.loaded
        # dist: a bare "cuda" lets each NCCL rank take a GPU of its own (cuda:<rank % device_count>)
        device = loaded.device.type if self.transport == "dist" else str(loaded.device)
        args = ["--model", model_ref, "--device", device, "--dtype", str(loaded.dtype).removeprefix("torch."),
                "--max-num-seqs", str(config.max_num_seqs), "--max-num-batched-tokens", str(config.max_num_batched_tokens),
                "--block-size", str(config.cache.block_size), "--clock-origin", repr(self.clock.origin_s),
                "--threads", str(worker_threads)]
        if config.cache.num_blocks is not None:
            args += ["--num-kv-blocks", str(config.cache.num_blocks)]
        if config.cache.memory_budget_bytes is not None:
            args += ["--kv-memory-budget-bytes", str(config.cache.memory_budget_bytes)]
        if config.cache.layout is not None:
            args += ["--kv-layout", config.cache.layout]
        if config.cache.enable_prefix_caching:
            args.append("--enable-prefix-caching")
        if config.max_model_len is not None:
            args += ["--max-model-len", str(config.max_model_len)]
        if not config.cuda_graphs:
            args.append("--no-cuda-graphs")
        if config.async_scheduling is not None:
            args += ["--async-scheduling", "on" if config.async_scheduling else "off"]
        if config.batch_invariant:
            args.append("--batch-invariant")
        link = config.link
        args += ["--kv-lease-s", repr(link.kv_lease_s), "--max-reserved-share-per-peer",
                 repr(link.max_reserved_share_per_peer), "--reconnect-deadline-s", repr(link.reconnect_deadline_s),
                 "--subscriber-queue-size", str(link.subscriber_queue_size),
                 "--frame-deadline-s", repr(link.frame_deadline_s), "--max-connections", str(link.max_connections)]
        args += ["--kv-wire-dtype", link.kv_wire_dtype]
        if loaded.random_weights:
            args += ["--random-weights", "--seed", str(loaded.seed)]
        security = LinkSecurity(secret=new_secret())  # this launch's: its workers accept only who proves it
        prefills, decodes, self.log_dir = launch_local(args, num_prefill, num_decode, overlap, pin_cores,
                                                       transport=self.transport, prefill_devices=prefill_devices,
                                                       decode_devices=decode_devices, secret=security.secret)
        self.processes = prefills + decodes
        cfg = loaded.config
        layout = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, config.cache.block_size, loaded.dtype)
        hello = make_hello("router", cfg.fingerprint(), layout)
        try:
            self.decode_workers = [RemoteWorker(d.name, d.host, d.port, hello, self._outputs,
                                                **self.remote_worker_options(config, security)) for d in decodes]
            self.prefill_workers = [RemoteWorker(p.name, p.host, p.port, hello, self._outputs,
                                                 **self.remote_worker_options(config, security)) for p in prefills]
        except BaseException:
            stop_processes(self.processes)
            raise
        # An LLM dropped without shutdown() still stops its processes (at the latest, at interpreter exit).
        weakref.finalize(self, _stop_remote, [*self.prefill_workers, *self.decode_workers], list(self.processes))

    def remote_worker_options(self, config: EngineConfig, security: object) -> dict:
        """How this router's links to worker servers behave (``RemoteWorker``'s keyword arguments).

        One owner token per router (``owners``): its requests are its own on every worker.
        """
        from minidisagg.transport.backoff import ReconnectPolicy

        return {"vocab_size": self.model_config.vocab_size, "security": security, "owner": self.owner,
                "reconnect": ReconnectPolicy.of(config.link), "frame_deadline_s": config.link.frame_deadline_s}

    def wire_id(self, request_id: str, attempt: int) -> str:
        """The id workers see for one attempt at a request: late outputs of an abandoned attempt are recognised, and
        this router's random tag keeps other routers from guessing (and taking) the ids of its requests."""
        return f"{request_id}@{attempt}.{self._id_tag}"

    # ---- the LLMEngine surface ----------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptInput) -> tuple[Optional[str], list[int]]:
        """Validate and tokenize a prompt as the colocated engine does (workers check KV capacity)."""
        return validate_prompt(prompt, lambda: self.loaded.tokenizer, self.model_config.vocab_size, self.max_model_len)

    def add_request(self, prompt: PromptInput, params: Optional[SamplingParams] = None,
                    arrival_time: Optional[float] = None, request_id: Optional[str] = None) -> str:
        """Route a request to a prefill/decode pair and queue it on the prefill worker."""
        params = params or SamplingParams()
        text, ids = self.tokenize_prompt(prompt)
        request_id = request_id if request_id is not None else f"r{next(self._ids)}"
        if request_id in self._live or request_id in self._future:
            raise ValueError(f"request id {request_id!r} is already in use")
        arrival = self.clock.now() if arrival_time is None else float(arrival_time)
        sub = Submission(request_id, ids, params, arrival, "", prompt=text)
        self._future[request_id] = sub  # routed when it arrives, so it holds no KV credit before then
        self._admit_arrivals()
        return request_id

    def _admit_arrivals(self) -> None:
        now = self.clock.now()
        for rid, sub in list(self._future.items()):
            if sub.arrival_s <= now:
                del self._future[rid]
                self._route(sub, attempts=1, arrival=sub.arrival_s)

    @property
    def prefix_hit_rate(self) -> float:
        """Prompt tokens finished requests took from a prefix cache over all their prompt tokens (0 before any)."""
        return self.num_cached_tokens_served / self.num_prompt_tokens_served if self.num_prompt_tokens_served else 0.0

    @property
    def decode_reuse_rate(self) -> float:
        """Prompt tokens of finished requests whose KV the decode worker's prefix cache held (not sent), over all."""
        served = self.num_prompt_tokens_served
        return self.num_kv_reused_tokens_served / served if served else 0.0

    def _route(self, sub: Submission, attempts: int, arrival: float, tokens_seen: int = 0) -> None:
        # cache_aware loads (``prefix_index``): prefill, prompt tokens left to compute; decode, KV tokens held
        cache_aware = self.router.policy == "cache_aware"
        prefill_loads = [0] * len(self.prefill_workers)
        decode_loads = [0] * len(self.decode_workers)
        for live in self._live.values():
            prefill_loads[live.prefill] += (0 if live.on_decode else live.new_tokens) if cache_aware else 1
            decode_loads[live.decode] += live.new_kv_tokens + live.tokens_seen if cache_aware else 1
        for side, workers in (("prefill", self.prefill_workers), ("decode", self.decode_workers)) if cache_aware else ():
            for i, worker in enumerate(workers):
                self.router.resize(i, worker_pool_blocks(worker), side)
        p, d = self.router.pick(prefill_loads, decode_loads, sorted(self._dead_prefills), sorted(self._dead_decodes),
                                prompt_token_ids=sub.prompt_token_ids)
        choices = (self.router.last_choice, self.router.last_decode_choice) if cache_aware else (None, None)
        cached, reused = (0 if c is None else c.predicted_cached_tokens for c in choices)
        sub.decode_target = self.decode_workers[d].name
        deadline = max(arrival, self.clock.now()) + self.request_timeout_s
        n = len(sub.prompt_token_ids)
        self._live[sub.request_id] = _Live(sub, p, d, deadline, attempts, tokens_seen, new_tokens=n - cached,
                                           new_kv_tokens=n - reused)
        # Workers see one id per attempt, so late outputs of an abandoned attempt are recognised.
        self.prefill_workers[p].submit(dataclasses.replace(sub, request_id=self.wire_id(sub.request_id, attempts)))

    def wake(self) -> None:
        """End a ``step`` waiting for outputs now (thread-safe): a caller has a request to add or abort."""
        self._outputs.put(None)

    def has_unfinished(self) -> bool:
        """Whether any request is still waiting to arrive or in flight."""
        return bool(self._live or self._future)

    def step(self) -> list[RequestOutput]:
        """Collect what the workers produced since the last call (waiting briefly); enforce deadlines."""
        self._admit_arrivals()
        # wait for outputs, but no longer than until the next arrival, so it is routed on time
        next_arrival_s = min((sub.arrival_s for sub in self._future.values()), default=math.inf)
        wait_s = min(POLL_S, max(0.0, next_arrival_s - self.clock.now()))
        items: list[RequestOutput | FailedRequest] = []
        try:
            items.append(self._outputs.get(timeout=wait_s) if wait_s > 0 else self._outputs.get_nowait())
            while True:
                items.append(self._outputs.get_nowait())
        except queue.Empty:
            pass
        # Workers after the drain: a worker reports its death before the failures of the requests it held,
        # so those are recognised as late outputs of a dead worker, and never recomputed on it.
        outputs: list[RequestOutput] = self._check_workers()
        for item in items:
            if item is None:  # ``wake``
                continue
            out = self._handle(item)
            if out is not None:
                outputs.append(out)
        outputs.extend(self._expire())
        return outputs

    def _check_workers(self) -> list[RequestOutput]:
        """A dead worker takes only its own requests down: fail them, or recompute them elsewhere.

        A remote worker whose link heals (``RemoteWorker.num_failures`` counts the breaks) is used again.
        """
        failed: list[RequestOutput] = []
        for kind, workers, dead in (("decode", self.decode_workers, self._dead_decodes),
                                    ("prefill", self.prefill_workers, self._dead_prefills)):
            for index, worker in enumerate(workers):
                failures = getattr(worker, "num_failures", int(worker.error is not None))
                if worker.error is None:
                    dead.discard(index)
                else:
                    dead.add(index)
                if failures <= self._failures_seen.get((kind, index), 0):
                    continue
                self._failures_seen[(kind, index)] = failures
                self.router.forget(index, kind)
                mine = [(r, live.attempts) for r, live in self._live.items()
                        if getattr(live, kind) == index and not (kind == "prefill" and live.on_decode)]
                for rid, attempt in mine:
                    out = self._handle(FailedRequest(self.wire_id(rid, attempt),
                                                     f"{kind} worker {worker.name} died: {worker.error}"))
                    if out is not None:
                        failed.append(out)
        return failed

    def _handle(self, item: RequestOutput | FailedRequest) -> Optional[RequestOutput]:
        if isinstance(item, RequestOutput) and item.finish_reason == "error":  # a worker failed it: as FailedRequest
            item = FailedRequest(item.request_id, item.error or "the worker failed the request")
        rid, _, attempt = item.request_id.rpartition("@")
        live = self._live.get(rid)
        if live is None or self.wire_id(rid, live.attempts) != item.request_id:
            # A late output of a request that already failed, timed out or moved on. One still decoding was
            # committed while it was aborted (its DONE crossed the abort): abort it again, so its blocks go now.
            if isinstance(item, RequestOutput) and not item.finished:
                for worker in self.decode_workers:
                    worker.abort(item.request_id)
            return None
        if isinstance(item, FailedRequest):
            if self.kv_failure_policy == "recompute" and live.attempts < self.max_attempts:
                self._live.pop(rid)
                try:
                    self._route(live.submission, live.attempts + 1, live.submission.arrival_s, live.tokens_seen)
                    return None
                except RuntimeError as exc:  # nowhere left to run it
                    self._live[rid] = live
                    return self._fail(rid, f"{item.error}; cannot recompute: {exc}")
            return self._fail(rid, item.error)
        live.on_decode = True
        new_tokens = len(item.token_ids) - live.tokens_seen
        if new_tokens <= 0 and not item.finished:
            return None  # a recomputed request re-emitting tokens the caller already has
        live.tokens_seen = len(item.token_ids)
        if item.finished:
            del self._live[rid]
            self.num_prompt_tokens_served += len(item.prompt_token_ids)
            self.num_cached_tokens_served += item.num_cached_tokens
            self.num_kv_reused_tokens_served += item.metrics.kv_reused_tokens if item.metrics is not None else 0
        return dataclasses.replace(item, request_id=rid)

    def _fail(self, request_id: str, error: str) -> RequestOutput:
        live = self._live.pop(request_id)
        sub = live.submission
        tl = RequestTimeline(arrival_s=sub.arrival_s, finish_s=self.clock.now())
        wire_id = self.wire_id(request_id, live.attempts)
        if not live.on_decode:  # queued, prefilling or its KV still on the way: the prefill worker frees it too
            self.prefill_workers[live.prefill].abort(wire_id)
        for worker in self.decode_workers:
            worker.abort(wire_id)
        return RequestOutput(request_id, sub.prompt, list(sub.prompt_token_ids), "", [], True, "error", None, tl,
                             error=error)

    def _expire(self) -> list[RequestOutput]:
        now = self.clock.now()
        late = [rid for rid, live in self._live.items() if now > live.deadline_s]
        return [self._fail(rid, f"no result within request_timeout_s={self.request_timeout_s}") for rid in late]

    def abort(self, request_id: str) -> None:
        """Give up on a request (its late outputs are dropped; its blocks are freed on the prefill and decode workers)."""
        self._future.pop(request_id, None)
        if request_id in self._live:
            self._fail(request_id, "aborted")

    def release(self, request_id: str) -> None:
        """Nothing to forget: finished requests leave ``_live`` as they finish."""

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop every worker thread and process (safe to call twice)."""
        deadline = time.monotonic() + timeout_s
        for worker in [*self.prefill_workers, *self.decode_workers]:
            worker.stop(max(0.1, deadline - time.monotonic()))
        if self.processes:
            from minidisagg.disagg.launch import stop_processes

            stop_processes(self.processes, max(1.0, deadline - time.monotonic()))
            self.processes = []
