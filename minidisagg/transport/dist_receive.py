"""The receiving half of the torch.distributed KV transport, below the socket receiver that calls it.

A decode worker's socket receiver reads a LAYER frame that says its pages travel by
torch.distributed, then posts the matching receives here. These functions need the process group
(``dist.py`` joins it) but nothing of the socket transport, so the socket receiver imports them
without importing ``dist.py``, which builds its sender on the socket one.
"""

from __future__ import annotations

import contextlib
import datetime
import threading
import time
from typing import ContextManager, Optional

import torch
import torch.distributed as dist

from minidisagg.engine.clock import event_time_s
from minidisagg.transport.framing import FrameError

KV_TAG = 0x4B56  # one constant tag: pairs are FIFO, so tags need not tell layers apart (NCCL ignores them)


def transfer_device() -> torch.device:
    """Where KV pages travel: the current GPU under NCCL, host memory under gloo (or with no group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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
