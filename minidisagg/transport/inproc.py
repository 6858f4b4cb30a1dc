"""In-process transport: the decode worker is in the same process; pages are handed over as tensors.

With a quantised ``wire_dtype`` the pages are encoded as a wire message and decoded into the
receiver's dtype at the hand-over, exactly what a socket link does at its two ends, so results
and ``bytes_sent`` agree across transports.
"""

from __future__ import annotations

import threading
import time
from typing import Sequence

import torch

from minidisagg.engine.sequence import SequenceState
from minidisagg.kv.wire_quant import WireMessage
from minidisagg.transport.base import HEARTBEAT_S, KVReceiver, KVSender, LeaseRenewing, TransferError, reserve_sharing


class InprocSender(KVSender):
    """Calls the decode worker's receiver directly: no serialization, one tensor copy into its pool."""

    name = "inproc"

    def __init__(self, receiver: KVReceiver, heartbeat_s: float = HEARTBEAT_S, wire_dtype: str = "auto") -> None:
        super().__init__(wire_dtype)
        self.receiver = receiver
        self.heartbeat_s = heartbeat_s
        self._next_heartbeat_s = 0.0
        self._granted: set[str] = set()  # reserved, not yet committed or cancelled
        self._lock = threading.Lock()

    def reserve(self, transfer_id: str, num_tokens: int, timeout_s: float, block_keys: Sequence[bytes] = ()) -> bool:
        """Reserve blocks on the receiver (sharing what its prefix cache holds of ``block_keys``)."""
        granted, num_shared = reserve_sharing(self.receiver.reserve, self.receiver, transfer_id, num_tokens, block_keys)
        if granted:
            with self._lock:
                self._granted.add(transfer_id)
            self._note_shared(transfer_id, num_shared)
        return granted

    def renew_leases(self) -> None:
        """Every ``heartbeat_s``: renew the leases of the transfers reserved here (receivers that hold leases)."""
        if not isinstance(self.receiver, LeaseRenewing):
            return
        now_s = time.monotonic()
        with self._lock:
            if now_s < self._next_heartbeat_s or not self._granted:
                return
            self._next_heartbeat_s = now_s + self.heartbeat_s
            transfer_ids = sorted(self._granted)
        self.receiver.renew_reservations(transfer_ids)

    def _forget(self, transfer_id: str) -> None:
        with self._lock:
            self._granted.discard(transfer_id)
        self._shared_blocks.pop(transfer_id, None)

    def _over_the_wire(self, pages: torch.Tensor) -> torch.Tensor:
        """``pages`` as the receiver gets them: themselves, or quantised and dequantised (``wire_dtype``)."""
        self.stats.bytes_sent += self.wire_nbytes(pages.shape, pages.dtype)
        if self.wire_dtype == "auto":
            return pages
        return WireMessage.encode(pages, self.wire_dtype).decode(pages.dtype)

    def send_layer(self, transfer_id: str, layer: int, pages: torch.Tensor) -> None:
        """Give the receiver the layer's pages to scatter into its pool."""
        t0 = time.perf_counter()
        self.receiver.write_layer(transfer_id, layer, self._over_the_wire(pages))
        self.stats.send_s += time.perf_counter() - t0

    def send_layers(self, transfer_id: str, first_layer: int, pages: torch.Tensor) -> None:
        """Give the receiver consecutive layers' pages to scatter at once."""
        t0 = time.perf_counter()
        self.receiver.write_layers(transfer_id, first_layer, self._over_the_wire(pages))
        self.stats.send_s += time.perf_counter() - t0

    def commit(self, transfer_id: str, state: SequenceState, num_bytes: int, timeout_s: float) -> None:
        """Hand the sequence over; errors from the receiver become TransferError."""
        try:
            self.receiver.commit(transfer_id, state, num_bytes)
        except Exception as exc:  # the receiver refused or failed
            raise TransferError(f"decode worker refused transfer {transfer_id}: {exc}") from exc
        finally:
            self._forget(transfer_id)
        self.stats.num_transfers += 1

    def cancel(self, transfer_id: str) -> None:
        """Drop the reservation."""
        self._forget(transfer_id)
        self.receiver.cancel(transfer_id)
