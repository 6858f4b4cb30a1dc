"""torch.distributed transport: control frames over the socket link, KV pages over point-to-point send/recv.

Production systems pair a small side channel with a fast data plane; this transport does the
same. RESERVE -> GRANT, DONE -> ACK and CANCEL still travel as socket frames (``socket.py``),
but a LAYER frame carries only its header, marked ``{"via": "dist", "src_rank": R}``; the
pages follow as one ``torch.distributed`` send (gloo on CPU; NCCL keeps CUDA tensors on the
GPU, so pages go device to device without touching the host).

One process group spans every worker of a deployment. ``launch_local`` assigns the ranks:
decode workers ``0 .. D-1``, prefill workers ``D .. D+P-1``; the prefill learns each decode
worker's rank from its ``--peers`` list (``d0=127.0.0.1:7001@0,...``). The decode side learns
the sender's rank from the LAYER header and checks it before receiving.

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

import contextlib
import datetime
import logging
import math
import os
import threading
import time
from typing import ContextManager, Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from minidisagg.engine.clock import event_time_s
from minidisagg.kv.pages import split_ranges
from minidisagg.transport.backoff import ReconnectPolicy
from minidisagg.transport.base import HEARTBEAT_S
from minidisagg.transport.framing import FrameError, FrameKind, Hello, send_frame
from minidisagg.transport.socket import FRAME_TIMEOUT_S, SocketSender

log = logging.getLogger(__name__)
BACKENDS = ("gloo", "nccl")
INIT_TIMEOUT_S = 120.0
KV_TAG = 0x4B56  # one constant tag: pairs are FIFO, so tags need not tell layers apart (NCCL ignores them)
CONNECT_RETRIES = 600  # x 0.2 s: workers start together, so a decode may still be loading when prefill dials


def default_backend(device: str | torch.device) -> str:
    """NCCL for CUDA workers, gloo otherwise."""
    if str(device) == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_dist(init_method: str, rank: Optional[int], world_size: Optional[int], backend: Optional[str] = None,
              device: str = "auto", timeout_s: float = INIT_TIMEOUT_S) -> str:
    """Join the deployment's process group; returns the device this worker should load its model on.

    Under NCCL every rank needs a GPU of its own: a device given without an index becomes
    ``cuda:<rank % device_count>`` and becomes the current CUDA device.
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
    try:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
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


def transfer_device() -> torch.device:
    """Where KV pages travel: the current GPU under NCCL, host memory under gloo (or with no group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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


def check_src_rank(value: object) -> int:
    """The sender's rank from a LAYER header, or FrameError when it cannot be a peer of this process."""
    if not (dist.is_available() and dist.is_initialized()):
        raise FrameError("LAYER via=dist, but this worker joined no torch.distributed process group")
    if not isinstance(value, int) or isinstance(value, bool):
        raise FrameError(f"LAYER via=dist with non-integer src_rank {value!r}")
    if not 0 <= value < dist.get_world_size() or value == dist.get_rank():
        raise FrameError(f"LAYER via=dist with src_rank {value}: not a peer of rank {dist.get_rank()} "
                         f"in a world of {dist.get_world_size()}")
    return value


class SourceClaims:
    """Which KV link of this process receives from which prefill rank (an explicit registry).

    Two links receiving from one source would race for the same (source, tag) queue and
    steal each other's pages, so a source belongs to the first link that used it, until that
    link ends. Process-wide because the process group is.
    """

    def __init__(self) -> None:
        self._owners: dict[int, object] = {}
        self._lock = threading.Lock()

    def claim(self, src_rank: int, link: object) -> None:
        """Record ``link`` as the receiver of ``src_rank``; FrameError when another link holds it."""
        with self._lock:
            owner = self._owners.setdefault(src_rank, link)
        if owner is not link:
            raise FrameError(f"LAYER via=dist from rank {src_rank}, which already sends on another link")

    def release(self, link: object) -> None:
        """Forget every source ``link`` held."""
        with self._lock:
            for rank in [r for r, owner in self._owners.items() if owner is link]:
                del self._owners[rank]


SOURCE_CLAIMS = SourceClaims()


_LINK_STREAMS = threading.local()  # each receiving thread's own CUDA stream, by device


def _link_stream(device: torch.device) -> torch.cuda.Stream:
    """This thread's side stream on ``device`` (made on first use)."""
    streams = getattr(_LINK_STREAMS, "by_device", None)
    if streams is None:
        streams = _LINK_STREAMS.by_device = {}
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    return streams[device]


def receive_stream(device: torch.device) -> ContextManager[object]:
    """Where this thread receives pages and scatters them (its side stream on a GPU; see Streams above)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.stream(_link_stream(device))


def mark_received(device: torch.device) -> Optional[torch.cuda.Event]:
    """A timing event after everything this thread queued so far on its side stream (None off the GPU)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event(enable_timing=True)
    event.record(_link_stream(device))
    return event


def wait_received(event: Optional[torch.cuda.Event], timeout_s: float, poll_s: float = 50e-6) -> float:
    """Block until ``event`` (from ``mark_received``) has passed; TimeoutError after ``timeout_s``.

    Polls rather than synchronizing, so a receive that never completes cannot hang the link.
    Each transfer waits for its own event, not for the whole stream: receives announced for
    later transfers may sit on the same stream until their pages are sent. Returns when the
    device passed the event, as a ``time.perf_counter()`` reading (now, without an event).
    """
    if event is None:
        return time.perf_counter()
    deadline = time.monotonic() + timeout_s
    while not event.query():
        if time.monotonic() > deadline:
            raise TimeoutError(f"KV pages did not land within {timeout_s} s")
        time.sleep(poll_s)
    streams = getattr(_LINK_STREAMS, "clock", None)
    if streams is None:
        streams = _LINK_STREAMS.clock = {}
    device = getattr(event, "device", None) or torch.device("cuda", torch.cuda.current_device())
    if device not in streams:  # a stream with nothing queued, to read the device's time on
        streams[device] = torch.cuda.Stream(device)
    return event_time_s(event, time.perf_counter, streams[device])


def post_receive(buffer: torch.Tensor, src_rank: int) -> dist.Work:
    """Post a receive of pages from ``src_rank`` into ``buffer`` (contiguous); returns without waiting.

    On a GPU (NCCL) call it under ``receive_stream``: the receive is ordered after the work
    already queued there, which is what makes reusing a staging buffer safe.
    """
    try:
        return dist.irecv(buffer, src=src_rank, tag=KV_TAG)
    except RuntimeError as exc:
        raise ConnectionError(f"KV receive from rank {src_rank} failed: {exc}") from exc


def finish_receive(work: dist.Work, on_gpu: bool, src_rank: int, timeout_s: float) -> None:
    """Make later work wait for a posted receive; ConnectionError/TimeoutError on failure.

    On a GPU (NCCL) the current stream waits for it and the host goes on at once (no timeout
    argument: with one, NCCL's wait blocks the host until the pages are here); ``wait_received``
    later waits for the pages with a deadline. On the CPU (gloo) it returns once the pages are here.
    """
    try:
        if on_gpu:
            work.wait()
        else:
            work.wait(timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as exc:
        if "timed out" in str(exc).lower():
            raise TimeoutError(f"KV pages from rank {src_rank} did not arrive within {timeout_s} s") from exc
        raise ConnectionError(f"KV receive from rank {src_rank} failed: {exc}") from exc


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
                 connect_retries: int = CONNECT_RETRIES, reconnect: Optional[ReconnectPolicy] = None,
                 heartbeat_s: float = HEARTBEAT_S) -> None:
        if not dist.is_initialized():
            raise RuntimeError("DistSender needs torch.distributed.init_process_group (see init_dist) first")
        if not 0 <= dst_rank < dist.get_world_size() or dst_rank == dist.get_rank():
            raise ValueError(f"decode rank {dst_rank} is not a peer of rank {dist.get_rank()} "
                             f"in a world of {dist.get_world_size()}")
        super().__init__(host, port, hello, timeout_s, connect_retries, reconnect, heartbeat_s)
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
        pages = pages.detach().to(self.device).contiguous()
        header = {**self._layer_header(transfer_id, layer, pages, stacked), "via": "dist", "src_rank": self.src_rank}
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
        self._exchange(FrameKind.LAYER, header, None)

    def send_pieces(self, transfer_id: str, pieces: Iterable[tuple[int, torch.Tensor]]) -> None:
        """One send per piece, no frame: each queued right behind its own piece's gather, if it needed one."""
        with self._lock:  # announced pages go even after an expired lease: the decode side posted their receives
            self._check_usable(transfer_id, notices=False)
        t0 = time.perf_counter()
        try:
            for _, pages in pieces:
                pages = pages.detach().to(self.device).contiguous()
                self._isend(pages)
                self.stats.bytes_sent += pages.numel() * pages.element_size()
        except RuntimeError as exc:
            with self._lock:
                raise self._fail(exc) from exc
        self.stats.send_s += time.perf_counter() - t0
