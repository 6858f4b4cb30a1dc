"""Wire layer of the socket transport: frames, limits, timeouts and the handshake over loopback TCP."""

from __future__ import annotations

import ctypes
import os
import random
import secrets
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from minidisagg.transport.framing import (
    MAGIC,
    PREFIX,
    WIRE_VERSION,
    FrameError,
    FrameKind,
    HandshakeError,
    PeerClosed,
    connect,
    encode_head,
    payload_tensor,
    recv_frame,
    send_frame,
    tensor_memoryview,
    tune_socket,
)
from minidisagg.transport.handshake import Hello, client_handshake, server_handshake

MiB = 1 << 20


@pytest.fixture
def seed() -> int:
    """A fresh seed per run (or MINIDISAGG_TEST_SEED to replay one); failures print it."""
    value = int(os.environ.get("MINIDISAGG_TEST_SEED", secrets.randbits(32)))
    print(f"seed={value}")
    return value


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected loopback TCP pair (sender, receiver) on 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname(), timeout=5)
        b, _ = server.accept()
    for sock in (a, b):
        sock.settimeout(None)
        tune_socket(sock)
    yield a, b
    a.close()
    b.close()


class Background:
    """Runs ``fn`` in a daemon thread; ``join`` returns its result or re-raises its exception."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:  # handed to the test thread by join()
            self.error = exc

    def join(self, timeout_s: float = 10.0) -> Any:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "background thread did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def random_header(rng: random.Random) -> dict[str, Any]:
    """A random JSON object: numbers, unicode strings, bools, nulls, nested lists and dicts."""

    def text() -> str:
        ranges = [(32, 127), (0xA0, 0xD7FF), (0x10000, 0x10FFFF)]
        return "".join(chr(rng.randrange(*rng.choice(ranges))) for _ in range(rng.randrange(12)))

    def value(depth: int) -> Any:
        pick = rng.randrange(7 if depth < 3 else 5)
        if pick == 5:
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        if pick == 6:
            return {text(): value(depth + 1) for _ in range(rng.randrange(4))}
        makers = [lambda: rng.randint(-(2**53), 2**53), lambda: rng.uniform(-1e9, 1e9), text, lambda: rng.random() < 0.5]
        return None if pick == 4 else makers[pick]()

    return {text(): value(0) for _ in range(rng.randrange(6))}


def random_bits(gen: torch.Generator, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor of random bit patterns (NaNs and infinities included) of ``dtype``."""
    int_dtype = {2: torch.int16, 4: torch.int32}[dtype.itemsize]
    bound = 2 ** (8 * dtype.itemsize - 1)
    return torch.randint(-bound, bound, shape, dtype=int_dtype, generator=gen).view(dtype)


def random_shape(rng: random.Random) -> tuple[int, ...]:
    """0 to 4 dimensions of size 0 to 9 (so empty and scalar tensors come up too)."""
    return tuple(rng.randrange(10) for _ in range(rng.randrange(5)))


def address_of(buffer: bytearray | memoryview) -> int:
    """The memory address of a writable buffer's first byte."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN payloads included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    )


def test_round_trip_every_kind_and_payload(pair, seed):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    cases = []
    for kind in FrameKind:
        for variant in ("none", "bytes", "memoryview", torch.float32, torch.bfloat16, torch.float16):
            if isinstance(variant, torch.dtype):
                shape = random_shape(rng) if rng.random() < 0.7 else (rng.randrange(1, 64), 1024)
                payload: Any = random_bits(gen, variant, shape)
            elif variant == "none":
                payload = None
            else:
                data = rng.randbytes(rng.choice([0, 1, rng.randrange(1, 300_000)]))
                payload = data if variant == "bytes" else memoryview(bytearray(data))
            cases.append((kind, random_header(rng), payload))
    sender = Background(lambda: [send_frame(pair[0], *case, timeout_s=5) for case in cases])
    for kind, header, payload in cases:
        frame = recv_frame(pair[1], timeout_s=5)
        assert frame.kind is kind and frame.header == header, f"seed={seed}"
        assert isinstance(frame.payload, bytearray), f"seed={seed}"
        if isinstance(payload, torch.Tensor):
            got = payload_tensor(frame, payload.dtype, payload.shape)
            assert same_bits(got, payload), f"seed={seed} {kind.name} {payload.dtype} {tuple(payload.shape)}"
            if payload.numel():
                assert got.data_ptr() == address_of(frame.payload), "payload_tensor copied the payload"
        else:
            assert bytes(frame.payload) == bytes(payload or b""), f"seed={seed} {kind.name}"
    sent = sender.join()
    heads = [len(encode_head(k, h, 0)) for k, h, _ in cases]
    sizes = [0 if p is None else (p.numel() * p.element_size() if isinstance(p, torch.Tensor) else len(p)) for *_, p in cases]
    assert sent == [h + s for h, s in zip(heads, sizes)], "send_frame must return the bytes it sent"


def test_payload_tensor_writes_through_to_the_frame(pair):
    src = torch.arange(12, dtype=torch.float32).view(3, 4)
    send_frame(pair[0], FrameKind.LAYER, {"layer": 0}, src)
    frame = recv_frame(pair[1], timeout_s=5)
    view = payload_tensor(frame, torch.float32, (3, 4))
    view[1, 2] = -7.0
    assert payload_tensor(frame, torch.float32, (3, 4))[1, 2] == -7.0
    with pytest.raises(FrameError, match="needs 40"):
        payload_tensor(frame, torch.float32, (2, 5))
    with pytest.raises(FrameError, match="needs 24"):
        payload_tensor(frame, torch.bfloat16, (12,))


def test_recv_into_preallocated_tensor(pair, seed):
    gen = torch.Generator().manual_seed(seed)
    src = random_bits(gen, torch.bfloat16, (2, 8, 16, 3, 64))  # one layer's K and V pages
    dst = torch.empty_like(src)
    dst_ptr = dst.data_ptr()
    seen: list[tuple[dict[str, Any], int]] = []

    def into(header: dict[str, Any], payload_len: int) -> memoryview:
        seen.append((header, payload_len))
        return tensor_memoryview(dst)

    send_frame(pair[0], FrameKind.LAYER, {"layer": 3}, src)
    frame = recv_frame(pair[1], timeout_s=5, into=into)
    assert seen == [({"layer": 3}, src.numel() * 2)]
    assert dst.data_ptr() == dst_ptr and same_bits(dst, src), f"seed={seed}"
    assert payload_tensor(frame, torch.bfloat16, src.shape).data_ptr() == dst_ptr

    send_frame(pair[0], FrameKind.LAYER, {"layer": 4}, src)  # into() may decline with None
    frame = recv_frame(pair[1], timeout_s=5, into=lambda header, n: None)
    assert same_bits(payload_tensor(frame, torch.bfloat16, src.shape), src)

    send_frame(pair[0], FrameKind.LAYER, {"layer": 5}, src)
    with pytest.raises(FrameError, match="into"):
        recv_frame(pair[1], timeout_s=5, into=lambda header, n: memoryview(bytearray(n - 2)))


def chunked_sender(sock: socket.socket, data: bytes, rng: random.Random, max_chunk: int, pause_s: float) -> None:
    """Write ``data`` in random chunks of 1..max_chunk bytes with tiny sleeps between them."""
    offset = 0
    while offset < len(data):
        step = rng.randint(1, max_chunk)
        sock.sendall(data[offset : offset + step])
        offset += step
        time.sleep(pause_s)


@pytest.mark.parametrize("max_chunk, payload_len", [(1, 200), (4096, 256 * 1024)])
def test_partial_reads_reassemble(pair, seed, max_chunk, payload_len):
    rng = random.Random(seed)
    header, payload = random_header(rng), rng.randbytes(payload_len)
    data = encode_head(FrameKind.TOKENS, header, len(payload)) + payload
    sender = Background(lambda: chunked_sender(pair[0], data, rng, max_chunk, 0.0002))
    frame = recv_frame(pair[1], timeout_s=10)
    sender.join()
    assert (frame.kind, frame.header, bytes(frame.payload)) == (FrameKind.TOKENS, header, payload), f"seed={seed}"


def raw_prefix(magic=MAGIC, version=WIRE_VERSION, kind=int(FrameKind.LAYER), flags=0, header_len=2, payload_len=0) -> bytes:
    """A hand-made prefix, to forge broken frames."""
    return PREFIX.pack(magic, version, kind, flags, header_len, payload_len)


GARBAGE = {
    "random bytes": (b"\x00" + random.Random().randbytes(63), {}, "bad magic"),
    "wrong magic": (raw_prefix(magic=b"HTTP") + b"{}", {}, r"bad magic b'HTTP'"),
    "wrong version": (raw_prefix(version=WIRE_VERSION + 1) + b"{}", {}, f"wrong wire version {WIRE_VERSION + 1}"),
    "unknown kind": (raw_prefix(kind=200) + b"{}", {}, "unknown frame kind 200"),
    "flags set": (raw_prefix(flags=1) + b"{}", {}, "unsupported flags"),
    "header over limit": (raw_prefix(header_len=2**31), {}, "header too large"),
    "payload over limit": (raw_prefix(payload_len=2**40), {"max_payload_bytes": 1024}, "payload too large"),
    "payload over default": (raw_prefix(payload_len=2**40), {}, "payload too large"),
    "small header limit": (raw_prefix(header_len=100), {"max_header_bytes": 99}, "header too large"),
    "non-JSON header": (raw_prefix(header_len=5) + b"{oops", {}, "invalid JSON"),
    "non-UTF-8 header": (raw_prefix(header_len=4) + b'"\xff"x', {}, "invalid JSON"),
    "JSON array header": (raw_prefix(header_len=7) + b"[1,2,3]", {}, "header not an object"),
    "JSON string header": (raw_prefix(header_len=4) + b'"hi"', {}, "header not an object"),
}


@pytest.mark.parametrize("name", list(GARBAGE))
def test_garbage_is_rejected_without_big_allocations(pair, name):
    data, limits, message = GARBAGE[name]
    pair[0].sendall(data)  # note: only the prefix of oversized frames is ever sent
    tracemalloc.start()
    start_s = time.monotonic()
    try:
        with pytest.raises(FrameError, match=message):
            recv_frame(pair[1], timeout_s=3, **limits)
        peak_bytes = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - start_s < 1.0
    assert peak_bytes < MiB, f"{name}: allocated {peak_bytes} bytes before rejecting"


def test_sender_rejects_bad_frames(pair):
    with pytest.raises(FrameError, match=r"\.contiguous\(\)\.cpu\(\)"):
        send_frame(pair[0], FrameKind.LAYER, {}, torch.zeros(4, 4).t())
    with pytest.raises(FrameError, match="not JSON-serializable"):
        send_frame(pair[0], FrameKind.ACK, {"x": object()})
    with pytest.raises(FrameError, match="not JSON-serializable"):
        send_frame(pair[0], FrameKind.ACK, {"x": float("nan")})
    with pytest.raises(FrameError, match="must be a dict"):
        send_frame(pair[0], FrameKind.ACK, [1, 2])  # type: ignore[arg-type]
    with pytest.raises(FrameError, match="unknown frame kind"):
        send_frame(pair[0], 99, {})  # type: ignore[arg-type]


def test_recv_times_out_on_a_silent_peer(pair):
    start_s = time.monotonic()
    with pytest.raises(TimeoutError, match=r"no frame from 127\.0\.0\.1:\d+ within 0\.2 s"):
        recv_frame(pair[1], timeout_s=0.2)
    assert 0.15 < time.monotonic() - start_s < 1.0
    assert pair[1].gettimeout() is None, "recv_frame must restore the socket's own timeout"
    pair[1].settimeout(0.1)  # without timeout_s the socket's own timeout applies
    with pytest.raises(TimeoutError, match=r"within 0\.1 s"):
        recv_frame(pair[1])
    send_frame(pair[0], FrameKind.PING, {"n": 1})  # nothing was consumed: the stream still works
    assert recv_frame(pair[1], timeout_s=1).header == {"n": 1}
    assert pair[1].gettimeout() == 0.1


def test_recv_times_out_on_a_stalled_frame(pair):
    pair[0].sendall(encode_head(FrameKind.LAYER, {"layer": 0}, 100) + b"x" * 10)
    with pytest.raises(TimeoutError, match=r"incomplete after 0\.2 s: got 41 of 131 bytes"):
        recv_frame(pair[1], timeout_s=0.2)


def test_send_times_out_when_the_peer_does_not_read(pair):
    start_s = time.monotonic()
    with pytest.raises(TimeoutError, match="could not send LAYER frame"):
        send_frame(pair[0], FrameKind.LAYER, {}, bytes(64 * MiB), timeout_s=0.3)
    assert time.monotonic() - start_s < 1.5


def test_peer_closed_mid_frame_and_between_frames(pair):
    pair[0].sendall(encode_head(FrameKind.LAYER, {"layer": 0}, 100) + b"x" * 10)
    pair[0].close()
    with pytest.raises(PeerClosed, match="mid-frame after 41 of 131 bytes"):
        recv_frame(pair[1], timeout_s=2)
    a, b = socket.socketpair()
    with a, b:
        send_frame(a, FrameKind.BYE, {})
        a.close()
        assert recv_frame(b, timeout_s=2).kind is FrameKind.BYE
        with pytest.raises(PeerClosed, match="between frames"):
            recv_frame(b, timeout_s=2)


def make_hello(role: str, **changes: Any) -> Hello:
    """A Hello for the tiny preset's layout, with some fields changed."""
    fields = dict(fingerprint="cfg-1234", dtype="bfloat16", block_size=16, kv_layout="layers,2,blocks,block_size,kv_heads,head_dim")
    return Hello(role=role, **{**fields, **changes})


def handshake(pair, client: Hello, server: Hello, **server_kwargs: Any) -> tuple[Any, Any]:
    """Run both sides; returns (client result or exception, server result or exception)."""
    server_side = Background(lambda: server_handshake(pair[1], server, timeout_s=2, **server_kwargs))
    try:
        client_result: Any = client_handshake(pair[0], client, timeout_s=2)
    except HandshakeError as exc:
        client_result = exc
    try:
        server_result: Any = server_side.join()
    except HandshakeError as exc:
        server_result = exc
    return client_result, server_result


def test_handshake_matching_hellos(pair):
    client, server = make_hello("prefill"), make_hello("decode")
    assert handshake(pair, client, server, accept_roles={"prefill"}) == (server, client)
    send_frame(pair[0], FrameKind.RESERVE, {"request_id": "r0", "num_blocks": 3})  # the stream is in step afterwards
    assert recv_frame(pair[1], timeout_s=1).header["num_blocks"] == 3


def test_handshake_mismatch_lists_every_field_on_both_sides(pair):
    client = make_hello("prefill", fingerprint="cfg-9999", block_size=32)
    client_error, server_error = handshake(pair, client, make_hello("decode"))
    for error in (client_error, server_error):
        assert isinstance(error, HandshakeError), error
        text = str(error)
        assert "fingerprint: ours=cfg-1234 theirs=cfg-9999" in text and "block_size: ours=16 theirs=32" in text
        assert "dtype" not in text and "kv_layout" not in text


def test_handshake_rejects_roles_and_malformed_hellos(pair):
    client_error, server_error = handshake(pair, make_hello("client"), make_hello("decode"), accept_roles={"prefill"})
    assert "role" in str(client_error) and "role" in str(server_error)
    a, b = socket.socketpair()
    with a, b:
        server_side = Background(lambda: server_handshake(b, make_hello("decode"), timeout_s=2))
        assert recv_frame(a, timeout_s=2).header == {"scheme": "none"}  # a server without a secret asks for none
        send_frame(a, FrameKind.HELLO, {"role": "prefill", "fingerprint": "x", "block_size": "16"})
        reply = recv_frame(a, timeout_s=2)
        assert reply.kind is FrameKind.ERROR and "dtype" in reply.header["message"]
        with pytest.raises(HandshakeError, match="missing field 'dtype'"):
            server_side.join()


def test_connect_and_handshake_over_a_listening_socket(seed):
    payload = random_bits(torch.Generator().manual_seed(seed), torch.float16, (4, 1000))
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def serve() -> Hello:
            conn, _ = server.accept()
            with conn:
                peer = server_handshake(conn, make_hello("decode"), timeout_s=2)
                frame = recv_frame(conn, timeout_s=2)
                send_frame(conn, FrameKind.ACK, frame.header, frame.payload, timeout_s=2)
                return peer

        server_side = Background(serve)
        with connect("127.0.0.1", port, timeout_s=2) as sock:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            assert client_handshake(sock, make_hello("prefill"), timeout_s=2).role == "decode"
            send_frame(sock, FrameKind.LAYER, {"layer": 7}, payload, timeout_s=2)
            echo = recv_frame(sock, timeout_s=2)
        assert server_side.join().role == "prefill"
    assert echo.header == {"layer": 7} and same_bits(payload_tensor(echo, torch.float16, (4, 1000)), payload)


def test_connect_to_a_closed_port_fails_clearly():
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # closed again on exit: nobody listens there now
    start_s = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"127\.0\.0\.1:{port} within 0\.5 s .* 2 attempt"):
        connect("127.0.0.1", port, timeout_s=0.5, retries=1, retry_delay_s=0.05)
    assert time.monotonic() - start_s < 2.0


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def test_throughput_16mib_frames_vs_raw_socket(pair, seed):
    """Not a timed assertion: prints loopback GB/s for frames and for a bare sendall/recv_into loop."""
    src = torch.randn(4 * MiB, generator=torch.Generator().manual_seed(seed))  # 16 MiB of float32
    src_view, repeats = tensor_memoryview(src), 5
    total_bytes = repeats * src_view.nbytes

    def raw_round() -> float:
        buffer = memoryview(bytearray(src_view.nbytes))
        start_s = time.perf_counter()
        sender = Background(lambda: [pair[0].sendall(src_view) for _ in range(repeats)])
        for _ in range(repeats):
            got = 0
            while got < buffer.nbytes:
                got += pair[1].recv_into(buffer[got:])
        elapsed_s = time.perf_counter() - start_s
        sender.join()
        assert bytes(buffer) == bytes(src_view)
        return elapsed_s

    def framed_round(into: bool) -> float:
        targets = [torch.zeros_like(src) for _ in range(repeats)] if into else []  # a KV cache is preallocated
        frames = []
        start_s = time.perf_counter()
        sender = Background(lambda: [send_frame(pair[0], FrameKind.LAYER, {"layer": i}, src) for i in range(repeats)])
        for i in range(repeats):
            hook = (lambda header, n: tensor_memoryview(targets[header["layer"]])) if into else None
            frames.append(recv_frame(pair[1], timeout_s=10, into=hook))
        elapsed_s = time.perf_counter() - start_s
        sender.join()
        for frame in frames:
            assert torch.equal(payload_tensor(frame, torch.float32, src.shape), src)
        return elapsed_s

    best_s = {"raw sendall/recv_into": [], "frames (new bytearray)": [], "frames (into= tensor)": []}
    for _ in range(3):
        best_s["raw sendall/recv_into"].append(raw_round())
        best_s["frames (new bytearray)"].append(framed_round(into=False))
        best_s["frames (into= tensor)"].append(framed_round(into=True))
    print(f"\nloopback TCP, {repeats} x 16 MiB float32, best of 3:")
    for name, times in best_s.items():
        print(f"  {name:24s} {_gbps(total_bytes, min(times)):6.2f} GB/s")
