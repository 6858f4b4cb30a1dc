"""Which requests failed and why: the accounting every summary, table and report shares.

A request fails when it ends without latency figures: an error (a worker died, a transfer
failed), an abort, a timeout, or no output token. Summaries count such requests apart, by
reason, and compute latencies over the others. Standard library only (``metrics`` imports it).
"""

from __future__ import annotations

from typing import Sequence

UNFINISHED = "no result before the deadline"
NO_OUTPUT_TOKEN = "ended without an output token"
MAX_REASON_CHARS = 200


def failure_note(num_requests: int, failures: dict[str, int]) -> str:
    """One line saying how many of ``num_requests`` failed and why, or "" when ``failures`` is empty."""
    num_failed = sum(failures.values())
    if not num_failed:
        return ""
    reasons = ", ".join(f"{reason} ({count})" for reason, count in sorted(failures.items(), key=lambda kv: -kv[1]))
    return f"{num_failed} of {num_requests} request{'s' if num_requests != 1 else ''} failed: {reasons}"


def failure_reason(output: object) -> str | None:
    """Why a request's output counts as failed, or None when it finished with latency figures.

    ``output`` is anything shaped like ``RequestOutput`` (``finished``, ``finish_reason``,
    ``error``, ``metrics``), or None for a request that produced no result at all.
    """
    if output is None:
        return UNFINISHED
    error = getattr(output, "error", None)
    if error:
        return str(error)[:MAX_REASON_CHARS]
    if not getattr(output, "finished", True):
        return UNFINISHED
    finish_reason = getattr(output, "finish_reason", None)
    if finish_reason in ("abort", "error"):
        return "aborted" if finish_reason == "abort" else "error"
    if getattr(output, "metrics", None) is None:
        return NO_OUTPUT_TOKEN
    return None


def count_failures(outputs: Sequence[object]) -> dict[str, int]:
    """Reason -> number of failed requests among ``outputs`` (see ``failure_reason``)."""
    counts: dict[str, int] = {}
    for out in outputs:
        reason = failure_reason(out)
        if reason is not None:
            counts[reason] = counts.get(reason, 0) + 1
    return counts
