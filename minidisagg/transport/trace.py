"""Timestamps of each step of a KV transfer, for taking a link's fixed cost apart (off by default).

With ``MINIDISAGG_KV_TRACE=1`` in a worker's environment, both ends of a link log one line per
step (``kv-trace <step> <transfer id> <monotonic seconds>``) to stderr, which ``launch_local``
sends to the worker's log file. Workers on one host share the monotonic clock, so the lines of
a prefill and a decode worker can be merged into one timeline (``read_trace``).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Iterable

ENABLED = os.environ.get("MINIDISAGG_KV_TRACE", "") == "1"
_log = logging.getLogger("minidisagg.kv.trace")
if ENABLED and not _log.handlers:
    _log.addHandler(logging.StreamHandler(sys.stderr))
    _log.setLevel(logging.INFO)
    _log.propagate = False
_LINE = re.compile(r"^kv-trace (\S+) (\S+) ([0-9.]+)$")


def kv_trace(step: str, transfer_id: object) -> None:
    """Log that ``step`` of ``transfer_id`` happens now (when tracing is on)."""
    if ENABLED:
        _log.info("kv-trace %s %s %.6f", step, transfer_id, time.monotonic())


def read_trace(log_paths: Iterable[Path]) -> dict[str, list[tuple[float, str]]]:
    """Trace lines of several workers' logs merged: transfer id -> [(seconds, step)] in time order."""
    by_transfer: dict[str, list[tuple[float, str]]] = {}
    for path in log_paths:
        for line in Path(path).read_text(errors="replace").splitlines():
            match = _LINE.match(line.strip())
            if match:
                step, tid, seconds = match.groups()
                by_transfer.setdefault(tid, []).append((float(seconds), step))
    return {tid: sorted(steps) for tid, steps in by_transfer.items()}
