"""One request through a router cluster, stepped to its end: shared by the live-worker tests."""

from __future__ import annotations

from typing import Any, Optional

from minidisagg.engine.sampling import SamplingParams
from minidisagg.engine.steppable import run_one

GREEDY = {"temperature": 0, "max_tokens": 6, "ignore_eos": True}
TIMEOUT_S = 30.0


def run_request(cluster: Any, prompt: list[int], params: Optional[dict[str, Any]] = None,
                timeout_s: float = TIMEOUT_S) -> Any:
    """Submit ``prompt`` (greedy, six tokens, unless ``params``) and step ``cluster`` until it finishes.

    ``TimeoutError`` (the request aborted) when it has not finished within ``timeout_s``; the output
    is returned whether it succeeded or failed, for the test to read.
    """
    return run_one(cluster, {"prompt_token_ids": prompt}, SamplingParams(**(params or GREEDY)), timeout_s)
