"""Authenticated peers: only a holder of the deployment's secret may talk to a worker, over TLS where asked.

Live worker processes, real sockets, fresh secrets and nonces in every run. A peer that fails
learns nothing but "authentication failed"; the workers log who and why, and keep serving.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from cluster_requests import run_request
from minidisagg import LLM, SamplingParams
from minidisagg.config import CacheConfig, EngineConfig
from minidisagg.disagg.launch import WorkerProcess, free_ports, spawn_worker, stop_processes
from minidisagg.disagg.remote_worker import RemoteWorker
from minidisagg.disagg.router_protocol import stream_request
from minidisagg.disagg.router_server import RemoteCluster
from minidisagg.disagg.serve import DecodeServer
from minidisagg.kv.pages import KVLayout
from minidisagg.transport import tls
from minidisagg.transport.auth import (
    CLIENT_TO_SERVER,
    REFUSAL,
    SCHEME,
    SECRET_ENV,
    SERVER_TO_CLIENT,
    AuthError,
    LinkSecurity,
    is_loopback,
    link_security,
    new_secret,
    proof,
    read_secret_file,
    secret_from,
)
from minidisagg.transport.framing import MAGIC, PREFIX, WIRE_VERSION, Frame, FrameKind, recv_frame, send_frame
from minidisagg.transport.rendezvous import MembershipError, join_store
from minidisagg.transport.socket import SocketSender, make_hello

HOST = "127.0.0.1"
NUM_BLOCKS = 32
MODEL_ARGS = ["--model", "tiny", "--device", "cpu", "--dtype", "float32", "--random-weights", "--batch-invariant",
              "--num-kv-blocks", str(NUM_BLOCKS)]
CONFIG = EngineConfig(batch_invariant=True, cache=CacheConfig(num_blocks=NUM_BLOCKS))
TIMEOUT_S = 30.0
GREEDY = {"temperature": 0, "max_tokens": 6, "ignore_eos": True}
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def reference():
    """The colocated engine on the workers' random weights: the oracle."""
    return LLM("tiny", device="cpu", batch_invariant=True)


def layout_of(loaded) -> KVLayout:
    cfg = loaded.config
    return KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, CONFIG.cache.block_size, loaded.dtype)


@dataclass
class Deployment:
    """A decode and a prefill worker process started with one secret (and TLS files, for the TLS one)."""

    decode: WorkerProcess
    prefill: WorkerProcess
    secret: bytes

    def cluster(self, loaded, security: LinkSecurity) -> RemoteCluster:
        """A router (in this process) over both workers, proving ``security``."""
        return RemoteCluster(loaded, CONFIG, {"p0": (HOST, self.prefill.port)}, {"d0": (HOST, self.decode.port)},
                             request_timeout_s=60, security=security)


def start_deployment(log_dir: Path, secret: bytes, extra_args: list[str]) -> Deployment:
    decode = spawn_worker("decode", "d0", [*MODEL_ARGS, *extra_args], log_dir, secret=secret)
    try:
        prefill = spawn_worker("prefill", "p0", [*MODEL_ARGS, *extra_args, "--peers", f"d0={HOST}:{decode.port}"],
                               log_dir, secret=secret)
    except BaseException:
        stop_processes([decode])
        raise
    return Deployment(decode, prefill, secret)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    dep = start_deployment(tmp_path_factory.mktemp("auth"), new_secret(), [])
    yield dep
    stop_processes([dep.prefill, dep.decode], timeout_s=20)



def assert_serves_like_colocated(cluster: RemoteCluster, reference, label: str) -> None:
    prompt = [secrets.randbelow(1000) + 1 for _ in range(7)]
    out = run_request(cluster, prompt)
    want = reference.generate({"prompt_token_ids": prompt}, SamplingParams(**GREEDY), use_tqdm=False)[0]
    assert out.error is None and out.token_ids == want.token_ids, f"{label}: prompt {prompt}: {out.error} {out.token_ids}"


def raw_connect(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=TIMEOUT_S)
    sock.settimeout(TIMEOUT_S)
    return sock


def assert_refused(sock: socket.socket) -> Frame:
    """The next frame is the bare refusal, and the server closes the connection after it."""
    reply = recv_frame(sock, TIMEOUT_S)
    assert reply.kind == FrameKind.ERROR and reply.header == {"message": REFUSAL}, reply
    assert sock.recv(1) == b"", "the connection stayed open after a failed authentication"
    return reply


def wait_for_log(worker: WorkerProcess, text: str, timeout_s: float = 10.0) -> str:
    """The worker's log once it contains ``text`` (fails after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        log = worker.log_path.read_text(errors="replace")
        if text in log:
            return log
        assert time.monotonic() < deadline, f"{worker.name}'s log never said {text!r}:\n{log[-3000:]}"
        time.sleep(0.05)


# ---- refusals ---------------------------------------------------------------------------------


def test_a_peer_without_the_secret_is_refused_before_any_payload_and_learns_nothing(deployment, tiny_loaded):
    fingerprint = tiny_loaded.config.fingerprint()
    hello = make_hello("router", fingerprint, layout_of(tiny_loaded))
    body = json.dumps(hello.to_header()).encode()
    for worker in (deployment.decode, deployment.prefill):
        said = []
        with raw_connect(worker.port) as sock:
            challenge = recv_frame(sock, TIMEOUT_S)
            assert challenge.kind == FrameKind.AUTH_CHALLENGE and challenge.header["scheme"] == SCHEME
            assert set(challenge.header) == {"scheme", "nonce"}, challenge.header
            # Only the prefix of a HELLO announcing a 64 MiB payload: refused before its header or payload is sent.
            sock.sendall(PREFIX.pack(MAGIC, WIRE_VERSION, int(FrameKind.HELLO), 0, len(body), 64 << 20))
            said += [challenge.header, assert_refused(sock).header]
            port = sock.getsockname()[1]
        log = wait_for_log(worker, f"refused {HOST}:{port}")
        assert "no valid answer to the challenge (payload too large" in log, log[-2000:]
        with raw_connect(worker.port) as sock:  # a whole HELLO, the fingerprint in it: still no word about ours
            said.append(recv_frame(sock, TIMEOUT_S).header)
            send_frame(sock, FrameKind.HELLO, hello.to_header(), timeout_s=TIMEOUT_S)
            said.append(assert_refused(sock).header)
            port = sock.getsockname()[1]
        assert "expected AUTH_RESPONSE, got HELLO" in wait_for_log(worker, f"refused {HOST}:{port}")
        text = json.dumps(said)
        for what_the_server_knows in (fingerprint, hello.dtype, hello.kv_layout, "fingerprint", "block_size"):
            assert what_the_server_knows not in text, text
    # the library's own client, without a secret, is told what to do about it
    with pytest.raises(AuthError, match=f"requires the deployment's shared secret.*--secret-file.*{SECRET_ENV}"):
        RemoteWorker("d0", HOST, deployment.decode.port, hello, queue.Queue(), timeout_s=TIMEOUT_S)


def test_a_wrong_secret_is_refused(deployment, tiny_loaded):
    hello = make_hello("prefill", tiny_loaded.config.fingerprint(), layout_of(tiny_loaded))
    wrong = LinkSecurity(secret=new_secret())
    with pytest.raises(AuthError, match="different secrets"):
        SocketSender(HOST, deployment.decode.port, hello, timeout_s=TIMEOUT_S, connect_retries=0, security=wrong)
    wait_for_log(deployment.decode, "wrong proof (the peer does not hold this deployment's secret)")
    with pytest.raises(AuthError, match="different secrets"):
        RemoteWorker("p0", HOST, deployment.prefill.port, make_hello("router", tiny_loaded.config.fingerprint(),
                     layout_of(tiny_loaded)), queue.Queue(), timeout_s=TIMEOUT_S, security=wrong)


def test_a_replayed_answer_fails(deployment):
    """An eavesdropper who recorded a good exchange cannot replay it: every challenge has a fresh nonce."""
    secret, role = deployment.secret, "router"
    with raw_connect(deployment.decode.port) as sock:
        server_nonce = bytes.fromhex(recv_frame(sock, TIMEOUT_S).header["nonce"])
        client_nonce = secrets.token_bytes(32)
        answer = {"role": role, "nonce": client_nonce.hex(),
                  "mac": proof(secret, CLIENT_TO_SERVER, role, server_nonce, client_nonce)}
        send_frame(sock, FrameKind.AUTH_RESPONSE, answer, timeout_s=TIMEOUT_S)
        reply = recv_frame(sock, TIMEOUT_S)
        assert reply.kind == FrameKind.AUTH_RESPONSE, reply
        assert reply.header["mac"] == proof(secret, SERVER_TO_CLIENT, role, server_nonce, client_nonce)
    for recorded in (answer, {**answer, "mac": reply.header["mac"]}):  # the client's answer, and the server's
        with raw_connect(deployment.decode.port) as sock:
            fresh_nonce = bytes.fromhex(recv_frame(sock, TIMEOUT_S).header["nonce"])
            assert fresh_nonce != server_nonce
            send_frame(sock, FrameKind.AUTH_RESPONSE, recorded, timeout_s=TIMEOUT_S)
            assert_refused(sock)


class Impostor:
    """A listener that plays a worker without the secret: ``script(conn)`` runs on the one connection it accepts."""

    def __init__(self, script: Callable[[socket.socket], None]) -> None:
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.error: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, args=(script,), daemon=True)
        self.thread.start()

    def _serve(self, script: Callable[[socket.socket], None]) -> None:
        conn, _ = self.listener.accept()
        with conn:
            try:
                script(conn)
            except BaseException as exc:  # noqa: BLE001 - reported by close()
                self.error.append(exc)

    def close(self) -> None:
        self.thread.join(TIMEOUT_S)
        self.listener.close()
        assert not self.error, self.error


def test_an_impostor_server_is_caught_by_the_client(tiny_loaded):
    """The client checks the server: a reflected answer fails (direction label), and so does a downgrade."""
    secret = new_secret()
    hello = make_hello("prefill", tiny_loaded.config.fingerprint(), layout_of(tiny_loaded))
    seen: dict[str, Any] = {}

    def reflect(conn: socket.socket) -> None:
        send_frame(conn, FrameKind.AUTH_CHALLENGE, {"scheme": SCHEME, "nonce": secrets.token_hex(32)}, timeout_s=5)
        seen["answer"] = recv_frame(conn, 5).header
        send_frame(conn, FrameKind.AUTH_RESPONSE, {"mac": seen["answer"]["mac"]}, timeout_s=5)  # the client's own
        seen["after"] = recv_frame(conn, 5) if conn.recv(1, socket.MSG_PEEK) else None

    impostor = Impostor(reflect)
    with pytest.raises(AuthError, match="could not prove it holds the deployment's secret"):
        SocketSender(HOST, impostor.port, hello, timeout_s=5, connect_retries=0, security=LinkSecurity(secret))
    impostor.close()
    assert seen["answer"]["role"] == "prefill" and seen["after"] is None, "the client went on to send its HELLO"

    def downgrade(conn: socket.socket) -> None:
        send_frame(conn, FrameKind.AUTH_CHALLENGE, {"scheme": "none"}, timeout_s=5)
        seen["after_downgrade"] = conn.recv(1)

    impostor = Impostor(downgrade)
    with pytest.raises(AuthError, match="does not authenticate its peers"):
        SocketSender(HOST, impostor.port, hello, timeout_s=5, connect_retries=0, security=LinkSecurity(secret))
    impostor.close()
    assert seen["after_downgrade"] == b"", "the client sent something to a server that asked for no secret"


# ---- the right secret ---------------------------------------------------------------------------


def test_the_right_secret_serves_and_never_shows_on_a_command_line(deployment, tiny_loaded, reference):
    cluster = deployment.cluster(tiny_loaded, LinkSecurity(secret=deployment.secret))
    try:
        assert_serves_like_colocated(cluster, reference, "right secret")
    finally:
        cluster.shutdown()
    for worker in (deployment.decode, deployment.prefill):
        cmdline = Path(f"/proc/{worker.proc.pid}/cmdline").read_bytes()
        assert deployment.secret not in cmdline, f"{worker.name}'s command line shows the secret"


def test_workers_keep_serving_after_20_bad_handshakes(deployment, tiny_loaded, reference):
    hello = make_hello("router", tiny_loaded.config.fingerprint(), layout_of(tiny_loaded))

    def silent(sock: socket.socket) -> None:  # reads the challenge, then hangs up
        recv_frame(sock, TIMEOUT_S)

    def garbage(sock: socket.socket) -> None:
        recv_frame(sock, TIMEOUT_S)
        sock.sendall(os.urandom(4096))
        assert_refused_or_reset(sock)

    def hello_first(sock: socket.socket) -> None:
        recv_frame(sock, TIMEOUT_S)
        send_frame(sock, FrameKind.HELLO, hello.to_header(), timeout_s=TIMEOUT_S)
        assert_refused(sock)

    def wrong_secret(sock: socket.socket) -> None:
        nonce = bytes.fromhex(recv_frame(sock, TIMEOUT_S).header["nonce"])
        mine = secrets.token_bytes(32)
        send_frame(sock, FrameKind.AUTH_RESPONSE, {"role": "router", "nonce": mine.hex(),
                                                    "mac": proof(new_secret(), CLIENT_TO_SERVER, "router", nonce, mine)},
                   timeout_s=TIMEOUT_S)
        assert_refused(sock)

    attempts = [silent, garbage, hello_first, wrong_secret] * 5
    for worker in (deployment.decode, deployment.prefill):
        before = worker.log_path.read_text(errors="replace").count(f"{worker.role}: refused {HOST}:")
        threads = []
        for attempt in attempts:  # half of them at once, half one after the other
            def run(attempt=attempt) -> None:
                with raw_connect(worker.port) as sock:
                    attempt(sock)
            if len(threads) < len(attempts) // 2:
                threads.append(threading.Thread(target=run))
                threads[-1].start()
            else:
                run()
        for thread in threads:
            thread.join(TIMEOUT_S)
        deadline = time.monotonic() + 10
        while True:
            refused = worker.log_path.read_text(errors="replace").count(f"{worker.role}: refused {HOST}:") - before
            if refused >= len(attempts) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert refused == len(attempts), f"{worker.name} logged {refused} refusals for {len(attempts)} bad handshakes"
        assert worker.proc.poll() is None, worker.log_tail()
    cluster = deployment.cluster(tiny_loaded, LinkSecurity(secret=deployment.secret))
    try:
        assert_serves_like_colocated(cluster, reference, "after 20 bad handshakes")
    finally:
        cluster.shutdown()


def assert_refused_or_reset(sock: socket.socket) -> None:
    """Garbage gets the bare refusal; the server may reset the connection while unread garbage is still queued."""
    try:
        assert_refused(sock)
    except ConnectionResetError:
        pass


def test_a_router_process_needs_the_secret_to_reach_the_workers(deployment, tmp_path, reference):
    peers = ["--peers", f"prefill=p0@{HOST}:{deployment.prefill.port};decode=d0@{HOST}:{deployment.decode.port}"]
    with pytest.raises(RuntimeError, match=f"requires the deployment's shared secret.*{SECRET_ENV}"):
        spawn_worker("router", "r-none", [*MODEL_ARGS, *peers], tmp_path)
    router = spawn_worker("router", "r0", [*MODEL_ARGS, *peers], tmp_path, secret=deployment.secret)
    try:
        prompt = [5, 6, 7, 8]
        lines = list(stream_request(HOST, router.port, {"prompt_token_ids": prompt, **GREEDY}, timeout_s=TIMEOUT_S))
        want = reference.generate({"prompt_token_ids": prompt}, SamplingParams(**GREEDY), use_tqdm=False)[0]
        assert lines[-1]["token_ids"] == want.token_ids, lines[-1]
    finally:
        stop_processes([router])


def test_the_launcher_gives_each_launch_its_own_secret(tiny_loaded, reference):
    with LLM("tiny", device="cpu", batch_invariant=True, mode="disagg", transport="socket") as llm:
        procs = llm.engine.processes
        secret = procs[0].secret
        assert secret is not None and len(secret) >= 32 and all(p.secret == secret for p in procs)
        for proc in procs:
            assert secret not in Path(f"/proc/{proc.proc.pid}/cmdline").read_bytes()
        prompt = {"prompt_token_ids": [3, 1, 4, 1, 5]}
        got = llm.generate(prompt, SamplingParams(**GREEDY))[0]
        assert got.token_ids == reference.generate(prompt, SamplingParams(**GREEDY), use_tqdm=False)[0].token_ids
        decode = next(p for p in procs if p.role == "decode")
        hello = make_hello("router", tiny_loaded.config.fingerprint(), layout_of(tiny_loaded))
        with pytest.raises(AuthError):
            RemoteWorker("d0", HOST, decode.port, hello, queue.Queue(), timeout_s=TIMEOUT_S)
        with pytest.raises(AuthError, match="different secrets"):
            RemoteWorker("d0", HOST, decode.port, hello, queue.Queue(), timeout_s=TIMEOUT_S,
                         security=LinkSecurity(secret=new_secret()))


# ---- TLS ----------------------------------------------------------------------------------------


def self_signed(directory: Path, name: str) -> tuple[str, str]:
    """A fresh self-signed certificate for 127.0.0.1/localhost (its own CA) and its key: (cert, key) paths."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, tuple[str, str]]:
    if shutil.which("openssl") is None:
        pytest.skip("the TLS tests make their certificates with the openssl command, which is not installed")
    directory = tmp_path_factory.mktemp("certs")
    return {"ours": self_signed(directory, "ours"), "stranger": self_signed(directory, "stranger")}


@pytest.fixture(scope="module")
def tls_deployment(tmp_path_factory, certs):
    cert, key = certs["ours"]
    dep = start_deployment(tmp_path_factory.mktemp("tls"), new_secret(),
                           ["--tls-cert", cert, "--tls-key", key, "--tls-ca", cert])
    yield dep
    stop_processes([dep.prefill, dep.decode], timeout_s=20)


def test_a_tls_round_trip_matches_colocated(tls_deployment, certs, tiny_loaded, reference):
    cert, key = certs["ours"]
    security = link_security(tls_cert=cert, tls_key=key, tls_ca=cert, environ={SECRET_ENV: tls_deployment.secret.decode()})
    cluster = tls_deployment.cluster(tiny_loaded, security)
    try:
        assert all(isinstance(w.sock, tls.TLSStream) and w.sock.version() in ("TLSv1.2", "TLSv1.3")
                   for w in [*cluster.prefill_workers, *cluster.decode_workers])
        assert_serves_like_colocated(cluster, reference, "TLS")
    finally:
        cluster.shutdown()
    hello = make_hello("router", tiny_loaded.config.fingerprint(), layout_of(tiny_loaded))
    port, secret = tls_deployment.decode.port, tls_deployment.secret
    with pytest.raises(AuthError, match="does it expect TLS"):  # plain TCP to a TLS worker
        RemoteWorker("d0", HOST, port, hello, queue.Queue(), timeout_s=2.0, security=LinkSecurity(secret=secret))
    stranger_cert, stranger_key = certs["stranger"]
    with pytest.raises(ConnectionError, match="certificate verify failed"):  # a server our CA did not sign
        RemoteWorker("d0", HOST, port, hello, queue.Queue(), timeout_s=TIMEOUT_S,
                     security=LinkSecurity(secret=secret, tls_client=tls.client_context(stranger_cert)))
    with pytest.raises(OSError):  # mutual TLS: a client without a certificate the CA signed is turned away
        RemoteWorker("d0", HOST, port, hello, queue.Queue(), timeout_s=TIMEOUT_S,
                     security=LinkSecurity(secret=secret, tls_client=tls.client_context(cert, stranger_cert,
                                                                                          stranger_key)))
    assert tls_deployment.decode.proc.poll() is None, tls_deployment.decode.log_tail()


def test_a_tls_stream_carries_frames_both_ways_at_once(certs, seed):
    """One reader and one writer thread per side at the same time, as on a router connection: nothing mixed up."""
    cert, key = certs["ours"]
    listener = socket.create_server((HOST, 0))
    accepted: "queue.Queue[tls.TLSStream]" = queue.Queue()
    threading.Thread(target=lambda: accepted.put(tls.wrap_server(listener.accept()[0], tls.server_context(cert, key),
                                                                  TIMEOUT_S, "test")), daemon=True).start()
    client = tls.wrap_client(socket.create_connection((HOST, listener.getsockname()[1])), tls.client_context(cert),
                             HOST, TIMEOUT_S)
    server = accepted.get(timeout=TIMEOUT_S)
    listener.close()
    rng = random.Random(seed)
    count = 200
    sizes = {side: [rng.choice([0, 1, 100, 70_000]) for _ in range(count)] for side in ("client", "server")}
    received: dict[str, list[Frame]] = {"client": [], "server": []}
    errors: list[BaseException] = []

    def write(stream: tls.TLSStream, side: str) -> None:
        for i, size in enumerate(sizes[side]):
            send_frame(stream, FrameKind.TOKENS, {"i": i, "side": side}, bytes([i % 251]) * size, timeout_s=TIMEOUT_S)

    def read(stream: tls.TLSStream, side: str) -> None:
        for _ in range(count):
            received[side].append(recv_frame(stream, TIMEOUT_S))

    def guarded(fn: Callable[..., None], *args: Any) -> threading.Thread:
        def run() -> None:
            try:
                fn(*args)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
        thread = threading.Thread(target=run)
        thread.start()
        return thread

    threads = [guarded(write, client, "client"), guarded(write, server, "server"),
               guarded(read, client, "client"), guarded(read, server, "server")]
    for thread in threads:
        thread.join(2 * TIMEOUT_S)
    client.close()
    server.close()
    assert not errors, f"seed {seed}: {errors}"
    for reader, writer in (("server", "client"), ("client", "server")):
        frames = received[reader]
        assert [f.header for f in frames] == [{"i": i, "side": writer} for i in range(count)], f"seed {seed}"
        assert all(bytes(f.payload) == bytes([i % 251]) * sizes[writer][i] for i, f in enumerate(frames)), f"seed {seed}"


# ---- where the secret comes from, and where a worker may listen ----------------------------------


def test_secret_files_are_checked_like_ssh_keys(tmp_path, caplog):
    secret = new_secret()
    path = tmp_path / "secret.txt"
    path.write_bytes(secret + b"\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="minidisagg.transport.auth"):
        assert read_secret_file(path) == secret  # the trailing newline is not part of it
    assert f"chmod 600 {path}" in caplog.text and "-rw-r--r--" in caplog.text, caplog.text
    caplog.clear()
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="minidisagg.transport.auth"):
        assert read_secret_file(path) == secret
    assert caplog.text == ""
    path.write_text("short")
    with pytest.raises(ValueError, match="has 5 bytes; use at least 32"):
        read_secret_file(path)
    with pytest.raises(ValueError, match="cannot read --secret-file"):
        read_secret_file(tmp_path / "missing")
    assert secret_from(None, {SECRET_ENV: secret.decode()}) == secret and secret_from(None, {}) is None
    path.write_bytes(secret)
    assert secret_from(str(path), {SECRET_ENV: new_secret().decode()}) == secret  # the file wins over the variable
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_listening_beyond_loopback_needs_a_secret(tiny_loaded, monkeypatch):
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("::")
    with pytest.raises(ValueError, match="refusing to listen on 0.0.0.0 without a shared secret.*--insecure-no-auth"):
        DecodeServer(tiny_loaded, CONFIG, host="0.0.0.0")
    assert LinkSecurity(secret=new_secret()).listen_refusal("0.0.0.0") is None
    assert LinkSecurity(insecure_no_auth=True).listen_refusal("0.0.0.0") is None
    assert LinkSecurity().listen_refusal(HOST) is None
    with pytest.raises(ValueError, match="--insecure-no-auth contradicts"):
        link_security(insecure_no_auth=True, environ={SECRET_ENV: new_secret().decode()})
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        link_security(tls_cert="cert.pem", environ={})
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    env.update(PYTHONPATH=str(REPO_ROOT), COLUMNS="400")
    cmd = [sys.executable, "-m", "minidisagg.cli", "serve", "--role", "decode", "--host", "0.0.0.0", "--port", "0",
           *MODEL_ARGS]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env=env)
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode == 2, text
    for words in ("refusing to listen on 0.0.0.0 without a shared secret", "--secret-file", SECRET_ENV,
                  "--insecure-no-auth"):
        assert words in text, text
    assert "Traceback" not in text and "listening" not in text, text


# ---- the torch.distributed rendezvous -----------------------------------------------------------


def _outside_address() -> str | None:
    """An address of this machine other than loopback (None when it has none)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 1))  # no packet leaves: this only picks the outgoing interface
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def _free_port() -> int:
    return free_ports(HOST, 1)[0]  # outside the ephemeral range, which the store's own connections draw from


def test_the_rendezvous_store_listens_on_its_host_only():
    outside = _outside_address()
    if outside is None:
        pytest.skip("this machine has no address but loopback to try the store from")
    port = _free_port()
    store = join_store(f"tcp://{HOST}:{port}", 0, 1, timeout_s=10)
    assert store is not None
    store.set("k", "v")
    socket.create_connection((HOST, port), timeout=5).close()  # there on loopback...
    with pytest.raises(OSError):
        socket.create_connection((outside, port), timeout=5).close()  # ...and not on the machine's other address


def _join_all(world_size: int, port: int, secrets_by_rank: list[bytes]) -> list[BaseException | None]:
    """Every rank joins at once (a thread each); what each raised, None where it joined. Stores live until all are done."""
    results: list[BaseException | None] = [None] * world_size
    stores: list[object] = []

    def join(rank: int) -> None:
        try:
            stores.append(join_store(f"tcp://{HOST}:{port}", rank, world_size, timeout_s=10,
                                     secret=secrets_by_rank[rank]))
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            results[rank] = exc

    threads = [threading.Thread(target=join, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def test_every_rank_proves_the_secret_through_the_store():
    secret = new_secret()
    assert _join_all(3, _free_port(), [secret] * 3) == [None, None, None]
    results = _join_all(3, _free_port(), [secret, secret, new_secret()])
    assert isinstance(results[0], MembershipError) and "rank 2" in str(results[0]), results  # rank 0 names it
    assert all(result is not None for result in results), results  # and nobody joined (rank 0's store may be gone)
    with pytest.raises(ValueError, match="must be tcp://HOST:PORT"):
        join_store("env://", 0, 1, timeout_s=1, secret=secret)
