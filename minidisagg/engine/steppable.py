"""``Steppable``: the surface every engine that serves requests step by step offers.

The colocated ``LLMEngine``, the disaggregated ``DisaggCluster`` and the ``ReplicaCluster`` all
have it, so a replay, the demo and the labs drive any of them the same way.
"""

from __future__ import annotations

import threading
import time
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


def run_one(engine: Steppable, prompt: Any, params: Optional[SamplingParams] = None, timeout_s: float = 60.0,
            raise_on_error: bool = False, other_outputs: Optional[list["RequestOutput"]] = None) -> "RequestOutput":
    """Submit ``prompt`` to ``engine`` and step it until that request finishes; returns its final output.

    Other requests already in the engine are stepped along with it; their outputs go to
    ``other_outputs`` when it is given (else only this request's are kept). Every wait has an end: past
    ``timeout_s`` the request is aborted (so it holds no KV blocks) and ``TimeoutError`` says how long it
    ran; an engine that runs out of work without the request's output raises ``RuntimeError``. With
    ``raise_on_error`` a request that finished with an error raises ``RuntimeError`` with that error;
    otherwise the output, error included, is returned for the caller to read. The request is released
    (forgotten by the engine) before returning.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    request_id = engine.add_request(prompt, params)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if not engine.has_unfinished():
                raise RuntimeError(f"request {request_id} left the engine without a final output")
            outs = engine.step()
            for out in outs:
                if out.request_id != request_id:
                    if other_outputs is not None:
                        other_outputs.append(out)
            for out in outs:
                if out.finished and out.request_id == request_id:
                    if raise_on_error and out.error:
                        raise RuntimeError(f"request {request_id} failed: {out.error}")
                    return out
        engine.abort(request_id)
        raise TimeoutError(f"request {request_id} did not finish within {timeout_s:g} s; it was aborted")
    finally:
        engine.release(request_id)


def run_one_on_thread(engine: Steppable, prompt: Any, params: Optional[SamplingParams] = None,
                      timeout_s: float = 60.0, raise_on_error: bool = False,
                      other_outputs: Optional[list["RequestOutput"]] = None) -> "RequestOutput":
    """:func:`run_one`, with the engine stepped on a thread of its own; errors are raised again here.

    On the 2-core CPU hosts the engine stepped from a process's main thread ran 5-10x slower in wall
    time than from a second thread (``benchmarks/NOTES.md``), so timed single requests use this.
    """
    result: list["RequestOutput"] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(run_one(engine, prompt, params, timeout_s, raise_on_error, other_outputs))
        except BaseException as err:  # noqa: BLE001 - raised again in the caller's thread
            failure.append(err)

    worker = threading.Thread(target=run, name="minidisagg-run-one", daemon=True)
    worker.start()
    worker.join(timeout_s + 30.0)  # run_one ends itself at timeout_s unless one step hangs
    if failure:
        raise failure[0]
    if not result:
        raise TimeoutError(f"one engine step did not return within {timeout_s + 30.0:g} s")
    return result[0]
