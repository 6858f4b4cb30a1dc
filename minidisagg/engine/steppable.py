"""``Steppable``: the surface every engine that serves requests step by step offers.

The colocated ``LLMEngine``, the disaggregated ``DisaggCluster`` and the ``ReplicaCluster`` all
have it, so a replay, the demo and the labs drive any of them the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Protocol, runtime_checkable

from minidisagg.engine.clock import Clock
from minidisagg.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from minidisagg.config import ModelConfig
    from minidisagg.engine.llm_engine import RequestOutput


@runtime_checkable
class Steppable(Protocol):
    """Queue requests, run one scheduling step at a time, read outputs, and forget finished requests."""

    clock: Clock
    model_config: "ModelConfig"

    def add_request(self, prompt: Any, params: Optional[SamplingParams] = None, arrival_time: Optional[float] = None,
                    request_id: Optional[str] = None) -> str:
        """Queue a request (visible from ``arrival_time`` on the engine clock); returns its id."""

    def step(self) -> list["RequestOutput"]:
        """Run one step; returns the outputs of requests that got a token or finished."""

    def has_unfinished(self) -> bool:
        """Whether any request is still queued or running."""

    def abort(self, request_id: str) -> None:
        """Stop a request now and free what it holds."""

    def release(self, request_id: str) -> None:
        """Forget a finished request."""
