"""TCP transport: KV pages cross a real socket between processes (or hosts), by layer or all layers at once.

The prefill side holds a ``SocketSender`` per decode worker; the decode side runs
``kv_link.serve_kv_link`` for each prefill connection. Frames are those of ``framing``: RESERVE ->
GRANT, LAYER (payload = one layer's pages, or with ``num_layers`` that many consecutive
layers stacked; with ``via: dist`` the pages follow by
torch.distributed instead, see ``dist.py``), DONE -> ACK, CANCEL. A malformed frame or a
dead peer drops that one connection, and every reservation it held goes back to the pool. A
RESERVE or DONE the receiver refuses (a bad field, a full or unhealthy worker, a peer over its
quota) is answered with an ERROR naming the reason, and the link stays up; a refused DONE gives
its reservation back. A connection that breaks is re-established (``SocketSender``).

With a quantised ``wire_dtype`` a LAYER's payload is a ``WireMessage`` (scales, then int8 or
fp8 values) and its header says ``"wire_dtype"``; ``shape`` and ``dtype`` stay those of the
pages it decodes to. A header without ``wire_dtype`` carries the pages as they are (``auto``).
"""

from __future__ import annotations

import logging
import random
import select
import socket
import threading
import time
from typing import Any, Optional, Sequence

import torch

from minidisagg.engine.sequence import SequenceState
from minidisagg.kv.pages import KV_LAYOUT_NAME, KVLayout
from minidisagg.kv.wire_quant import WireMessage
from minidisagg.transport.auth import LinkSecurity
from minidisagg.transport.backoff import ReconnectPolicy
from minidisagg.transport.base import HEARTBEAT_S, KVSender, TransferError
from minidisagg.transport.framing import Frame, FrameError, FrameKind, recv_frame, send_frame
from minidisagg.transport.handshake import Hello, open_link

log = logging.getLogger(__name__)
FRAME_TIMEOUT_S = 30.0


def make_hello(role: str, fingerprint: str, layout: KVLayout) -> Hello:
    """The Hello a worker of ``role`` sends or expects for this model and KV layout."""
    return Hello(role=role, fingerprint=fingerprint, dtype=layout.dtype_name, block_size=layout.block_size,
                 kv_layout=KV_LAYOUT_NAME)


class SocketSender(KVSender):
    """One TCP link from a prefill worker to a decode worker (thread-safe; one exchange at a time).

    A link that breaks heals: a thread reconnects with backoff (``reconnect``, see ``backoff``).
    Transfers reserved over the broken connection fail (the decode side freed their blocks when it
    saw the connection drop); while the link heals, ``reserve_many`` answers "not now", so new
    requests wait for the healed link as they wait for a full pool; past the policy's deadline the
    link is down for good and every call fails. ``renew_leases`` is the prefill loop's heartbeat
    for the transfers reserved here; the decode side's unasked notices (an expired lease: ERROR
    with ``event``) are noted and fail that transfer's next call.
    """

    name = "socket"

    def __init__(self, host: str, port: int, hello: Hello, timeout_s: float = FRAME_TIMEOUT_S,
                 connect_retries: int = 50, security: Optional[LinkSecurity] = None,
                 reconnect: Optional[ReconnectPolicy] = None, heartbeat_s: float = HEARTBEAT_S,
                 wire_dtype: str = "auto") -> None:
        """``security``: the deployment's secret (and TLS) this link proves and checks, again on every
        reconnect; None: neither. ``reconnect``: how a broken link heals; ``heartbeat_s``: how often
        leases are renewed; ``wire_dtype``: how pages travel (``KVSender``)."""
        super().__init__(wire_dtype)
        self.host, self.port, self.hello = host, port, hello
        self.security = security or LinkSecurity()
        self.address = f"{host}:{port}"
        self.timeout_s = timeout_s
        self.reconnect = reconnect if reconnect is not None else ReconnectPolicy()
        self.heartbeat_s = heartbeat_s
        self._next_heartbeat_s = 0.0
        self._lock = threading.Lock()
        self.sock, _ = open_link(host, port, hello, self.security, timeout_s, retries=connect_retries)
        self._broken: Optional[str] = None
        self._gave_up = False  # no reconnect within the deadline (or none allowed): down for good
        self._transfers: set[str] = set()  # granted over the current connection, not yet committed or cancelled
        self._notices: dict[str, str] = {}  # transfer id -> what the decode side said unasked (lease expired)
        self._closing = threading.Event()
        self._healer: Optional[threading.Thread] = None
        self.num_reconnects = 0

    # ---- the connection and its healing -------------------------------------------------------
    @property
    def is_broken(self) -> bool:
        """Whether the link is down for good (broken, and not healing)."""
        return self._broken is not None and self._gave_up

    @property
    def is_healing(self) -> bool:
        """Whether the link is down right now and being re-established."""
        return self._broken is not None and not self._gave_up

    def _fail(self, exc: BaseException) -> TransferError:
        """The current connection broke (lock held): close it, forget its transfers, start healing."""
        self._broken = str(exc)
        self._transfers.clear()
        self._notices.clear()
        self.sock.close()
        if not self.reconnect.enabled or self._closing.is_set():
            self._gave_up = True
        elif self._healer is None or not self._healer.is_alive():
            log.warning("KV link to %s broke (%s); reconnecting for up to %g s", self.address, exc,
                        self.reconnect.deadline_s)
            self._healer = threading.Thread(target=self._heal, name=f"kv-heal-{self.address}", daemon=True)
            self._healer.start()
        return TransferError(f"link to {self.address} failed: {exc}")

    def _heal(self) -> None:
        """Reconnect with backoff until it works, the deadline passes, or ``close``."""
        started_s = time.monotonic()
        give_up_at_s = started_s + self.reconnect.deadline_s
        attempts, last_error = 0, ""
        for delay_s in self.reconnect.delays(random.Random()):
            if time.monotonic() + delay_s >= give_up_at_s or self._closing.wait(delay_s):
                break
            attempts += 1
            try:
                sock, _ = open_link(self.host, self.port, self.hello, self.security, self.reconnect.attempt_timeout_s)
            except (OSError, FrameError) as exc:  # refused, timed out, or a handshake the peer declined
                last_error = str(exc)
                log.info("KV link to %s: reconnect attempt %d failed: %s", self.address, attempts, exc)
                continue
            with self._lock:
                if self._closing.is_set():
                    sock.close()
                    return
                self.sock, self._broken = sock, None
                self.num_reconnects += 1
            log.warning("KV link to %s re-established after %d attempt(s) in %.1f s", self.address, attempts,
                        time.monotonic() - started_s)
            return
        with self._lock:
            self._gave_up = True
            if self._broken is not None and not self._closing.is_set():
                self._broken += (f"; not re-established within reconnect_deadline_s={self.reconnect.deadline_s:g} "
                                 f"({attempts} attempt(s){': ' + last_error if last_error else ''})")
                log.error("KV link to %s is down for good: %s", self.address, self._broken)

    def _check_usable(self, transfer_id: Optional[str], notices: bool = True) -> None:
        """Raise TransferError unless the link is up and ``transfer_id`` (if any) holds a live reservation on it.

        With ``notices``, also when the decode side said the transfer's lease expired.
        """
        if self._broken is not None:
            state = "reconnecting" if self.is_healing else "down for good"
            raise TransferError(f"link to {self.address} is {state}: {self._broken}")
        if transfer_id is None:
            return
        if notices and transfer_id in self._notices:
            raise TransferError(f"{self.address}: {self._notices[transfer_id]}")
        if transfer_id not in self._transfers:
            raise TransferError(f"transfer {transfer_id} holds no reservation on the link to {self.address}: it was "
                                f"made over a connection that broke, and the decode side freed it")

    def _read_reply(self, timeout_s: float) -> Frame:
        """The next frame that answers us; notices sent unasked (``event``) are noted on the way."""
        while True:
            frame = recv_frame(self.sock, timeout_s, max_payload_bytes=0)
            tid = frame.header.get("transfer_id")
            if frame.kind != FrameKind.ERROR or "event" not in frame.header:
                return frame
            message = str(frame.header.get("message"))[:4096]
            log.warning("KV link to %s: %s", self.address, message)
            if isinstance(tid, str) and tid in self._transfers:
                self._notices[tid] = message

    def _exchange(self, kind: FrameKind, header: dict[str, Any], reply_kind: Optional[FrameKind],
                  payload: Optional[torch.Tensor] = None, timeout_s: Optional[float] = None) -> dict[str, Any]:
        timeout = timeout_s or self.timeout_s
        with self._lock:
            self._check_usable(header.get("transfer_id"))
            try:
                send_frame(self.sock, kind, header, payload, timeout_s=timeout)
                if reply_kind is None:
                    return {}
                reply = self._read_reply(timeout)
            except (OSError, FrameError) as exc:
                raise self._fail(exc) from exc
            if reply.kind == FrameKind.ERROR:
                raise TransferError(f"{self.address} refused: {reply.header.get('message')}")
            if reply.kind != reply_kind or reply.header.get("transfer_id") != header.get("transfer_id"):
                raise self._fail(FrameError(f"out of step: expected {reply_kind.name}, got {reply.kind.name}"))
        return reply.header

    # ---- the KVSender calls -------------------------------------------------------------------
    def reserve(self, transfer_id: str, num_tokens: int, timeout_s: float, block_keys: Sequence[bytes] = ()) -> bool:
        """RESERVE -> GRANT (False: the pool is full, the peer is over its quota, or the link is healing)."""
        answer = self.reserve_many([(transfer_id, num_tokens)], timeout_s, [block_keys])[0]
        if isinstance(answer, TransferError):
            raise answer
        return answer

    def reserve_many(self, requests: Sequence[tuple[str, int]], timeout_s: float,
                     block_keys: Sequence[Sequence[bytes]] = ()) -> list[bool | TransferError]:
        """Every RESERVE first, then every reply: one round trip for the lot instead of one per request.

        ``block_keys[i]`` travel as hex (``"block_keys"``); a GRANT's ``"cached_blocks"`` says how
        many leading blocks the decode side shared (``take_num_shared_blocks``).

        A refusal for the peer's quota counts as "not now" (False), as a full pool does. So does a
        link that is healing: the connection that broke took its reservations with it, and the
        requests wait for the healed link.
        """
        answers: list[bool | TransferError] = []
        with self._lock:
            if self.is_healing:
                return [False] * len(requests)
            self._check_usable(None)
            try:
                for i, (transfer_id, num_tokens) in enumerate(requests):
                    header: dict[str, Any] = {"transfer_id": transfer_id, "num_tokens": num_tokens}
                    if block_keys and block_keys[i]:
                        header["block_keys"] = [key.hex() for key in block_keys[i]]
                    send_frame(self.sock, FrameKind.RESERVE, header, timeout_s=timeout_s)
                for transfer_id, num_tokens in requests:
                    reply = self._read_reply(timeout_s)
                    if reply.header.get("transfer_id") != transfer_id or reply.kind not in (FrameKind.GRANT,
                                                                                            FrameKind.ERROR):
                        raise FrameError(f"expected GRANT for {transfer_id}, got {reply.kind.name} {reply.header}")
                    if reply.kind == FrameKind.GRANT:
                        answers.append(bool(reply.header.get("ok")))
                        if answers[-1]:
                            self._transfers.add(transfer_id)
                            self._note_shared(transfer_id, self._checked_shared(reply.header, num_tokens))
                    elif reply.header.get("over_quota") is True:
                        answers.append(False)
                    else:
                        answers.append(TransferError(f"{self.address} refused: {reply.header.get('message')}"))
            except (OSError, FrameError) as exc:
                error = self._fail(exc)
                if self.is_healing:
                    return [False] * len(requests)
                raise error from exc
        return answers

    def _checked_shared(self, grant: dict[str, Any], num_tokens: int) -> int:
        """A GRANT's ``cached_blocks``: 0 if absent; FrameError unless fewer than the request's blocks."""
        num_shared = grant.get("cached_blocks", 0)
        if isinstance(num_shared, bool) or not isinstance(num_shared, int) or \
                not 0 <= num_shared < -(-num_tokens // self.hello.block_size):
            raise FrameError(f"GRANT with cached_blocks {num_shared!r} for {num_tokens} tokens")
        return num_shared

    def renew_leases(self) -> None:
        """Every ``heartbeat_s``: PING ``{"renew": [transfer ids]}`` for the transfers reserved here, ACKed.

        The decode side renews their leases, so a transfer whose prefill is still queued keeps its
        blocks. A link that is down renews nothing (its reservations are gone).
        """
        now_s = time.monotonic()
        if now_s < self._next_heartbeat_s:  # checked before the lock: a big send in flight must not hold up the loop
            return
        with self._lock:
            self._next_heartbeat_s = now_s + self.heartbeat_s
            if not self._transfers or self._broken is not None:
                return
            renew = sorted(self._transfers)
        try:
            self._exchange(FrameKind.PING, {"transfer_id": None, "renew": renew}, FrameKind.ACK)
        except TransferError as exc:  # the link broke: it heals, and its transfers fail on their own
            log.info("KV link to %s: heartbeat failed: %s", self.address, exc)

    def _layer_header(self, transfer_id: str, layer: int, pages: torch.Tensor, stacked: bool) -> dict[str, Any]:
        header = {"transfer_id": transfer_id, "layer": layer, "shape": list(pages.shape),
                  "dtype": str(pages.dtype).removeprefix("torch.")}
        if stacked:
            header["num_layers"] = pages.shape[0]
        if self.wire_dtype != "auto":
            header["wire_dtype"] = self.wire_dtype
        return header

    def _wire_payload(self, pages: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        """What goes on the wire for ``pages``, contiguous on ``device``: the pages, or their ``WireMessage``
        (quantised where the pages are, so a GPU moves the smaller message)."""
        pages = pages.detach()
        if self.wire_dtype != "auto":
            pages = WireMessage.encode(pages, self.wire_dtype).data
        return pages.to(device).contiguous()

    def _send_pages(self, transfer_id: str, layer: int, pages: torch.Tensor, stacked: bool) -> None:
        header = self._layer_header(transfer_id, layer, pages, stacked)
        payload = self._wire_payload(pages, "cpu")
        t0 = time.perf_counter()
        self._exchange(FrameKind.LAYER, header, None, payload)
        self.stats.send_s += time.perf_counter() - t0
        self.stats.bytes_sent += payload.numel() * payload.element_size()

    def send_layer(self, transfer_id: str, layer: int, pages: torch.Tensor) -> None:
        """One LAYER frame; the payload is the pages' own memory (no copy)."""
        self._send_pages(transfer_id, layer, pages, stacked=False)

    def send_layers(self, transfer_id: str, first_layer: int, pages: torch.Tensor) -> None:
        """One LAYER frame for consecutive layers (header ``num_layers``; shape [num_layers, 2, ...])."""
        self._send_pages(transfer_id, first_layer, pages, stacked=True)

    def commit(self, transfer_id: str, state: SequenceState, num_bytes: int, timeout_s: float) -> None:
        """DONE -> ACK; a refusal raises TransferError (either way the reservation is gone)."""
        try:
            reply = self._exchange(FrameKind.DONE, {"transfer_id": transfer_id, "state": state.to_dict(),
                                                    "num_bytes": num_bytes}, FrameKind.ACK, timeout_s=timeout_s)
        finally:
            with self._lock:
                self._transfers.discard(transfer_id)
                self._notices.pop(transfer_id, None)
                self._shared_blocks.pop(transfer_id, None)
        if not reply.get("ok"):
            raise TransferError(f"{self.address} could not adopt {transfer_id}: {reply.get('error')}")
        self.stats.num_transfers += 1

    def cancel(self, transfer_id: str) -> None:
        """CANCEL, best effort (a dead link frees the reservation on its own, so a stale one sends nothing)."""
        with self._lock:
            if transfer_id not in self._transfers:
                return
        try:
            self._exchange(FrameKind.CANCEL, {"transfer_id": transfer_id}, None)
        except TransferError:
            pass
        with self._lock:
            self._transfers.discard(transfer_id)
            self._notices.pop(transfer_id, None)
            self._shared_blocks.pop(transfer_id, None)

    def close(self) -> None:
        """Stop healing, say BYE and close."""
        self._closing.set()
        with self._lock:
            if self._broken is None:
                try:
                    send_frame(self.sock, FrameKind.BYE, {}, timeout_s=1.0)
                except OSError:
                    pass
            self.sock.close()
        if self._healer is not None:
            self._healer.join(self.reconnect.attempt_timeout_s)


def wait_readable(sock: socket.socket, stop: threading.Event, poll_s: float = 0.2, once: bool = False) -> bool:
    """Block until ``sock`` has bytes (True) or ``stop`` is set (False); with ``once``, wait at most ``poll_s``.

    A TLS stream may hold decrypted bytes that ``select`` on its socket cannot see: ``pending`` first.
    """
    pending = getattr(sock, "pending", None)
    while not stop.is_set():
        if pending is not None and pending():
            return True
        ready, _, _ = select.select([sock], [], [], poll_s)
        if ready:
            return True
        if once:
            break
    return False


def parse_host_port(text: str) -> tuple[str, int]:
    """``host:port`` (IPv6 hosts may be bracketed) -> (host, port); ValueError when malformed."""
    host, _, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {text!r}")
    return host, int(port)
