"""Replay a timed workload (Poisson, CSV, the interference scenario) through an engine.

Any ``Steppable`` works: the colocated ``LLMEngine``, a ``DisaggCluster`` or a ``ReplicaCluster``.
"""

from __future__ import annotations

import random
from typing import Optional, Sequence

from rich.progress import Progress, TaskID

from minidisagg.engine.llm_engine import RequestOutput
from minidisagg.engine.sampling import SamplingParams
from minidisagg.engine.steppable import Steppable
from minidisagg.metrics import RequestTimeline
from minidisagg.workload import TimedRequest

SYNTHETIC_TOKEN_RANGE = (100, 49152)  # ordinary (non-special) ids of the SmolLM2 vocabulary


def submit_workload(engine: Steppable, workload: Sequence[TimedRequest], seed: int = 0) -> list[str]:
    """Queue every request at its arrival time, with seeded synthetic prompt ids; returns request ids.

    Outputs are greedy and ignore EOS, so each request produces exactly ``output_len`` tokens.
    """
    rng = random.Random(seed)
    low, high = SYNTHETIC_TOKEN_RANGE
    high = min(high, engine.model_config.vocab_size)
    ids = []
    for req in workload:
        prompt = [rng.randrange(low, high) for _ in range(req.prompt_len)]
        params = SamplingParams(temperature=0, max_tokens=req.output_len, ignore_eos=True)
        ids.append(engine.add_request({"prompt_token_ids": prompt}, params, arrival_time=req.arrival_s))
    return ids


def run_to_completion(
    engine: Steppable, request_ids: Sequence[str], progress: Optional[Progress] = None, task: Optional[TaskID] = None
) -> list[RequestOutput]:
    """Step until the given requests finish; returns their outputs in order (progress counts tokens).

    A request the engine no longer works on without having finished it (aborted elsewhere, lost with a
    worker) comes back as a failed output (``finish_reason="error"``) rather than being left out.
    """
    done: dict[str, RequestOutput] = {}
    tokens: dict[str, int] = {}
    while len(done) < len(request_ids) and engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] = len(out.token_ids)
            if out.finished:
                done[out.request_id] = out
        if progress is not None and task is not None:
            progress.update(task, completed=sum(tokens.values()))
    return [done[r] if r in done else _lost(engine, r, tokens.get(r, 0)) for r in request_ids]


def _lost(engine: Steppable, request_id: str, num_tokens: int) -> RequestOutput:
    """A failed output for a request that ended without a finished output."""
    now = engine.clock.now()
    return RequestOutput(request_id, None, [], "", [], True, "error", None, RequestTimeline(arrival_s=now, finish_s=now),
                         error=f"the engine stopped working on it after {num_tokens} tokens, unfinished")


def replay(engine: Steppable, workload: Sequence[TimedRequest], seed: int = 0,
           progress: Optional[Progress] = None, label: str = "replay") -> list[RequestOutput]:
    """Submit a workload and run it to the end; outputs come back in workload order."""
    ids = submit_workload(engine, workload, seed)
    task = progress.add_task(label, total=sum(r.output_len for r in workload)) if progress else None
    return run_to_completion(engine, ids, progress, task)
