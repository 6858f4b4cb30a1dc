"""Optional TLS for the socket links: contexts from PEM files, and a TLS stream safe for a reader and a writer thread.

Sockets are wrapped right after connect/accept, before the authentication handshake
(``auth.py``), so the nonces, proofs and every frame after them travel encrypted.

Why ``TLSStream`` and not a plain ``ssl.SSLSocket``: a worker reads a router connection on
one thread while engine threads write outputs to it, and CPython's ``SSLSocket`` is not safe
for a ``recv`` and a ``sendall`` running at once (OpenSSL's per-connection state gets
corrupted; python/cpython#76714 and later reports). So the stream keeps the TLS socket
non-blocking and runs every OpenSSL call under one lock; a call that would block releases the
lock and waits in ``select`` for the socket, until the stream's own timeout. It offers the few
socket methods ``framing`` uses (``recv_into``, ``sendall``, ``settimeout``, ``fileno``, ...).
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Optional, Union

SEND_CHUNK_BYTES = 256 << 10  # one TLS write per chunk: the lock is never held for a whole KV message


def _check_file(path: str, flag: str) -> str:
    if not Path(path).is_file():
        raise ValueError(f"{flag} {path}: no such file (PEM expected)")
    return path


def server_context(cert_file: str, key_file: str, ca_file: Optional[str] = None) -> ssl.SSLContext:
    """A server context with this process's certificate; with ``ca_file`` it also requires client certificates signed by it."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(_check_file(cert_file, "--tls-cert"), _check_file(key_file, "--tls-key"))
        if ca_file is not None:
            context.load_verify_locations(cafile=_check_file(ca_file, "--tls-ca"))
            context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: a peer must show a certificate the CA signed
    except ssl.SSLError as exc:
        raise ValueError(f"cannot load TLS certificate/key ({cert_file}, {key_file}, CA {ca_file}): {exc}") from exc
    return context


def client_context(ca_file: Optional[str] = None, cert_file: Optional[str] = None,
                   key_file: Optional[str] = None) -> ssl.SSLContext:
    """A client context that checks the server's certificate against ``ca_file`` (else the system's CAs) and its host name.

    ``cert_file``/``key_file`` are shown to servers that ask for a client certificate (mutual TLS).
    """
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                             cafile=_check_file(ca_file, "--tls-ca") if ca_file else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert_file is not None and key_file is not None:
            context.load_cert_chain(_check_file(cert_file, "--tls-cert"), _check_file(key_file, "--tls-key"))
    except ssl.SSLError as exc:
        raise ValueError(f"cannot load TLS files (CA {ca_file}, certificate {cert_file}): {exc}") from exc
    return context


class TLSStream:
    """A TLS connection that one reading and one writing thread may use at once (see the module docstring)."""

    def __init__(self, tls_sock: ssl.SSLSocket) -> None:
        self._sock = tls_sock
        self._lock = threading.Lock()
        self._timeout_s: Optional[float] = None
        tls_sock.setblocking(False)

    def fileno(self) -> int:
        """The underlying socket's descriptor (for ``select``); -1 once closed."""
        return self._sock.fileno()

    def settimeout(self, timeout_s: Optional[float]) -> None:
        """Deadline of each later ``recv_into``/``sendall`` call (None: wait forever)."""
        self._timeout_s = timeout_s

    def gettimeout(self) -> Optional[float]:
        """The timeout ``settimeout`` set."""
        return self._timeout_s

    def getpeername(self) -> tuple:
        """The peer's address."""
        return self._sock.getpeername()

    def pending(self) -> int:
        """Decrypted bytes already buffered here, which ``select`` on the socket cannot see."""
        with self._lock:
            return self._sock.pending()

    def version(self) -> Optional[str]:
        """The negotiated protocol, e.g. ``TLSv1.3``."""
        return self._sock.version()

    def _wait(self, deadline: Optional[float], for_write: bool) -> None:
        """Wait until the socket is readable (or writable); socket.timeout past ``deadline``."""
        remaining_s = None if deadline is None else deadline - time.monotonic()
        if remaining_s is not None and remaining_s <= 0:
            raise socket.timeout("timed out")
        fd = self._sock.fileno()
        if fd < 0:
            raise OSError("the TLS connection is closed")
        readable, writable, _ = select.select([] if for_write else [fd], [fd] if for_write else [], [], remaining_s)
        if not readable and not writable:
            raise socket.timeout("timed out")

    def _deadline(self) -> Optional[float]:
        return None if self._timeout_s is None else time.monotonic() + self._timeout_s

    def recv_into(self, buffer: Union[memoryview, bytearray], nbytes: int = 0) -> int:
        """Read up to ``nbytes`` (0: the buffer's size) decrypted bytes; 0 when the peer closed."""
        deadline = self._deadline()
        while True:
            with self._lock:
                try:
                    return self._sock.recv_into(buffer, nbytes or None)
                except ssl.SSLWantReadError:
                    for_write = False
                except ssl.SSLWantWriteError:
                    for_write = True
                except ssl.SSLZeroReturnError:  # the peer closed TLS cleanly
                    return 0
            self._wait(deadline, for_write)

    def recv(self, nbytes: int) -> bytes:
        """Read up to ``nbytes`` decrypted bytes (b"" when the peer closed)."""
        buffer = bytearray(nbytes)
        return bytes(buffer[:self.recv_into(buffer)])

    def sendall(self, data: Union[bytes, bytearray, memoryview]) -> None:
        """Encrypt and send all of ``data``; socket.timeout when the timeout passes first."""
        view = memoryview(data).cast("B")
        sent, deadline = 0, self._deadline()
        while sent < view.nbytes:
            with self._lock:
                try:
                    sent += self._sock.send(view[sent:sent + SEND_CHUNK_BYTES])  # a retry repeats the same chunk
                    continue
                except ssl.SSLWantWriteError:
                    for_write = True
                except ssl.SSLWantReadError:
                    for_write = False
            self._wait(deadline, for_write)

    def shutdown(self, how: int) -> None:
        """Shut down the underlying socket (as ``socket.shutdown``)."""
        self._sock.shutdown(how)

    def close(self) -> None:
        """Close the connection (safe to call twice)."""
        self._sock.close()

    def __enter__(self) -> TLSStream:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _handshake(tls_sock: ssl.SSLSocket, timeout_s: float, peer: str) -> TLSStream:
    tls_sock.settimeout(timeout_s)
    try:
        tls_sock.do_handshake()
    except socket.timeout:
        tls_sock.close()
        raise TimeoutError(f"TLS handshake with {peer} did not finish within {timeout_s} s "
                           f"(does the other side use TLS too?)") from None
    except (ssl.SSLError, OSError) as exc:
        tls_sock.close()
        raise ConnectionError(f"TLS handshake with {peer} failed: {exc}") from exc
    return TLSStream(tls_sock)


def wrap_client(sock: socket.socket, context: ssl.SSLContext, host: str, timeout_s: float) -> TLSStream:
    """TLS over a connected socket, as the client: the server's certificate must name ``host``."""
    return _handshake(context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False), timeout_s, host)


def wrap_server(sock: socket.socket, context: ssl.SSLContext, timeout_s: float, peer: str) -> TLSStream:
    """TLS over an accepted socket, as the server (the client's certificate is checked when the context asks for one)."""
    return _handshake(context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), timeout_s, peer)
