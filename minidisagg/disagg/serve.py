"""Worker processes: a decode server and a prefill server speaking the socket protocol.

Who connects to whom (every connection starts with the proof of the deployment's shared secret,
``transport/auth.py``, over TLS where configured, then a HELLO carrying the model fingerprint):

- the router connects to each prefill server (role ``router``) and sends REQUEST frames;
  the prefill server answers on that connection with TOKENS (a request that stopped at its
  first token) or ERROR (a request it could not hand over);
- each prefill server connects to every decode server (role ``prefill``): the KV link;
- the router connects to each decode server (role ``router``) and receives TOKENS frames,
  one per new token, the last one marked finished; it may send REQUEST {"abort": id}.

Every REQUEST is checked field by field (``validate``) before the worker sees it. A bad one,
or a frame whose JSON header cannot be parsed, is answered with an ERROR naming the field, sent
to that router alone and carrying the request id where the frame had a usable one; the
connection stays open. A router's PING is answered, to it alone, with HEALTH
``{"healthy", "reason", "num_free_blocks", "num_blocks"}``.

Health (``health`` says why this design): when a worker's engine loop dies, the server sends
every router an unasked HEALTH ``{"healthy": false, "reason": ...}`` before the worker fails the
requests it held, and ``failed`` turns true; ``minidisagg serve`` then exits non-zero.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
from pathlib import Path
from typing import Any, Callable, Optional

from minidisagg.config import EngineConfig
from minidisagg.disagg.decode_worker import DecodeWorker
from minidisagg.disagg.outbox import Subscribers
from minidisagg.disagg.prefill_worker import FailedRequest, PrefillWorker, Submission
from minidisagg.disagg.validate import InvalidMessage, MessageLimits, check_abort, check_submission, request_id_in
from minidisagg.engine.clock import WallClock
from minidisagg.engine.llm_engine import RequestOutput
from minidisagg.kv.pages import KVLayout
from minidisagg.plain import plain_dict
from minidisagg.models.registry import LoadedModel
from minidisagg.transport.auth import AuthError, LinkSecurity
from minidisagg.transport.framing import FrameError, FrameKind, HeaderError, PeerClosed, recv_frame
from minidisagg.transport.backoff import ReconnectPolicy
from minidisagg.transport.handshake import server_handshake
from minidisagg.transport.kv_link import serve_kv_link
from minidisagg.transport.socket import (
    SocketSender,
    accept_loop,
    listen,
    make_hello,
    wait_readable,
)

log = logging.getLogger(__name__)
HANDSHAKE_TIMEOUT_S = 10.0
SEND_TIMEOUT_S = 30.0
FLUSH_TIMEOUT_S = 1.0  # at stop, how long the outputs still queued for routers may take to leave
STREAM_EVERY_TOKENS = 8  # a decode server streams a request's output every this many tokens (and when it ends)


def output_to_dict(out: RequestOutput) -> dict[str, Any]:
    """A RequestOutput as a JSON-friendly dict (the router recomputes metrics from the timeline: ``validate.check_output``)."""
    d = {f.name: getattr(out, f.name) for f in dataclasses.fields(out) if f.name != "metrics"}
    d["timeline"] = plain_dict(out.timeline)
    return d


def submission_to_dict(sub: Submission) -> dict[str, Any]:
    """A Submission as a JSON-friendly dict."""
    return plain_dict(sub)


class WorkerServer:
    """Shared skeleton: listen, handshake every connection, dispatch it by role."""

    role = "worker"
    worker: DecodeWorker | PrefillWorker

    def __init__(self, loaded: LoadedModel, layout: KVLayout, host: str, port: int, queue_size: int,
                 security: Optional[LinkSecurity] = None) -> None:
        self.security = security or LinkSecurity()  # subclasses check it first: LinkSecurity.check_listen
        self.hello = make_hello(self.role, loaded.config.fingerprint(), layout)
        self.server = listen(host, port)
        self.port = self.server.getsockname()[1]
        self.stop_event = threading.Event()
        self.subscribers = Subscribers(queue_size, self.subscriber_dropped)
        self.failure: Optional[str] = None  # why the engine loop died, once it has

    @property
    def failed(self) -> bool:
        """Whether the worker's engine loop died and the requests it held were failed."""
        return self.worker.health.dead.is_set()

    def _watch_worker(self, worker: DecodeWorker | PrefillWorker) -> None:
        """Announce the worker's death to every router (HEALTH) before it fails its requests."""
        def unhealthy(reason: str) -> None:
            self.failure = reason
            self.subscribers.send(FrameKind.HEALTH, {"healthy": False, "reason": reason})

        worker.health.on_unhealthy = unhealthy

    def health(self) -> dict[str, Any]:
        """This worker's HEALTH header: alive or not, why not, and its KV pool."""
        blocks = self.worker.engine.blocks
        return {"healthy": self.worker.health.healthy, "reason": self.failure, "num_free_blocks": blocks.num_free_blocks,
                "num_blocks": blocks.num_blocks}

    def handle(self, sock: socket.socket, peer: str) -> None:
        """TLS (if set), authentication and handshake, then serve the connection by the peer's role.

        Errors drop only this connection; a peer that fails authentication is logged with its address.
        """
        try:
            sock = self.security.wrap_server(sock, HANDSHAKE_TIMEOUT_S, peer)
            theirs = server_handshake(sock, self.hello, HANDSHAKE_TIMEOUT_S, self.accepted_roles(),
                                      secret=self.security.secret)
            # Fixed for the connection's life: a reader and other writers share this socket.
            sock.settimeout(SEND_TIMEOUT_S)
            self.serve_role(theirs.role, sock, peer)
        except AuthError as exc:
            log.warning("%s: refused %s: %s", self.role, peer, exc)
        except (ConnectionError, FrameError, OSError, TimeoutError) as exc:
            log.warning("%s: connection from %s dropped: %s", self.role, peer, exc)
        except Exception:  # noqa: BLE001 - a bug on one connection must not leak its socket or thread
            log.exception("%s: connection from %s failed", self.role, peer)
        finally:
            self.subscribers.remove(sock)
            sock.close()

    def accepted_roles(self) -> set[str]:
        """Roles allowed to connect."""
        return {"router"}

    def subscriber_dropped(self, peer: str, reason: str, num_left: int) -> None:
        """A router fell behind on this worker's outputs and was dropped (``outbox``; already logged)."""

    def serve_role(self, role: str, sock: socket.socket, peer: str) -> None:
        """Serve one accepted connection."""
        raise NotImplementedError

    def serve_router(self, sock: socket.socket, peer: str, on_request: Callable[[dict[str, Any]], None]) -> None:
        """Subscribe a router to outputs and feed its REQUEST frames to ``on_request`` until it leaves."""
        self.subscribers.add(sock, peer)
        while wait_readable(sock, self.stop_event):
            try:
                frame = recv_frame(sock, None, max_payload_bytes=0)
            except PeerClosed:
                return
            except HeaderError as exc:  # read whole, so the connection is still in step: say why, go on
                self.subscribers.send_to(sock, FrameKind.ERROR, {"request_id": None, "message": f"header: {exc}"})
                continue
            if frame.kind == FrameKind.BYE:
                return
            if frame.kind == FrameKind.PING:
                self.subscribers.send_to(sock, FrameKind.HEALTH, self.health())
                continue
            if frame.kind != FrameKind.REQUEST:
                raise FrameError(f"unexpected {frame.kind.name} frame from a router")
            try:
                on_request(frame.header)
            except ValueError as exc:  # one bad request: tell its sender alone, keep the connection
                rid = (exc.request_id if isinstance(exc, InvalidMessage) else None) or request_id_in(frame.header)
                self.subscribers.send_to(sock, FrameKind.ERROR, {"request_id": rid, "message": str(exc)})

    def serve_forever(self, ready_file: Optional[Path] = None) -> None:
        """Accept connections until stopped; writes the bound port to ``ready_file`` once listening."""
        if ready_file is not None:
            tmp = ready_file.with_suffix(".tmp")
            tmp.write_text(str(self.port))
            tmp.replace(ready_file)
        accept_loop(self.server, self.handle, self.stop_event, self.role)

    def stop(self) -> None:
        """Stop accepting and close the listener; what routers are still owed goes out first (briefly)."""
        self.subscribers.close(FLUSH_TIMEOUT_S)
        self.stop_event.set()
        self.server.close()


class DecodeServer(WorkerServer):
    """A DecodeWorker behind a socket: KV links from prefill servers, outputs to routers."""

    role = "decode"

    def __init__(self, loaded: LoadedModel, config: EngineConfig, host: str = "127.0.0.1", port: int = 0,
                 clock: Optional[WallClock] = None, security: Optional[LinkSecurity] = None) -> None:
        """``security``: the secret (and TLS) peers must prove; None: none, allowed on loopback only."""
        (security or LinkSecurity()).check_listen(host, self.role)  # no secret beyond loopback: refused here
        self.worker = DecodeWorker("decode", loaded, config, clock or WallClock(), self._emit)
        super().__init__(loaded, self.worker.layout, host, port, config.link.subscriber_queue_size, security)
        self._watch_worker(self.worker)
        self.worker.start()

    def _emit(self, out: RequestOutput) -> None:
        # Each frame carries the whole output so far; sending one per token would make the decode loop
        # pay O(n^2) encoding per request. Stream every STREAM_EVERY_TOKENS tokens, and always the last.
        if out.finished or len(out.token_ids) % STREAM_EVERY_TOKENS == 1:
            self.subscribers.send(FrameKind.TOKENS, output_to_dict(out))

    def accepted_roles(self) -> set[str]:
        return {"router", "prefill"}

    def subscriber_dropped(self, peer: str, reason: str, num_left: int) -> None:
        """With no router left to read them, abort every request decoding here, so their KV blocks are freed."""
        if num_left:
            return
        request_ids = self.worker.engine.request_ids()
        for request_id in request_ids:
            self.worker.abort(request_id)
        log.warning("decode: %s was the last router subscribed; aborted its %d request(s) and freed their KV",
                    peer, len(request_ids))

    def serve_role(self, role: str, sock: socket.socket, peer: str) -> None:
        if role == "prefill":
            serve_kv_link(sock, self.worker, self.worker.layout, self.stop_event, peer)
        else:
            self.serve_router(sock, peer, lambda h: self.worker.abort(check_abort(h)))

    def stop(self) -> None:
        super().stop()
        self.worker.stop()


class PrefillServer(WorkerServer):
    """A PrefillWorker behind a socket: requests from routers, KV out to decode servers."""

    role = "prefill"

    def __init__(self, loaded: LoadedModel, config: EngineConfig, decode_peers: dict[str, tuple[str, int]],
                 host: str = "127.0.0.1", port: int = 0, overlap: bool = False,
                 clock: Optional[WallClock] = None, decode_ranks: Optional[dict[str, int]] = None,
                 security: Optional[LinkSecurity] = None) -> None:
        """``decode_ranks`` (name -> torch.distributed rank) switches the KV links to the dist transport.

        ``security``: the secret (and TLS) of the deployment, proved to decode servers and asked of routers.
        """
        (security or LinkSecurity()).check_listen(host, self.role)  # no secret beyond loopback: refused here
        self.worker = PrefillWorker("prefill", loaded, config, clock or WallClock(), {}, self._emit, overlap=overlap)
        layout = KVLayout.of(self.worker.engine.kv_cache)
        sender_hello = make_hello("prefill", loaded.config.fingerprint(), layout)
        senders: dict[str, SocketSender]
        reconnect, heartbeat_s = ReconnectPolicy.of(config.link), config.link.kv_lease_s / 3  # see ``LinkConfig``
        if decode_ranks is None:
            senders = {name: SocketSender(h, p, sender_hello, security=security, reconnect=reconnect,
                                          heartbeat_s=heartbeat_s) for name, (h, p) in decode_peers.items()}
        else:
            from minidisagg.transport.dist import DistSender

            if missing := sorted(set(decode_peers) - set(decode_ranks)):
                raise ValueError(f"no torch.distributed rank for decode worker(s) {missing}")
            senders = {name: DistSender(h, p, sender_hello, decode_ranks[name], security=security, reconnect=reconnect,
                                        heartbeat_s=heartbeat_s) for name, (h, p) in decode_peers.items()}
        self.worker.senders.update(senders)
        super().__init__(loaded, layout, host, port, config.link.subscriber_queue_size, security)
        self.limits = MessageLimits(loaded.config.vocab_size, self.worker.engine.max_model_len)
        self._watch_worker(self.worker)
        self.worker.start()

    def _emit(self, item: RequestOutput | FailedRequest) -> None:
        if isinstance(item, FailedRequest):
            self.subscribers.send(FrameKind.ERROR, {"request_id": item.request_id, "message": item.error})
        else:
            self.subscribers.send(FrameKind.TOKENS, output_to_dict(item))

    def _on_request(self, header: dict[str, Any]) -> None:
        sub = check_submission(header, self.limits, self.worker.engine.clock.now(), self.worker.senders)
        try:
            self.worker.engine.tokenize_prompt({"prompt_token_ids": sub.prompt_token_ids})  # fits the KV pool
            self.worker.submit(sub)
        except InvalidMessage:
            raise
        except ValueError as exc:
            raise InvalidMessage("submission", str(exc), sub.request_id) from None

    def serve_role(self, role: str, sock: socket.socket, peer: str) -> None:
        self.serve_router(sock, peer, self._on_request)

    def stop(self) -> None:
        super().stop()
        self.worker.stop()
        for sender in self.worker.senders.values():
            sender.close()
