"""The decode worker: receives prefilled requests' KV pages and decodes them with the usual engine.

The receiving calls other than ``commit`` (reservations, page writes, leases, peers) are
``decode_reservations``'s; the engine's lock is a ``FairEngineLock`` (``engine_lock``).

A decode loop that dies is a health failure (``health``): the worker fails every request it
holds, each with an error output, frees all their KV blocks, reservations included, and from
then on refuses reservations and commits.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable, Optional

from minidisagg.config import EngineConfig
from minidisagg.disagg.decode_reservations import DecodeReservations
from minidisagg.disagg.health import LoopHealth
from minidisagg.disagg.owners import RequestOwners
from minidisagg.disagg.validate import MessageLimits, check_sequence_state
from minidisagg.engine.clock import Clock
from minidisagg.engine.llm_engine import LLMEngine, RequestOutput
from minidisagg.engine.sequence import SequenceState
from minidisagg.models.registry import LoadedModel
from minidisagg.stages.base import Stage
from minidisagg.stages.decode import DecodeStage
from minidisagg.transport.trace import kv_trace

log = logging.getLogger(__name__)
OutputSink = Callable[[RequestOutput], None]
IDLE_WAIT_S = 0.05
WAITER_GRACE_S = 0.05
FAIL_LOCK_TIMEOUT_S = 5.0
LEASE_CHECK_S = 0.05  # how often the loop looks for expired leases
MAX_ABORTED_IDS = 4096  # aborted ids remembered, so a commit that crossed its abort is refused


@dataclass
class _Adoption:
    """A committed transfer waiting for the decode loop's next step boundary."""

    transfer_id: str
    state: SequenceState
    num_bytes: int
    landed_at_s: Optional[float]


class DecodeWorker(DecodeReservations):
    """An ``LLMEngine`` that only decodes: sequences arrive prefilled, through ``KVReceiver`` calls.

    It is the receiving end of every transport. Reservations are blocks held under the
    transfer id (``DecodeReservations``); ``commit`` turns one into a running sequence. Each is a
    lease that expires without progress, and a link's reservations count against its quota
    (``leases``; the clock is ``lease_clock``, monotonic). Outputs (each new token, and the final
    result) go to ``sink``. Each request is held under its id, with its router's owner token
    (``owners``): a second request under an id already here is refused at commit.
    """

    def __init__(self, name: str, loaded: LoadedModel, config: EngineConfig, clock: Clock, sink: OutputSink,
                 decode_stage: type[Stage] = DecodeStage, lease_clock: Callable[[], float] = time.monotonic) -> None:
        engine = LLMEngine(loaded, config, clock=clock, policy="decode_first", decode_stage=decode_stage)
        engine.capture_cuda_graphs()  # a server captures at start: no request pays for a capture
        super().__init__(name, engine, LoopHealth(f"decode worker {name}"), config.link, lease_clock)
        self._sink = sink
        self.owners = RequestOwners()  # request id -> owner token, from commit until the request ends
        self.owner_connected: Callable[[str], bool] = lambda token: True  # a server tells whether that router is here
        # called after each batch of outputs handed to ``sink`` (one decode step's): a server sends them as one frame
        self.flush_outputs: Callable[[], None] = lambda: None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._next_lease_check_s = 0.0
        self._adoptions: deque[_Adoption] = deque()  # committed transfers the loop adopts before its next step
        self._adoptions_lock = threading.Lock()  # transport threads append, the loop and abort take
        self._thread: Optional[threading.Thread] = None
        self._aborted: OrderedDict[str, None] = OrderedDict()  # the latest aborted ids (``abort``)
        self.limits = MessageLimits(loaded.config.vocab_size, self.engine.max_model_len)

    @property
    def error(self) -> Optional[BaseException]:
        """What killed the decode loop (None while it is healthy)."""
        return self.health.error

    # ---- KVReceiver: commit (the other calls are ``DecodeReservations``'s) ------------------
    def commit(self, transfer_id: str, state: SequenceState, num_bytes: int,
               landed_at_s: Optional[float] = None) -> None:
        """Adopt the sequence whose pages now sit in the reservation: now if the engine is free, else queued.

        What can be checked at once is (ValueError: no reservation, no first token, too few
        blocks). While the loop runs a step, the sequence is queued and the loop adopts it before
        its next step; the transport acknowledges without waiting for the engine, so several
        transfers that finish together are adopted together instead of one per step (a failure
        then reaches the client as an error output). ``landed_at_s`` (a ``time.perf_counter()``
        reading) becomes the timeline's ``kv_landed_s`` on a wall clock.
        """
        self.health.check()
        blocks = self._blocks_of(transfer_id)
        check_sequence_state(state, self.limits, self.engine.clock.now())  # InvalidMessage (a ValueError) names the field
        num_tokens = len(state.prompt_token_ids) + len(state.output_token_ids)
        if self.engine.blocks.blocks_needed(num_tokens - 1) > len(blocks) + self.leases.num_shared_blocks(transfer_id):
            raise ValueError(f"request {state.request_id}: reservation {transfer_id!r} is too small for its KV")
        self.owners.claim(state.request_id, state.owner, f"decode worker {self.name}")  # ValueError: a duplicate id
        try:
            if state.request_id in self._aborted:  # after the claim: an abort from now on finds it (``abort``)
                raise ValueError(f"request {state.request_id} was aborted before its KV arrived")
            if state.owner is not None and not self.owner_connected(state.owner):  # after the claim: see ``owners``
                raise ValueError(f"request {state.request_id}: the router that submitted it has no connection to "
                                 f"decode worker {self.name}, so nobody would read its outputs")
            self.leases.commit(transfer_id)  # LeaseExpired if the loop expired it first; after this it cannot
        except BaseException:
            self.owners.release(state.request_id)
            raise
        item: Optional[_Adoption] = _Adoption(transfer_id, state, num_bytes, landed_at_s)
        if self._lock.acquire(blocking=False):  # the engine is free: adopt now (errors reach the caller)
            try:
                with self._adoptions_lock:
                    if self._adoptions:  # keep the order of earlier commits
                        self._adoptions.append(item)
                        item = None
                if item is None:
                    adopted, failed = self._adopt_queued()
                else:
                    try:
                        adopted, failed = [self._adopt(item)], []
                    except BaseException:
                        self.owners.release(state.request_id)
                        raise
            finally:
                self._lock.release()
            for out in failed + adopted:
                self.sink(out)
            self.flush_outputs()
        else:
            kv_trace("queued", transfer_id)
            with self._adoptions_lock:
                self._adoptions.append(item)
        if self.health.error is not None:  # the loop failed since the check above: nobody will decode it
            for out in self._fail_held(self.health.reason or "decode loop failed"):
                self.sink(out)
            self.flush_outputs()
        self._wake.set()

    def _adopt(self, item: _Adoption) -> RequestOutput:
        """Turn a committed reservation into a running sequence (engine lock held); its first-token output."""
        tid = item.transfer_id
        if tid not in self._reserved:
            raise ValueError(f"no reservation for transfer {tid!r}")
        if item.state.request_id not in self.owners:
            raise ValueError(f"request {item.state.request_id} was aborted before it could be adopted")
        seq = self.engine.adopt(item.state, f"transfer:{tid}")
        kv_trace("adopted", tid)
        seq.timeline.kv_reused_tokens = self.leases.num_shared_blocks(tid) * self.engine.blocks.block_size
        self.leases.remove(tid)
        now = self.engine.clock.now()
        seq.timeline.transfer_end_s = now
        seq.timeline.kv_transfer_bytes = item.num_bytes
        origin_s = getattr(self.engine.clock, "origin_s", None)
        if item.landed_at_s is not None and origin_s is not None:
            seq.timeline.kv_landed_s = item.landed_at_s - origin_s
        seq.timeline.record_token(now)  # the first token reaches the client with its KV
        return self.engine.output_of(seq)

    def _adopt_queued(self) -> tuple[list[RequestOutput], list[RequestOutput]]:
        """Adopt every queued transfer (under the engine lock): (first-token outputs, failed requests' outputs)."""
        outputs, failures = [], []
        with self._adoptions_lock:
            queued, self._adoptions = self._adoptions, deque()
        for item in queued:
            state = item.state
            if item.transfer_id not in self._reserved:  # aborted or cancelled while queued
                continue
            try:
                outputs.append(self._adopt(item))
            except ValueError as exc:
                self.engine.cancel_reservation(f"transfer:{item.transfer_id}")
                self.leases.remove(item.transfer_id)
                failures.append(RequestOutput(state.request_id, state.prompt, list(state.prompt_token_ids), "", [],
                                              True, "error", None, state.restore_timeline(), error=str(exc)))
        return outputs, failures

    # ---- the loop ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Free blocks in this worker's pool."""
        return self.engine.blocks.num_free_blocks

    def step(self) -> bool:
        """Adopt queued transfers, then one decode iteration; returns whether there was work."""
        self._fair_lock.let_waiters_in(WAITER_GRACE_S)  # transport calls first (bounded: none stalls decode)
        with self._lock:
            now_s = self.leases.clock()
            if now_s >= self._next_lease_check_s:
                self._next_lease_check_s = now_s + LEASE_CHECK_S
                self.expire_leases()
            adopted, failed = self._adopt_queued()
            start = self.engine.clock.now()
            if failed or adopted:  # their first tokens leave now, not a decode step later
                for out in adopted:
                    out.timeline.decode_start_s = start
                for out in failed + adopted:
                    self.sink(out)
                self.flush_outputs()
            outputs: list[RequestOutput] = []
            if self.engine.has_unfinished():
                outputs = self.engine.step()
                for out in outputs:
                    if out.timeline.decode_start_s is None:
                        out.timeline.decode_start_s = start
                    if out.finished:
                        self.engine.release(out.request_id)
        for out in outputs:
            self.sink(out)
        self.flush_outputs()
        return bool(failed or adopted or outputs)

    def run_forever(self) -> None:
        """Decode until ``stop``; sleeps on an event while idle. If the loop fails, fail what it holds (``health``)."""
        def loop() -> None:
            while not self._stop.is_set():
                if not self.step():
                    self._wake.wait(IDLE_WAIT_S)
                    self._wake.clear()

        def fail_held(reason: str) -> None:
            for out in self._fail_held(reason):
                self.sink(out)
            self.flush_outputs()

        self.health.run(loop, fail_held)

    def _fail_held(self, reason: str) -> list[RequestOutput]:
        """Fail every request this worker holds and free all its blocks (after the loop died)."""
        if not self._lock.acquire(timeout=FAIL_LOCK_TIMEOUT_S):
            log.error("decode worker %s: engine still busy after %s s; its blocks stay held", self.name,
                      FAIL_LOCK_TIMEOUT_S)
            return []
        failures: list[RequestOutput] = []
        try:
            with self._adoptions_lock:
                queued, self._adoptions = self._adoptions, deque()
            for item in queued:
                state = item.state
                failures.append(RequestOutput(state.request_id, state.prompt, list(state.prompt_token_ids), "",
                                              list(state.output_token_ids), True, "error", None,
                                              state.restore_timeline(), error=reason))
            for tid in list(self._reserved):
                self.engine.cancel_reservation(f"transfer:{tid}")
            self.leases.clear()
            for rid in self.engine.request_ids():
                try:
                    seq = self.engine.sequence(rid)
                    self.engine.abort(rid)
                    failures.append(RequestOutput(rid, seq.prompt, list(seq.prompt_token_ids), "",
                                                  list(seq.output_token_ids), True, "error", None, seq.timeline,
                                                  seq.num_preemptions, error=reason))
                    self.engine.release(rid)
                except Exception:  # noqa: BLE001 - free what can be freed
                    log.exception("decode worker %s: could not fail request %s", self.name, rid)
        finally:
            self._lock.release()
        return failures

    def start(self) -> None:
        """Run the loop on a daemon thread."""
        self._thread = threading.Thread(target=self.run_forever, name=f"decode-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the loop and wait for it."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def sink(self, out: RequestOutput) -> None:
        """Hand an output on; a request whose last output this is no longer counts as held (``owners``)."""
        try:
            self._sink(out)
        finally:
            if out.finished:
                self.owners.release(out.request_id)

    def abort_as(self, request_id: str, owner: Optional[str]) -> None:
        """Abort for a router whose owner token is ``owner``: ``NotOwner`` (nothing aborted) if another router owns it."""
        self.owners.check_abort(request_id, owner)
        self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop decoding one request and free its blocks (also one committed but not adopted yet).

        Its id is released last, under the engine: a commit still on its way in then finds it gone and is
        refused (``_adopt``), while one the loop adopted first is aborted here. The id is remembered (the
        latest ``MAX_ABORTED_IDS``), so a commit that arrives after its abort (the abort overtook the KV) is
        refused too.
        """
        with self._fair_lock.transport_access():
            self._aborted[request_id] = None  # one whose DONE is still on its way is refused at commit
            while len(self._aborted) > MAX_ABORTED_IDS:
                self._aborted.popitem(last=False)
            with self._adoptions_lock:
                dropped = [a for a in self._adoptions if a.state.request_id == request_id]
                self._adoptions = deque(a for a in self._adoptions if a.state.request_id != request_id)
            for item in dropped:
                if self.leases.remove(item.transfer_id) is not None:
                    self.engine.cancel_reservation(f"transfer:{item.transfer_id}")
            self.engine.abort(request_id)
            self.engine.release(request_id)
            self.owners.release(request_id)
