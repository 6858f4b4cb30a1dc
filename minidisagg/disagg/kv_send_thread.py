"""A prefill worker's sender thread: the link operations its loop queues, carried out in order, off the loop.

Each queued item is ``(kind, transfer, payload)``: ``announce`` (the page header, for links that
announce), ``layer`` / ``layers`` (pages, payload ``(first layer, pages)``), ``commit`` (DONE,
payload the handed-off sequence), ``cancel`` or ``abort`` (the router gave the request up: its
reservation goes back unless DONE went through already; the loop set ``error`` first, so the
operations queued before it are skipped). A failed operation fails that transfer only: its
``error`` is set, its reservation cancelled, and every later operation on it is skipped. A
committed transfer, or a failed one at its commit, is kept for the loop to reap (``next_finished``).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from minidisagg.disagg.prefill_requests import Submission
from minidisagg.engine.clock import Clock
from minidisagg.engine.sequence import Sequence, SequenceState
from minidisagg.transport.base import KVSender
from minidisagg.transport.trace import kv_trace

log = logging.getLogger(__name__)


@dataclass
class OutgoingTransfer:
    """One admitted request's KV on its way to its decode worker: its reservation, its link, how far it got."""

    transfer_id: str
    submission: Submission
    sender: KVSender
    seq: Sequence
    num_bytes: int = 0
    started: bool = False
    error: Optional[str] = None
    shape: Optional[tuple[int, ...]] = None  # of the announced stacked pages (``PrefillWorker._announce``)
    pieces: list[tuple[int, int]] = field(default_factory=list)  # their planned block ranges
    handed_off: bool = False
    committed: bool = False  # DONE was acknowledged: the decode worker holds the request
    kv_ready: Optional[tuple[float, Optional[torch.cuda.Event]]] = None  # when its pages were complete
    num_shared_blocks: int = 0  # leading blocks the decode worker's prefix cache held: their pages stay here

    @property
    def page_blocks(self) -> list[int]:
        """The blocks whose pages travel: the request's block table after those the decode worker shares."""
        return self.seq.block_table[self.num_shared_blocks:]


class KVSendThread:
    """The queue of link operations and the thread that runs them (``run``); ``dtype``: the pages' dtype."""

    def __init__(self, dtype: torch.dtype, clock: Clock, timeout_s: float) -> None:
        self.dtype = dtype
        self.clock = clock
        self.timeout_s = timeout_s
        self._finished: queue.Queue[OutgoingTransfer] = queue.Queue()
        self._queue: queue.Queue[Optional[tuple[str, OutgoingTransfer, object]]] = queue.Queue()
        self._idle = threading.Event()  # set while the thread waits on an empty queue

    def put(self, kind: str, transfer: OutgoingTransfer, payload: object = None) -> None:
        """Queue one operation on ``transfer``'s link, behind those already queued."""
        self._queue.put((kind, transfer, payload))

    def close(self) -> None:
        """Let the thread end once it has carried out what is queued."""
        self._queue.put(None)

    def is_idle(self) -> bool:
        """Whether the thread waits on an empty queue (so every queued operation has been carried out)."""
        return self._idle.is_set() and self._queue.empty()

    def next_finished(self) -> Optional[OutgoingTransfer]:
        """A transfer that committed or failed at its commit, not yet reaped; None if there is none."""
        try:
            return self._finished.get_nowait()
        except queue.Empty:
            return None

    def run(self) -> None:
        """Carry out queued operations until ``close``."""
        while True:
            self._idle.set()
            item = self._queue.get()
            self._idle.clear()
            if item is None:
                return
            self.send(*item)

    def send(self, kind: str, transfer: OutgoingTransfer, payload: object) -> None:
        """Carry out one link operation (on the sender thread, or inline when it is idle: ``PrefillWorker``)."""
        if kind == "abort":
            if not transfer.committed:
                try:
                    transfer.sender.cancel(transfer.transfer_id)
                except Exception:  # noqa: BLE001 - best effort: a dropped link frees reservations by itself
                    log.warning("could not give back the reservation of aborted transfer %s", transfer.transfer_id)
            return
        if transfer.error is not None:
            if kind == "commit":
                self._finished.put(transfer)
            return
        try:
            if kind == "announce":
                kv_trace("announce", transfer.transfer_id)
                transfer.sender.announce_pages(transfer.transfer_id, transfer.shape, self.dtype, transfer.pieces)
            elif kind == "cancel":
                transfer.sender.cancel(transfer.transfer_id)
            elif kind in ("layer", "layers"):
                layer, pages = payload  # type: ignore[misc]
                if not transfer.started:
                    transfer.started = True
                    transfer.seq.timeline.transfer_start_s = self.clock.now()
                sent_at = time.perf_counter()
                send = transfer.sender.send_layer if kind == "layer" else transfer.sender.send_layers
                kv_trace(f"send-{layer}", transfer.transfer_id)
                send(transfer.transfer_id, layer, pages)
                kv_trace(f"sent-{layer}", transfer.transfer_id)
                transfer.seq.timeline.kv_send_s += time.perf_counter() - sent_at
                transfer.num_bytes += transfer.sender.wire_nbytes(pages.shape, pages.dtype)  # scales included
            else:
                # the engine no longer touches a handed-off seq
                state = dataclasses.replace(SequenceState.of(transfer.seq), owner=transfer.submission.owner)
                kv_trace("commit", transfer.transfer_id)
                transfer.sender.commit(transfer.transfer_id, state, transfer.num_bytes, self.timeout_s)
                kv_trace("acked", transfer.transfer_id)
                transfer.committed = True
                self._finished.put(transfer)
        except Exception as exc:  # a dead peer, a timeout, a refusal: fail this request only
            transfer.error = f"KV transfer to {transfer.submission.decode_target} failed: {exc}"
            log.warning("%s", transfer.error)
            try:
                transfer.sender.cancel(transfer.transfer_id)
            except Exception:  # noqa: BLE001 - best effort on a broken link
                pass
            if kind == "commit":
                self._finished.put(transfer)
