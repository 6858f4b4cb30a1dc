"""The router process: a TCP server in front of running prefill and decode servers.

``RemoteCluster`` connects to the workers (it never launches them); ``RouterServer`` accepts
clients, submits their requests and streams the replies; ``serve_router`` is the
``minidisagg serve --role router`` entry point. What clients send and get back (JSON lines)
is documented, parsed and built in ``router_protocol``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import signal
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

from minidisagg.config import EngineConfig, LinkConfig
from minidisagg.disagg.cluster import DisaggCluster
from minidisagg.disagg.remote_worker import RemoteWorker
from minidisagg.disagg.outbox import Outbox, shutdown_quietly
from minidisagg.disagg.prefill_requests import Submission
from minidisagg.disagg.router_protocol import (
    IDLE_WAIT_S,
    MAX_LINE_BYTES,
    BadRequest,
    ReplyStream,
    error_line,
    parse_request,
    read_lines,
)
from minidisagg.engine.clock import WallClock
from minidisagg.kv.pages import KVLayout
from minidisagg.models.registry import LoadedModel
from minidisagg.models.tokenizer import Tokenizer
from minidisagg.transport.auth import LinkSecurity
from minidisagg.transport.framing import FrameError
from minidisagg.transport.listener import ConnectionLimit, accept_loop, listen
from minidisagg.transport.socket import make_hello, parse_host_port

log = logging.getLogger(__name__)
SEND_TIMEOUT_S = 30.0
PEERS_EXAMPLE = "prefill=p0@127.0.0.1:7001,p1@10.0.0.2:7002;decode=d0@127.0.0.1:7101"
Address = tuple[str, int]


def parse_router_peers(text: str) -> tuple[dict[str, Address], dict[str, Address]]:
    """``prefill=p0@host:port,...;decode=d0@host:port,...`` -> (prefill, decode) as name -> (host, port).

    A name may be left out (``host:port``): it then defaults to p0, p1, ... or d0, d1, ...
    Decode names must be those the prefill servers were given in their own ``--peers``.
    """
    sections: dict[str, dict[str, Address]] = {}
    for section in filter(None, (s.strip() for s in text.split(";"))):
        role, sep, entries = section.partition("=")
        role = role.strip()
        if not sep or role not in ("prefill", "decode"):
            raise ValueError(f"router --peers sections are prefill=... and decode=...; got {section!r} "
                             f"(example: {PEERS_EXAMPLE!r})")
        if role in sections:
            raise ValueError(f"router --peers has two {role} sections")
        addrs: dict[str, Address] = {}
        for i, entry in enumerate(filter(None, (e.strip() for e in entries.split(",")))):
            name, at, address = entry.partition("@")
            name, address = (name, address) if at else (f"{role[0]}{i}", entry)
            try:
                host_port = parse_host_port(address)
            except ValueError:
                host_port = None
            if not name or host_port is None:
                raise ValueError(f"router --peers entries look like name@host:port, got {entry!r} "
                                 f"(example: {PEERS_EXAMPLE!r})")
            if name in addrs:
                raise ValueError(f"router --peers names {role} worker {name!r} twice")
            addrs[name] = host_port
        if not addrs:
            raise ValueError(f"router --peers section {role} lists no worker")
        sections[role] = addrs
    missing = [r for r in ("prefill", "decode") if r not in sections]
    if missing:
        raise ValueError(f"router --peers lacks {' and '.join(missing)} workers (example: {PEERS_EXAMPLE!r})")
    return sections["prefill"], sections["decode"]


class RemoteCluster(DisaggCluster):
    """A ``DisaggCluster`` over already running ``minidisagg serve`` workers: it connects, never launches."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig, prefill_addrs: dict[str, Address],
                 decode_addrs: dict[str, Address], routing: str = "round_robin", kv_failure_policy: str = "fail",
                 request_timeout_s: float = 600.0, max_attempts: int = 3, clock_origin_s: Optional[float] = None,
                 connect_timeout_s: float = 30.0, security: Optional[LinkSecurity] = None,
                 routing_load_weight: float = 1.0) -> None:
        """``security``: the deployment's secret (and TLS) proved to every worker; None: neither."""
        self.security = security or LinkSecurity()
        if not prefill_addrs or not decode_addrs:
            raise ValueError("a RemoteCluster needs at least one prefill and one decode address")
        self.prefill_addrs, self.decode_addrs = dict(prefill_addrs), dict(decode_addrs)
        self.clock_origin_s = clock_origin_s
        self.connect_timeout_s = connect_timeout_s
        super().__init__(loaded, config, transport="socket", num_prefill=len(prefill_addrs),
                         num_decode=len(decode_addrs), routing=routing, kv_failure_policy=kv_failure_policy,
                         request_timeout_s=request_timeout_s, max_attempts=max_attempts,
                         routing_load_weight=routing_load_weight)

    @property
    def shared_clock(self) -> bool:
        """Whether the workers' clocks share this router's origin (``--clock-origin`` on every process)."""
        return self.clock_origin_s is not None

    def _start_processes(self, model_ref: str, config: EngineConfig, *_: object) -> None:
        """Connect to the worker servers (decode first) instead of launching processes."""
        self.clock = WallClock(self.clock_origin_s)
        cfg = self.loaded.config
        layout = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, config.cache.block_size, self.loaded.dtype)
        hello = make_hello("router", cfg.fingerprint(), layout)
        workers: list[RemoteWorker] = []
        try:
            for role, addrs in (("decode", self.decode_addrs), ("prefill", self.prefill_addrs)):
                for name, (host, port) in addrs.items():
                    try:
                        workers.append(RemoteWorker(name, host, port, hello, self._outputs, self.connect_timeout_s,
                                                    **self.remote_worker_options(config, self.security)))
                    except (ConnectionError, OSError, FrameError) as exc:
                        raise ConnectionError(f"cannot reach {role} worker {name} at {host}:{port}: {exc}") from exc
        except BaseException:
            for worker in workers:
                worker.stop()
            raise
        self.decode_workers, self.prefill_workers = workers[:len(self.decode_addrs)], workers[len(self.decode_addrs):]

    def _route(self, sub: Submission, *args: Any, **kwargs: Any) -> None:
        if not self.shared_clock:  # our clock means nothing to a worker: make the request due at once there
            sub.arrival_s = 0.0
        super()._route(sub, *args, **kwargs)


class _Client:
    """One client connection: a reader thread (lines in), and a bounded outbox with its own sender thread (lines out)."""

    def __init__(self, sock: socket.socket, peer: str, queue_size: int, on_drop: Callable[[str], None],
                 on_exit: Callable[[], None]) -> None:
        self.sock, self.peer = sock, peer
        self.outbox: Outbox[dict[str, Any]] = Outbox(f"client {peer}", self._write_line, queue_size,
                                                     lambda: shutdown_quietly(sock), on_drop, on_exit)
        self.inflight: dict[str, str] = {}  # client id -> request id (under RouterServer.lock)
        self.closed = threading.Event()
        self.input_done = False

    def _write_line(self, message: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(message).encode() + b"\n")  # SEND_TIMEOUT_S bounds a stuck write

    def send(self, message: dict[str, Any]) -> None:
        """Queue a line for this client without blocking (dropped once the connection is closed)."""
        if not self.closed.is_set():
            self.outbox.put(message)

    def close(self) -> None:
        """Close after the queued lines are written (safe to call twice)."""
        if not self.closed.is_set():
            self.closed.set()
            self.outbox.close()


class RouterServer:
    """Accepts clients, submits their requests to the cluster, and streams outputs back.

    One driver thread owns ``cluster.step()``; client threads call ``add_request`` under the
    same lock, which also guards the request table, so no output can outrun its registration.
    Lines go out through a bounded queue per client (``queue_size`` lines, see ``outbox``): a
    client that falls that far behind is dropped and its requests aborted; the driver never waits.
    A line begun must end within ``line_deadline_s`` (else the client is told and dropped), and
    at most ``max_connections`` clients are served at once (more get an error line and are closed).
    """

    def __init__(self, cluster: RemoteCluster, host: str = "127.0.0.1", port: int = 0,
                 tokenizer: Optional[Tokenizer] = None,
                 queue_size: int = LinkConfig.subscriber_queue_size,
                 max_connections: int = LinkConfig.max_connections,
                 line_deadline_s: float = LinkConfig.frame_deadline_s) -> None:
        self.cluster, self.tokenizer = cluster, tokenizer
        self.queue_size = queue_size
        self.connections = ConnectionLimit(max_connections)
        self.line_deadline_s = line_deadline_s
        self.listener = listen(host, port)
        self.port: int = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.streams: dict[str, tuple[_Client, ReplyStream]] = {}  # request id -> (client, replies)
        self.clients: set[_Client] = set()
        self.stop_event, self.work = threading.Event(), threading.Event()
        self.fatal: Optional[str] = None
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]  # request ids stay unique if other routers share the workers
        self._threads: list[threading.Thread] = []

    def start(self, ready_file: Optional[Path] = None) -> None:
        """Start the driver and accept loop; then write the bound port to ``ready_file``."""
        accept_args = (self.listener, self._serve_client, self.stop_event, "router")
        accept_kwargs = {"refuse": _refuse_client, "limit": self.connections}
        for name, target, args, kwargs in (("driver", self._drive, (), {}),
                                           ("accept", accept_loop, accept_args, accept_kwargs)):
            thread = threading.Thread(target=target, args=args, kwargs=kwargs, name=f"router-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if ready_file is not None:
            tmp = ready_file.with_suffix(".tmp")
            tmp.write_text(str(self.port))
            tmp.replace(ready_file)

    # ---- client connections ----------------------------------------------------------------------
    def _serve_client(self, sock: socket.socket, peer: str) -> None:
        sock.settimeout(SEND_TIMEOUT_S)

        def gone() -> None:  # the sender thread ends: nothing more goes out on this connection
            sock.close()
            with self.lock:
                self.clients.discard(client)

        client = _Client(sock, peer, self.queue_size, lambda reason: self._drop(client, reason), gone)
        with self.lock:
            self.clients.add(client)
        client.outbox.start()
        try:
            for line_no, line in enumerate(read_lines(sock, client.closed, self.line_deadline_s), start=1):
                if line is None:
                    client.send(error_line(f"#{line_no}", f"line longer than {MAX_LINE_BYTES} bytes"))
                elif line.strip():
                    self._submit(client, line, f"#{line_no}")
        except TimeoutError as exc:  # half a line, then nothing: say why, then let it go
            client.send(error_line(None, str(exc)))
            self._drop(client, str(exc))
            return
        except (OSError, ValueError) as exc:  # reset by the client, or closed under us
            self._drop(client, f"read failed: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - a bug: drop this client, leak neither its socket nor its writer
            log.exception("client %s: reading failed", client.peer)
            self._drop(client, f"internal error: {type(exc).__name__}")
            return
        with self.lock:
            client.input_done = True
            idle = not client.inflight
        if idle:
            client.close()

    def _submit(self, client: _Client, line: bytes, default_id: str) -> None:
        try:
            client_id, prompt, params = parse_request(line, default_id, self.tokenizer)
            stream = ReplyStream(client_id, prompt["prompt_token_ids"], params, self.tokenizer,
                                 self.cluster.shared_clock)
            with self.lock:
                if client.closed.is_set() or self.stop_event.is_set():
                    raise BadRequest(client_id, "the router is shutting down")
                if client_id in client.inflight:
                    raise BadRequest(client_id, f"request id {client_id!r} is already in flight on this connection")
                request_id = f"{self._prefix}-{next(self._ids)}"
                try:
                    self.cluster.add_request(prompt, params, request_id=request_id)
                except (ValueError, RuntimeError) as exc:  # bad prompt, or no decode worker alive
                    raise BadRequest(client_id, str(exc)) from None
                self.streams[request_id] = (client, stream)
                client.inflight[client_id] = request_id
        except BadRequest as exc:
            client.send(error_line(exc.request_id, str(exc)))
            return
        except RecursionError:  # a request nested too deeply for some check: this line only
            client.send(error_line(default_id, "the request is nested too deeply"))
            return
        self.work.set()

    def _drop(self, client: _Client, reason: str) -> None:
        """The client is gone: abort its requests; nobody else's are touched."""
        with self.lock:
            request_ids = list(client.inflight.values())
            client.inflight.clear()
            for request_id in request_ids:
                self.streams.pop(request_id, None)
                self.cluster.abort(request_id)
        if not client.closed.is_set():
            log.info("client %s disconnected (%s); aborted %d request(s)", client.peer, reason, len(request_ids))
        client.close()

    # ---- the driver --------------------------------------------------------------------------------
    def _drive(self) -> None:
        try:
            while not self.stop_event.is_set():
                with self.lock:
                    busy = self.cluster.has_unfinished()
                if not busy:
                    self.work.wait(IDLE_WAIT_S)
                    self.work.clear()
                    continue
                with self.lock:  # lines are queued under the lock, so a client never closes before its last one
                    outputs = self.cluster.step()
                    now_s = time.perf_counter()
                    for out in outputs:
                        if out.request_id not in self.streams:
                            continue
                        client, stream = self.streams[out.request_id]
                        for message in stream.update(out, now_s):
                            client.send(message)
                        if out.finished:
                            del self.streams[out.request_id]
                            client.inflight.pop(stream.client_id, None)
                            if client.input_done and not client.inflight:
                                client.close()
                time.sleep(0)  # let waiting submitters take the lock
        except Exception as exc:  # a bug, not a bad request: fail every request; serve_router exits
            self.fatal = f"{type(exc).__name__}: {exc}"
            log.exception("router driver failed")
            self.stop_event.set()
            self._fail_all(f"router failed: {self.fatal}")

    def _fail_all(self, message: str) -> None:
        with self.lock:
            streams, self.streams = list(self.streams.items()), {}
            for request_id, (client, stream) in streams:
                self.cluster.abort(request_id)
                client.inflight.pop(stream.client_id, None)
            clients = list(self.clients)
            for _, (client, stream) in streams:
                client.send(error_line(stream.client_id, message))
        for client in clients:
            client.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop accepting, fail what is in flight, close clients, disconnect from the workers."""
        self.stop_event.set()
        self.listener.close()
        deadline = time.monotonic() + timeout_s / 2
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._fail_all("the router is shutting down")
        deadline = time.monotonic() + 1.0
        for client in list(self.clients):  # give the last lines a second to leave
            client.outbox.join(max(0.0, deadline - time.monotonic()))
        self.cluster.shutdown(timeout_s / 2)


def _refuse_client(sock: socket.socket, message: str) -> None:
    """An error line for a client over the router's connection cap (it is closed next)."""
    sock.sendall(json.dumps(error_line(None, message)).encode() + b"\n")


def serve_router(args: argparse.Namespace, config: EngineConfig, security: Optional[LinkSecurity] = None) -> int:
    """Run the router role (``minidisagg serve --role router``) until SIGTERM/SIGINT; returns the exit code.

    ``security`` is what the router proves to the workers; its own client port speaks plain JSON lines.
    """
    from minidisagg.models.registry import load_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    prefill_addrs, decode_addrs = parse_router_peers(args.peers or "")
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, seed=args.seed,
                        random_weights=args.random_weights, weights=False)
    tokenizer: Optional[Tokenizer] = None
    try:
        tokenizer = loaded.tokenizer
    except Exception as exc:  # noqa: BLE001 - token-id requests still work without it
        log.warning("no tokenizer (%s): only prompt_token_ids requests are served, without text", exc)
    try:
        cluster = RemoteCluster(loaded, config, prefill_addrs, decode_addrs,
                                routing=args.routing, routing_load_weight=args.routing_load_weight,
                                kv_failure_policy=args.kv_failure_policy,
                                request_timeout_s=args.request_timeout_s,
                                clock_origin_s=args.clock_origin, security=security)
    except ConnectionError as exc:
        log.error("router could not start: %s", exc)
        return 1
    server = RouterServer(cluster, args.host, args.port, tokenizer, config.link.subscriber_queue_size,
                          config.link.max_connections, config.link.frame_deadline_s)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    server.start(Path(args.ready_file) if args.ready_file else None)
    log.info("router listening on %s:%d; prefill %s; decode %s", args.host, server.port, prefill_addrs, decode_addrs)
    while not done.wait(0.5) and server.fatal is None:
        pass
    server.stop()
    log.info("router stopped")
    return 1 if server.fatal is not None else 0

