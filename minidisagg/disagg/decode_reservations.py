"""The receiving side of a decode worker's KV transfers: block reservations, the pages written into them, their leases.

A reservation is blocks held under a transfer id until ``commit`` (``decode_worker``) turns it
into a running sequence. Each is a lease that expires without progress, and a KV link's
reservations count against its quota (``leases``).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch

from minidisagg.config import LinkConfig
from minidisagg.disagg.engine_lock import FairEngineLock
from minidisagg.disagg.health import LoopHealth
from minidisagg.disagg.leases import LeaseTable, PeerSession
from minidisagg.engine.llm_engine import LLMEngine
from minidisagg.kv.pages import KVLayout, block_region, scatter_blocks, scatter_layer, scatter_pages
from minidisagg.kv.prefix_cache import BLOCK_HASH_BYTES
from minidisagg.transport.base import LeaseExpired

log = logging.getLogger(__name__)


class DecodeReservations:
    """The ``KVReceiver`` calls of a decode worker other than ``commit``: reserve, write pages, cancel, leases, peers.

    ``engine`` is the worker's engine, guarded by a ``FairEngineLock``; ``health`` its loop's
    health (an unhealthy worker refuses reservations). The lease clock is ``lease_clock``, monotonic.
    """

    def __init__(self, name: str, engine: LLMEngine, health: LoopHealth, link: LinkConfig,
                 lease_clock: Callable[[], float]) -> None:
        self.name = name
        self.engine = engine
        self.layout = KVLayout.of(engine.kv_cache)
        self.health = health
        self._fair_lock = FairEngineLock()
        self._lock = self._fair_lock.lock
        self.leases = LeaseTable(link.kv_lease_s, engine.blocks.num_blocks, link.max_reserved_share_per_peer,
                                 lease_clock)
        self._reserved = self.leases.blocks  # transfer id -> blocks; changed only through ``leases``

    def reserve(self, transfer_id: str, num_tokens: int, peer: Optional[PeerSession] = None,
                block_keys: Sequence[bytes] = ()) -> bool:
        """Reserve blocks for an incoming request; False when the pool cannot take it now.

        ``peer`` (a link's ``open_peer``) holds the reservation: ``QuotaExceeded`` (a ValueError)
        if it would take that peer past ``max_reserved_share_per_peer`` of the pool. ``block_keys``:
        the hash chain (``kv.prefix_cache``) of the prompt's leading full blocks; where this
        worker's prefix cache holds a leading run of them, the reservation shares those blocks and
        only the rest take pages (``num_shared_blocks``).
        """
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens must be an integer >= 1, got {num_tokens!r}")
        if num_tokens >= self.engine.max_model_len:
            raise ValueError(f"num_tokens={num_tokens} can never fit this engine's context of "
                             f"{self.engine.max_model_len} tokens (prompt plus at least one generated token)")
        blocks_of = self.engine.blocks
        if not isinstance(block_keys, (list, tuple)) or len(block_keys) > blocks_of.blocks_needed(num_tokens) or any(
                not isinstance(k, bytes) or len(k) != BLOCK_HASH_BYTES for k in block_keys):
            raise ValueError(f"block_keys must be at most {blocks_of.blocks_needed(num_tokens)} keys of "
                             f"{BLOCK_HASH_BYTES} bytes (one per full block of the prompt)")
        with self._fair_lock.transport_access():
            self.health.check()
            if transfer_id in self._reserved:
                raise ValueError(f"transfer {transfer_id!r} already holds a reservation")
            cache = blocks_of.prefix_cache  # the last token's block always travels: its KV is the newest
            shared = cache.match_keys(block_keys[:(num_tokens - 1) // blocks_of.block_size]) if cache else []
            if peer is not None:
                self.leases.check_quota(peer, blocks_of.blocks_needed(num_tokens) - len(shared))
            blocks = self.engine.reserve(f"transfer:{transfer_id}", num_tokens, tuple(shared))
            if blocks is None:
                return False
            self.leases.add(transfer_id, blocks[len(shared):], peer, len(shared))
            return True

    def num_shared_blocks(self, transfer_id: str) -> int:
        """How many leading blocks of a reservation this worker already held (no pages travel for them)."""
        return self.leases.num_shared_blocks(transfer_id)

    def write_layer(self, transfer_id: str, layer: int, pages: torch.Tensor) -> None:
        """Scatter one layer's pages into the reservation (no lock: the blocks are ours alone)."""
        if not 0 <= layer < self.layout.num_layers:
            raise ValueError(f"layer {layer} out of range (model has {self.layout.num_layers})")
        scatter_layer(self.engine.kv_cache, layer, self._blocks_of(transfer_id), pages)

    def write_layers(self, transfer_id: str, first_layer: int, pages: torch.Tensor) -> None:
        """Scatter consecutive layers' pages into the reservation at once (no lock, as ``write_layer``)."""
        scatter_pages(self.engine.kv_cache, self._blocks_of(transfer_id), pages, first_layer)

    def write_blocks(self, transfer_id: str, first: int, pages: torch.Tensor) -> None:
        """Write pages block first into the reservation's blocks from position ``first`` (no lock, as ``write_layer``)."""
        scatter_blocks(self.engine.kv_cache, self._blocks_of(transfer_id), pages, first)

    def block_region(self, transfer_id: str, first: int, end: int) -> Optional[torch.Tensor]:
        """The pool's memory for the reservation's blocks ``first .. end`` if it is one range (``kv.pages.block_region``)."""
        blocks = self._blocks_of(transfer_id)
        if not 0 <= first < end <= len(blocks):
            raise ValueError(f"blocks {first}..{end} of a reservation of {len(blocks)}")
        return block_region(self.engine.kv_cache, blocks[first:end])

    def _blocks_of(self, transfer_id: str) -> list[int]:
        """The reservation's blocks; asking for them to write pages is progress, so its lease is renewed."""
        return self.leases.blocks_of(transfer_id)

    def cancel(self, transfer_id: str) -> None:
        """Give a reservation back to the pool."""
        with self._fair_lock.transport_access():
            if self.leases.remove(transfer_id) is not None:
                self.engine.cancel_reservation(f"transfer:{transfer_id}")

    # ---- leases and peers (``leases``) ------------------------------------------------------
    def open_peer(self, name: str) -> PeerSession:
        """Track one KV link: its reservations count against its quota and go when it closes."""
        return PeerSession(name, self)

    def release_peer(self, peer: PeerSession) -> int:
        """Free every uncommitted reservation ``peer`` holds (its link closed); returns the blocks freed."""
        with self._fair_lock.transport_access():
            tids = self.leases.held_by(peer)
            num_blocks = 0
            for tid in tids:
                blocks = self.leases.remove(tid)
                if blocks is not None:
                    num_blocks += len(blocks)
                    self.engine.cancel_reservation(f"transfer:{tid}")
        if tids:
            log.info("decode worker %s: link from %s closed; freed %d block(s) of %d reservation(s) it held",
                     self.name, peer.name, num_blocks, len(tids))
        return num_blocks

    def renew_reservations(self, transfer_ids: Sequence[str]) -> None:
        """An in-process sender's heartbeat: these transfers are still under way (expired or unknown ones are skipped)."""
        for transfer_id in transfer_ids:
            try:
                self.leases.renew(transfer_id)
            except LeaseExpired:
                pass

    def expire_leases(self) -> list[str]:
        """Expire every reservation whose lease ran out; returns their transfer ids.

        A link's reservation is handed to that link to free (``PeerSession.take_expired``); one
        without a link is freed here. Runs under the engine lock, so it never interleaves with a commit.
        """
        with self._lock:
            expired = self.leases.take_expired()
            for lease in expired:
                reason = self.leases.expiry_message(lease)
                log.warning("decode worker %s: %s (held by %s)", self.name, reason,
                            lease.peer.name if lease.peer is not None else "an in-process sender")
                if lease.peer is not None:
                    lease.peer.notify_expired(lease.transfer_id, reason)
                elif self.leases.remove(lease.transfer_id) is not None:
                    self.engine.cancel_reservation(f"transfer:{lease.transfer_id}")
        return [lease.transfer_id for lease in expired]
