"""Worker processes: a decode server and a prefill server speaking the socket protocol.

Who connects to whom (every connection starts with the proof of the deployment's shared secret,
``transport/auth.py``, over TLS where configured, then a HELLO carrying the model fingerprint):

- the router connects to each prefill server (role ``router``), says which router it is (REQUEST
  ``{"owner": token}``) and sends REQUEST frames (submissions, and ``{"abort": id}`` for its own
  requests only); the prefill server answers on that connection with TOKENS (a request that
  stopped at its first token) or ERROR (a request it could not hand over, or aborted);
- each prefill server connects to every decode server (role ``prefill``): the KV link;
- the router connects to each decode server (role ``router``), says which router it is (REQUEST
  ``{"owner": token}``, ``owners``) and receives TOKENS frames for its requests, the last one
  marked finished, token by token (``token_stream``); it may send REQUEST ``{"abort": id}`` for its
  own requests only.

Every REQUEST is checked field by field (``validate``) before the worker sees it. A bad one,
or a frame whose JSON header cannot be parsed, is answered with an ERROR naming the field, sent
to that router alone and carrying the request id where the frame had a usable one; the
connection stays open. A router's PING is answered, to it alone, with HEALTH
``{"healthy", "reason", "num_free_blocks", "num_blocks"}``. A prefill server answers a request
(ERROR, or TOKENS for one that stopped at its first token) to the router that sent it alone.

A frame from a router must arrive whole within ``LinkConfig.frame_deadline_s`` of its first
byte (a peer that sends half a frame and stalls is dropped), and each port serves at most
``LinkConfig.max_connections`` connections at once; one more gets an ERROR saying so.

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

from minidisagg.config import EngineConfig, LinkConfig
from minidisagg.disagg.decode_worker import DecodeWorker
from minidisagg.disagg.outbox import Subscribers
from minidisagg.disagg.owners import OwnerConnections
from minidisagg.disagg.prefill_requests import FailedRequest, Submission
from minidisagg.disagg.prefill_worker import PrefillWorker
from minidisagg.disagg.token_stream import DeltaFramer
from minidisagg.disagg.validate import (
    InvalidMessage,
    MessageLimits,
    check_decode_request,
    check_submission,
    request_id_in,
)
from minidisagg.engine.clock import WallClock
from minidisagg.engine.llm_engine import RequestOutput
from minidisagg.kv.pages import KVLayout
from minidisagg.plain import plain_dict
from minidisagg.models.registry import LoadedModel
from minidisagg.transport.auth import AuthError, LinkSecurity
from minidisagg.transport.framing import FrameError, FrameKind, HeaderError, PeerClosed, recv_frame, send_frame
from minidisagg.transport.backoff import ReconnectPolicy
from minidisagg.transport.handshake import server_handshake
from minidisagg.transport.kv_link import serve_kv_link
from minidisagg.transport.listener import REFUSAL_TIMEOUT_S, ConnectionLimit, accept_loop, listen
from minidisagg.transport.socket import SocketSender, make_hello, wait_readable

log = logging.getLogger(__name__)
HANDSHAKE_TIMEOUT_S = 10.0
SEND_TIMEOUT_S = 30.0
FLUSH_TIMEOUT_S = 1.0  # at stop, how long the outputs still queued for routers may take to leave


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

    def __init__(self, loaded: LoadedModel, layout: KVLayout, host: str, port: int, link: LinkConfig,
                 security: Optional[LinkSecurity] = None) -> None:
        self.security = security or LinkSecurity()  # subclasses check it first: LinkSecurity.check_listen
        self.hello = make_hello(self.role, loaded.config.fingerprint(), layout)
        self.server = listen(host, port)
        self.port = self.server.getsockname()[1]
        self.stop_event = threading.Event()
        self.subscribers = Subscribers(link.subscriber_queue_size, self.subscriber_dropped)
        self.frame_deadline_s = link.frame_deadline_s
        self.connections = ConnectionLimit(link.max_connections)  # served at once; ``serve_forever`` refuses more
        self.kv_wire_dtype = link.kv_wire_dtype  # how KV pages travel between prefill and decode
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
            self.connection_closed(sock)
            sock.close()

    def connection_closed(self, sock: socket.socket) -> None:
        """A connection ended (whatever its role): forget what was tied to it."""

    def refuse(self, sock: socket.socket, message: str) -> None:
        """Turn a connection away before its handshake (over ``max_connections``): an ERROR saying why.

        Over TLS nothing can be said before the TLS handshake, so the connection is only closed.
        """
        if self.security.tls_server is None:
            send_frame(sock, FrameKind.ERROR, {"message": message}, timeout_s=REFUSAL_TIMEOUT_S)

    def accepted_roles(self) -> set[str]:
        """Roles allowed to connect."""
        return {"router"}

    def subscriber_dropped(self, peer: str, reason: str, num_left: int) -> None:
        """A router fell behind on this worker's outputs and was dropped (``outbox``; already logged)."""

    def serve_role(self, role: str, sock: socket.socket, peer: str) -> None:
        """Serve one accepted connection."""
        raise NotImplementedError

    def serve_router(self, sock: socket.socket, peer: str,
                     on_request: Callable[[dict[str, Any], socket.socket], None]) -> None:
        """Subscribe a router to outputs and feed its REQUEST frames to ``on_request(header, sock)`` until it leaves.

        A frame begun must be whole within ``frame_deadline_s`` (TimeoutError: the connection is dropped).
        """
        self.subscribers.add(sock, peer)
        while wait_readable(sock, self.stop_event):
            try:
                frame = recv_frame(sock, max_payload_bytes=0, frame_deadline_s=self.frame_deadline_s)
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
                on_request(frame.header, sock)
            except ValueError as exc:  # one bad request: tell its sender alone, keep the connection
                rid = (exc.request_id if isinstance(exc, InvalidMessage) else None) or request_id_in(frame.header)
                self.subscribers.send_to(sock, FrameKind.ERROR, {"request_id": rid, "message": str(exc)})

    def serve_forever(self, ready_file: Optional[Path] = None) -> None:
        """Accept connections until stopped; writes the bound port to ``ready_file`` once listening."""
        if ready_file is not None:
            tmp = ready_file.with_suffix(".tmp")
            tmp.write_text(str(self.port))
            tmp.replace(ready_file)
        accept_loop(self.server, self.handle, self.stop_event, self.role, refuse=self.refuse, limit=self.connections)

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
        self.routers: OwnerConnections[socket.socket] = OwnerConnections()  # router connections by owner token
        self.worker = DecodeWorker("decode", loaded, config, clock or WallClock(), self._emit)
        self.worker.owner_connected = lambda token: bool(self.routers.connections(token))
        self.framer = DeltaFramer(output_to_dict, self._send_tokens)  # token by token, one frame per step (``token_stream``)
        self.worker.flush_outputs = self._flush
        super().__init__(loaded, self.worker.layout, host, port, config.link, security)
        self._watch_worker(self.worker)
        self.worker.start()

    def _emit(self, out: RequestOutput) -> None:
        """An output goes to its owner's connections (``owners``); one without an owner to every router
        connection that registered no owner token. Sent when the worker's step ends (``_flush``)."""
        self.framer.add(self.worker.owners.owner_of(out.request_id), out)

    def _flush(self) -> None:
        self.framer.flush()
        if len(self.worker.owners) + 64 < self.framer.num_streaming:  # requests aborted without a last output
            self.framer.forget(lambda rid: rid not in self.worker.owners)

    def _send_tokens(self, token: Optional[str], header: dict[str, Any]) -> None:
        if token is None:
            self.subscribers.send(FrameKind.TOKENS, header, exclude=self.routers.registered())
            return
        for conn in self.routers.connections(token):  # none left: the owner is gone (or reconnecting)
            self.subscribers.send_to(conn, FrameKind.TOKENS, header)

    def _on_router_request(self, header: dict[str, Any], sock: socket.socket) -> None:
        """``{"owner": token}``: this connection speaks for that router; ``{"abort": id}``: abort one of its requests."""
        what, value = check_decode_request(header)
        if what == "owner":
            self.routers.register(sock, value)
        else:
            self.worker.abort_as(value, self.routers.token_of(sock))  # NotOwner names the id; nothing is aborted

    def connection_closed(self, sock: socket.socket) -> None:
        """A router that closed its last connection has its requests aborted: nobody reads their outputs now."""
        token = self.routers.token_of(sock)
        self.routers.remove(sock)
        if token is None or self.routers.connections(token):
            return
        request_ids = self.worker.owners.held_by(token)
        for request_id in request_ids:
            self.worker.abort(request_id)
        if request_ids:
            log.warning("decode: a router left with %d request(s) decoding here; aborted them and freed their KV",
                        len(request_ids))

    def accepted_roles(self) -> set[str]:
        return {"router", "prefill"}

    def subscriber_dropped(self, peer: str, reason: str, num_left: int) -> None:
        """With no router left to read them, abort every request decoding here, so their KV blocks are freed."""
        if num_left:
            return
        # those decoding, and those committed but not adopted yet
        request_ids = sorted(set(self.worker.engine.request_ids()) | set(self.worker.owners.request_ids()))
        for request_id in request_ids:
            self.worker.abort(request_id)
        log.warning("decode: %s was the last router subscribed; aborted its %d request(s) and freed their KV",
                    peer, len(request_ids))

    def serve_role(self, role: str, sock: socket.socket, peer: str) -> None:
        if role == "prefill":
            serve_kv_link(sock, self.worker, self.worker.layout, self.stop_event, peer, wire_dtype=self.kv_wire_dtype)
        else:
            self.serve_router(sock, peer, self._on_router_request)

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
                                          heartbeat_s=heartbeat_s, wire_dtype=config.link.kv_wire_dtype) for name, (h, p) in decode_peers.items()}
        else:
            from minidisagg.transport.dist import DistSender

            if missing := sorted(set(decode_peers) - set(decode_ranks)):
                raise ValueError(f"no torch.distributed rank for decode worker(s) {missing}")
            senders = {name: DistSender(h, p, sender_hello, decode_ranks[name], security=security, reconnect=reconnect,
                                        heartbeat_s=heartbeat_s, wire_dtype=config.link.kv_wire_dtype) for name, (h, p) in decode_peers.items()}
        self.worker.senders.update(senders)
        self._submitters: dict[str, socket.socket] = {}  # request id -> the router connection that sent it
        self.routers: OwnerConnections[socket.socket] = OwnerConnections()  # router connections by owner token
        self._submit_lock = threading.Lock()
        super().__init__(loaded, layout, host, port, config.link, security)
        self.limits = MessageLimits(loaded.config.vocab_size, self.worker.engine.max_model_len)
        self._watch_worker(self.worker)
        self.worker.start()

    def _emit(self, item: RequestOutput | FailedRequest) -> None:
        """A request's last word here goes to the router that sent it (to every router if that is unknown)."""
        with self._submit_lock:
            sock = self._submitters.pop(item.request_id, None)
        if isinstance(item, FailedRequest):
            kind, header = FrameKind.ERROR, {"request_id": item.request_id, "message": item.error}
        else:
            kind, header = FrameKind.TOKENS, output_to_dict(item)
        if sock is not None:
            self.subscribers.send_to(sock, kind, header)
        else:
            self.subscribers.send(kind, header)

    def _on_request(self, header: dict[str, Any], sock: socket.socket) -> None:
        """A submission; or ``{"owner": token}`` (this connection speaks for that router), ``{"abort": id}``."""
        if isinstance(header, dict) and ("abort" in header or "owner" in header):
            what, value = check_decode_request(header)
            if what == "owner":
                self.routers.register(sock, value)
            else:
                self.worker.abort_as(value, self.routers.token_of(sock))  # NotOwner names the id; nothing is aborted
            return
        sub = check_submission(header, self.limits, self.worker.engine.clock.now(), self.worker.senders)
        with self._submit_lock:  # the worker may answer before submit returns: note the sender first
            for rid in [rid for rid in self._submitters if not self.worker.holds(rid)]:
                del self._submitters[rid]  # handed over to its decode worker: nothing more to say here
            if sub.request_id in self._submitters:
                raise InvalidMessage("request_id", f"{sub.request_id!r} is already in flight on this prefill worker",
                                     sub.request_id)
            self._submitters[sub.request_id] = sock
            try:
                self.worker.engine.tokenize_prompt({"prompt_token_ids": sub.prompt_token_ids})  # fits the KV pool
                self.worker.submit(sub)
            except ValueError as exc:
                self._submitters.pop(sub.request_id, None)
                if isinstance(exc, InvalidMessage):
                    raise
                raise InvalidMessage("submission", str(exc), sub.request_id) from None

    def serve_role(self, role: str, sock: socket.socket, peer: str) -> None:
        self.serve_router(sock, peer, self._on_request)

    def connection_closed(self, sock: socket.socket) -> None:
        """Forget the connection's owner registration (its requests still reach their decode workers)."""
        self.routers.remove(sock)

    def stop(self) -> None:
        super().stop()
        self.worker.stop()
        for sender in self.worker.senders.values():
            sender.close()
