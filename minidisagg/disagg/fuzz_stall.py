"""A decode worker that stops answering: SIGSTOP it while it holds requests, SIGCONT it later, check both sides.

A stopped process keeps its sockets open, so nothing looks broken: no reset, no lost
connection, just silence. ``stall_decode`` runs that on a ``FuzzDeployment``: it starts
requests with a short deadline, waits until each is decoding, stops the decode process for
``stop_s`` seconds, and records when each request ended. Held requests (and one submitted
during the stop) must end within their deadline, failed or recomputed per
``kv_failure_policy``; after SIGCONT every later request must return the colocated engine's
tokens, and both KV pools must be whole again.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from minidisagg.disagg.fuzz_checks import HOST, PROMPTS, FuzzDeployment

DEADLINE_SLACK_S = 1.0  # how late after its deadline a request may end (the router checks deadlines each step)
HELD_PARAMS = {"temperature": 0, "max_tokens": 600, "ignore_eos": True}  # still decoding when the stop comes
AFTER_PARAMS = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}


@dataclass
class StallReport:
    """What a SIGSTOP of the decode worker did to the requests around it."""

    stop_s: float
    deadline_s: float
    policy: str
    held: list[tuple[str, float, Optional[str]]] = field(default_factory=list)  # (id, s after submission, error)
    during: list[tuple[str, float, Optional[str]]] = field(default_factory=list)
    after: list[tuple[str, bool, Optional[str]]] = field(default_factory=list)  # (id, tokens as colocated, error)
    pools: dict[str, Any] = field(default_factory=dict)
    alive: dict[str, bool] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ended_in_time(self) -> bool:
        """Whether every held and every stop-time request ended within its deadline (plus the slack)."""
        ended = self.held + self.during
        return bool(ended) and all(s <= self.deadline_s + DEADLINE_SLACK_S for _, s, _ in ended)

    @property
    def after_ok(self) -> bool:
        """Whether every request after SIGCONT returned the colocated engine's tokens."""
        return bool(self.after) and all(ok for _, ok, _ in self.after)

    @property
    def pools_whole(self) -> bool:
        """Whether both KV pools were whole at the end."""
        return bool(self.pools) and all(p is not None and p[0] == p[1] for p in self.pools.values())


def stall_decode(deployment: FuzzDeployment, stop_s: float = 40.0, deadline_s: float = 12.0, policy: str = "fail",
                 num_held: int = 3, num_after: int = 4) -> StallReport:
    """SIGSTOP the deployment's decode worker for ``stop_s`` while it holds ``num_held`` requests (module docstring)."""
    from minidisagg import SamplingParams
    from minidisagg.config import CacheConfig, EngineConfig
    from minidisagg.disagg.router_server import RemoteCluster
    from minidisagg.transport.auth import LinkSecurity

    started_s = time.monotonic()
    report = StallReport(stop_s, deadline_s, policy)
    config = EngineConfig(batch_invariant=True, cache=CacheConfig(num_blocks=deployment.settings.num_kv_blocks))
    cluster = RemoteCluster(deployment.loaded, config, {"p0": (HOST, deployment.port("prefill"))},
                            {"d0": (HOST, deployment.port("decode"))}, kv_failure_policy=policy,
                            request_timeout_s=deadline_s, security=LinkSecurity(secret=deployment.secret))
    decode_pid = deployment.processes["decode"].proc.pid
    submitted: dict[str, float] = {}
    finished: dict[str, Any] = {}

    def drive(until_s: float, waiting_for: set[str]) -> None:
        while time.monotonic() < until_s and not waiting_for <= set(finished):
            for out in cluster.step():
                if out.finished:
                    finished[out.request_id] = (time.monotonic() - submitted[out.request_id], out)

    try:
        held = {cluster.add_request({"prompt_token_ids": PROMPTS[i % len(PROMPTS)]}, SamplingParams(**HELD_PARAMS))
                for i in range(num_held)}
        submitted.update({rid: time.monotonic() for rid in held})
        decoding: set[str] = set()
        until_s = time.monotonic() + deadline_s / 2
        while decoding != held and time.monotonic() < until_s:  # stop only once each one is on the decode worker
            decoding |= {out.request_id for out in cluster.step() if out.token_ids and not out.finished}
        os.kill(decode_pid, signal.SIGSTOP)
        stopped_s = time.monotonic()
        try:
            rid = cluster.add_request({"prompt_token_ids": PROMPTS[-1]}, SamplingParams(**AFTER_PARAMS))
            submitted[rid] = time.monotonic()
            drive(stopped_s + min(stop_s, deadline_s + 3 * DEADLINE_SLACK_S), held | {rid})
            report.held = [_ended(rid, finished) for rid in sorted(held)]
            report.during = [_ended(rid, finished)]
            remaining_s = stop_s - (time.monotonic() - stopped_s)
            if remaining_s > 0:
                time.sleep(remaining_s)
        finally:
            os.kill(decode_pid, signal.SIGCONT)
        for i in range(num_after):
            prompt = PROMPTS[i % len(PROMPTS)]
            rid = cluster.add_request({"prompt_token_ids": prompt}, SamplingParams(**AFTER_PARAMS))
            submitted[rid] = time.monotonic()
            drive(time.monotonic() + deadline_s + 2 * DEADLINE_SLACK_S, {rid})
            out = finished.get(rid, (None, None))[1]
            want = deployment.reference.generate({"prompt_token_ids": prompt}, SamplingParams(**AFTER_PARAMS),
                                                 use_tqdm=False)[0].token_ids
            error = "no result" if out is None else out.error
            report.after.append((rid, out is not None and out.error is None and out.token_ids == want, error))
        report.pools = deployment.pools()
        report.alive = deployment.alive()
    finally:
        cluster.shutdown()
    report.seconds = time.monotonic() - started_s
    return report


def _ended(rid: str, finished: dict[str, Any]) -> tuple[str, float, Optional[str]]:
    """(id, seconds from submission to its end, its error): ``inf`` seconds if it never ended."""
    if rid not in finished:
        return rid, float("inf"), "never ended"
    seconds, out = finished[rid]
    return rid, seconds, out.error
