"""Who may talk to a worker: a shared secret, proved by HMAC challenge-response before anything else is read.

Every process of a deployment holds the same secret (``launch_local`` makes one per launch;
``minidisagg serve`` reads ``--secret-file`` or ``MINIDISAGG_SECRET``). A connection starts with
the server speaking (frames of ``framing``, wire version 2)::

    server -> client  AUTH_CHALLENGE {"scheme": "hmac-sha256", "nonce": Ns}     (or {"scheme": "none"})
    client -> server  AUTH_RESPONSE  {"role": R, "nonce": Nc, "mac": HMAC(secret, "client->server", R, Ns, Nc)}
    server -> client  AUTH_RESPONSE  {"mac": HMAC(secret, "server->client", R, Ns, Nc)}   or ERROR, then close
    then HELLO / HELLO_OK as before (``handshake.client_handshake``), the HELLO's role bound to R

Both nonces are 32 fresh random bytes, so an answer recorded on one connection proves nothing
on the next (replay); the direction label makes the client's proof useless as the server's
(reflection). The server reads at most a 1 KiB header and no payload from a peer that has not
proved the secret, and answers a failure with the bare words ``authentication failed``: no
fingerprint, no configuration. The client checks the server's proof too, so a prefill worker
never sends KV pages, and a router never takes outputs, from an impostor.

What this does not do: hide the traffic (use TLS: ``tls.py``), or stop a relay that sits in
the middle of a live connection (TLS with certificates does), or a flood of connections.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import socket
import ssl
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from minidisagg.transport import tls
from minidisagg.transport.framing import (
    Frame,
    FrameError,
    FrameKind,
    HandshakeError,
    PeerClosed,
    peer_name,
    recv_frame,
    send_frame,
)

log = logging.getLogger(__name__)
SECRET_ENV = "MINIDISAGG_SECRET"
MIN_SECRET_BYTES = 32
NONCE_BYTES = 32
SCHEME = "hmac-sha256"
REFUSAL = "authentication failed"  # all an unauthenticated peer ever learns
AUTH_LABEL = "minidisagg-auth-v1"
CLIENT_TO_SERVER, SERVER_TO_CLIENT = "client->server", "server->client"
MAX_AUTH_HEADER_BYTES = 1024
MAKE_SECRET = "python -c 'import secrets; print(secrets.token_hex(32))' > secret.txt && chmod 600 secret.txt"
_ROLE = re.compile(r"[a-z_]{1,32}")
Link = Union[socket.socket, tls.TLSStream]


class AuthError(HandshakeError):
    """A peer did not prove it holds the deployment's secret (or this side has none to prove)."""


def new_secret() -> bytes:
    """A fresh secret for one launch: 32 random bytes, as 64 hex characters (so it can travel as text)."""
    return secrets.token_bytes(32).hex().encode()


def parse_secret(raw: bytes, source: str) -> bytes:
    """A secret as given (surrounding whitespace dropped, the rest used as is); ValueError when too short."""
    secret = raw.strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the secret from {source} has {len(secret)} bytes; use at least {MIN_SECRET_BYTES}, "
                         f"e.g. made by: {MAKE_SECRET}")
    return secret


def read_secret_file(path: Union[str, Path]) -> bytes:
    """The secret in ``path``; warns (like ssh) when group or others may read or write the file."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read --secret-file {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("secret file %s is accessible by group or others (mode %s): whoever can read it can pose as "
                    "any worker of this deployment; run: chmod 600 %s", path, stat.filemode(mode), path)
    return parse_secret(raw, f"--secret-file {path}")


def secret_from(secret_file: Optional[str], environ: Mapping[str, str]) -> Optional[bytes]:
    """The secret from ``--secret-file`` if given, else from ``MINIDISAGG_SECRET``, else None."""
    if secret_file:
        return read_secret_file(secret_file)
    text = environ.get(SECRET_ENV, "")
    return parse_secret(text.encode(), SECRET_ENV) if text.strip() else None


def proof(secret: bytes, direction: str, role: str, server_nonce: bytes, client_nonce: bytes) -> str:
    """HMAC-SHA256 (hex) of one side's answer: bound to the direction, the client's role and both nonces."""
    message = "\n".join((AUTH_LABEL, direction, role, server_nonce.hex(), client_nonce.hex())).encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def member_proof(secret: bytes, rank: int, world_size: int, nonce: bytes) -> str:
    """HMAC-SHA256 (hex) with which a torch.distributed rank shows the group it holds the secret (``dist.py``)."""
    message = "\n".join((AUTH_LABEL, "dist-member", str(rank), str(world_size), nonce.hex())).encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def _nonce(value: object) -> bytes:
    """A peer's nonce (hex) as bytes; ValueError unless it is exactly NONCE_BYTES."""
    if not isinstance(value, str) or len(value) != 2 * NONCE_BYTES:
        raise ValueError(f"nonce must be {2 * NONCE_BYTES} hex characters")
    return bytes.fromhex(value)


def _recv_auth(sock: Link, timeout_s: float) -> Frame:
    """One frame of the authentication exchange: a small header, never a payload."""
    return recv_frame(sock, timeout_s, max_header_bytes=MAX_AUTH_HEADER_BYTES, max_payload_bytes=0)


def _refuse(sock: Link, reason: str, timeout_s: float) -> AuthError:
    """Tell the peer only that it failed; the reason is for this side's log (the caller raises the result)."""
    try:
        send_frame(sock, FrameKind.ERROR, {"message": REFUSAL}, timeout_s=timeout_s)
    except OSError:
        pass
    return AuthError(f"{REFUSAL}: {reason}")


def server_authenticate(sock: Link, secret: Optional[bytes], timeout_s: float) -> Optional[str]:
    """Challenge a new connection; returns the role the client proved the secret for (None: no secret here).

    Raises AuthError, after a bare ``authentication failed`` to the peer, when it does not prove it.
    """
    if secret is None:
        send_frame(sock, FrameKind.AUTH_CHALLENGE, {"scheme": "none"}, timeout_s=timeout_s)
        return None
    server_nonce = secrets.token_bytes(NONCE_BYTES)
    send_frame(sock, FrameKind.AUTH_CHALLENGE, {"scheme": SCHEME, "nonce": server_nonce.hex()}, timeout_s=timeout_s)
    try:
        frame = _recv_auth(sock, timeout_s)
    except (FrameError, TimeoutError) as exc:
        raise _refuse(sock, f"no valid answer to the challenge ({exc})", timeout_s) from None
    except PeerClosed as exc:
        raise AuthError(f"{REFUSAL}: {exc} before answering the challenge") from None
    if frame.kind == FrameKind.ERROR:  # the client gave up (it has no secret, say): nothing to answer
        raise AuthError(f"{REFUSAL}: the peer gave up: {str(frame.header.get('message'))[:200]!r}")
    if frame.kind != FrameKind.AUTH_RESPONSE:
        raise _refuse(sock, f"expected AUTH_RESPONSE, got {frame.kind.name} (a peer without authentication)", timeout_s)
    role, mac = frame.header.get("role"), frame.header.get("mac")
    try:
        client_nonce = _nonce(frame.header.get("nonce"))
        if not isinstance(role, str) or not _ROLE.fullmatch(role) or not isinstance(mac, str):
            raise ValueError("malformed role or mac")
    except ValueError as exc:
        raise _refuse(sock, f"malformed AUTH_RESPONSE: {exc}", timeout_s) from None
    if not hmac.compare_digest(proof(secret, CLIENT_TO_SERVER, role, server_nonce, client_nonce), mac):
        raise _refuse(sock, "wrong proof (the peer does not hold this deployment's secret)", timeout_s)
    send_frame(sock, FrameKind.AUTH_RESPONSE, {"mac": proof(secret, SERVER_TO_CLIENT, role, server_nonce, client_nonce)},
               timeout_s=timeout_s)
    return role


def client_authenticate(sock: Link, secret: Optional[bytes], role: str, timeout_s: float) -> None:
    """Answer the server's challenge as ``role`` and check the server's own proof; AuthError saying what to fix."""
    who = peer_name(sock)
    try:
        frame = _recv_auth(sock, timeout_s)
    except TimeoutError:
        raise AuthError(f"{who} sent no AUTH_CHALLENGE within {timeout_s} s: is it a minidisagg worker of this "
                        f"version, and does it expect TLS (--tls-cert/--tls-ca)?") from None
    if frame.kind == FrameKind.ERROR:
        raise AuthError(f"{who} refused the connection: {frame.header.get('message')}")
    if frame.kind != FrameKind.AUTH_CHALLENGE:
        raise AuthError(f"expected AUTH_CHALLENGE from {who}, got {frame.kind.name}")
    scheme = frame.header.get("scheme")
    if scheme == "none":
        if secret is not None:
            raise AuthError(f"{who} does not authenticate its peers, but this side has a secret: refusing to talk to "
                            f"it (start it with the deployment's secret: --secret-file or {SECRET_ENV})")
        return
    if scheme != SCHEME:
        raise AuthError(f"{who} asks for authentication scheme {scheme!r}; this side speaks {SCHEME!r}")
    if secret is None:
        try:
            send_frame(sock, FrameKind.ERROR, {"message": "this client has no secret"}, timeout_s=timeout_s)
        except OSError:
            pass
        raise AuthError(f"{who} requires the deployment's shared secret and this side has none: pass "
                        f"--secret-file PATH or set {SECRET_ENV} (the same secret as the worker's)")
    try:
        server_nonce = _nonce(frame.header.get("nonce"))
    except ValueError as exc:
        raise AuthError(f"malformed AUTH_CHALLENGE from {who}: {exc}") from None
    client_nonce = secrets.token_bytes(NONCE_BYTES)
    send_frame(sock, FrameKind.AUTH_RESPONSE, {"role": role, "nonce": client_nonce.hex(),
                                               "mac": proof(secret, CLIENT_TO_SERVER, role, server_nonce, client_nonce)},
               timeout_s=timeout_s)
    reply = _recv_auth(sock, timeout_s)
    if reply.kind == FrameKind.ERROR:
        raise AuthError(f"{who} refused our proof ({reply.header.get('message')}): this process and the worker "
                        f"hold different secrets; give both the same --secret-file or {SECRET_ENV}")
    mac = reply.header.get("mac")
    expected = proof(secret, SERVER_TO_CLIENT, role, server_nonce, client_nonce)
    if reply.kind != FrameKind.AUTH_RESPONSE or not isinstance(mac, str) or not hmac.compare_digest(expected, mac):
        raise AuthError(f"{who} could not prove it holds the deployment's secret: it is not the worker you meant "
                        f"to reach, or it was started with another secret")


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback one (``""``, ``0.0.0.0`` and ``::`` are not)."""
    if host in ("", "0.0.0.0", "::"):
        return False
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


@dataclass(frozen=True)
class LinkSecurity:
    """How one process proves itself to its peers and checks them: the shared secret and, optionally, TLS."""

    secret: Optional[bytes] = field(default=None, repr=False)
    tls_server: Optional[ssl.SSLContext] = None  # wraps accepted connections
    tls_client: Optional[ssl.SSLContext] = None  # wraps connections this process opens
    insecure_no_auth: bool = False  # the operator chose to listen beyond loopback without a secret

    def wrap_client(self, sock: socket.socket, host: str, timeout_s: float) -> Link:
        """The connection, TLS-wrapped when this process speaks TLS."""
        return sock if self.tls_client is None else tls.wrap_client(sock, self.tls_client, host, timeout_s)

    def wrap_server(self, sock: socket.socket, timeout_s: float, peer: str) -> Link:
        """An accepted connection, TLS-wrapped when this process serves TLS."""
        return sock if self.tls_server is None else tls.wrap_server(sock, self.tls_server, timeout_s, peer)

    def listen_refusal(self, host: str) -> Optional[str]:
        """Why a worker must not listen on ``host`` with these settings, or None when it may."""
        if self.tls_client is not None and self.tls_server is None:
            return "a prefill or decode server with TLS needs its own certificate: add --tls-cert and --tls-key"
        if self.secret is not None or self.insecure_no_auth or is_loopback(host):
            return None
        return (f"refusing to listen on {host or 'every interface'} without a shared secret: anyone who can reach "
                f"the port could submit requests, read every output and abort them. Give every process of the "
                f"deployment the same secret ({MAKE_SECRET}; then --secret-file secret.txt, or set {SECRET_ENV}), "
                f"or pass --insecure-no-auth on a network you trust")

    def check_listen(self, host: str, role: str) -> None:
        """Raise ValueError when ``listen_refusal`` objects; warn when a worker accepts peers without a secret."""
        refusal = self.listen_refusal(host)
        if refusal is not None:
            raise ValueError(refusal)
        if self.secret is None:
            reach = "any process on this machine" if is_loopback(host) else "anyone who reaches the port"
            log.warning("%s on %s accepts peers without a shared secret: %s can submit requests, read outputs and "
                        "abort them (pass --secret-file or set %s)", role, host, reach, SECRET_ENV)


def link_security(secret_file: Optional[str] = None, tls_cert: Optional[str] = None, tls_key: Optional[str] = None,
                  tls_ca: Optional[str] = None, insecure_no_auth: bool = False,
                  environ: Mapping[str, str] = os.environ) -> LinkSecurity:
    """A process's LinkSecurity from ``serve``'s options (the secret also from ``MINIDISAGG_SECRET``)."""
    secret = secret_from(secret_file, environ)
    if secret is not None and insecure_no_auth:
        source = f"--secret-file {secret_file}" if secret_file else SECRET_ENV
        raise ValueError(f"--insecure-no-auth contradicts the secret given by {source}: drop one of them")
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("--tls-cert and --tls-key go together (a certificate and its private key, PEM)")
    tls_server = tls.server_context(tls_cert, tls_key, tls_ca or None) if tls_cert and tls_key else None
    tls_client = tls.client_context(tls_ca or None, tls_cert or None, tls_key or None) if tls_cert or tls_ca else None
    return LinkSecurity(secret, tls_server, tls_client, insecure_no_auth)
