"""Leases and per-peer quotas on a decode worker's KV reservations.

A reservation holds decode blocks for pages that have not arrived yet. A prefill worker that
stalls, or a peer that reserves and walks away, would hold them for ever, and a single busy
peer could reserve the whole pool while others wait. So:

- **Leases.** Every reservation is a lease of ``kv_lease_s`` seconds on a monotonic clock
  (vLLM's NIXL connector keeps its KV blocks on similar ~30 s leases, renewed as the transfer
  makes progress). Each chunk of pages renews it; a commit ends it (the blocks now belong to a
  running sequence). The decode loop expires leases under the engine lock, and the table's own
  lock makes "commit" and "expire" exclusive: a committed lease never expires, and an expired
  one can no longer be committed.
- **Who frees an expired lease.** One taken through a KV link (a ``PeerSession``) is freed by
  that link's thread: it is the only writer of those blocks, and it first lets pages still in
  flight land, so no late page can overwrite blocks already given to another request. One taken
  without a link (in-process transports) is freed at once.
- **Quotas.** One peer may hold at most ``max_reserved_share_per_peer`` of the pool in
  reservations (committed transfers no longer count). A peer that holds none may always take
  one, so a request bigger than the share still runs, alone. A refusal is a ``QuotaExceeded``:
  the peer keeps its link and asks again later, as it does when the pool is full.
- **A closed link** gives back every reservation it held (``DecodeWorker.release_peer``).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

from minidisagg.transport.base import LeaseExpired, QuotaExceeded

MAX_REMEMBERED_EXPIRIES = 4096  # expired transfer ids kept, so late frames for them are told why


@dataclass
class Lease:
    """One reservation's lease: its blocks' count, who holds it, and until when it lives without progress."""

    transfer_id: str
    num_blocks: int
    expires_at_s: float
    peer: Optional["PeerSession"] = None
    committed: bool = False
    expired: bool = False
    num_shared_blocks: int = 0  # leading blocks shared from the prefix cache (not in ``num_blocks``: no pages for them)


class LeaseTable:
    """The reserved blocks of a decode worker and their leases, by transfer id (thread-safe).

    ``blocks`` maps transfer id -> reserved block ids; only this table's methods change it.
    ``clock`` is a monotonic clock in seconds (tests pass a fake one).
    """

    def __init__(self, lease_s: float, pool_blocks: int, max_share: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lease_s = lease_s
        self.pool_blocks = pool_blocks
        self.max_share = max_share
        self.quota_blocks = max(1, int(max_share * pool_blocks))
        self.clock = clock
        self.blocks: dict[str, list[int]] = {}
        self._leases: dict[str, Lease] = {}
        self._expired: OrderedDict[str, str] = OrderedDict()  # transfer id -> why, most recent last
        self._lock = threading.Lock()

    def held_blocks(self, peer: "PeerSession") -> int:
        """Blocks ``peer`` holds in uncommitted reservations."""
        with self._lock:
            return sum(lease.num_blocks for lease in self._leases.values() if lease.peer is peer and not lease.committed)

    def check_quota(self, peer: "PeerSession", num_blocks: int) -> None:
        """Raise ``QuotaExceeded`` if ``num_blocks`` more would take ``peer`` past its share of the pool."""
        held = self.held_blocks(peer)
        if held and held + num_blocks > self.quota_blocks:
            raise QuotaExceeded(
                f"peer {peer.name} holds {held} blocks in reservations; {num_blocks} more would pass its quota of "
                f"{self.quota_blocks} blocks (max_reserved_share_per_peer={self.max_share:g} of {self.pool_blocks} "
                f"blocks): retry once its transfers commit")

    def add(self, transfer_id: str, blocks: list[int], peer: Optional["PeerSession"],
            num_shared_blocks: int = 0) -> None:
        """Record a new reservation (``blocks``: those its pages go into, after ``num_shared_blocks`` shared ones)."""
        with self._lock:
            self._expired.pop(transfer_id, None)
            self.blocks[transfer_id] = blocks
            self._leases[transfer_id] = Lease(transfer_id, len(blocks), self.clock() + self.lease_s, peer,
                                              num_shared_blocks=num_shared_blocks)

    def num_shared_blocks(self, transfer_id: str) -> int:
        """How many leading blocks of the reservation were shared from the prefix cache (0 if it has none)."""
        with self._lock:
            lease = self._leases.get(transfer_id)
            return 0 if lease is None else lease.num_shared_blocks

    def blocks_of(self, transfer_id: str) -> list[int]:
        """A reservation's blocks, renewing its lease (ValueError when there is none, ``LeaseExpired`` if it ran out)."""
        with self._lock:
            self._renew(transfer_id)
            blocks = self.blocks.get(transfer_id)
        if blocks is None:
            raise ValueError(f"no reservation for transfer {transfer_id!r}")
        return blocks

    def renew(self, transfer_id: str) -> None:
        """Progress on a transfer: its lease starts again (``LeaseExpired`` if it already ran out)."""
        with self._lock:
            self._renew(transfer_id)

    def _renew(self, transfer_id: str) -> None:
        why = self._expired.get(transfer_id)
        if why is not None:
            raise LeaseExpired(why)
        lease = self._leases.get(transfer_id)
        if lease is not None:
            lease.expires_at_s = self.clock() + self.lease_s

    def commit(self, transfer_id: str) -> None:
        """The transfer is complete: its lease can no longer expire (``LeaseExpired`` if it already has)."""
        with self._lock:
            self._renew(transfer_id)
            lease = self._leases.get(transfer_id)
            if lease is None:
                raise ValueError(f"no reservation for transfer {transfer_id!r}")
            lease.committed = True

    def take_expired(self) -> list[Lease]:
        """Mark every uncommitted lease past its time as expired and return them (each once)."""
        now_s = self.clock()
        with self._lock:
            due = [lease for lease in self._leases.values()
                   if not lease.committed and not lease.expired and now_s >= lease.expires_at_s]
            for lease in due:
                lease.expired = True
                self._expired[lease.transfer_id] = self.expiry_message(lease)
                while len(self._expired) > MAX_REMEMBERED_EXPIRIES:
                    self._expired.popitem(last=False)
        return due

    def expiry_message(self, lease: Lease) -> str:
        """Why ``lease`` is gone, in words a student can act on."""
        return (f"transfer {lease.transfer_id}: lease expired after {self.lease_s:g} s without progress "
                f"(kv_lease_s={self.lease_s:g}); its {lease.num_blocks} block(s) went back to the pool")

    def expiry_of(self, transfer_id: str) -> Optional[str]:
        """Why ``transfer_id``'s lease expired (None if it did not, or long ago)."""
        with self._lock:
            return self._expired.get(transfer_id)

    def remove(self, transfer_id: str) -> Optional[list[int]]:
        """Forget a reservation (committed, cancelled or expired); its blocks, or None if there was none."""
        with self._lock:
            self._leases.pop(transfer_id, None)
            return self.blocks.pop(transfer_id, None)

    def held_by(self, peer: "PeerSession") -> list[str]:
        """Transfer ids of ``peer``'s uncommitted reservations."""
        with self._lock:
            return [tid for tid, lease in self._leases.items() if lease.peer is peer and not lease.committed]

    def clear(self) -> None:
        """Forget every reservation (the caller gave their blocks back)."""
        with self._lock:
            self._leases.clear()
            self.blocks.clear()


class LeaseHolder(Protocol):
    """What a ``PeerSession`` needs from its decode worker."""

    leases: LeaseTable

    def reserve(self, transfer_id: str, num_tokens: int, peer: Optional["PeerSession"] = None,
                block_keys: Sequence[bytes] = ()) -> bool:
        """Reserve blocks held by ``peer``, sharing the cached ones ``block_keys`` name."""

    def release_peer(self, peer: "PeerSession") -> int:
        """Free every uncommitted reservation of ``peer``; the number of blocks."""


class PeerSession:
    """One KV link's standing with a decode worker (a ``transport.base.KVPeer``)."""

    def __init__(self, name: str, holder: LeaseHolder) -> None:
        self.name = name
        self._holder = holder
        self._expired: deque[tuple[str, str]] = deque()
        self._closed = False

    def reserve(self, transfer_id: str, num_tokens: int, block_keys: Sequence[bytes] = ()) -> bool:
        """Reserve blocks held by this peer (``QuotaExceeded`` over its share of the pool)."""
        if self._closed:
            raise ValueError(f"peer {self.name} is closed")
        return self._holder.reserve(transfer_id, num_tokens, peer=self, block_keys=block_keys)

    def renew(self, transfer_id: str) -> None:
        """Progress on one of this peer's transfers (``LeaseExpired`` if its lease already ran out)."""
        self._holder.leases.renew(transfer_id)

    def notify_expired(self, transfer_id: str, reason: str) -> None:
        """Called by the decode loop: this lease ran out; the link frees it (``take_expired``)."""
        self._expired.append((transfer_id, reason))

    def take_expired(self) -> list[tuple[str, str]]:
        """(transfer id, reason) of leases that expired since the last call."""
        taken = []
        while self._expired:
            taken.append(self._expired.popleft())
        return taken

    def close(self) -> int:
        """The link is gone: free every reservation it holds; returns the number of blocks freed."""
        self._closed = True
        return self._holder.release_peer(self)
