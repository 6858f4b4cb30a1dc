"""The router's side of one worker link: submit or abort requests, receive outputs, heal a link that broke.

A lost connection, or a HEALTH frame saying the worker is not healthy, sets ``error`` and
counts one more in ``num_failures``; the cluster then fails or recomputes the requests it had
sent there (``DisaggCluster``), and routes none there while ``error`` is set. A lost connection
is re-established with the jittered backoff of ``transport.backoff`` (the prefill-to-decode
links heal the same way), so a worker restarted on the same port is used again: the new
connection proves the secret again, and its worker must answer a PING with a healthy HEALTH
before ``error`` clears. Past the policy's deadline the worker stays gone.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from typing import Optional

from minidisagg.disagg.prefill_requests import FailedRequest, Submission
from minidisagg.disagg.serve import submission_to_dict
from minidisagg.disagg.token_stream import DeltaReceiver, check_deltas
from minidisagg.disagg.validate import InvalidMessage, check_output
from minidisagg.engine.llm_engine import RequestOutput
from minidisagg.transport.auth import Link, LinkSecurity
from minidisagg.transport.backoff import ReconnectPolicy
from minidisagg.transport.framing import Frame, FrameError, FrameKind, PeerClosed, recv_frame, send_frame
from minidisagg.transport.handshake import Hello, open_link
from minidisagg.transport.socket import wait_readable

log = logging.getLogger(__name__)
HEALTH_CHECK_FRAMES = 64  # after a reconnect, at most this many frames may come before the HEALTH reply


class RemoteWorker:
    """The router's connection to one worker server (thread-safe).

    Outputs land on ``outputs``. An ERROR with a request id fails that request; one without (a
    frame the worker could not read) is logged, never taken for a lost connection. Every TOKENS
    frame is checked (``validate.check_output``; token ids against ``vocab_size`` when given): a
    malformed one fails its request. ``owner`` is the router's owner token (``owners``): each
    submission carries it and each worker is told it on connect, so this router's
    requests are its own. A frame begun must be whole within ``frame_deadline_s``.
    """

    def __init__(self, name: str, host: str, port: int, hello: Hello,
                 outputs: "queue.Queue[RequestOutput | FailedRequest]", timeout_s: float = 30.0,
                 vocab_size: Optional[int] = None, security: Optional[LinkSecurity] = None,
                 owner: Optional[str] = None, reconnect: Optional[ReconnectPolicy] = None,
                 frame_deadline_s: Optional[float] = None) -> None:
        """``security``: the deployment's secret (and TLS) to prove to the worker and check it by; None: neither.

        ``reconnect``: how a lost connection heals (None: ``ReconnectPolicy()``; a deadline of 0: never).
        """
        self.name, self.host, self.port, self.hello = name, host, port, hello
        self.vocab_size = vocab_size
        self.timeout_s = timeout_s
        self.security = security or LinkSecurity()
        self.owner = owner
        self.reconnect = reconnect if reconnect is not None else ReconnectPolicy()
        self.frame_deadline_s = frame_deadline_s
        self.outputs = outputs
        self.error: Optional[str] = None
        self.num_failures = 0  # connections lost or unhealthy reports so far
        self.num_reconnects = 0
        self.last_health: Optional[dict] = None  # the worker's latest HEALTH answer (its KV pool among it)
        self._lock = threading.Lock()  # one writer at a time; guards the connection's replacement
        self._closing = False
        self._stop = threading.Event()
        self._healer: Optional[threading.Thread] = None
        self._streams = DeltaReceiver()  # the outputs so far of requests decoding there
        self.sock = self._open(timeout_s, retries=20)
        self._reader = self._start_reader(self.sock)

    # ---- the connection --------------------------------------------------------------------
    def _open(self, timeout_s: float, retries: int) -> Link:
        """Connect, authenticate, exchange HELLOs; tell a decode worker whose requests ours are."""
        sock, theirs = open_link(self.host, self.port, self.hello, self.security, timeout_s, retries=retries)
        try:
            # One timeout for the socket's whole life: two threads share it, and changing a socket's
            # timeout while another thread blocks in recv can make that recv fail with EAGAIN.
            sock.settimeout(self.timeout_s)
            if self.owner is not None and theirs.role in ("decode", "prefill"):
                send_frame(sock, FrameKind.REQUEST, {"owner": self.owner})
        except BaseException:
            sock.close()
            raise
        return sock

    def _start_reader(self, sock: Link) -> threading.Thread:
        reader = threading.Thread(target=self._read_loop, args=(sock,), name=f"router-{self.name}", daemon=True)
        reader.start()
        return reader

    def _read_loop(self, sock: Link) -> None:
        try:
            while wait_readable(sock, self._stop):
                self._on_frame(recv_frame(sock, max_payload_bytes=0, frame_deadline_s=self.frame_deadline_s))
        except (PeerClosed, OSError, ValueError) as exc:
            if not self._closing:
                self._lost(sock, f"connection to {self.name} lost: {exc}")
        except Exception as exc:  # noqa: BLE001 - a bug here must still mark the worker as gone
            log.exception("reading from %s failed", self.name)
            self._lost(sock, f"reading from {self.name} failed: {type(exc).__name__}: {exc}")

    def _lost(self, sock: Link, reason: str) -> None:
        """``sock`` broke: the worker is gone until a new connection heals it."""
        with self._lock:
            if sock is not self.sock or self._closing:
                return
            if self.error is None:
                self.error = reason
                self.num_failures += 1
                log.warning("%s", reason)
            sock.close()
            self._streams.clear()
            if self.reconnect.enabled and (self._healer is None or not self._healer.is_alive()):
                self._healer = threading.Thread(target=self._heal, name=f"router-heal-{self.name}", daemon=True)
                self._healer.start()

    def _heal(self) -> None:
        """Reconnect with backoff until a healthy worker answers, the deadline passes, or ``stop``."""
        started_s = time.monotonic()
        give_up_at_s = started_s + self.reconnect.deadline_s
        attempts = 0
        for delay_s in self.reconnect.delays(random.Random()):
            if time.monotonic() + delay_s >= give_up_at_s or self._stop.wait(delay_s):
                break
            attempts += 1
            try:
                sock = self._open(self.reconnect.attempt_timeout_s, retries=0)
            except (OSError, FrameError) as exc:
                log.info("%s: reconnect attempt %d failed: %s", self.name, attempts, exc)
                continue
            if not self._healthy(sock):
                sock.close()
                continue
            with self._lock:
                if self._closing:
                    sock.close()
                    return
                self.sock, self.error = sock, None
                self.num_reconnects += 1
                self._reader = self._start_reader(sock)
            log.warning("%s: connection re-established after %d attempt(s) in %.1f s", self.name, attempts,
                        time.monotonic() - started_s)
            return
        if not self._closing:
            log.error("%s: not reachable again within reconnect_deadline_s=%g s (%d attempt(s)); it stays gone",
                      self.name, self.reconnect.deadline_s, attempts)

    def _healthy(self, sock: Link) -> bool:
        """PING a freshly opened connection; whether the worker answers HEALTH ``healthy: true`` in time."""
        try:
            send_frame(sock, FrameKind.PING, {}, timeout_s=self.reconnect.attempt_timeout_s)
            for _ in range(HEALTH_CHECK_FRAMES):
                frame = recv_frame(sock, self.reconnect.attempt_timeout_s, max_payload_bytes=0)
                if frame.kind == FrameKind.HEALTH:
                    if frame.header.get("healthy") is True:
                        return True
                    log.info("%s answers again but is unhealthy: %s", self.name,
                             str(frame.header.get("reason"))[:4096])
                    return False
                if frame.kind == FrameKind.TOKENS:  # outputs of our requests that flowed meanwhile
                    self._on_frame(frame)
        except (OSError, ValueError) as exc:
            log.info("%s: health check after reconnecting failed: %s", self.name, exc)
        return False

    # ---- frames ------------------------------------------------------------------------------
    def _on_frame(self, frame: Frame) -> None:
        """One frame from the worker: an output, a request's failure, or its health."""
        header = frame.header
        if frame.kind == FrameKind.TOKENS:
            try:
                if isinstance(header, dict) and "deltas" in header:  # a decode step's new tokens (``token_stream``)
                    for delta in check_deltas(header, self.vocab_size):
                        out = self._streams.apply(delta)
                        if out is not None:
                            self.outputs.put(out)
                else:
                    self.outputs.put(self._streams.whole(check_output(header, self.vocab_size)))
            except InvalidMessage as exc:
                log.warning("%s sent a malformed TOKENS frame: %s", self.name, exc)
                if exc.request_id is not None:
                    self.outputs.put(FailedRequest(exc.request_id, f"{self.name} sent a malformed output: {exc}"))
        elif frame.kind == FrameKind.ERROR:
            rid, message = header.get("request_id"), str(header.get("message"))[:4096]
            if isinstance(rid, str) and rid:
                self.outputs.put(FailedRequest(rid, message))
            else:  # about a frame, not a request: the connection is fine
                log.warning("%s refused a frame: %s", self.name, message)
        elif frame.kind == FrameKind.HEALTH:
            self.last_health = dict(header)
            if header.get("healthy") is not True:
                with self._lock:
                    if self.error is None:
                        self.error = f"{self.name} is unhealthy: {str(header.get('reason'))[:4096]}"
                        self.num_failures += 1
                        log.warning("%s", self.error)
        else:
            raise FrameError(f"unexpected {frame.kind.name} frame from {self.name}")

    def _send(self, header: dict) -> None:
        with self._lock:
            if self.error is not None:
                raise ConnectionError(self.error)
            send_frame(self.sock, FrameKind.REQUEST, header)

    def submit(self, sub: Submission) -> None:
        """Queue a request on this prefill server (as this router's: ``owner``)."""
        submission = submission_to_dict(sub)
        submission["owner"] = self.owner
        try:
            self._send({"request_id": sub.request_id, "submission": submission})
        except OSError as exc:
            self.outputs.put(FailedRequest(sub.request_id, f"prefill worker {self.name} unreachable: {exc}"))

    def ping(self) -> None:
        """Ask the worker for its health (best effort); the answer lands in ``last_health``."""
        try:
            with self._lock:
                if self.error is None:
                    send_frame(self.sock, FrameKind.PING, {})
        except OSError:
            pass

    def abort(self, request_id: str) -> None:
        """Ask the worker to drop one of this router's requests, freeing its KV there (best effort)."""
        self._streams.forget(request_id)
        try:
            self._send({"abort": request_id})
        except OSError:
            pass

    def stop(self, timeout_s: float = 1.0) -> None:
        """Stop healing, say BYE and close."""
        self._closing = True
        self._stop.set()
        try:
            with self._lock:
                send_frame(self.sock, FrameKind.BYE, {}, timeout_s=min(timeout_s, self.timeout_s))
        except OSError:
            pass
        self._reader.join(timeout_s)
        if self._healer is not None:
            self._healer.join(timeout_s)
        self.sock.close()
