"""The pieces every fuzz input is made of: what an input may use, raw frames and messages, and a socket peer.

``fuzz`` and ``fuzz_messages`` build the inputs from these; ``fuzz_checks`` runs them. A
``Peer`` is one connection an input holds (``SocketPeer`` is the real one); a ``FuzzTarget`` is
what an input may reach (``fuzz_checks.FuzzContext``).
"""

from __future__ import annotations

import json
import math
import select
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

from minidisagg.kv.pages import KVLayout
from minidisagg.transport.framing import MAGIC, PREFIX, WIRE_VERSION, FrameError, recv_frame

GREEDY = {"temperature": 0, "max_tokens": 3, "ignore_eos": True}
NESTED_DEPTH = 100_000
BAD_NUMBERS: list[Any] = [math.nan, math.inf, -math.inf, 1e300, -1, 10**30, True, False, "1", None, [1], {"x": 1}]
BAD_TOKENS: list[Any] = [-1, 10**9, 2**63, 1.5, True, None, "7", [3], math.nan]
BAD_STRINGS: list[Any] = [None, "", 7, True, ["x"], {"a": 1}, "x" * 5000, "\ud800"]


class Peer(Protocol):
    """A connection an act holds: raw bytes or frames out, frames (or lines) back."""

    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are (errors from a peer that hung up are swallowed)."""

    def send(self, kind: int, header: Any, payload: bytes = b"") -> None:
        """Send one frame; the header may be a dict (NaN allowed) or raw bytes."""

    def replies(self, wait_s: float) -> list[Any]:
        """What came back within ``wait_s``: frames (kind, header) or, on the router port, parsed lines."""

    def wait_closed(self, timeout_s: float) -> bool:
        """Whether the other side closed the connection within ``timeout_s`` (what it sent is discarded)."""

    def send_until_dropped(self, data: bytes, timeout_s: float) -> bool:
        """Send ``data`` again and again, never reading, until the other side hangs up (True) or ``timeout_s``
        passes (False)."""


class FuzzTarget(Protocol):
    """What an act may use (``fuzz_checks.FuzzContext``); everything it opens is closed after the act."""

    layout: KVLayout
    vocab_size: int
    frame_deadline_s: float
    max_connections: int

    def peer(self, target: str, role: str, deaf: bool = False) -> Peer:
        """A connection to ``decode`` or ``prefill`` that proved the secret and said HELLO as ``role``.

        ``deaf``: its receive buffer is tiny, so what the worker sends it backs up at once.
        """

    def raw(self, target: str) -> Peer:
        """A bare TCP connection to ``decode``, ``prefill`` or ``router`` (no handshake)."""

    def victim(self, on_decode: bool) -> str:
        """Start a request of a well-behaved router (checked when the act ends); its id as workers see it."""

    def serve_one(self, via: Optional[Peer] = None) -> None:
        """Run one good request now, while the act's connections are open (a wrong answer counts as lost).

        ``via``: a router connection (``raw("router")``) opened earlier to send it on; else a new one.
        """

    def note(self, problem: str) -> None:
        """Record a broken promise of the deployment (the act's input is reported)."""


@dataclass(frozen=True)
class FuzzInput:
    """One hostile act: its category (the report's rows), a name that says exactly what it sends, and the act."""

    category: str
    name: str
    act: Callable[[FuzzTarget], None]
    authenticated: bool = True


def frame_bytes(kind: int, header: Any = None, payload: bytes = b"", magic: bytes = MAGIC,
                version: int = WIRE_VERSION, flags: int = 0, header_len: Optional[int] = None,
                payload_len: Optional[int] = None) -> bytes:
    """A frame as bytes, any field of it wrong on request (``header`` a dict is JSON with NaN allowed)."""
    body = header if isinstance(header, bytes) else json.dumps({} if header is None else header).encode()
    return PREFIX.pack(magic, version, kind, flags, len(body) if header_len is None else header_len,
                       len(payload) if payload_len is None else payload_len) + body + payload


def nested_header(depth: int = NESTED_DEPTH) -> bytes:
    """A JSON object nested ``depth`` arrays deep: valid JSON, far past any parser's recursion limit."""
    return b'{"request_id": "deep", "x": ' + b"[" * depth + b"]" * depth + b"}"


def set_path(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """``obj`` with the dotted ``path`` set to ``value`` (changed in place)."""
    node = obj
    *parents, last = path.split(".")
    for name in parents:
        node = node[name]
    node[last] = value
    return obj


def submission(rid: str, prompt: list[int], decode_target: str = "d0") -> dict[str, Any]:
    """A well-formed REQUEST header for a prefill worker (what a router sends)."""
    return {"request_id": rid, "submission": {"request_id": rid, "prompt_token_ids": prompt, "params": dict(GREEDY),
                                              "arrival_s": 0.0, "decode_target": decode_target, "prompt": None}}


def sequence_state(rid: str, prompt: list[int], first_token: int) -> dict[str, Any]:
    """A well-formed ``SequenceState`` as a DONE frame carries it."""
    return {"request_id": rid, "prompt_token_ids": prompt, "output_token_ids": [first_token], "params": dict(GREEDY),
            "timeline": {"arrival_s": 0.0}, "prompt": None, "generator_state_b64": None}


def drain(peer: Peer, wait_s: float = 0.3) -> list[Any]:
    """What ``peer`` got back within ``wait_s`` (nothing, if the other side hung up)."""
    try:
        return peer.replies(wait_s)
    except OSError:
        return []


class SocketPeer:
    """A connection an input holds (``fuzz.Peer``): frames to and from a worker, or JSON lines to a router."""

    def __init__(self, sock: socket.socket, lines: bool = False) -> None:
        self.sock, self.lines = sock, lines
        self.sock.settimeout(5.0)

    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are; a peer that already hung up is no error here."""
        try:
            self.sock.sendall(data)
        except OSError:
            pass

    def send(self, kind: int, header: Any, payload: bytes = b"") -> None:
        """Send one frame (a dict header may hold NaN: JSON as Python writes it)."""
        self.send_raw(frame_bytes(int(kind), header, payload))

    def replies(self, wait_s: float, until: Optional[Callable[[Any], bool]] = None) -> list[Any]:
        """Frames ``(kind, header)`` (or parsed lines) that arrive within ``wait_s``; stops early at close, or
        once ``until`` holds for one."""
        got: list[Any] = []
        deadline = time.monotonic() + wait_s
        buffer = b""
        while (remaining_s := deadline - time.monotonic()) > 0:
            if not select.select([self.sock], [], [], remaining_s)[0]:
                break
            try:
                if self.lines:
                    chunk = self.sock.recv(1 << 16)
                    if not chunk:
                        break
                    buffer += chunk
                    *complete, buffer = buffer.split(b"\n")
                    got += [json.loads(line) for line in complete if line.strip()]
                else:
                    frame = recv_frame(self.sock, max(0.5, remaining_s), max_payload_bytes=1 << 20)
                    got.append((frame.kind, frame.header))
            except (OSError, FrameError, ValueError):
                break
            if until is not None and got and until(got[-1]):
                break
        return got

    def wait_closed(self, timeout_s: float) -> bool:
        """Whether the other side closed (or reset) the connection within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining_s = max(0.0, deadline - time.monotonic())
            try:
                if select.select([self.sock], [], [], remaining_s)[0]:
                    if not self.sock.recv(1 << 16):
                        return True
                    continue
            except OSError:
                return True
            if remaining_s <= 0:
                return False

    def send_until_dropped(self, data: bytes, timeout_s: float) -> bool:
        """Send ``data`` again and again, never reading, until the other side hangs up (True) or ``timeout_s``
        passes (False: still connected, or it stopped reading what it is sent)."""
        deadline = time.monotonic() + timeout_s
        while (remaining_s := deadline - time.monotonic()) > 0:
            self.sock.settimeout(remaining_s)  # a whole copy or nothing: a cut frame would be dropped for that
            try:
                self.sock.sendall(data)
            except socket.timeout:
                return False
            except OSError:  # reset or broken pipe: the other side closed the connection
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        """Close the connection."""
        try:
            self.sock.close()
        except OSError:
            pass
