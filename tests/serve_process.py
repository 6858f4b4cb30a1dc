"""Start ``minidisagg serve ...`` as a real process on a free port, and stop it (shared by the server tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0


def serve_process(args: list[str], ready: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """Yield (base URL, process) once /health answers; SIGTERM (then SIGKILL) at the end if still running."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
    proc = subprocess.Popen([sys.executable, "-m", "minidisagg.cli", "serve", *args, "--port", "0",
                             "--ready-file", str(ready)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (ready.exists() and ready.read_text()):
            assert proc.poll() is None, f"the server exited: {proc.stdout.read()}"
            assert time.monotonic() < deadline, "the server did not start in time"
            time.sleep(0.2)
        url = f"http://127.0.0.1:{ready.read_text()}"
        while True:  # the port is bound just before uvicorn serves it
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server never answered /health"
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)


def child_pids(pid: int) -> set[int]:
    """Every descendant process of ``pid`` (from /proc)."""
    found: set[int] = set()
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = {int(k) for k in (task / "children").read_text().split()}
            except OSError:
                continue
            frontier.extend(kids - found)
            found |= kids
    return found


def running(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
