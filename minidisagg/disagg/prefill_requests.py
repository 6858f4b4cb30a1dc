"""A router's request to a prefill worker (``Submission``), and the failure it may get back (``FailedRequest``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from minidisagg.engine.sampling import SamplingParams


@dataclass
class Submission:
    """A request routed to this prefill worker, with the decode worker its KV must reach.

    ``owner``: the submitting router's opaque token, handed on with the request's state
    (``SequenceState.owner``), so the decode worker ties the request to that router.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_s: float
    decode_target: str
    prompt: Optional[str] = None
    owner: Optional[str] = None


@dataclass
class FailedRequest:
    """A request this worker could not hand over, with the reason (the router decides what next)."""

    request_id: str
    error: str
