"""The handshake that opens every worker link: prove the shared secret, then agree on the KV layout.

The server speaks first with an AUTH_CHALLENGE; the client proves the deployment's secret
(``auth.py``), then sends its HELLO, and the server answers HELLO_OK, or ERROR naming what the two
sides disagree on (model fingerprint, dtype, block size, KV layout, wire version, role). Only a
client that proved the secret learns why its HELLO was refused. ``open_link`` dials, wraps the
socket in TLS where configured, and runs the client's side.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, NoReturn

from minidisagg.transport.auth import Link, LinkSecurity, client_authenticate, server_authenticate
from minidisagg.transport.framing import FrameKind, HandshakeError, connect, peer_name, recv_frame, send_frame

COMPARED_FIELDS = ("fingerprint", "dtype", "block_size", "kv_layout", "version")  # must agree for a link to open
HANDSHAKE_MAX_HEADER_BYTES = 64 << 10


@dataclass(frozen=True)
class Hello:
    """What each side declares on connect: who it is and the KV layout it speaks."""

    role: str  # "prefill" | "decode" | "router" | "client"
    fingerprint: str  # model config hash
    dtype: str  # e.g. "bfloat16"
    block_size: int
    kv_layout: str  # e.g. "layers,2,blocks,block_size,kv_heads,head_dim"
    version: int = 1

    def to_header(self) -> dict[str, Any]:
        """This Hello as a frame header."""
        return dataclasses.asdict(self)

    @classmethod
    def from_header(cls, header: dict[str, Any]) -> Hello:
        """Parse a peer's Hello, raising HandshakeError naming any missing or mistyped field."""
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name not in header and field.default is dataclasses.MISSING:
                raise HandshakeError(f"malformed HELLO: missing field {field.name!r}")
            value = header.get(field.name, field.default)
            if type(value).__name__ != field.type:  # annotations are strings: "str" or "int"
                raise HandshakeError(f"malformed HELLO: {field.name} should be {field.type}, got {value!r}")
            values[field.name] = value
        return cls(**values)


COMPARED_FIELDS = ("fingerprint", "dtype", "block_size", "kv_layout", "version")
HANDSHAKE_MAX_HEADER_BYTES = 64 << 10


def client_handshake(sock: socket.socket, hello: Hello, timeout_s: float, secret: bytes | None = None) -> Hello:
    """Prove ``secret`` and check the server's proof, send our HELLO; the server's Hello, or HandshakeError saying why."""
    client_authenticate(sock, secret, hello.role, timeout_s)
    send_frame(sock, FrameKind.HELLO, hello.to_header(), timeout_s=timeout_s)
    reply = recv_frame(sock, timeout_s, max_header_bytes=HANDSHAKE_MAX_HEADER_BYTES, max_payload_bytes=0)
    if reply.kind == FrameKind.ERROR:
        raise HandshakeError(f"{peer_name(sock)} refused the handshake: {reply.header.get('message', reply.header)}")
    if reply.kind != FrameKind.HELLO_OK:
        raise HandshakeError(f"expected HELLO_OK or ERROR from {peer_name(sock)}, got {reply.kind.name}")
    return Hello.from_header(reply.header)


def server_handshake(
    sock: socket.socket, hello: Hello, timeout_s: float, accept_roles: Collection[str] | None = None,
    secret: bytes | None = None,
) -> Hello:
    """Have the client prove ``secret`` (auth.py), then check its HELLO against ours; returns the client's Hello.

    Only a client that proved the secret (or any client, without one) learns why its HELLO was refused.
    """
    proved_role = server_authenticate(sock, secret, timeout_s)
    frame = recv_frame(sock, timeout_s, max_header_bytes=HANDSHAKE_MAX_HEADER_BYTES, max_payload_bytes=0)
    try:
        if frame.kind != FrameKind.HELLO:
            raise HandshakeError(f"expected HELLO, got {frame.kind.name}")
        theirs = Hello.from_header(frame.header)
    except HandshakeError as exc:
        _refuse(sock, str(exc), timeout_s)
    mismatches = [
        f"{name}: ours={getattr(hello, name)} theirs={getattr(theirs, name)}"
        for name in COMPARED_FIELDS
        if getattr(hello, name) != getattr(theirs, name)
    ]
    if accept_roles is not None and theirs.role not in accept_roles:
        mismatches.insert(0, f"role: accepted={sorted(accept_roles)} theirs={theirs.role}")
    if proved_role is not None and theirs.role != proved_role:
        mismatches.insert(0, f"role: authenticated as {proved_role}, HELLO says {theirs.role}")
    if mismatches:
        _refuse(sock, f"{hello.role} and {theirs.role} disagree on " + "; ".join(mismatches), timeout_s)
    send_frame(sock, FrameKind.HELLO_OK, hello.to_header(), timeout_s=timeout_s)
    return theirs


def _refuse(sock: socket.socket, message: str, timeout_s: float) -> NoReturn:
    with contextlib.suppress(OSError):  # the client may already be gone; our own error matters more
        send_frame(sock, FrameKind.ERROR, {"message": message}, timeout_s=timeout_s)
    raise HandshakeError(message)




def open_link(host: str, port: int, hello: Hello, security: LinkSecurity, timeout_s: float,
              retries: int = 0) -> tuple[Link, Hello]:
    """Connect, wrap in TLS if configured, authenticate both ways, exchange HELLOs; returns (link, the server's Hello)."""
    link: Link = connect(host, port, timeout_s, retries=retries)
    try:
        link = security.wrap_client(link, host, timeout_s)
        return link, client_handshake(link, hello, timeout_s, secret=security.secret)
    except BaseException:
        link.close()
        raise
