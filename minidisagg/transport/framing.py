"""Wire layer of the socket KV transport: length-prefixed frames over a blocking TCP socket.

Every message is one frame: a fixed prefix, a JSON header, then raw payload bytes::

    prefix (20 bytes, little-endian, struct "<4sBBHIQ")
      magic        4s   b"MDKV"
      version      u8   2 (2 added the authentication frames; a version 1 peer is refused)
      kind         u8   a FrameKind (HELLO=1 ... AUTH_RESPONSE=16)
      flags        u16  0 (reserved)
      header_len   u32  bytes of JSON that follow
      payload_len  u64  raw bytes after the header (may be 0)
    header   header_len bytes of UTF-8 JSON, always an object (a dict)
    payload  payload_len bytes, e.g. one layer's KV pages

Why this shape:
- magic and version catch a peer that speaks something else, or a stream that lost its
  place, on the very next frame.
- The header carries small self-describing metadata (request id, layer, dtype, shape);
  the payload carries bulk bytes that are never JSON-encoded and never copied: the sender
  hands the tensor's own memory to ``sendall`` and the receiver can ``recv_into`` a
  preallocated KV tensor (``recv_frame(..., into=...)``). Receiving into fresh memory
  instead makes the kernel fault in every page of it, which costs measurable bandwidth.
- Lengths come first, so the receiver checks them against its limits before it
  allocates or reads anything: a corrupt prefix claiming 2**40 bytes fails at once.

A connection opens with the server's AUTH_CHALLENGE and the client's proof of the
deployment's shared secret (``auth.py``), then HELLO / HELLO_OK: ``handshake.py`` does both steps.

HEALTH (14) and older peers. A worker sends HEALTH ``{"healthy", "reason", "num_free_blocks",
"num_blocks"}`` to a router in answer to its PING, and once unasked, ``{"healthy": false,
"reason"}``, when its engine loop dies. HEALTH came late in version 1, without a new version
number: a version 1 router built before it reads kind 14 as "unknown frame kind 14" and drops
the connection on the first HEALTH. No version 1 peer gets that far any more: every
connection now starts with the worker's version 2 AUTH_CHALLENGE, so a version 1 peer stops at
its very first frame ("wrong wire version 2 (this side speaks 1)"), and a version 1 frame sent
to a worker is refused ("authentication failed") before anything else is read. Kinds unknown
to a receiver (a newer peer's, say) fail the same way as any malformed frame: the receiver
drops the connection. New kinds therefore come with a new version number.

Errors: a malformed frame raises ``FrameError`` (a ValueError), or its subclass ``HeaderError``
when only the JSON header was bad (too deeply nested, say) and the frame, which had no
payload, was read whole: the stream is still in step; the peer closing raises ``PeerClosed``; ``timeout_s`` is a deadline for the whole frame and raises TimeoutError.
``frame_deadline_s`` is one too, for a socket that another thread writes on: it waits for bytes
with ``select`` and leaves the socket's own timeout alone (changing it would change the writer's).
After any error, except a receive timeout before the frame's first byte, the byte stream
is out of step: close the socket. Use at most one sending and one receiving thread per socket.
"""

from __future__ import annotations

import contextlib
import enum
import json
import math
import select
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

PREFIX = struct.Struct("<4sBBHIQ")
MAGIC = b"MDKV"
WIRE_VERSION = 2
DEFAULT_MAX_HEADER_BYTES = 1 << 20
DEFAULT_MAX_PAYLOAD_BYTES = 4 << 30
SOCKET_BUFFER_BYTES = 4 << 20


class FrameError(ValueError):
    """A frame broke the wire format or a limit (bad magic, unknown kind, too large, bad JSON, ...)."""


class HeaderError(FrameError):
    """A frame without payload whose JSON header is bad; it was read whole, so the stream is still in step."""


class PeerClosed(ConnectionError):
    """The peer closed the connection (cleanly between frames, or mid-frame: say which)."""


class HandshakeError(ConnectionError):
    """The two sides of a connection disagree on who they are or on the KV layout."""


class FrameKind(enum.IntEnum):
    """What a frame means; the receiver rejects numbers it does not know."""

    HELLO = 1  # client -> server: a Hello
    HELLO_OK = 2  # server -> client: the server's Hello
    ERROR = 3  # either way: {"message": ...}; the sender closes next
    RESERVE = 4  # prefill -> decode: ask for KV blocks for a request
    GRANT = 5  # decode -> prefill: the blocks granted
    LAYER = 6  # prefill -> decode: one layer's KV pages (payload)
    DONE = 7  # prefill -> decode: all layers of a request sent
    ACK = 8  # receipt
    REQUEST = 9  # router/client -> worker: a generation request
    TOKENS = 10  # worker -> router/client: generated tokens
    PING = 11  # liveness check
    BYE = 12  # orderly goodbye before close
    CANCEL = 13  # prefill -> decode: give a reservation back
    HEALTH = 14  # worker -> router: {"healthy": bool, "reason": str, ...}; unasked when a worker fails, else after PING
    AUTH_CHALLENGE = 15  # server -> client, first frame of a connection: {"scheme", "nonce"} (auth.py)
    AUTH_RESPONSE = 16  # client -> server: proof of the secret; server -> client: its own proof


@dataclass
class Frame:
    """One received (or to-be-sent) message: kind, JSON header and raw payload."""

    kind: FrameKind
    header: dict[str, Any]
    payload: memoryview | bytes | bytearray = b""


def peer_name(sock: socket.socket) -> str:
    """``host:port`` of the socket's peer, or a short description when it has none."""
    try:
        address = sock.getpeername()
    except OSError:
        return "an unconnected socket"
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return f"unix socket {address!r}" if address else "a unix socket peer"


def tensor_memoryview(tensor: torch.Tensor) -> memoryview:
    """A flat byte view sharing memory with a contiguous CPU tensor (any dtype, bfloat16 too)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise FrameError(
            f"tensor payloads must be contiguous CPU tensors (got device={tensor.device}, "
            f"contiguous={tensor.is_contiguous()}): call .contiguous().cpu() first"
        )
    # numpy has no bfloat16, so reinterpret as bytes first; reshape(-1) also covers 0-dim.
    return memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy())


def encode_head(kind: FrameKind | int, header: dict[str, Any], payload_len: int) -> bytes:
    """The prefix plus JSON header of a frame whose payload has ``payload_len`` bytes."""
    try:
        kind = FrameKind(kind)
    except ValueError:
        raise FrameError(f"unknown frame kind {kind!r} (known: {[k.name for k in FrameKind]})") from None
    if not isinstance(header, dict):
        raise FrameError(f"header must be a dict, got {type(header).__name__}")
    try:
        header_bytes = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise FrameError(f"header is not JSON-serializable: {exc}") from exc
    if len(header_bytes) > DEFAULT_MAX_HEADER_BYTES:
        raise FrameError(f"header too large: {len(header_bytes)} bytes > {DEFAULT_MAX_HEADER_BYTES}")
    prefix = PREFIX.pack(MAGIC, WIRE_VERSION, int(kind), 0, len(header_bytes), payload_len)
    return prefix + header_bytes


def _deadline(timeout_s: float | None) -> float | None:
    if timeout_s is not None and timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive or None, got {timeout_s}")
    return None if timeout_s is None else time.monotonic() + timeout_s


def _arm(sock: socket.socket, deadline: float | None) -> None:
    """Set the socket timeout to what is left until ``deadline``; raise socket.timeout if nothing is."""
    if deadline is not None:
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            raise socket.timeout
        sock.settimeout(remaining_s)


def _restore_timeout(sock: socket.socket, timeout_s: float | None) -> None:
    with contextlib.suppress(OSError):  # closed meanwhile: nothing to restore
        sock.settimeout(timeout_s)


def send_frame(
    sock: socket.socket,
    kind: FrameKind,
    header: dict[str, Any],
    payload: torch.Tensor | bytes | bytearray | memoryview | None = None,
    timeout_s: float | None = None,
) -> int:
    """Send one frame within ``timeout_s`` (None: the socket's own timeout); returns bytes sent.

    Tensor payloads go out without a copy: ``sendall`` reads the tensor's memory directly.
    """
    if payload is None:
        body = memoryview(b"")
    elif isinstance(payload, torch.Tensor):
        body = tensor_memoryview(payload)
    else:
        body = memoryview(payload)
        if not body.contiguous:
            raise FrameError("payload memoryview must be contiguous")
    head = encode_head(kind, header, body.nbytes)
    deadline = _deadline(timeout_s)
    previous_timeout_s = sock.gettimeout()
    try:
        for part in (head, body) if body.nbytes else (head,):
            _arm(sock, deadline)
            sock.sendall(part)
    except socket.timeout:
        raise TimeoutError(
            f"could not send {FrameKind(kind).name} frame ({len(head) + body.nbytes} bytes) to "
            f"{peer_name(sock)} within {timeout_s or sock.gettimeout()} s; the stream is now unusable"
        ) from None
    finally:
        if deadline is not None:
            _restore_timeout(sock, previous_timeout_s)
    return len(head) + body.nbytes


class _Reader:
    """Reads exact byte counts of one frame, tracking progress for error messages.

    ``timeout_s`` arms the socket's timeout for each read; ``frame_deadline_s`` instead waits for
    bytes with ``select`` before each read, so the socket's timeout, which a writing thread relies
    on, is never touched.
    """

    def __init__(self, sock: socket.socket, timeout_s: float | None, frame_deadline_s: float | None = None) -> None:
        self.sock, self.deadline = sock, _deadline(timeout_s)
        self.poll_deadline = _deadline(frame_deadline_s)
        self.timeout_s = frame_deadline_s if frame_deadline_s is not None else (
            sock.gettimeout() if timeout_s is None else timeout_s)  # for messages
        self.received, self.expected = 0, PREFIX.size  # expected grows once the prefix is parsed

    def read_into(self, view: memoryview) -> None:
        """Fill ``view`` completely, or raise PeerClosed / TimeoutError saying how far the frame got."""
        got = 0
        while got < view.nbytes:
            try:
                self._wait_for_bytes()
                _arm(self.sock, self.deadline)
                n = self.sock.recv_into(view[got:])
            except socket.timeout:
                self._timed_out()
            if n == 0:
                where = "between frames" if self.received == 0 else (
                    f"mid-frame after {self.received} of {self.expected} bytes"
                )
                raise PeerClosed(f"{peer_name(self.sock)} closed the connection {where}")
            got += n
            self.received += n

    def _wait_for_bytes(self) -> None:
        """With a frame deadline: return once the socket has bytes, raise socket.timeout once the deadline passed."""
        if self.poll_deadline is None:
            return
        pending = getattr(self.sock, "pending", None)  # a TLS stream may hold bytes select cannot see
        if pending is not None and pending():
            return
        remaining_s = self.poll_deadline - time.monotonic()
        if remaining_s <= 0 or not select.select([self.sock], [], [], remaining_s)[0]:
            raise socket.timeout

    def _timed_out(self) -> NoReturn:
        who = peer_name(self.sock)
        if self.received == 0:
            raise TimeoutError(f"no frame from {who} within {self.timeout_s} s")
        raise TimeoutError(
            f"frame from {who} incomplete after {self.timeout_s} s: got {self.received} of {self.expected} bytes"
        )


def recv_frame(
    sock: socket.socket,
    timeout_s: float | None = None,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    into: Callable[[dict[str, Any], int], memoryview | None] | None = None,
    frame_deadline_s: float | None = None,
) -> Frame:
    """Receive exactly one frame within ``timeout_s`` (None: the socket's own timeout).

    ``frame_deadline_s`` bounds the whole frame without touching the socket's timeout (see the
    module docstring); a peer that sends part of a frame and stalls raises TimeoutError then.

    The payload lands in a fresh writable bytearray, or, when ``into(header, payload_len)``
    returns a writable memoryview of exactly ``payload_len`` bytes, directly in that memory
    (``into`` is called only for non-empty payloads and may return None to decline).
    """
    reader = _Reader(sock, timeout_s, frame_deadline_s)
    previous_timeout_s = sock.gettimeout()
    try:
        prefix = bytearray(PREFIX.size)
        reader.read_into(memoryview(prefix))
        kind, header_len, payload_len = _parse_prefix(prefix, max_header_bytes, max_payload_bytes)
        reader.expected += header_len + payload_len
        header_bytes = bytearray(header_len)
        reader.read_into(memoryview(header_bytes))
        try:
            header = _parse_header(header_bytes)
        except FrameError as exc:
            if payload_len:
                raise
            raise HeaderError(str(exc)) from None
        payload: memoryview | bytearray = bytearray()
        if payload_len:
            target = into(header, payload_len) if into is not None else None
            payload = bytearray(payload_len) if target is None else _check_target(target, payload_len)
            reader.read_into(memoryview(payload).cast("B"))
        return Frame(kind, header, payload)
    finally:
        if timeout_s is not None:
            _restore_timeout(sock, previous_timeout_s)


def _parse_prefix(prefix: bytearray, max_header_bytes: int, max_payload_bytes: int) -> tuple[FrameKind, int, int]:
    magic, version, kind, flags, header_len, payload_len = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise FrameError(f"bad magic {bytes(magic)!r} (expected {MAGIC!r}): not a minidisagg peer, or out of step")
    if version != WIRE_VERSION:
        raise FrameError(f"wrong wire version {version} (this side speaks {WIRE_VERSION})")
    try:
        kind = FrameKind(kind)
    except ValueError:
        raise FrameError(f"unknown frame kind {kind} (known: {[k.name for k in FrameKind]})") from None
    if flags != 0:
        raise FrameError(f"unsupported flags 0x{flags:04x} (version {WIRE_VERSION} defines none)")
    if header_len > max_header_bytes:
        raise FrameError(f"header too large: {header_len} bytes > max_header_bytes={max_header_bytes}")
    if payload_len > max_payload_bytes:
        raise FrameError(f"payload too large: {payload_len} bytes > max_payload_bytes={max_payload_bytes}")
    return kind, header_len, payload_len


def _parse_header(header_bytes: bytearray) -> dict[str, Any]:
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(f"invalid JSON header ({len(header_bytes)} bytes): {exc}") from exc
    except RecursionError:
        raise FrameError(f"JSON header nested too deeply ({len(header_bytes)} bytes)") from None
    if not isinstance(header, dict):
        raise FrameError(f"header not an object: got JSON {type(header).__name__}")
    return header


def _check_target(target: memoryview, payload_len: int) -> memoryview:
    if not isinstance(target, memoryview) or target.readonly or not target.c_contiguous:
        raise FrameError("into() must return a writable, contiguous memoryview (or None)")
    if target.nbytes != payload_len:
        raise FrameError(f"into() returned a view of {target.nbytes} bytes for a payload of {payload_len} bytes")
    return target


def payload_tensor(frame: Frame, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """A tensor view of a received frame's payload, sharing its memory (no copy)."""
    itemsize, numel = dtype.itemsize, math.prod(int(size) for size in shape)
    payload_bytes = memoryview(frame.payload).nbytes
    if payload_bytes != numel * itemsize:
        raise FrameError(
            f"payload has {payload_bytes} bytes, but shape {tuple(shape)} of {dtype} needs {numel * itemsize}"
        )
    if numel == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    buffer = frame.payload
    if isinstance(buffer, bytes) or memoryview(buffer).readonly:
        buffer = bytearray(buffer)  # torch wants writable memory; only sent-side frames get here
    return torch.frombuffer(buffer, dtype=dtype, count=numel).view(tuple(shape))


def tune_socket(sock: socket.socket, buffer_bytes: int | None = SOCKET_BUFFER_BYTES) -> None:
    """Turn on TCP_NODELAY and ask for ``buffer_bytes`` send/receive buffers; failures are ignored."""
    options = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    if buffer_bytes is not None:
        options += [(socket.SOL_SOCKET, opt, buffer_bytes) for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF)]
    for level, option, value in options:
        with contextlib.suppress(OSError):  # e.g. TCP options on a unix socket
            sock.setsockopt(level, option, value)


def connect(host: str, port: int, timeout_s: float, retries: int = 0, retry_delay_s: float = 0.2) -> socket.socket:
    """Open a tuned blocking TCP connection; each of ``1 + retries`` attempts gets ``timeout_s``."""
    last_error: OSError | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(retry_delay_s)
        try:
            sock = socket.create_connection((host, port), timeout=timeout_s)
        except OSError as exc:
            last_error = exc
            continue
        tune_socket(sock)
        sock.settimeout(None)  # per-call timeout_s arguments govern from here on
        return sock
    raise ConnectionError(
        f"could not connect to {host}:{port} within {timeout_s} s per attempt "
        f"after {retries + 1} attempt(s): {last_error}"
    ) from last_error
