"""One request through a router cluster, stepped to its end: shared by the live-worker tests."""

from __future__ import annotations

import time
from typing import Any, Optional

from minidisagg.engine.sampling import SamplingParams

GREEDY = {"temperature": 0, "max_tokens": 6, "ignore_eos": True}
TIMEOUT_S = 30.0


def run_request(cluster: Any, prompt: list[int], params: Optional[dict[str, Any]] = None,
                timeout_s: float = TIMEOUT_S) -> Any:
    """Submit ``prompt`` (greedy, six tokens, unless ``params``) and step ``cluster`` until it finishes.

    AssertionError when it has not finished within ``timeout_s``.
    """
    rid = cluster.add_request({"prompt_token_ids": prompt}, SamplingParams(**(params or GREEDY)))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for out in cluster.step():
            if out.request_id == rid and out.finished:
                return out
    raise AssertionError(f"request {rid} did not finish within {timeout_s} s")
