"""Start worker processes (``minidisagg serve``) on this machine (the router's side of their links: ``remote_worker``).

Children die with their parent process (``PR_SET_PDEATHSIG`` on Linux) and are terminated,
then killed, by ``stop_processes``: no orphan processes, even when the router crashes. The
kernel sends that signal when the *thread* that forked the child ends, not the process, so
every child is started by one long-lived launcher thread (``Launcher``): an ``LLM`` made on a
short-lived thread keeps its workers after that thread returns. A child that finds its parent
already gone when it sets the signal up (the parent died during the fork) exits at once.

Each launch makes a fresh shared secret (``auth.new_secret``) and hands it to its children in
their environment (``MINIDISAGG_SECRET``), never on a command line, which other users of the
machine can read in ``ps``; a child's environment is readable by its owner only.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from minidisagg.disagg.placement import check_dist_placement, check_placement, placement
from minidisagg.transport.auth import SECRET_ENV, new_secret

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 180.0
POPEN_TIMEOUT_S = 60.0  # starting one process (fork and exec), not its readiness
PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        return
    if os.getppid() != parent_pid:  # the parent died before the signal was set up: nobody would send it
        os._exit(1)


class Launcher:
    """Starts child processes from one daemon thread that lives as long as the process (see the module docstring)."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[tuple, dict, dict[str, Any], threading.Event]] = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    def popen(self, *args: Any, **kwargs: Any) -> subprocess.Popen:
        """``subprocess.Popen(*args, **kwargs)``, run on the launcher thread; its errors are raised here."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="minidisagg-launcher", daemon=True)
                self._thread.start()
        box: dict[str, Any] = {}
        done = threading.Event()
        self._jobs.put((args, kwargs, box, done))
        if not done.wait(POPEN_TIMEOUT_S):
            raise TimeoutError(f"the launcher thread did not start {args[0][:4]} within {POPEN_TIMEOUT_S} s")
        if "error" in box:
            raise box["error"]
        return box["proc"]

    def _run(self) -> None:
        while True:
            args, kwargs, box, done = self._jobs.get()
            try:
                box["proc"] = subprocess.Popen(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, which raises it
                box["error"] = exc
            finally:
                done.set()


LAUNCHER = Launcher()  # one per process by necessity: the thread it keeps must outlive every caller


@dataclass
class WorkerProcess:
    """A running ``minidisagg serve`` child: its role, name, address, log file and the secret it was given."""

    role: str
    name: str
    proc: subprocess.Popen
    host: str
    port: int
    log_path: Path
    secret: Optional[bytes] = field(default=None, repr=False)

    def log_tail(self, lines: int = 15) -> str:
        """The end of the child's log, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def start_worker(role: str, name: str, serve_args: Sequence[str], log_dir: Path, host: str = "127.0.0.1",
                 cpu_cores: Optional[str] = None, port: int = 0, device: Optional[str] = None,
                 secret: Optional[bytes] = None) -> WorkerProcess:
    """Start one worker process without waiting for it (see ``wait_ready``); ``device`` pins it (see ``placement``).

    ``secret`` reaches the child as ``MINIDISAGG_SECRET`` (None: the child inherits this environment as is).
    """
    ready = log_dir / f"{name}.port"
    log_path = log_dir / f"{name}.log"
    device_args, device_env = placement(device)
    cmd = [sys.executable, "-m", "minidisagg.cli", "serve", "--role", role, "--host", host, "--port", str(port),
           "--ready-file", str(ready), *serve_args, *device_args]
    if cpu_cores:
        cmd += ["--cpu-cores", cpu_cores]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **device_env)
    if secret is not None:
        env[SECRET_ENV] = secret.decode()
    with open(log_path, "wb") as log_file:
        preexec = functools.partial(_die_with_parent, os.getpid()) if sys.platform == "linux" else None
        proc = LAUNCHER.popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                              preexec_fn=preexec)
    return WorkerProcess(role, name, proc, host, port, log_path, secret)


def wait_ready(workers: Sequence[WorkerProcess], ready_timeout_s: float = READY_TIMEOUT_S) -> None:
    """Wait until every worker listens (its ready file holds the port); stop them all if one fails."""
    deadline = time.monotonic() + ready_timeout_s
    waiting = list(workers)
    while waiting:
        for worker in list(waiting):
            ready = worker.log_path.with_suffix(".port")
            if ready.exists():
                worker.port = int(ready.read_text())
                waiting.remove(worker)
            elif worker.proc.poll() is not None:
                stop_processes(workers)
                raise RuntimeError(f"{worker.role} worker {worker.name} exited with code {worker.proc.returncode}:\n"
                                   f"{worker.log_tail()}")
        if waiting and time.monotonic() > deadline:
            stop_processes(workers)
            raise TimeoutError(f"{waiting[0].role} worker {waiting[0].name} was not listening after "
                               f"{ready_timeout_s} s:\n{waiting[0].log_tail()}")
        if waiting:
            time.sleep(0.05)


def spawn_worker(role: str, name: str, serve_args: Sequence[str], log_dir: Path, host: str = "127.0.0.1",
                 cpu_cores: Optional[str] = None, ready_timeout_s: float = READY_TIMEOUT_S,
                 device: Optional[str] = None, secret: Optional[bytes] = None) -> WorkerProcess:
    """Start one worker process and wait until it listens (or fail with its log); ``secret`` as in ``start_worker``."""
    worker = start_worker(role, name, serve_args, log_dir, host, cpu_cores, device=device, secret=secret)
    wait_ready([worker], ready_timeout_s)
    return worker


EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_PICKED_PORT = 10000  # below this sit well-known and registered services


def ephemeral_port_range() -> Optional[tuple[int, int]]:
    """The range the kernel draws outgoing connections' ports from (Linux), or None where it cannot be read."""
    try:
        low, high = (int(x) for x in EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return None
    return low, high


def free_ports(host: str, count: int) -> list[int]:
    """``count`` distinct ports free right now on ``host``, outside the kernel's ephemeral range.

    A port handed to a worker before it binds can be taken meanwhile. The likeliest taker is an
    outgoing connection (torch.distributed's store and gloo open many), whose port the kernel draws
    from the ephemeral range: so on Linux the ports are drawn below that range and checked by
    binding them. Elsewhere the kernel picks (port 0), which is free now but not reserved.
    """
    import random

    span = ephemeral_port_range()
    socks: list[socket.socket] = []
    try:
        if span is not None and span[0] - LOWEST_PICKED_PORT >= 64 * count:
            rng = random.Random()
            tries = 0
            while len(socks) < count and tries < 200 * count:
                tries += 1
                try:
                    socks.append(socket.create_server((host, rng.randrange(LOWEST_PICKED_PORT, span[0]))))
                except OSError:  # taken: draw another
                    continue
        while len(socks) < count:
            socks.append(socket.create_server((host, 0)))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def stop_processes(workers: Sequence[WorkerProcess], timeout_s: float = 10.0) -> None:
    """Terminate every worker, then kill any that outlive ``timeout_s``."""
    for w in workers:
        if w.proc.poll() is None:
            w.proc.terminate()
    deadline = time.monotonic() + timeout_s
    for w in workers:
        try:
            w.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait(5)


def launch_local(serve_args: Sequence[str], num_prefill: int, num_decode: int, overlap: bool = False,
                 pin_cores: bool = False, transport: str = "socket", dist_backend: Optional[str] = None,
                 host: str = "127.0.0.1", prefill_devices: Optional[Sequence[str]] = None,
                 decode_devices: Optional[Sequence[str]] = None,
                 secret: Optional[bytes] = None) -> tuple[list[WorkerProcess], list[WorkerProcess], Path]:
    """Start ``num_decode`` decode servers and ``num_prefill`` prefill servers pointing at them.

    Every worker gets ``secret``, or one made for this launch when None (``WorkerProcess.secret``
    says which): the workers prove it to each other, and a router must prove it to them.

    ``prefill_devices`` / ``decode_devices`` (``"cpu"`` or ``"cuda:N"``, one per worker) pin
    each worker to a device; left out, every worker uses the ``--device`` in ``serve_args``.

    ``transport="socket"``: decodes first (each picks its own port), then prefills.
    ``transport="dist"``: every worker joins one torch.distributed group, so all start at
    once: decodes get ranks ``0..D-1`` and ports picked here, prefills ranks ``D..D+P-1`` and
    ``--peers d0=host:port@0,...``; then we wait for all of them to listen.
    """
    prefill_at = check_placement(prefill_devices, num_prefill, "prefill")
    decode_at = check_placement(decode_devices, num_decode, "decode")
    if transport == "dist":
        check_dist_placement([*prefill_at, *decode_at])
    secret = secret or new_secret()
    log_dir = Path(tempfile.mkdtemp(prefix="minidisagg-workers-"))
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    core_list = sorted(cores)

    def core_for(i: int) -> Optional[str]:
        return str(core_list[i % len(core_list)]) if pin_cores and core_list else None

    decodes: list[WorkerProcess] = []
    prefills: list[WorkerProcess] = []
    overlap_flag = ["--overlap"] if overlap else ["--no-overlap"]
    try:
        if transport == "dist":
            rendezvous_port, *decode_ports = free_ports(host, 1 + num_decode)
            world = ["--dist-init", f"tcp://{host}:{rendezvous_port}", "--dist-world", str(num_decode + num_prefill)]
            world += ["--dist-backend", dist_backend] if dist_backend else []
            for i, port in enumerate(decode_ports):
                decodes.append(start_worker("decode", f"d{i}", [*serve_args, *world, "--dist-rank", str(i)], log_dir,
                                            host, core_for(num_prefill + i), port, decode_at[i], secret))
            peers = ",".join(f"{d.name}={d.host}:{d.port}@{rank}" for rank, d in enumerate(decodes))
            for i in range(num_prefill):
                args = [*serve_args, *world, "--dist-rank", str(num_decode + i), "--peers", peers, *overlap_flag]
                prefills.append(start_worker("prefill", f"p{i}", args, log_dir, host, core_for(i), device=prefill_at[i],
                                             secret=secret))
            wait_ready(decodes + prefills)
        else:
            for i in range(num_decode):
                decodes.append(spawn_worker("decode", f"d{i}", serve_args, log_dir, host, core_for(num_prefill + i),
                                            device=decode_at[i], secret=secret))
            peers = ",".join(f"{d.name}={d.host}:{d.port}" for d in decodes)
            for i in range(num_prefill):
                prefills.append(spawn_worker("prefill", f"p{i}", [*serve_args, "--peers", peers, *overlap_flag],
                                             log_dir, host, core_for(i), device=prefill_at[i], secret=secret))
    except BaseException:
        stop_processes(prefills + decodes)
        raise
    return prefills, decodes, log_dir
