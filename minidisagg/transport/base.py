"""The ``KVTransport`` protocol: how a prefill worker ships one request's KV pages to a decode worker.

A transfer has four moves, the same over every transport:

1. ``reserve``: ask the decode worker to set aside blocks for the request (credit-based
   flow control: when it is full, the answer is no and the prefill side waits). With prefix
   caching the ask carries the hash keys of the prompt's full blocks; a decode worker whose
   prefix cache holds a leading run of them shares those blocks and says how many
   (``take_num_shared_blocks``): the pages below travel for the blocks after them only;
2. ``send_layer``: the pages of one layer, [2, num_blocks, block_size, kv_heads, head_dim],
   possibly while later layers are still being computed (or ``send_layers``: several
   consecutive layers stacked into one message, once the prefill has ended; or, on links that
   announce, ``send_pieces``: every layer block first, [num_blocks, num_layers, 2, ...]);
3. ``commit``: the sequence's state (tokens, sampling, timeline); the decode worker adopts
   it and acknowledges, after which the prefill worker frees its own pages;
4. ``cancel``: give the reservation back if anything went wrong.

A decode worker may hold each reservation as a lease that expires without progress and count
it against the quota of the link it came over (``KVPeer``, ``PeerAwareReceiver``); a refusal
for that reason is a ``QuotaExceeded`` (wait and ask again), an expired one a ``LeaseExpired``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Protocol, Sequence, runtime_checkable

import torch

from minidisagg.config import LinkConfig
from minidisagg.engine.sequence import SequenceState
from minidisagg.kv.wire_quant import check_wire_dtype, wire_nbytes

HEARTBEAT_S = LinkConfig.kv_lease_s / 3  # a sender renews its reservations' leases three times per lease


class TransferError(RuntimeError):
    """A KV transfer failed (peer gone, timed out, refused); the request can be failed or recomputed."""


class QuotaExceeded(ValueError):
    """A reservation refused because its peer already holds its share of the pool: retry once transfers commit."""


class LeaseExpired(ValueError):
    """A reservation whose transfer made no progress within its lease; its blocks went back to the pool."""


class KVPeer(Protocol):
    """One link's standing with a decode worker: its reservations, their leases and its quota.

    Reservations made through it count against its quota; a lease that expires is reported
    back through ``take_expired`` so the link, the only writer of those blocks, frees them;
    ``close`` frees whatever the link still holds.
    """

    name: str

    def reserve(self, transfer_id: str, num_tokens: int, block_keys: Sequence[bytes] = ()) -> bool:
        """Reserve as ``KVReceiver.reserve``, held by this peer (``QuotaExceeded`` over its share)."""

    def renew(self, transfer_id: str) -> None:
        """Progress on a transfer: its lease starts again."""

    def take_expired(self) -> list[tuple[str, str]]:
        """(transfer id, reason) of this peer's leases that expired since the last call."""

    def close(self) -> int:
        """The link is gone: free every reservation it still holds; returns the number of blocks freed."""


@runtime_checkable
class LeaseRenewing(Protocol):
    """A ``KVReceiver`` whose reservations are leases an in-process sender renews."""

    def renew_reservations(self, transfer_ids: Sequence[str]) -> None:
        """These transfers are still under way: their leases start again (unknown or expired ones are skipped)."""


@runtime_checkable
class PeerAwareReceiver(Protocol):
    """A ``KVReceiver`` that tracks reservations per link (leases, quotas, freeing on close)."""

    def open_peer(self, name: str) -> KVPeer:
        """Start tracking one link (``name`` says who it is, for messages)."""


@runtime_checkable
class PrefixSharingReceiver(Protocol):
    """A ``KVReceiver`` whose ``reserve`` takes ``block_keys`` and may share cached blocks for them."""

    def num_shared_blocks(self, transfer_id: str) -> int:
        """How many leading blocks of the reservation it already held: no pages are written into them."""


def reserve_sharing(reserve: Callable[..., bool], receiver: object, transfer_id: str, num_tokens: int,
                    block_keys: Sequence[bytes]) -> tuple[bool, int]:
    """Reserve through ``reserve`` (``receiver``'s own, or its link's ``KVPeer``'s), offering ``block_keys`` where
    ``receiver`` shares prefixes: (granted, leading blocks it already held)."""
    if not block_keys or not isinstance(receiver, PrefixSharingReceiver):
        return reserve(transfer_id, num_tokens), 0
    granted = reserve(transfer_id, num_tokens, block_keys=list(block_keys))
    return granted, receiver.num_shared_blocks(transfer_id) if granted else 0


class KVReceiver(Protocol):
    """What a decode worker offers to transports (all methods are thread-safe)."""

    def reserve(self, transfer_id: str, num_tokens: int) -> bool:
        """Reserve blocks for ``num_tokens`` tokens; False when the pool is full right now.

        A ``PrefixSharingReceiver`` also takes ``block_keys``; the page calls below then address
        the reservation's blocks after the shared ones (position 0 is the first new block).
        """

    def write_layer(self, transfer_id: str, layer: int, pages: torch.Tensor) -> None:
        """Scatter one layer's pages into the reserved blocks."""

    def write_layers(self, transfer_id: str, first_layer: int, pages: torch.Tensor) -> None:
        """Scatter consecutive layers' pages [n, 2, blocks, ...] into the reserved blocks."""

    def write_blocks(self, transfer_id: str, first: int, pages: torch.Tensor) -> None:
        """Write pages block first [n, layers, 2, ...] into the reservation's blocks ``first .. first + n``."""

    def block_region(self, transfer_id: str, first: int, end: int) -> Optional[torch.Tensor]:
        """The pool's memory for the reservation's blocks ``first .. end``, block first, where it is one
        contiguous range (a transport may then receive straight into it); else None."""

    def commit(self, transfer_id: str, state: SequenceState, num_bytes: int,
               landed_at_s: Optional[float] = None) -> None:
        """All layers arrived: adopt the sequence and start decoding it.

        ``landed_at_s``: when the pages were all in the pool (a ``time.perf_counter()`` reading),
        where the transport measured it.
        """

    def cancel(self, transfer_id: str) -> None:
        """Drop a reservation (and anything written into it)."""


@dataclass
class TransferStats:
    """Bytes and time a sender has moved, for bandwidth figures."""

    num_transfers: int = 0
    bytes_sent: int = 0
    send_s: float = 0.0


class KVSender(ABC):
    """The prefill side of one link to one decode worker.

    ``wire_dtype`` (``LinkConfig.kv_wire_dtype``): how pages travel, ``auto`` (the pool's dtype) or
    quantised (``int8``, ``fp8_e4m3``: ``kv/wire_quant.py``); the decode side must expect the same.
    """

    name = "base"

    def __init__(self, wire_dtype: str = "auto") -> None:
        self.stats = TransferStats()
        self._shared_blocks: dict[str, int] = {}  # transfer id -> leading blocks the decode side holds (granted > 0)
        self.device = torch.device("cpu")  # where this link's pages travel from
        self.wire_dtype = check_wire_dtype(wire_dtype)

    def wire_nbytes(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        """Bytes this link puts on the wire for pages of ``shape`` and ``dtype`` (scales included)."""
        return wire_nbytes(shape, self.wire_dtype, dtype)

    @abstractmethod
    def reserve(self, transfer_id: str, num_tokens: int, timeout_s: float, block_keys: Sequence[bytes] = ()) -> bool:
        """Ask for blocks; True when granted, False when the decode worker is full.

        ``block_keys``: the prompt's full blocks' hash chain (``kv.prefix_cache``), for the decode
        worker to share what its prefix cache holds (``take_num_shared_blocks``).
        """

    def take_num_shared_blocks(self, transfer_id: str) -> int:
        """How many leading blocks of a granted reservation the decode side already held (asked once: forgotten then).

        The transfer's pages start after them: ``block_table[n:]``.
        """
        return self._shared_blocks.pop(transfer_id, 0)

    def _note_shared(self, transfer_id: str, num_blocks: int) -> None:
        """Remember what a grant said about shared blocks, for ``take_num_shared_blocks``."""
        if num_blocks:
            self._shared_blocks[transfer_id] = num_blocks

    @abstractmethod
    def send_layer(self, transfer_id: str, layer: int, pages: torch.Tensor) -> None:
        """Ship one layer's pages (a contiguous tensor)."""

    def send_layers(self, transfer_id: str, first_layer: int, pages: torch.Tensor) -> None:
        """Ship consecutive layers stacked as [num_layers, 2, num_blocks, ...] (default: one ``send_layer`` each).

        Transports override this to move them as one message: one header and one send instead of
        one per layer, which is what a finished prefill wants.
        """
        for i in range(pages.shape[0]):
            self.send_layer(transfer_id, first_layer + i, pages[i])

    @property
    def announces(self) -> bool:
        """Whether this link can describe a finished prefill's pages before they exist (``announce_pages``).

        Then the decode side posts its receive while the prefill still computes, and the pages
        move as soon as they are sent, with no header hop on the critical path.
        """
        return False

    def plan_pieces(self, shape: Sequence[int], dtype: torch.dtype) -> list[tuple[int, int]]:
        """How an announced message [blocks, layers, 2, ...] is cut: (first, end) block ranges."""
        return [(0, shape[0])]

    def announce_pages(self, transfer_id: str, shape: Sequence[int], dtype: torch.dtype,
                       pieces: Sequence[tuple[int, int]]) -> None:
        """Describe the pages, block first, that ``send_pieces`` will ship (only where ``announces`` is True)."""
        raise NotImplementedError(f"the {self.name} transport does not announce pages")

    def send_pieces(self, transfer_id: str, pieces: Iterable[tuple[int, torch.Tensor]]) -> None:
        """Ship an announced transfer's pages, (first block position, pages block first) per planned piece, in order.

        ``pieces`` may be a generator that gathers each piece as it is asked for, so the copy of
        one piece overlaps the send of the one before. Every announced transfer must get exactly
        its planned pieces (the decode side posted a receive for each), even one cancelled later.
        """
        raise NotImplementedError(f"the {self.name} transport does not announce pages")

    def reserve_many(self, requests: Sequence[tuple[str, int]], timeout_s: float,
                     block_keys: Sequence[Sequence[bytes]] = ()) -> list[bool | TransferError]:
        """Reserve for several transfers, each (transfer id, number of tokens), with ``block_keys[i]`` (if given).

        Each entry of the answer is True (granted), False (the decode worker is full now) or the
        TransferError that refused that one request. A broken link raises TransferError for all.
        The default asks one at a time; a transport over a network pipelines the questions.
        """
        answers: list[bool | TransferError] = []
        for i, (transfer_id, num_tokens) in enumerate(requests):
            keys = block_keys[i] if block_keys else ()
            try:
                answers.append(self.reserve(transfer_id, num_tokens, timeout_s, keys) if keys
                               else self.reserve(transfer_id, num_tokens, timeout_s))
            except TransferError as exc:
                if self.is_broken:
                    raise
                answers.append(exc)
            except ValueError as exc:  # an in-process receiver refusing this one request
                answers.append(TransferError(str(exc)))
        return answers

    @property
    def is_broken(self) -> bool:
        """Whether the link is down for good (every later call fails)."""
        return False

    def renew_leases(self) -> None:
        """Tell the decode side that the transfers reserved over this link are still under way.

        A prefill worker calls this from its loop, so a loop that stops also stops renewing.
        Links whose reservations hold no lease need not do anything (the default).
        """

    @abstractmethod
    def commit(self, transfer_id: str, state: SequenceState, num_bytes: int, timeout_s: float) -> None:
        """Hand over the sequence and wait for the acknowledgement (TransferError on failure)."""

    @abstractmethod
    def cancel(self, transfer_id: str) -> None:
        """Release the reservation on the decode side (best effort)."""

    def close(self) -> None:
        """Release the link."""
