"""torch.distributed transport: control frames over the socket link, KV pages over point-to-point send/recv.

Production systems pair a small side channel with a fast data plane; this transport does the
same. RESERVE -> GRANT, DONE -> ACK and CANCEL still travel as socket frames (``socket.py``),
but a LAYER frame carries only its header, marked ``{"via": "dist", "src_rank": R}``; the
pages follow as one ``torch.distributed`` send (gloo on CPU; NCCL keeps CUDA tensors on the
GPU, so pages go device to device without touching the host).

One process group spans every worker of a deployment. ``launch_local`` assigns the ranks:
decode workers ``0 .. D-1``, prefill workers ``D .. D+P-1``; the prefill learns each decode
worker's rank from its ``--peers`` list (``d0=127.0.0.1:7001@0,...``). The decode side learns
the sender's rank from the LAYER header and checks it before receiving. That receiving half
(``SourceClaims``, the receive streams, ``wait_received``) lives in ``dist_receive.py``, below the
socket receiver that calls it.

Ordering: a link's frames and tensors go out under the sender's lock, and each link is served
by one thread on the decode side, so for a (prefill, decode) pair a header and its tensor are
matched first-in first-out. A source rank belongs to one link at a time (``SourceClaims``), so
a second link claiming a live source is dropped instead of stealing its pages.

Streams (NCCL): the sender does not wait on its sends. The receiving thread posts each receive,
and the scatter of the pages into the pool, on a side stream of its own and goes straight on to
the next frame: the host waits once per request, when DONE arrives (``wait_received``), not once
per layer. So neither worker's compute stream ever waits on the link (a decode step never stalls
behind pages the prefill GPU has not computed yet, a prefill never behind a busy decoder), and
the link's cost per layer is a frame and two kernel launches, not a host round trip. The blocks
being written belong to a reservation that no decode step reads before the commit; blocks come
back to the pool only once the steps that used them have finished on the host.

Messages: with layer-wise overlap each layer goes as it is computed (a LAYER header and one
send). Without it, a prefill's pages are *announced*: when the batch that completes a prompt
starts, the prefill worker sends a LAYER header for all its layers in block order
([blocks, layers, 2, ...], ``order: blocks``), marked ``announced`` and cut into ``pieces``
(``plan_pieces``: up to 4 block ranges). The decode side posts one receive per piece, all while
the prefill still computes: straight into its pool where the piece's reserved blocks are one
range of a ``block_major`` pool, else into a staging buffer with the piece's scatter queued
behind it. Once the last layer is queued, before the logits, the prefill thread queues one send
per piece: straight from its pool where the piece's blocks are one range of a ``block_major``
pool, else right behind the piece's own gather, so the copy of one piece overlaps the transfer
of the one before. No header hop sits between the pages and the wire. Announced transfers
are sent in announcement order, since a pair's receives match its sends first in, first out,
and every announced transfer sends its pages, even one its first token then stops (it is
cancelled after). On the CPU the receives of an announced transfer are waited for when DONE
arrives.

Threads: gloo runs send/recv on the calling thread and matches them by (source, tag) on a
per-peer connection, so decode threads receiving from *different* sources at once do not
interfere (measured with torch 2.13: two threads, two sources, 50 tensors each, no mix-ups;
a peer that dies fails a pending recv at once with "Connection closed by peer"). Gloo's
send waits until the receiver has posted its recv. Caveat: a gloo wait that times out closes
that pair's connection for good, so a timed-out link is never retried: the request fails (or
is recomputed) and the sender stays broken. If the decode side drops a link on a bad frame,
the prefill's pending send only fails after its ``timeout_s``.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import threading
import time
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from minidisagg.kv.pages import split_ranges
from minidisagg.transport.auth import LinkSecurity
from minidisagg.transport.backoff import ReconnectPolicy
from minidisagg.transport.base import HEARTBEAT_S
from minidisagg.transport.dist_receive import KV_TAG, transfer_device
from minidisagg.transport.framing import FrameError, FrameKind, send_frame
from minidisagg.transport.handshake import Hello
from minidisagg.transport.rendezvous import MembershipError, check_init_method, join_store
from minidisagg.transport.socket import FRAME_TIMEOUT_S, SocketSender

log = logging.getLogger(__name__)
BACKENDS = ("gloo", "nccl")
INIT_TIMEOUT_S = 120.0
CONNECT_RETRIES = 600  # x 0.2 s: workers start together, so a decode may still be loading when prefill dials


def default_backend(device: str | torch.device) -> str:
    """NCCL for CUDA workers, gloo otherwise."""
    if str(device) == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_dist(init_method: str, rank: Optional[int], world_size: Optional[int], backend: Optional[str] = None,
              device: str = "auto", timeout_s: float = INIT_TIMEOUT_S, secret: Optional[bytes] = None,
              store: Optional[dist.Store] = None) -> str:
    """Join the deployment's process group; returns the device this worker should load its model on.

    Under NCCL every rank needs a GPU of its own: a device given without an index becomes
    ``cuda:<rank % device_count>`` and becomes the current CUDA device. A ``tcp://HOST:PORT``
    rendezvous store listens on HOST only, and with ``secret`` every rank proves it through the
    store before any gloo/NCCL connection opens (``rendezvous.py``). A ``store`` already joined
    (``join_torchrun_store``) is used as is; ``init_method`` then only names it in errors.
    """
    if not isinstance(rank, int) or not isinstance(world_size, int):
        raise ValueError("--dist-init needs --dist-rank and --dist-world")
    backend = backend or default_backend(device)
    if backend not in BACKENDS:
        raise ValueError(f"--dist-backend must be one of {list(BACKENDS)}, got {backend!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"--dist-rank must be in [0, {world_size}), got {rank}")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("--dist-backend nccl needs CUDA; use gloo on CPU")
        dev = torch.device("cuda" if str(device) == "auto" else device)
        if dev.type != "cuda":
            raise ValueError(f"--dist-backend nccl needs a CUDA device, got --device {device}")
        index = dev.index if dev.index is not None else rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        device = f"cuda:{index}"
    if store is None:
        check_init_method(init_method, secret)
    try:
        if store is None:
            store = join_store(init_method, rank, world_size, timeout_s, secret)
        if store is None:  # not tcp:// (env://, file://, ...): torch's own rendezvous
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        else:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
    except MembershipError:  # a rank without the secret: say so, not "did every worker start"
        raise
    except Exception as exc:  # noqa: BLE001 - c10d raises RuntimeError, DistStoreError, ValueError...
        raise RuntimeError(
            f"rank {rank} of {world_size} could not join the {backend} process group at {init_method} "
            f"within {timeout_s:.0f} s (did every worker start, with the same --dist-init and --dist-world?): {exc}"
        ) from exc
    log.info("joined %s process group as rank %d of %d on %s", backend, rank, world_size, device)
    return device


def shutdown_dist() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def parse_peer_ranks(text: str) -> tuple[str, dict[str, int]]:
    """``d0=h:7001@0,d1=h:7002@1`` -> (``d0=h:7001,d1=h:7002``, {"d0": 0, "d1": 1})."""
    peers, ranks = [], {}
    for item in filter(None, text.split(",")):
        address, at, rank = item.rpartition("@")
        if not at or not rank.isdigit():
            raise ValueError(f"with --dist-init, --peers entries look like name=host:port@rank, got {item!r}")
        peers.append(address)
        ranks[address.partition("=")[0]] = int(rank)
    return ",".join(peers), ranks


def _max_pieces(default: int = 4) -> int:
    """``MINIDISAGG_KV_PIECES`` (a positive integer), else ``default``; ValueError naming the variable."""
    text = os.environ.get("MINIDISAGG_KV_PIECES", "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"MINIDISAGG_KV_PIECES must be a positive integer, got {text!r}")
    return int(text)


MAX_PIECES = _max_pieces()  # an announced message is cut into at most this many pieces (one NCCL send each)
MIN_PIECE_BYTES = 32 << 20  # ... of at least this size: a send costs ~25 us on top of its bytes (H100 NVLink)


class DistSender(SocketSender):
    """A socket control link to one decode worker whose LAYER pages go by ``torch.distributed.send``."""

    name = "dist"

    def __init__(self, host: str, port: int, hello: Hello, dst_rank: int, timeout_s: float = FRAME_TIMEOUT_S,
                 connect_retries: int = CONNECT_RETRIES, security: Optional[LinkSecurity] = None,
                 reconnect: Optional[ReconnectPolicy] = None, heartbeat_s: float = HEARTBEAT_S,
                 wire_dtype: str = "auto") -> None:
        """The control link authenticates and heals like a ``SocketSender``'s; the pages follow by rank
        (as ``WireMessage`` bytes where ``wire_dtype`` quantises them)."""
        if not dist.is_initialized():
            raise RuntimeError("DistSender needs torch.distributed.init_process_group (see init_dist) first")
        if not 0 <= dst_rank < dist.get_world_size() or dst_rank == dist.get_rank():
            raise ValueError(f"decode rank {dst_rank} is not a peer of rank {dist.get_rank()} "
                             f"in a world of {dist.get_world_size()}")
        super().__init__(host, port, hello, timeout_s, connect_retries, security, reconnect, heartbeat_s, wire_dtype)
        self.src_rank = dist.get_rank()
        self.dst_rank = dst_rank
        self.device = transfer_device()
        self._in_flight: list[tuple[dist.Work, torch.Tensor]] = []  # NCCL sends not yet known to be done
        self._in_flight_lock = threading.Lock()  # sends are issued from the prefill and the sender threads

    def _isend(self, pages: torch.Tensor) -> None:
        """One send of contiguous ``pages``: queued under NCCL (kept alive until done), waited for under gloo."""
        work = dist.isend(pages, dst=self.dst_rank, tag=KV_TAG)
        if pages.is_cuda:
            # NCCL: no wait, so the prefill's compute stream never stalls on the decode side posting its
            # receive; the send is ordered after the pages' gather, and the decode side acknowledges
            # DONE only once the pages landed. Keep each send's tensor alive until it completes.
            with self._in_flight_lock:
                self._in_flight = [(w, t) for w, t in self._in_flight if not w.is_completed()]
                self._in_flight.append((work, pages))
        else:
            work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))

    def _send_pages(self, transfer_id: str, layer: int, pages: torch.Tensor, stacked: bool) -> None:
        """A payload-free LAYER frame, then the pages by ``torch.distributed`` (both under the link's lock)."""
        header = {**self._layer_header(transfer_id, layer, pages, stacked), "via": "dist", "src_rank": self.src_rank}
        pages = self._wire_payload(pages, self.device)
        t0 = time.perf_counter()
        with self._lock:
            self._check_usable(transfer_id)
            try:
                send_frame(self.sock, FrameKind.LAYER, header, timeout_s=self.timeout_s)
                self._isend(pages)
            except (OSError, FrameError, RuntimeError) as exc:
                raise self._fail(exc) from exc
        self.stats.send_s += time.perf_counter() - t0
        self.stats.bytes_sent += pages.numel() * pages.element_size()

    # ---- announced transfers: the header goes while the prefill computes, the pages when it ends ----
    @property
    def announces(self) -> bool:
        """Always: the decode side can post its receive before the pages exist (see ``announce_pages``)."""
        return True

    def plan_pieces(self, shape: Sequence[int], dtype: torch.dtype) -> list[tuple[int, int]]:
        """Up to ``MAX_PIECES`` block ranges of at least ``MIN_PIECE_BYTES`` each.

        On the CPU a piece per block (at most ``MAX_PIECES``): gloo gains nothing from pieces, but
        the same path is then exercised where the tests run.
        """
        if self.device.type != "cuda":
            return split_ranges(shape[0], min(MAX_PIECES, shape[0]))
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        return split_ranges(shape[0], max(1, min(MAX_PIECES, shape[0], nbytes // MIN_PIECE_BYTES)))

    def announce_pages(self, transfer_id: str, shape: Sequence[int], dtype: torch.dtype,
                       pieces: Sequence[tuple[int, int]]) -> None:
        """A LAYER header for all layers in block order, marked ``announced`` with the number of pieces; no pages yet.

        ``shape`` is [blocks, layers, 2, block_size, kv_heads, head_dim]. The decode side posts one
        receive per piece, then goes on; the pages land as soon as ``send_pieces`` sends them.
        Announced transfers are sent in the order they were announced (a pair's receives match
        its sends first-in first-out).
        """
        header = {"transfer_id": transfer_id, "layer": 0, "shape": list(shape), "num_layers": shape[1],
                  "dtype": str(dtype).removeprefix("torch."), "via": "dist", "src_rank": self.src_rank,
                  "pieces": len(pieces), "announced": True, "order": "blocks"}
        if self.wire_dtype != "auto":  # each piece then travels as a WireMessage of its own
            header["wire_dtype"] = self.wire_dtype
        self._exchange(FrameKind.LAYER, header, None)

    def send_pieces(self, transfer_id: str, pieces: Iterable[tuple[int, torch.Tensor]]) -> None:
        """One send per piece, no frame: each queued right behind its own piece's gather, if it needed one."""
        with self._lock:  # announced pages go even after an expired lease: the decode side posted their receives
            self._check_usable(transfer_id, notices=False)
        t0 = time.perf_counter()
        try:
            for _, pages in pieces:
                pages = self._wire_payload(pages, self.device)
                self._isend(pages)
                self.stats.bytes_sent += pages.numel() * pages.element_size()
        except RuntimeError as exc:
            with self._lock:
                raise self._fail(exc) from exc
        self.stats.send_s += time.perf_counter() - t0
