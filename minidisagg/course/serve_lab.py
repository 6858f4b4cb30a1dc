"""Lab 4's HTTP part: ``minidisagg serve`` as a real process, driven by ``bench serve``, beside a direct run.

``serving(model, mode)`` starts the HTTP front (colocated, or over prefill and decode worker
processes) on a free loopback port, waits for ``/health`` and always stops it: SIGTERM, then
SIGKILL. Its worker processes die with it (``disagg/launch.py`` starts them so). ``http_run``
sends a workload through ``bench serve``'s load generator; ``direct_run`` sends the same prompts,
on the same arrival schedule, to an engine in this process, so the two differ only by the HTTP path.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import httpx
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import minidisagg
from minidisagg.bench.serve import RequestResult, run_load
from minidisagg.bench.serve_data import BenchRequest, poisson_gaps_s
from minidisagg.engine.llm_engine import RequestOutput
from minidisagg.engine.replay import run_to_completion
from minidisagg.engine.sampling import SamplingParams
from minidisagg.engine.steppable import Steppable

START_TIMEOUT_S = 180.0  # loading the model (and, disaggregated, starting its workers) included
STOP_TIMEOUT_S = 20.0
HTTP_TIMEOUT_S = 120.0  # one streamed request
PACKAGE_ROOT = Path(minidisagg.__file__).resolve().parents[1]

_RUNNING: set["ServerProcess"] = set()  # stopped at interpreter exit if a caller never stopped them


@dataclass(eq=False)
class ServerProcess:
    """A running ``minidisagg serve`` process: its base URL, the process and its log file."""

    url: str
    proc: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 20) -> str:
        """The end of the server's log, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> Optional[int]:
        """SIGTERM (a graceful stop that also stops its workers), then SIGKILL after ``timeout_s``; the exit code."""
        _RUNNING.discard(self)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # its workers get SIGTERM when it dies (PR_SET_PDEATHSIG)
                self.proc.wait(timeout_s)
        return self.proc.returncode


@atexit.register
def _stop_forgotten() -> None:
    for server in list(_RUNNING):
        server.stop()


def start_server(model: str, mode: str = "colocated", serve_args: Sequence[str] = (), host: str = "127.0.0.1",
                 start_timeout_s: float = START_TIMEOUT_S, env: Optional[dict[str, str]] = None) -> ServerProcess:
    """Start ``minidisagg serve MODEL --mode MODE`` on a free port of ``host``; return once ``/health`` answers 200.

    ``env`` adds to this process's environment (``OMP_NUM_THREADS``, say). On a timeout, or when the
    process exits first, it is stopped and the error quotes its log.
    """
    if mode not in ("colocated", "disagg"):
        raise ValueError(f"mode must be 'colocated' or 'disagg', got {mode!r}")
    log_dir = Path(tempfile.mkdtemp(prefix="minidisagg-serve-"))
    ready, log_path = log_dir / "port", log_dir / "server.log"
    path = os.pathsep.join(filter(None, (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH"))))
    cmd = [sys.executable, "-m", "minidisagg.cli", "serve", model, "--mode", mode, "--host", host, "--port", "0",
           "--ready-file", str(ready), *serve_args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {}), "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"})
    server = ServerProcess("", proc, log_path)
    _RUNNING.add(server)
    try:
        deadline = time.monotonic() + start_timeout_s
        while not (ready.exists() and ready.read_text().strip()):
            _check_alive(server, deadline, start_timeout_s, "bound its port")
            time.sleep(0.1)
        server.url = f"http://{f'[{host}]' if ':' in host else host}:{int(ready.read_text())}"
        while not _healthy(server.url):  # the port is bound just before uvicorn serves it
            _check_alive(server, deadline, start_timeout_s, "answered /health")
            time.sleep(0.1)
    except BaseException:
        server.stop()
        raise
    return server


def _check_alive(server: ServerProcess, deadline: float, timeout_s: float, what: str) -> None:
    if server.proc.poll() is not None:
        raise RuntimeError(f"the server exited with code {server.proc.returncode} before it {what}; its log:\n"
                           f"{server.log_tail()}")
    if time.monotonic() > deadline:
        raise TimeoutError(f"the server had not {what} after {timeout_s:g} s (a busy host? raise start_timeout_s); "
                           f"its log:\n{server.log_tail()}")


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5.0).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def serving(model: str, mode: str = "colocated", serve_args: Sequence[str] = (), host: str = "127.0.0.1",
            start_timeout_s: float = START_TIMEOUT_S, env: Optional[dict[str, str]] = None) -> Iterator[ServerProcess]:
    """``start_server`` as a ``with`` block: the server (and its workers) stop when the block ends, however it ends."""
    server = start_server(model, mode, serve_args, host, start_timeout_s, env)
    try:
        yield server
    finally:
        server.stop()


@dataclass
class LatencySample:
    """The TTFT of every request and every inter-token gap of one run (seconds), under a label."""

    label: str
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    failed: int = 0

    @property
    def ttft_p50_s(self) -> float:
        """Median TTFT."""
        return statistics.median(self.ttft_s)

    @property
    def ttft_min_s(self) -> float:
        """Fastest TTFT: a request that found the engine idle (load from other programs only adds to it)."""
        return min(self.ttft_s)

    @property
    def itl_p50_s(self) -> float:
        """Median inter-token gap."""
        return statistics.median(self.itl_s)

    def describe(self) -> str:
        """One line: medians and counts."""
        return (f"{self.label:>22}: TTFT min {1e3 * self.ttft_min_s:6.1f} ms, p50 {1e3 * self.ttft_p50_s:7.1f} ms; "
                f"ITL p50 {1e3 * self.itl_p50_s:6.1f} ms "
                f"({len(self.ttft_s)} requests, {len(self.itl_s)} gaps, {self.failed} failed)")

    @classmethod
    def of_http(cls, label: str, results: Sequence[RequestResult]) -> "LatencySample":
        """What ``bench serve`` saw: TTFT from request sent to first text, ITL the gaps between text chunks."""
        done = [r for r in results if r.ok]
        return cls(label, [r.ttft_s for r in done], [g for r in done for g in r.itl_s], len(results) - len(done))

    @classmethod
    def of_outputs(cls, label: str, outputs: Sequence[RequestOutput]) -> "LatencySample":
        """What the engine recorded: TTFT from arrival to first token, ITL the gaps between tokens."""
        done = [o for o in outputs if o.metrics is not None and not o.error]
        return cls(label, [o.metrics.ttft_s for o in done], [g for o in done for g in o.metrics.itl_s],
                   len(outputs) - len(done))


def arrivals_s(num_requests: int, rate_rps: float, seed: int) -> list[float]:
    """When each request leaves, from the first (seconds): the schedule ``bench serve`` follows for this seed."""
    gaps = poisson_gaps_s(rate_rps, seed)
    times, t = [], 0.0
    for _ in range(num_requests):
        times.append(t)
        t += next(gaps)
    return times


def _progress(label: str) -> Progress:
    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True)


def http_run(server: ServerProcess, model: str, requests: Sequence[BenchRequest], rate_rps: float, seed: int,
             label: str, warm_up: int = 2) -> LatencySample:
    """Send ``requests`` through ``bench serve``'s load generator (after ``warm_up`` unrecorded ones); a progress bar."""
    def load(batch: Sequence[BenchRequest], progress: Optional[Progress]) -> list[RequestResult]:
        coro = run_load(server.url, model, list(batch), rate_rps, False, True, {}, HTTP_TIMEOUT_S, None, seed, progress)
        box: dict[str, object] = {}
        # a notebook's kernel already runs an event loop on this thread, so the load runs on its own thread
        worker = threading.Thread(target=lambda: box.update(out=asyncio.run(coro)), name="bench-serve")
        worker.start()
        worker.join()
        if "out" not in box:
            raise RuntimeError(f"bench serve failed; the server's log:\n{server.log_tail()}")
        return box["out"][0]  # type: ignore[index]

    if warm_up:
        load(requests[:warm_up], None)  # the server's first steps (allocations, lazy kernels) count for nothing
    with _progress(label) as progress:
        results = load(requests, progress)
    sample = LatencySample.of_http(label, results)
    if sample.failed:
        errors = sorted({r.error for r in results if r.error})
        raise RuntimeError(f"{sample.failed} of {len(results)} requests failed over HTTP: {errors[:3]}; "
                           f"the server's log:\n{server.log_tail()}")
    return sample


def direct_run(engine: Steppable, requests: Sequence[BenchRequest], rate_rps: float, seed: int,
               label: str) -> LatencySample:
    """Queue the same prompts on the same arrival schedule into ``engine`` (wall clock) and step it; a progress bar."""
    start_s = engine.clock.now() + 0.01
    ids = [engine.add_request(req.prompt, SamplingParams(temperature=0, max_tokens=req.max_tokens, ignore_eos=True),
                              arrival_time=start_s + t) for req, t in zip(requests, arrivals_s(len(requests), rate_rps, seed))]
    with _progress(label) as progress:
        task = progress.add_task(label, total=sum(r.max_tokens for r in requests))
        outputs = run_to_completion(engine, ids, progress, task)
    for rid in ids:
        engine.release(rid)
    sample = LatencySample.of_outputs(label, outputs)
    if sample.failed:
        raise RuntimeError(f"{sample.failed} of {len(outputs)} requests failed: "
                           f"{sorted({o.error for o in outputs if o.error})[:3]}")
    return sample


def latency_figure(samples: Sequence[LatencySample]):
    """TTFT and ITL distributions of several runs side by side (empirical CDFs, log time axis)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, name, attr in ((axes[0], "TTFT", "ttft_s"), (axes[1], "ITL (gap between chunks)", "itl_s")):
        for sample in samples:
            values_ms = sorted(1e3 * v for v in getattr(sample, attr))
            if values_ms:
                share = [(i + 1) / len(values_ms) for i in range(len(values_ms))]
                ax.step(values_ms, share, where="post", label=f"{sample.label} ({len(values_ms)})")
        ax.set_xscale("log")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("share of values at or below")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig
