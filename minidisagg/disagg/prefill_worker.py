"""The prefill worker: computes prompts' KV and first tokens, then ships the pages to a decode worker.

Its link operations run on a sender thread (``kv_send_thread``); what it takes and gives back
are ``prefill_requests``'s ``Submission`` and ``FailedRequest``.

A prefill loop that dies is a health failure (``health``): the worker fails every request it
holds with a ``FailedRequest``, frees their blocks here, gives their reservations back on the
decode side, and refuses new submissions.

A router may abort a request it submitted (``abort_as``: the owner-token check of ``owners``),
wherever it is here: waiting for credit, prefilling, or handed off with its pages and DONE still
queued for the sender thread. The loop drops it between steps, frees its blocks here and gives
its reservation back on the decode side (unless DONE already went through: the decode worker
holds it then, and the router aborts it there).
"""

from __future__ import annotations

import itertools
import logging
import queue
import secrets
import threading
import time
from typing import Callable, Optional

import torch

from minidisagg.config import EngineConfig
from minidisagg.disagg.health import LoopHealth
from minidisagg.disagg.kv_send_thread import KVSendThread, OutgoingTransfer
from minidisagg.disagg.owners import RequestOwners
from minidisagg.disagg.prefill_requests import FailedRequest, Submission
from minidisagg.engine.clock import Clock, event_time_s
from minidisagg.engine.llm_engine import LLMEngine, RequestOutput
from minidisagg.engine.sequence import Sequence, SequenceStatus
from minidisagg.kv.pages import KVLayout, gather_block_pieces, gather_layer, gather_pages
from minidisagg.kv.prefix_cache import hash_chain
from minidisagg.models.registry import LoadedModel
from minidisagg.stages.prefill import LayerwisePrefillStage
from minidisagg.transport.base import KVSender, TransferError
from minidisagg.transport.trace import kv_trace

log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.05
ABORTED = "aborted by its router"


def kv_ready_mark(device: torch.device, clock: Clock) -> tuple[float, Optional[torch.cuda.Event]]:
    """The clock now, and on a GPU a timing event queued now: the device passes it once the pages are complete."""
    if device.type != "cuda":
        return clock.now(), None
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return clock.now(), event


class PrefillWorker:
    """An ``LLMEngine`` that only prefills; each prefilled sequence leaves through a ``KVSender``.

    Flow control is credit-based: a request is admitted to the engine only after its decode
    worker reserved blocks for it, so a full decode worker makes prefill wait, never drop.
    With ``overlap=True`` each layer's pages are queued for sending as soon as that layer is
    computed; otherwise all layers are sent after the prefill ends. Where the link can announce
    pages (``KVSender.announces``), their header goes out when the batch that completes the
    prompt starts, and this thread sends the pages itself as soon as the batch's last layer is
    queued, in announcement order (``_on_last_layer``).
    """

    def __init__(self, name: str, loaded: LoadedModel, config: EngineConfig, clock: Clock,
                 senders: dict[str, KVSender], sink: Callable[[RequestOutput | FailedRequest], None],
                 overlap: bool = False, timeout_s: float = 30.0) -> None:
        self.name = name
        self.engine = LLMEngine(loaded, config, clock=clock, policy="prefill_first", prefill_stage=LayerwisePrefillStage)
        self.engine.handoff = self._on_handoff
        stage = self.engine.prefill_stage
        assert isinstance(stage, LayerwisePrefillStage)
        stage.on_layer = self._on_layer if overlap else self._on_last_layer
        stage.on_batch_start = None if overlap else self._announce
        self.layout = KVLayout.of(self.engine.kv_cache)
        self.overlap = overlap
        self.senders = senders
        self.sink = sink
        self.timeout_s = timeout_s
        self._inbox: queue.Queue[Submission] = queue.Queue()
        self._pending: list[Submission] = []
        self._transfers: dict[str, OutgoingTransfer] = {}  # by request id
        self._announced: list[OutgoingTransfer] = []  # announced in this step, in order; shipped after its last layer
        self._to_commit: list[OutgoingTransfer] = []  # announced transfers handed off in this step
        self._sends = KVSendThread(self.layout.dtype, self.engine.clock, timeout_s)
        # Transfer ids key the reservations of a decode worker that every prefill worker shares, and
        # separate server processes may all be named "prefill": a random tag keeps them apart.
        self._transfer_prefix = f"{name}-{secrets.token_hex(4)}"
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.health = LoopHealth(f"prefill worker {name}")
        # requests submitted here and not yet finished, failed or handed over, with their routers' owner tokens
        self.owners = RequestOwners()
        self._aborts: queue.Queue[str] = queue.Queue()  # ids to drop, taken by the loop between steps

    @property
    def error(self) -> Optional[BaseException]:
        """What killed the prefill loop (None while it is healthy)."""
        return self.health.error

    def next_transfer_id(self) -> str:
        """A transfer id no other prefill worker, in this process or another, will use."""
        return f"{self._transfer_prefix}-{next(self._ids)}"

    def submit(self, submission: Submission) -> None:
        """Queue a request (thread-safe); ValueError if this worker is unhealthy or already holds the id."""
        with self.health.guard():  # a submission lands before the loop fails, and is failed with the rest, or is refused
            self.health.check()
            if submission.request_id in self.owners:
                raise ValueError(f"request id {submission.request_id!r} is already in flight on {self.name}")
            self.owners.claim(submission.request_id, submission.owner, f"prefill worker {self.name}")
            self._inbox.put(submission)

    def holds(self, request_id: str) -> bool:
        """Whether ``request_id`` was submitted here and is not yet finished, failed or handed over."""
        with self.health.guard():
            return request_id in self.owners

    def abort_as(self, request_id: str, owner: Optional[str]) -> None:
        """Abort for a router whose owner token is ``owner``: ``NotOwner`` (nothing aborted) if another router owns it."""
        self.owners.check_abort(request_id, owner)
        self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Drop a request held here (thread-safe, best effort: an unknown id is ignored); the loop frees its KV."""
        if request_id not in self.owners:
            return
        transfer = self._transfers.get(request_id)
        if transfer is not None and transfer.seq.status is SequenceStatus.HANDED_OFF and transfer.error is None:
            transfer.error = ABORTED  # at once: the sender thread skips its queued pages and DONE from now on
        self._aborts.put(request_id)

    def _drop_aborted(self) -> None:
        """Carry out the aborts queued since the last call (on the loop's thread: the engine is its own)."""
        while True:
            try:
                rid = self._aborts.get_nowait()
            except queue.Empty:
                return
            if any(sub.request_id == rid for sub in self._pending):  # no reservation yet
                self._pending = [sub for sub in self._pending if sub.request_id != rid]
                self._emit(FailedRequest(rid, ABORTED))
                continue
            transfer = self._transfers.get(rid)
            if transfer is None or transfer.error not in (None, ABORTED):  # handed over, finished or failed already
                continue
            transfer.error = ABORTED  # the sender thread skips its queued pages and DONE
            if transfer.seq.status is not SequenceStatus.HANDED_OFF:  # queued or prefilling: free it now
                self._transfers.pop(rid)
                self.engine.abort(rid)
                self.engine.release(rid)
                self._emit(FailedRequest(rid, ABORTED))
            # else its skipped DONE brings it to ``_reap``, which frees its blocks and fails it
            self._sends.put("abort", transfer)  # its reservation back, behind what is queued for it

    def _emit(self, item: RequestOutput | FailedRequest) -> None:
        """Pass a request's last word to the sink; it no longer counts as held here."""
        with self.health.guard():
            self.owners.release(item.request_id)
        self.sink(item)

    # ---- admission with credits ------------------------------------------------------------
    def _admit(self) -> None:
        while True:
            try:
                self._pending.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        self._drop_aborted()
        still_pending = []
        for sub, tid, granted, num_shared in self._reserve_pending():
            if isinstance(granted, TransferError):
                self._emit(FailedRequest(sub.request_id, f"decode worker {sub.decode_target} unreachable: {granted}"))
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
                self._emit(FailedRequest(sub.request_id, str(exc)))
                continue
            self._transfers[sub.request_id] = OutgoingTransfer(tid, sub, sender, self.engine.sequence(sub.request_id),
                                                               num_shared_blocks=num_shared)
        self._pending = still_pending

    def _reserve_pending(self) -> list[tuple[Submission, str, bool | TransferError, int]]:
        """Ask each decode worker for blocks for every pending request it is to get, in one exchange per worker.

        With prefix caching each ask carries the prompt's full blocks' keys; each answer comes with
        how many leading blocks the decode worker already held (their pages need not travel).
        """
        by_target: dict[str, list[tuple[int, Submission, str]]] = {}
        for i, sub in enumerate(self._pending):
            by_target.setdefault(sub.decode_target, []).append((i, sub, self.next_transfer_id()))
        answers: list[tuple[int, Submission, str, bool | TransferError, int]] = []
        bs, caching = self.engine.blocks.block_size, self.engine.blocks.prefix_cache is not None
        for target, items in by_target.items():
            sender = self.senders[target]
            keys = [hash_chain(s.prompt_token_ids, bs, (len(s.prompt_token_ids) - 1) // bs) if caching else []
                    for _, s, _ in items]
            try:
                granted = sender.reserve_many([(tid, len(sub.prompt_token_ids)) for _, sub, tid in items],
                                              self.timeout_s, keys)
            except (TransferError, OSError, ValueError) as exc:
                error = exc if isinstance(exc, TransferError) else TransferError(str(exc))
                granted = [error] * len(items)
            answers.extend((i, sub, tid, g, sender.take_num_shared_blocks(tid) if g is True else 0)
                           for (i, sub, tid), g in zip(items, granted))
        return [(sub, tid, g, n) for _, sub, tid, g, n in sorted(answers, key=lambda a: a[0])]  # arrival order

    # ---- hand-off: called on this worker's thread from inside engine.step() ---------------

    def _on_layer(self, seqs: list[Sequence], layer: int) -> None:
        for seq in seqs:
            transfer = self._transfers.get(seq.request_id)
            if transfer is not None:
                pages = gather_layer(self.engine.kv_cache, layer, transfer.page_blocks)
                self._sends.put("layer", transfer, (layer, pages))

    def _announce(self, seqs: list[Sequence]) -> None:
        """Before the batch that completes ``seqs`` runs: queue each one's page header (links that announce)."""
        for seq in seqs:
            transfer = self._transfers.get(seq.request_id)
            if transfer is None or not transfer.sender.announces or transfer.shape is not None:
                continue
            transfer.shape = self.layout.block_shape(len(transfer.page_blocks))
            transfer.pieces = transfer.sender.plan_pieces(transfer.shape, self.layout.dtype)
            self._announced.append(transfer)
            self._sends.put("announce", transfer)

    def _on_last_layer(self, seqs: list[Sequence], layer: int) -> None:
        """After the last layer of a batch is queued: send the announced pages of ``seqs``, in announcement order.

        The pages are complete once that layer has run, before the logits and the sampling, so
        their sends are queued behind it on the device right away. A piece whose blocks are one range
        of a ``block_major`` pool is sent from the pool itself; another is gathered just before its
        send is queued, so copies and transfer overlap. The blocks stay allocated here until DONE is
        acknowledged, which the decode side does only once the pages landed. A request that then stops at
        its first token has sent its pages all the same, and is cancelled after the step.
        """
        if layer != self.layout.num_layers - 1:
            return
        announced, self._announced = self._announced, []
        cache = self.engine.kv_cache
        for transfer in announced:
            tid, seq = transfer.transfer_id, transfer.seq
            if transfer.error is not None:  # its announcement failed: the decode side expects no pages
                continue
            transfer.started = True
            transfer.kv_ready = kv_ready_mark(cache.device, self.engine.clock)
            kv_trace("send-0", tid)
            sent_at = time.perf_counter()
            try:
                transfer.sender.send_pieces(tid, gather_block_pieces(cache, transfer.page_blocks, transfer.pieces))
            except TransferError as exc:
                transfer.error = f"KV transfer to {transfer.submission.decode_target} failed: {exc}"
                log.warning("%s", transfer.error)
            kv_trace("sent-0", tid)
            seq.timeline.kv_send_s += time.perf_counter() - sent_at
            transfer.num_bytes = transfer.sender.wire_nbytes(transfer.shape, self.layout.dtype)

    def _on_handoff(self, seq: Sequence) -> None:
        transfer = self._transfers[seq.request_id]
        kv_trace("handoff", transfer.transfer_id)
        seq.timeline.token_times_s.clear()  # the client gets the first token from the decode worker
        if transfer.shape is not None:  # announced: the pages left after the last layer; DONE follows
            transfer.handed_off = True
            seq.timeline.transfer_start_s = self.engine.clock.now()
            if transfer.kv_ready is not None:  # the step has synchronized: its events are passed
                host_s, event = transfer.kv_ready
                seq.timeline.kv_ready_s = host_s if event is None else event_time_s(event, self.engine.clock.now)
            self._to_commit.append(transfer)
            return
        if not self.overlap:  # the prefill is over: every layer in one message
            self._sends.put("layers", transfer, (0, gather_pages(self.engine.kv_cache, transfer.page_blocks)))
        self._sends.put("commit", transfer, seq)

    def _commit_handed_off(self) -> None:
        """Send DONE for the announced transfers this step handed off: here when idle, else by the sender thread.

        When nothing else waits (no request queued or running here, the sender thread idle on an
        empty queue, so every announcement already went out), this thread makes the DONE -> ACK
        exchange itself: the hop to the sender thread would add its wake-up to the request's TTFT.
        """
        to_commit, self._to_commit = self._to_commit, []
        idle = (self._sends.is_idle() and self._inbox.empty() and not self._pending
                and not self.engine.has_unfinished())
        for transfer in to_commit:
            if idle:
                self._drop_aborted()  # one aborted while an earlier DONE waited for its ACK skips its own
                self._sends.send("commit", transfer, transfer.seq)
            else:
                self._sends.put("commit", transfer, transfer.seq)

    def _reap(self) -> None:
        """Free what the sender thread finished with (committed, or failed at its commit); fail the failed."""
        while (transfer := self._sends.next_finished()) is not None:
            self.engine.release_handed_off(transfer.seq)
            self._transfers.pop(transfer.submission.request_id, None)
            with self.health.guard():
                self.owners.release(transfer.submission.request_id)
            if transfer.error is not None:
                self._emit(FailedRequest(transfer.submission.request_id, transfer.error))

    # ---- the main loop ----------------------------------------------------------------------
    def step(self) -> bool:
        """Admit what has credit, run one prefill step, reap finished transfers; returns whether it worked."""
        self._admit()
        for sender in self.senders.values():  # reservations still waiting for their prefill keep their leases
            sender.renew_leases()
        worked = False
        if self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:  # stopped at its first token: nothing to ship
                    transfer = self._transfers.pop(out.request_id, None)
                    if transfer is None:  # aborted (``_drop_aborted``): freed already
                        continue
                    if transfer.shape is None:
                        transfer.sender.cancel(transfer.transfer_id)
                    else:  # after its announcement, in the link's order
                        self._sends.put("cancel", transfer)
                    self.engine.release(out.request_id)
                    self._emit(out)
            self._drop_aborted()  # one aborted during this step skips its DONE
            self._commit_handed_off()
            worked = True
        self._reap()
        return worked

    def run_forever(self) -> None:
        """Prefill until ``stop``. If the loop fails, fail what it holds (``health``)."""
        def loop() -> None:
            while not self._stop.is_set():
                if not self.step():
                    try:
                        self._pending.append(self._inbox.get(timeout=IDLE_WAIT_S))
                    except queue.Empty:
                        pass

        self.health.run(loop, self._fail_held)

    def _fail_held(self, reason: str) -> None:
        """Fail every request this worker holds; free its blocks here and its reservations on the decode side."""
        while True:
            try:
                self._pending.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        pending, self._pending = self._pending, []
        for sub in pending:  # no reservation yet
            self._emit(FailedRequest(sub.request_id, reason))
        for rid, transfer in list(self._transfers.items()):
            transfer.error = reason  # the sender thread skips it from now on
            try:
                transfer.sender.cancel(transfer.transfer_id)
            except Exception:  # noqa: BLE001 - best effort: a dropped link frees reservations by itself
                log.warning("prefill worker %s: could not cancel transfer %s", self.name, transfer.transfer_id)
            try:
                if transfer.seq.status is SequenceStatus.HANDED_OFF:
                    self.engine.release_handed_off(transfer.seq)
                else:
                    self.engine.abort(rid)
                    self.engine.release(rid)
            except Exception:  # noqa: BLE001 - free what can be freed
                log.exception("prefill worker %s: could not free request %s", self.name, rid)
            self._transfers.pop(rid, None)
            self._emit(FailedRequest(rid, reason))

    def start(self) -> None:
        """Start the loop and the sender on daemon threads."""
        for target, kind in ((self.run_forever, "prefill"), (self._sends.run, "sender")):
            thread = threading.Thread(target=target, name=f"{kind}-{self.name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop both threads and wait for them."""
        self._stop.set()
        self._sends.close()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
