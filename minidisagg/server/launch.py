"""Start the HTTP front: load the engine (colocated, or a router over worker processes), then serve with uvicorn."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import uvicorn

from minidisagg.engine.llm_engine import LLMEngine
from minidisagg.llm import LLM
from minidisagg.server.app import create_app
from minidisagg.server.engine_loop import EngineLoop, KVBlocks
from minidisagg.server.metrics import ServerMetrics
from minidisagg.server.requests import ModelInfo

API_KEY_ENV = "MINIDISAGG_API_KEY"
SERVER_START_TIMEOUT_S = 30.0
WORKER_POOL_POLL_S = 0.5  # how often the front asks worker processes for their KV pools (for /metrics)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (0 picks a free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class WorkerPools:
    """Free and total KV blocks of each worker process, from their latest HEALTH answers (asked every interval)."""

    def __init__(self, workers: list[Any], interval_s: float = WORKER_POOL_POLL_S) -> None:
        self.workers = workers
        self.interval_s = interval_s
        self._asked_s = -float("inf")

    def __call__(self) -> dict[str, tuple[int, int]]:
        """Each worker's (free, total) KV blocks as last reported; asks again when the last ask is old enough."""
        if time.monotonic() - self._asked_s >= self.interval_s:
            self._asked_s = time.monotonic()
            for worker in self.workers:
                worker.ping()
        pools = {}
        for worker in self.workers:
            health = worker.last_health or {}
            if isinstance(health.get("num_free_blocks"), int) and isinstance(health.get("num_blocks"), int):
                pools[worker.name] = (health["num_free_blocks"], health["num_blocks"])
        return pools


def engine_kv_blocks(engine: Any) -> Optional[KVBlocks]:
    """Free and total KV blocks of the engine's pool, or of every worker process's (None: not known here)."""
    if isinstance(engine, LLMEngine):
        return lambda: {"engine": (engine.blocks.num_free_blocks, engine.blocks.num_blocks)}
    workers = [*getattr(engine, "prefill_workers", []), *getattr(engine, "decode_workers", [])]
    if workers and all(hasattr(w, "ping") for w in workers):
        return WorkerPools(workers)
    return None


def model_info(llm: LLM, name: str) -> ModelInfo:
    """What the request checks need of an ``LLM``'s model, served under ``name``."""
    engine = llm.engine
    return ModelInfo(name=name, max_model_len=engine.max_model_len, tokenizer=llm.get_tokenizer,
                     check_prompt=engine.tokenize_prompt)


class FrontServer(uvicorn.Server):
    """uvicorn's server, except that SIGINT / SIGTERM first end the engine loop's requests with an error event.

    Streams then close at once instead of holding the graceful shutdown open, and the process exits
    normally afterwards (stock uvicorn re-raises the signal, which would skip stopping worker processes).
    """

    def __init__(self, config: uvicorn.Config, engine_loop: EngineLoop) -> None:
        super().__init__(config)
        self.engine_loop = engine_loop

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Handle SIGINT and SIGTERM while serving (main thread only, as signals require)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_signal(sig: int, frame: Any) -> None:
            self.engine_loop.request_stop()
            self.handle_exit(sig, frame)

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@dataclass
class HttpServer:
    """A running HTTP front: its URL, the engine loop and the uvicorn server (``stop`` ends both)."""

    url: str
    engine_loop: EngineLoop
    server: FrontServer
    thread: Optional[threading.Thread] = None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop serving, then stop the engine loop."""
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout_s)
        self.engine_loop.stop(timeout_s)


def build_server(llm: LLM, name: str, host: str = "127.0.0.1", port: int = 0, api_key: Optional[str] = None,
                 max_pending: int = 256, request_timeout_s: float = 600.0) -> tuple[HttpServer, socket.socket]:
    """The app over ``llm``'s engine, its engine loop started, and a bound socket (not yet serving)."""
    engine_loop = EngineLoop(llm.engine, ServerMetrics(), engine_kv_blocks(llm.engine), max_pending=max_pending,
                             request_timeout_s=request_timeout_s, tokenizer=llm.get_tokenizer())
    app = create_app(engine_loop, model_info(llm, name), api_key)
    sock = bind(host, port)
    bound = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    server = FrontServer(config, engine_loop)
    shown = f"[{host}]" if ":" in host else host
    engine_loop.start()
    return HttpServer(f"http://{shown}:{bound}", engine_loop, server), sock


def start_in_thread(llm: LLM, name: str, **options: Any) -> HttpServer:
    """Serve ``llm`` from a background thread (tests, notebooks); returns once it accepts connections."""
    handle, sock = build_server(llm, name, **options)
    handle.thread = threading.Thread(target=handle.server.run, kwargs={"sockets": [sock]}, name="http", daemon=True)
    handle.thread.start()
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if handle.server.started:
            return handle
        time.sleep(0.05)
    handle.stop()
    raise RuntimeError(f"the HTTP server did not start within {SERVER_START_TIMEOUT_S:g} s")


def llm_from_args(args: argparse.Namespace) -> LLM:
    """The ``LLM`` the serve flags describe: one colocated engine, or a router over worker processes.

    With ``--peers`` (``--mode disagg``) the workers are already running, and the router connects to them.
    ``--threads`` sets torch's CPU threads here too, where a colocated or in-process engine runs.
    """
    disagg = args.mode == "disagg"
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    workers, security = (args.peers or None) if disagg else None, None
    if workers is not None:  # worker processes already running (another launcher, torchrun): connect to them
        from minidisagg.transport.auth import link_security

        security = link_security(args.secret_file or None, args.tls_cert or None, args.tls_key or None,
                                 args.tls_ca or None)
    return LLM(args.model, device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
               block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
               kv_memory_budget_bytes=args.kv_memory_budget_bytes, kv_layout=args.kv_layout,
               batch_invariant=args.batch_invariant, cuda_graphs=not args.no_cuda_graphs,
               async_scheduling={"auto": None, "on": True, "off": False}[args.async_scheduling],
               random_weights=args.random_weights, seed=args.seed, policy=args.policy,
               mode=args.mode, transport=args.transport if disagg else "inproc", num_prefill=args.num_prefill,
               num_decode=args.num_decode, routing=args.routing, kv_overlap=args.overlap,
               routing_load_weight=args.routing_load_weight,
               kv_failure_policy=args.kv_failure_policy, request_timeout_s=args.request_timeout_s,
               worker_threads=args.threads, workers=workers, worker_security=security,
               kv_wire_dtype=args.kv_wire_dtype, enable_prefix_caching=args.enable_prefix_caching)


def serve_http(args: argparse.Namespace) -> int:
    """``minidisagg serve MODEL --mode colocated|disagg``: serve the OpenAI API until SIGINT or SIGTERM."""
    from rich.console import Console

    console = Console(stderr=True)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(args.host) and api_key is None:
        console.print(f"[yellow]warning:[/] listening on {args.host} without an API key: anyone who reaches the "
                      f"port can use the model (pass --api-key or set ${API_KEY_ENV})", highlight=False)
    port = 8000 if args.port is None else args.port
    llm = llm_from_args(args)
    try:
        if isinstance(llm.engine, LLMEngine):
            llm.engine.capture_cuda_graphs()
        handle, sock = build_server(llm, args.served_model_name or args.model, args.host, port, api_key,
                                    args.max_pending, args.request_timeout_s)
        if args.ready_file:
            Path(args.ready_file).write_text(str(sock.getsockname()[1]))
        console.print(f"serving {args.model} ({args.mode}) on {handle.url}/v1", highlight=False)
        try:
            handle.server.run(sockets=[sock])  # uvicorn handles SIGINT and SIGTERM: it returns after a graceful stop
        finally:
            handle.engine_loop.stop()
    finally:
        llm.shutdown()  # disaggregated: every worker process goes with the front
    return 0
