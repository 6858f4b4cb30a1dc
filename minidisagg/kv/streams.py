"""CUDA side streams and events for KV traffic, so moving pages never makes compute wait (or wait for compute).

A prefill worker's forward pass runs ahead of the GPU: by the time a sending thread gets to a
request's pages, the next batch's kernels may already be queued on the compute stream. A send
issued on that stream would wait for them. So each gather records a ``ready_event``, and the
sender issues the send on a side stream of its own that waits for that event only
(``after``). The receiving side uses two side streams per thread, one that receives and one that
scatters into the pool, so the scatter of one message overlaps the receive of the next.

On the CPU all of this is a no-op: events are None and streams are null contexts.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional

import torch

_STREAMS = threading.local()  # each thread's side streams, by (device, role)


def side_stream(device: torch.device, role: str) -> torch.cuda.Stream:
    """This thread's side stream for ``role`` on the CUDA ``device`` (made on first use)."""
    streams = getattr(_STREAMS, "by_key", None)
    if streams is None:
        streams = _STREAMS.by_key = {}
    key = (device, role)
    if key not in streams:
        streams[key] = torch.cuda.Stream(device)
    return streams[key]


def ready_event(tensor: torch.Tensor) -> Optional[torch.cuda.Event]:
    """An event marking the point on the current stream where ``tensor`` is written; None off the GPU."""
    if not tensor.is_cuda:
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(tensor.device))
    return event


@contextlib.contextmanager
def after(event: Optional[torch.cuda.Event], device: torch.device, role: str = "kv-send") -> Iterator[None]:
    """Run the body on this thread's ``role`` side stream, ordered after ``event`` only (no-op for None)."""
    if event is None:
        yield
        return
    stream = side_stream(device, role)
    stream.wait_event(event)
    with torch.cuda.stream(stream):
        yield
