"""The receiving end of the transport benchmark, and this side's handle on it.

The receiver is always the real one: a ``KVReceiver`` scattering into a ``PagedKVCache``
(``PagedReceiver``). ``RemoteReceivers`` spawns a process holding a raw TCP sink (the socket
ceiling), a socket KV link and optionally a dist (gloo) KV link, each into its own paged pools,
and keeps this side's ends: the raw socket and one sender per link. The process answers
commands (counters, digests of what arrived, plain gloo receives) over a pipe.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import shutil
import socket
import tempfile
import threading
import time
from typing import Any, Optional

import torch

from minidisagg.bench.transport_names import DIST, SOCKET
from minidisagg.config import ModelConfig
from minidisagg.engine.sequence import SequenceState
from minidisagg.kv.cache import PagedKVCache
from minidisagg.kv.pages import KVLayout, gather_pages, scatter_blocks, scatter_layer, scatter_pages
from minidisagg.transport.handshake import server_handshake
from minidisagg.transport.kv_link import serve_kv_link
from minidisagg.transport.listener import listen
from minidisagg.transport.socket import SocketSender, make_hello

FINGERPRINT = "bench-transport"
GLOO_TAG, PIPE_TIMEOUT_S, TIMEOUT_S, RAW_HEAD_BYTES = 7, 120.0, 60.0, 24


def digest(pages: torch.Tensor) -> str:
    """sha256 of a tensor's bytes."""
    return hashlib.sha256(pages.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


class PagedReceiver:
    """A minimal ``KVReceiver``: one ``PagedKVCache`` per pool size; a reservation gets blocks 0..n-1 of the
    smallest pool that holds it (a benchmark has one transfer in flight per link)."""

    def __init__(self, layout: KVLayout, pools: dict[int, int]) -> None:
        width = layout.num_kv_heads * layout.head_dim
        self.layout, self.caches = layout, {}
        for num_blocks, num_layers in sorted(pools.items()):  # pool size in blocks -> layers it holds
            model = ModelConfig("bench", num_layers, width, layout.num_kv_heads, layout.num_kv_heads, layout.head_dim,
                                intermediate_size=1, vocab_size=1)
            self.caches[num_blocks] = PagedKVCache(model, num_blocks, layout.block_size, layout.dtype, "cpu")
        self._reserved: dict[str, tuple[PagedKVCache, list[int]]] = {}
        self.last: Optional[tuple[PagedKVCache, list[int]]] = None
        self.counters = {"commits": 0, "layers": 0, "bytes": 0}

    def reserve(self, transfer_id: str, num_tokens: int) -> bool:
        """Blocks 0..n-1 of the smallest pool with n blocks."""
        n = -(-num_tokens // self.layout.block_size)
        cache = next((c for size, c in self.caches.items() if size >= n), None)
        if cache is None:
            raise ValueError(f"{num_tokens} tokens need {n} blocks; the largest pool has {max(self.caches)}")
        self._reserved[transfer_id] = (cache, list(range(n)))
        return True

    def write_layer(self, transfer_id: str, layer: int, pages: torch.Tensor) -> None:
        """Scatter the pages into the reserved blocks, as a decode worker does."""
        cache, blocks = self._reserved[transfer_id]
        scatter_layer(cache, layer, blocks, pages)
        self.counters["layers"] += 1
        self.counters["bytes"] += pages.numel() * pages.element_size()

    def write_layers(self, transfer_id: str, first_layer: int, pages: torch.Tensor) -> None:
        """Scatter consecutive layers at once."""
        cache, blocks = self._reserved[transfer_id]
        scatter_pages(cache, blocks, pages, first_layer)
        self.counters["layers"] += pages.shape[0]
        self.counters["bytes"] += pages.numel() * pages.element_size()

    def write_blocks(self, transfer_id: str, first: int, pages: torch.Tensor) -> None:
        """Write pages block first into the reserved blocks, as a decode worker does."""
        cache, blocks = self._reserved[transfer_id]
        scatter_blocks(cache, blocks, pages, first)
        self.counters["bytes"] += pages.numel() * pages.element_size()

    def block_region(self, transfer_id: str, first: int, end: int) -> Optional[torch.Tensor]:
        """None: this receiver's pools are layer first, so pages always go through ``write_blocks``."""
        return None

    def commit(self, transfer_id: str, state: SequenceState, num_bytes: int,
               landed_at_s: Optional[float] = None) -> None:
        """Count the transfer; its blocks keep the pages until the next one."""
        self.last = self._reserved.pop(transfer_id)
        self.counters["commits"] += 1

    def cancel(self, transfer_id: str) -> None:
        """Forget a reservation."""
        self._reserved.pop(transfer_id, None)

    def received(self, num_layers: int) -> torch.Tensor:
        """The last committed transfer's first ``num_layers`` layers: [layers, 2, n, block_size, heads, dim]."""
        assert self.last is not None, "nothing committed yet"
        return gather_pages(*self.last)[:num_layers]


def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    got = 0
    while got < view.nbytes:
        n = sock.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


def _raw_sink(sock: socket.socket) -> None:
    """Per transfer: a header (message bytes, count, pool flag), ``count`` messages ``recv_into`` one reused
    message buffer (pool flag 0) or into distinct memory, a pool's worth (1), then a 1-byte ack."""
    head, buffers = memoryview(bytearray(RAW_HEAD_BYTES)), _Buffers()
    while _recv_exact(sock, head):
        message_bytes, count, pool = (int.from_bytes(head[i:i + 8], "little") for i in (0, 8, 16))
        destination = memoryview(buffers.get(message_bytes * (count if pool else 1)).numpy())
        for i in range(count):
            offset = i * message_bytes if pool else 0
            if not _recv_exact(sock, destination[offset:offset + message_bytes]):
                return
        sock.sendall(b"k")


class _Buffers:
    """Preallocated, pre-faulted receive buffers by size, reused (as a pool would be)."""

    def __init__(self) -> None:
        self._by_size: dict[int, torch.Tensor] = {}

    def get(self, nbytes: int) -> torch.Tensor:
        """A zeroed uint8 tensor of ``nbytes``, the same one every time for that size."""
        if nbytes not in self._by_size:
            self._by_size[nbytes] = torch.zeros(nbytes, dtype=torch.uint8)
        return self._by_size[nbytes]


def _receiver_main(conn: Any, layout: KVLayout, pools: dict[int, int], dist_init: Optional[str],
                   threads: Optional[int]) -> None:
    """The receiver process: a raw TCP sink, a socket KV link, optionally a dist KV link; answers ``conn``."""
    if threads:
        torch.set_num_threads(threads)
    server = listen("127.0.0.1", 0)
    conn.send(server.getsockname()[1])
    raw, _ = server.accept()
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.Thread(target=_raw_sink, args=(raw,), daemon=True).start()
    stop, receivers = threading.Event(), []
    for link in range(2 if dist_init else 1):
        if link == 1:
            from minidisagg.transport.dist import init_dist

            init_dist(dist_init, 0, 2, backend="gloo", device="cpu")
        sock, peer = server.accept()
        sock.settimeout(None)
        server_handshake(sock, make_hello("decode", FINGERPRINT, layout), TIMEOUT_S, {"prefill"})
        receivers.append(PagedReceiver(layout, pools))
        threading.Thread(target=serve_kv_link, args=(sock, receivers[-1], layout, stop, str(peer)), daemon=True).start()
    gloo_buffers = _Buffers()
    while True:
        command, *args = conn.recv()
        if command == "stop":
            break
        if command == "counters":
            conn.send(dict(receivers[args[0]].counters))
        elif command == "digest":
            conn.send(digest(receivers[args[0]].received(args[1])))
        elif command == "gloo":  # the dist ceiling: plain recvs of args[1] messages of args[0] bytes
            import torch.distributed as torch_dist

            destination = gloo_buffers.get(args[0])
            for _ in range(args[1]):
                torch_dist.recv(destination, src=1, tag=GLOO_TAG)
            conn.send("ok")
    stop.set()
    server.close()
    if dist_init:
        from minidisagg.transport.dist import shutdown_dist

        shutdown_dist()


class RemoteReceivers:
    """A spawned receiver process (see ``_receiver_main``) and this side's ends: raw socket, senders."""

    def __init__(self, layout: KVLayout, pools: dict[int, int], with_dist: bool = False,
                 threads: Optional[int] = None) -> None:
        self._tmp = tempfile.mkdtemp(prefix="bench-transport-") if with_dist else None
        dist_init = f"file://{self._tmp}/rendezvous" if self._tmp else None
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_receiver_main, args=(child, layout, pools, dist_init, threads), daemon=True)
        self.process.start()
        port, hello = self.answer(), make_hello("prefill", FINGERPRINT, layout)
        self.raw = socket.create_connection(("127.0.0.1", port))
        self.raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.senders: dict[str, SocketSender] = {SOCKET: SocketSender("127.0.0.1", port, hello)}
        if dist_init:
            from minidisagg.transport.dist import DistSender, init_dist

            init_dist(dist_init, 1, 2, backend="gloo", device="cpu")
            self.senders[DIST] = DistSender("127.0.0.1", port, hello, dst_rank=0)

    def post(self, *command: Any) -> None:
        """Send a command to the receiver process."""
        self._conn.send(command)

    def answer(self) -> Any:
        """The receiver process's next answer (RuntimeError if it died, TimeoutError if silent too long)."""
        deadline = time.monotonic() + PIPE_TIMEOUT_S
        while not self._conn.poll(0.2):
            if not self.process.is_alive():
                raise RuntimeError(f"the receiver process died (exit code {self.process.exitcode})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the receiver process was silent for {PIPE_TIMEOUT_S} s")
        return self._conn.recv()

    def ask(self, *command: Any) -> Any:
        """Send a command to the receiver process and return its answer."""
        self.post(*command)
        return self.answer()

    def counters(self, transport: str) -> dict[str, int]:
        """The receiver's commits, layer messages and bytes so far on ``transport``'s link."""
        return self.ask("counters", list(self.senders).index(transport))

    def digest(self, transport: str, num_layers: int) -> str:
        """sha256 of the last transfer's first ``num_layers`` layers, as the receiver holds them."""
        return self.ask("digest", list(self.senders).index(transport), num_layers)

    def close(self) -> None:
        """Say BYE on every link and stop the process."""
        for sender in self.senders.values():
            sender.close()
        self.raw.close()
        if self.process.is_alive():
            self.post("stop")
        self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
        if self._tmp:
            from minidisagg.transport.dist import shutdown_dist

            shutdown_dist()
            shutil.rmtree(self._tmp, ignore_errors=True)
