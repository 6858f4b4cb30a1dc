"""The router process: JSON lines over TCP in front of running prefill and decode servers.

Clients send one JSON object per line (UTF-8, at most 1 MiB, ending in a newline)::

    {"id": "a", "prompt": "Hello", "max_tokens": 8, "temperature": 0}
    {"prompt_token_ids": [1, 2, 3]}          {"messages": [{"role": "user", "content": "Hi"}]}

Exactly one of ``prompt``, ``prompt_token_ids``, ``messages`` (chat template applied); optional
``id`` (a string; default ``"#N"``, N the line's number on the connection) and the sampling
fields ``max_tokens temperature top_p top_k seed stop stop_token_ids ignore_eos`` with
``SamplingParams``' defaults (temperature 1.0, max_tokens 16). Unknown fields are errors.
The router answers with lines carrying the request's ``id``::

    {"id": "a", "token_ids": [new ids], "text": "new text", "finished": false}      (as tokens come)
    {"id": "a", "finished": true, "finish_reason": "length", "token_ids": [all], "text": "all",
     "metrics": {"ttft_s", "tpot_s", "e2e_s", "num_output_tokens", "prefill_s", "decode_s",
                 "kv_transfer_bytes", "kv_transfer_s"}}
    {"id": "a", "finished": true, "finish_reason": "error", "error": "why"}         (bad line or failure)

Many requests may be in flight on one connection (give them ids); a bad line gets an error line
and the connection stays open. Input EOF (half-close) is fine: the connection closes once its
requests finish. A client that goes away (or reads nothing for 30 s) has its requests aborted.
``ttft_s``/``tpot_s``/``e2e_s`` are measured by the router; ``kv_transfer_s`` is null unless
every process got the same ``--clock-origin`` (workers' clocks are compared only then).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import queue
import select
import signal
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

from minidisagg.config import CacheConfig, EngineConfig
from minidisagg.disagg.cluster import DisaggCluster
from minidisagg.disagg.launch import RemoteWorker
from minidisagg.disagg.prefill_worker import Submission
from minidisagg.engine.clock import WallClock
from minidisagg.engine.llm_engine import RequestOutput
from minidisagg.engine.sampling import SamplingParams
from minidisagg.kv.pages import KVLayout
from minidisagg.models.registry import LoadedModel
from minidisagg.models.tokenizer import IncrementalDetokenizer, Tokenizer
from minidisagg.transport.framing import FrameError
from minidisagg.transport.socket import accept_loop, listen, make_hello

log = logging.getLogger(__name__)
MAX_LINE_BYTES = 1 << 20
SEND_TIMEOUT_S = 30.0
IDLE_WAIT_S = 0.2
PEERS_EXAMPLE = "prefill=p0@127.0.0.1:7001,p1@10.0.0.2:7002;decode=d0@127.0.0.1:7101"
SAMPLING_TYPES: dict[str, Any] = {"max_tokens": int, "temperature": (int, float), "top_p": (int, float), "top_k": int,
                                  "seed": int, "stop": (str, list), "stop_token_ids": list, "ignore_eos": bool}
PROMPT_FIELDS = ("prompt", "prompt_token_ids", "messages")
REQUEST_FIELDS = ("id", *PROMPT_FIELDS, *SAMPLING_TYPES)
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
            host, _, port = address.rpartition(":")
            host = host.strip("[]")
            if not name or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"router --peers entries look like name@host:port, got {entry!r} "
                                 f"(example: {PEERS_EXAMPLE!r})")
            if name in addrs:
                raise ValueError(f"router --peers names {role} worker {name!r} twice")
            addrs[name] = (host, int(port))
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
                 connect_timeout_s: float = 30.0) -> None:
        if not prefill_addrs or not decode_addrs:
            raise ValueError("a RemoteCluster needs at least one prefill and one decode address")
        self.prefill_addrs, self.decode_addrs = dict(prefill_addrs), dict(decode_addrs)
        self.clock_origin_s = clock_origin_s
        self.connect_timeout_s = connect_timeout_s
        super().__init__(loaded, config, transport="socket", num_prefill=len(prefill_addrs),
                         num_decode=len(decode_addrs), routing=routing, kv_failure_policy=kv_failure_policy,
                         request_timeout_s=request_timeout_s, max_attempts=max_attempts)

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
                        workers.append(RemoteWorker(name, host, port, hello, self._outputs, self.connect_timeout_s))
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


class BadRequest(ValueError):
    """A client line the router cannot serve; ``request_id`` is the id to answer with."""

    def __init__(self, request_id: str, message: str) -> None:
        super().__init__(message)
        self.request_id = request_id


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def parse_request(line: bytes, default_id: str,
                  tokenizer: Optional[Tokenizer]) -> tuple[str, dict[str, Any], SamplingParams]:
    """One client line -> (id, engine prompt ``{"prompt_token_ids", "prompt"}``, params); BadRequest says why not."""
    try:
        obj = json.loads(line, parse_constant=_reject_constant)
    except ValueError as exc:  # also UnicodeDecodeError
        raise BadRequest(default_id, f"not a JSON line: {exc}") from None
    if not isinstance(obj, dict):
        raise BadRequest(default_id, f"a request is a JSON object, got {type(obj).__name__}")
    rid = obj.get("id", default_id)
    if not isinstance(rid, str) or not rid:
        raise BadRequest(default_id, f"id must be a non-empty string, got {rid!r}")
    unknown = sorted(set(obj) - set(REQUEST_FIELDS))
    if unknown:
        raise BadRequest(rid, f"unknown field(s) {unknown}; known: {list(REQUEST_FIELDS)}")
    kwargs = {}
    for name, kinds in SAMPLING_TYPES.items():
        value = obj.get(name)
        if value is not None and (not isinstance(value, kinds) or (isinstance(value, bool) and kinds is not bool)):
            raise BadRequest(rid, f"{name} has the wrong type: {value!r}")
        if value is not None:
            kwargs[name] = value
    try:
        params = SamplingParams(**kwargs)
    except (ValueError, TypeError) as exc:
        raise BadRequest(rid, str(exc)) from None
    given = [f for f in PROMPT_FIELDS if f in obj]
    if len(given) != 1:
        raise BadRequest(rid, f"give exactly one of {list(PROMPT_FIELDS)}, got {given}")
    value = obj[given[0]]
    if given[0] == "prompt_token_ids":
        if not isinstance(value, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in value):
            raise BadRequest(rid, "prompt_token_ids must be a list of integers")
        return rid, {"prompt_token_ids": value, "prompt": None}, params
    if tokenizer is None:
        raise BadRequest(rid, "this router has no tokenizer: send prompt_token_ids")
    try:
        if given[0] == "prompt":
            if not isinstance(value, str):
                raise ValueError("prompt must be a string")
            return rid, {"prompt_token_ids": tokenizer.encode(value), "prompt": value}, params
        if not isinstance(value, list) or not value or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in value):
            raise ValueError("messages must be a non-empty list of {'role': str, 'content': str}")
        text = tokenizer.apply_chat_template(value, tokenize=False)
        return rid, {"prompt_token_ids": tokenizer.encode(str(text)), "prompt": text}, params
    except ValueError as exc:  # TokenizerError is a ValueError
        raise BadRequest(rid, str(exc)) from None


def error_line(request_id: Optional[str], message: str) -> dict[str, Any]:
    """The final line of a request that failed (or a line that was not a request)."""
    return {"id": request_id, "finished": True, "finish_reason": "error", "error": message}


class _Client:
    """One client connection: a reader thread (lines in), a writer thread (its outbox out)."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock, self.peer = sock, peer
        self.outbox: queue.Queue[Optional[dict[str, Any]]] = queue.Queue()
        self.inflight: dict[str, str] = {}  # client id -> request id (under RouterServer.lock)
        self.closed = threading.Event()
        self.input_done = False
        self.writer: Optional[threading.Thread] = None

    def send(self, message: dict[str, Any]) -> None:
        """Queue a line for this client (dropped once the connection is closed)."""
        if not self.closed.is_set():
            self.outbox.put(message)

    def close(self) -> None:
        """Close after the queued lines are written (safe to call twice)."""
        if not self.closed.is_set():
            self.closed.set()
            self.outbox.put(None)


class _Stream:
    """One request as its client sees it: ids and text sent so far, token arrival times at the router."""

    def __init__(self, client: _Client, client_id: str, prompt_ids: list[int], params: SamplingParams,
                 tokenizer: Optional[Tokenizer], shared_clock: bool) -> None:
        self.client, self.client_id, self.params, self.shared_clock = client, client_id, params, shared_clock
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids) if tokenizer is not None else None
        self.arrival_s = time.perf_counter()
        self.token_ids: list[int] = []
        self.token_times_s: list[float] = []
        self.raw_text = ""
        self.sent_text = ""

    def _visible_text(self, finished: bool) -> str:
        text = self.raw_text
        hits = [text.find(s) for s in self.params.stop or [] if s in text]
        if hits:
            return text[:min(hits)]
        hold = 0 if finished else max((len(s) - 1 for s in self.params.stop or []), default=0)
        return text[:len(text) - hold]  # a stop string may be forming in the last chars: hold them back

    def update(self, out: RequestOutput, now_s: float) -> list[dict[str, Any]]:
        """The lines an output means for the client: new tokens and text, then the final line if finished."""
        if out.error is not None:
            return [error_line(self.client_id, out.error)]
        new = out.token_ids[len(self.token_ids):]
        self.token_ids += new
        self.token_times_s += [now_s] * len(new)
        if self.detok is not None:
            self.raw_text += "".join(self.detok.push(t) for t in new) + (self.detok.flush() if out.finished else "")
        text = self._visible_text(out.finished)
        delta, self.sent_text = text[len(self.sent_text):], text
        lines = []
        if new or delta:
            lines.append({"id": self.client_id, "token_ids": new, "text": delta if self.detok else None,
                          "finished": False})
        if out.finished:
            lines.append({"id": self.client_id, "finished": True, "finish_reason": out.finish_reason,
                          "token_ids": list(self.token_ids), "text": text if self.detok else None,
                          "metrics": self._metrics(out, now_s)})
        return lines

    def _metrics(self, out: RequestOutput, now_s: float) -> dict[str, Any]:
        times, tl = self.token_times_s, out.timeline

        def span(start: Optional[float], end: Optional[float]) -> Optional[float]:
            return None if start is None or end is None else end - start

        return {"ttft_s": times[0] - self.arrival_s if times else None,
                "tpot_s": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0,
                "e2e_s": now_s - self.arrival_s, "num_output_tokens": len(times),
                "prefill_s": span(tl.prefill_start_s, tl.prefill_end_s),
                "decode_s": span(tl.decode_start_s, tl.finish_s),
                "kv_transfer_bytes": tl.kv_transfer_bytes,
                "kv_transfer_s": span(tl.transfer_start_s, tl.transfer_end_s) if self.shared_clock else None}


def _read_lines(sock: socket.socket, closed: threading.Event) -> Iterator[Optional[bytes]]:
    """A client's lines until EOF or ``closed``; None stands for a line over MAX_LINE_BYTES (then skipped)."""
    buf, skipping = bytearray(), False
    while not closed.is_set():
        if not select.select([sock], [], [], IDLE_WAIT_S)[0]:
            continue
        chunk = sock.recv(1 << 16)
        if not chunk:
            return
        buf += chunk
        while (nl := buf.find(b"\n")) >= 0:
            line, was_skipping, skipping = bytes(buf[:nl]), skipping, False
            del buf[:nl + 1]
            if not was_skipping:
                yield line if len(line) <= MAX_LINE_BYTES else None
        if len(buf) > MAX_LINE_BYTES:
            if not skipping:
                yield None
            skipping = True
            buf.clear()


class RouterServer:
    """Accepts clients, submits their requests to the cluster, and streams outputs back.

    One driver thread owns ``cluster.step()``; client threads call ``add_request`` under the
    same lock, which also guards the request table, so no output can outrun its registration.
    """

    def __init__(self, cluster: RemoteCluster, host: str = "127.0.0.1", port: int = 0,
                 tokenizer: Optional[Tokenizer] = None) -> None:
        self.cluster, self.tokenizer = cluster, tokenizer
        self.listener = listen(host, port)
        self.port: int = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.streams: dict[str, _Stream] = {}
        self.clients: set[_Client] = set()
        self.stop_event, self.work = threading.Event(), threading.Event()
        self.fatal: Optional[str] = None
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]  # request ids stay unique if other routers share the workers
        self._threads: list[threading.Thread] = []

    def start(self, ready_file: Optional[Path] = None) -> None:
        """Start the driver and accept loop; then write the bound port to ``ready_file``."""
        accept_args = (self.listener, self._serve_client, self.stop_event, "router")
        for name, target, args in (("driver", self._drive, ()), ("accept", accept_loop, accept_args)):
            thread = threading.Thread(target=target, args=args, name=f"router-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if ready_file is not None:
            tmp = ready_file.with_suffix(".tmp")
            tmp.write_text(str(self.port))
            tmp.replace(ready_file)

    # ---- client connections ----------------------------------------------------------------------
    def _serve_client(self, sock: socket.socket, peer: str) -> None:
        sock.settimeout(SEND_TIMEOUT_S)
        client = _Client(sock, peer)
        with self.lock:
            self.clients.add(client)
        client.writer = threading.Thread(target=self._write_loop, args=(client,), name=f"router-out-{peer}",
                                         daemon=True)
        client.writer.start()
        try:
            for line_no, line in enumerate(_read_lines(sock, client.closed), start=1):
                if line is None:
                    client.send(error_line(f"#{line_no}", f"line longer than {MAX_LINE_BYTES} bytes"))
                elif line.strip():
                    self._submit(client, line, f"#{line_no}")
        except (OSError, ValueError) as exc:  # reset by the client, or closed under us
            self._drop(client, f"read failed: {exc}")
            return
        with self.lock:
            client.input_done = True
            idle = not client.inflight
        if idle:
            client.close()

    def _write_loop(self, client: _Client) -> None:
        try:
            while (message := client.outbox.get()) is not None:
                client.sock.sendall(json.dumps(message).encode() + b"\n")
        except OSError as exc:
            self._drop(client, f"write failed: {exc}")
        finally:
            client.sock.close()
            with self.lock:
                self.clients.discard(client)

    def _submit(self, client: _Client, line: bytes, default_id: str) -> None:
        try:
            client_id, prompt, params = parse_request(line, default_id, self.tokenizer)
            stream = _Stream(client, client_id, prompt["prompt_token_ids"], params, self.tokenizer,
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
                self.streams[request_id] = stream
                client.inflight[client_id] = request_id
        except BadRequest as exc:
            client.send(error_line(exc.request_id, str(exc)))
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
                        stream = self.streams.get(out.request_id)
                        if stream is None:
                            continue
                        for message in stream.update(out, now_s):
                            stream.client.send(message)
                        if out.finished:
                            del self.streams[out.request_id]
                            client = stream.client
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
            for request_id, stream in streams:
                self.cluster.abort(request_id)
                stream.client.inflight.pop(stream.client_id, None)
            clients = list(self.clients)
            for _, stream in streams:
                stream.client.send(error_line(stream.client_id, message))
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
            if client.writer is not None:
                client.writer.join(max(0.0, deadline - time.monotonic()))
        self.cluster.shutdown(timeout_s / 2)


def serve_router(args: argparse.Namespace) -> int:
    """Run the router role (``minidisagg serve --role router``) until SIGTERM/SIGINT; returns the exit code."""
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
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          batch_invariant=args.batch_invariant,
                          cache=CacheConfig(block_size=args.block_size, num_blocks=args.num_kv_blocks))
    try:
        cluster = RemoteCluster(loaded, config, prefill_addrs, decode_addrs,
                                routing=args.routing,
                                kv_failure_policy=args.kv_failure_policy,
                                request_timeout_s=args.request_timeout_s,
                                clock_origin_s=args.clock_origin)
    except ConnectionError as exc:
        log.error("router could not start: %s", exc)
        return 1
    server = RouterServer(cluster, args.host, args.port, tokenizer)
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


def stream_request(host: str, port: int, request: dict[str, Any], timeout_s: float = 60.0) -> Iterator[dict[str, Any]]:
    """Send one request to a router and yield its reply lines, the final one (``finished``) last."""
    deadline = time.monotonic() + timeout_s
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.sendall(json.dumps(request).encode() + b"\n")
        reader = sock.makefile("rb")
        while True:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                line = reader.readline()
            except socket.timeout:
                raise TimeoutError(f"no final reply from the router at {host}:{port} within {timeout_s} s") from None
            if not line:
                raise ConnectionError(f"the router at {host}:{port} closed the connection before the final reply")
            message = json.loads(line)
            yield message
            if message.get("finished"):
                return
