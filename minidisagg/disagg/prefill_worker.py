"""The prefill worker: computes prompts' KV and first tokens, then ships the pages to a decode worker."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from minidisagg.config import EngineConfig
from minidisagg.engine.clock import Clock
from minidisagg.engine.llm_engine import LLMEngine, RequestOutput
from minidisagg.engine.sampling import SamplingParams
from minidisagg.engine.sequence import Sequence, SequenceState
from minidisagg.kv.pages import gather_layer, gather_pages
from minidisagg.models.registry import LoadedModel
from minidisagg.stages.prefill import LayerwisePrefillStage
from minidisagg.transport.base import KVSender, TransferError
from minidisagg.transport.trace import kv_trace

log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.05


@dataclass
class Submission:
    """A request routed to this prefill worker, with the decode worker its KV must reach."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_s: float
    decode_target: str
    prompt: Optional[str] = None


@dataclass
class FailedRequest:
    """A request this worker could not hand over, with the reason (the router decides what next)."""

    request_id: str
    error: str


@dataclass
class _Transfer:
    transfer_id: str
    submission: Submission
    sender: KVSender
    seq: Sequence
    num_bytes: int = 0
    started: bool = False
    error: Optional[str] = None


class PrefillWorker:
    """An ``LLMEngine`` that only prefills; each prefilled sequence leaves through a ``KVSender``.

    Flow control is credit-based: a request is admitted to the engine only after its decode
    worker reserved blocks for it, so a full decode worker makes prefill wait, never drop.
    With ``overlap=True`` each layer's pages are queued for sending as soon as that layer is
    computed; otherwise all layers are sent after the prefill ends.
    """

    def __init__(self, name: str, loaded: LoadedModel, config: EngineConfig, clock: Clock,
                 senders: dict[str, KVSender], sink: Callable[[RequestOutput | FailedRequest], None],
                 overlap: bool = True, timeout_s: float = 30.0) -> None:
        self.name = name
        self.engine = LLMEngine(loaded, config, clock=clock, policy="prefill_first", prefill_stage=LayerwisePrefillStage)
        self.engine.handoff = self._on_handoff
        stage = self.engine.prefill_stage
        assert isinstance(stage, LayerwisePrefillStage)
        stage.on_layer = self._on_layer if overlap else None
        self.overlap = overlap
        self.senders = senders
        self.sink = sink
        self.timeout_s = timeout_s
        self._inbox: queue.Queue[Submission] = queue.Queue()
        self._pending: list[Submission] = []
        self._transfers: dict[str, _Transfer] = {}  # by request id
        self._send_queue: queue.Queue[Optional[tuple[str, _Transfer, object]]] = queue.Queue()
        self._finished_transfers: queue.Queue[_Transfer] = queue.Queue()
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.error: Optional[BaseException] = None

    def submit(self, submission: Submission) -> None:
        """Queue a request (thread-safe)."""
        self._inbox.put(submission)

    # ---- admission with credits ------------------------------------------------------------
    def _admit(self) -> None:
        while True:
            try:
                self._pending.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        still_pending = []
        for sub, tid, granted in self._reserve_pending():
            if isinstance(granted, TransferError):
                self.sink(FailedRequest(sub.request_id, f"decode worker {sub.decode_target} unreachable: {granted}"))
                continue
            if not granted:
                still_pending.append(sub)  # decode is full: wait for credit
                continue
            sender = self.senders[sub.decode_target]
            try:
                self.engine.add_request({"prompt_token_ids": sub.prompt_token_ids, "prompt": sub.prompt}, sub.params,
                                        arrival_time=sub.arrival_s, request_id=sub.request_id)
            except ValueError as exc:
                sender.cancel(tid)
                self.sink(FailedRequest(sub.request_id, str(exc)))
                continue
            self._transfers[sub.request_id] = _Transfer(tid, sub, sender, self.engine.sequence(sub.request_id))
        self._pending = still_pending

    def _reserve_pending(self) -> list[tuple[Submission, str, bool | TransferError]]:
        """Ask each decode worker for blocks for every pending request it is to get, in one exchange per worker."""
        by_target: dict[str, list[tuple[int, Submission, str]]] = {}
        for i, sub in enumerate(self._pending):
            by_target.setdefault(sub.decode_target, []).append((i, sub, f"{self.name}-{next(self._ids)}"))
        answers: list[tuple[int, Submission, str, bool | TransferError]] = []
        for target, items in by_target.items():
            try:
                granted = self.senders[target].reserve_many(
                    [(tid, len(sub.prompt_token_ids)) for _, sub, tid in items], self.timeout_s)
            except (TransferError, OSError, ValueError) as exc:
                error = exc if isinstance(exc, TransferError) else TransferError(str(exc))
                granted = [error] * len(items)
            answers.extend((i, sub, tid, g) for (i, sub, tid), g in zip(items, granted))
        return [(sub, tid, g) for _, sub, tid, g in sorted(answers, key=lambda a: a[0])]  # arrival order

    # ---- hand-off: called on this worker's thread from inside engine.step() ---------------
    def _on_layer(self, seqs: list[Sequence], layer: int) -> None:
        for seq in seqs:
            transfer = self._transfers.get(seq.request_id)
            if transfer is not None:
                pages = gather_layer(self.engine.kv_cache, layer, seq.block_table)
                self._send_queue.put(("layer", transfer, (layer, pages)))

    def _on_handoff(self, seq: Sequence) -> None:
        transfer = self._transfers[seq.request_id]
        kv_trace("handoff", transfer.transfer_id)
        seq.timeline.token_times_s.clear()  # the client gets the first token from the decode worker
        if not self.overlap:  # the prefill is over: every layer in one message
            self._send_queue.put(("layers", transfer, (0, gather_pages(self.engine.kv_cache, seq.block_table))))
        self._send_queue.put(("commit", transfer, seq))

    # ---- the sender thread ------------------------------------------------------------------
    def _send_loop(self) -> None:
        while True:
            item = self._send_queue.get()
            if item is None:
                return
            kind, transfer, payload = item
            if transfer.error is not None:
                if kind == "commit":
                    self._finished_transfers.put(transfer)
                continue
            try:
                if kind in ("layer", "layers"):
                    layer, pages = payload  # type: ignore[misc]
                    if not transfer.started:
                        transfer.started = True
                        transfer.seq.timeline.transfer_start_s = self.engine.clock.now()
                    sent_at = time.perf_counter()
                    send = transfer.sender.send_layer if kind == "layer" else transfer.sender.send_layers
                    kv_trace(f"send-{layer}", transfer.transfer_id)
                    send(transfer.transfer_id, layer, pages)
                    kv_trace(f"sent-{layer}", transfer.transfer_id)
                    transfer.seq.timeline.kv_send_s += time.perf_counter() - sent_at
                    transfer.num_bytes += pages.numel() * pages.element_size()
                else:
                    state = SequenceState.of(transfer.seq)  # the engine no longer touches a handed-off seq
                    kv_trace("commit", transfer.transfer_id)
                    transfer.sender.commit(transfer.transfer_id, state, transfer.num_bytes, self.timeout_s)
                    kv_trace("acked", transfer.transfer_id)
                    self._finished_transfers.put(transfer)
            except Exception as exc:  # a dead peer, a timeout, a refusal: fail this request only
                transfer.error = f"KV transfer to {transfer.submission.decode_target} failed: {exc}"
                log.warning("%s", transfer.error)
                try:
                    transfer.sender.cancel(transfer.transfer_id)
                except Exception:  # noqa: BLE001 - best effort on a broken link
                    pass
                if kind == "commit":
                    self._finished_transfers.put(transfer)

    def _reap(self) -> None:
        while True:
            try:
                transfer = self._finished_transfers.get_nowait()
            except queue.Empty:
                return
            self.engine.release_handed_off(transfer.seq)
            self._transfers.pop(transfer.submission.request_id, None)
            if transfer.error is not None:
                self.sink(FailedRequest(transfer.submission.request_id, transfer.error))

    # ---- the main loop ----------------------------------------------------------------------
    def step(self) -> bool:
        """Admit what has credit, run one prefill step, reap finished transfers; returns whether it worked."""
        self._admit()
        worked = False
        if self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:  # stopped at its first token: nothing to ship
                    transfer = self._transfers.pop(out.request_id)
                    transfer.sender.cancel(transfer.transfer_id)
                    self.engine.release(out.request_id)
                    self.sink(out)
            worked = True
        self._reap()
        return worked

    def run_forever(self) -> None:
        """Prefill until ``stop``."""
        try:
            while not self._stop.is_set():
                if not self.step():
                    try:
                        self._pending.append(self._inbox.get(timeout=IDLE_WAIT_S))
                    except queue.Empty:
                        pass
        except BaseException as exc:
            self.error = exc
            log.exception("prefill worker %s crashed", self.name)

    def start(self) -> None:
        """Start the loop and the sender on daemon threads."""
        for target, kind in ((self.run_forever, "prefill"), (self._send_loop, "sender")):
            thread = threading.Thread(target=target, name=f"{kind}-{self.name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop both threads and wait for them."""
        self._stop.set()
        self._send_queue.put(None)
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
