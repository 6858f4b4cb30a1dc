"""KV transfer bandwidth by transport and message size, each against its plain ceiling; KV transfer vs prefill.

One message is one layer's pages (one LAYER frame); one transfer is reserve -> N x send_layer
-> commit, timed until the commit is acknowledged, as a prefill worker does it. The receiving
side is always the real one: a ``KVReceiver`` scattering into a ``PagedKVCache`` (behind
``serve_kv_link`` in a separate process for socket and dist). Ceilings, measured in the same run:

- socket: a plain loop of ``sendall`` / ``recv_into`` of the same byte counts to that process
  (one reused message buffer, a 1-byte ack per transfer), the receiver in its own process so
  the GIL does not interfere; also the same loop landing the bytes in pool-sized memory;
- dist (gloo): plain ``torch.distributed`` send / recv of the same tensors between the two processes;
- inproc: ``dst.copy_(src)`` of the same bytes.

GB/s counts payload bytes once (1e9 bytes/s). Every repetition runs all methods back to back
(rotating who goes first); GB/s is the median over repetitions, the fraction of a ceiling the
median of the per-repetition ratios, so load from other processes hits both sides alike.
Torch runs one thread per process by default (two processes share two cores). The
KV-vs-prefill part times a real prefill (``LLMEngine``) and ships that request's pages over the
socket transport; a projection for Llama-8B follows.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from minidisagg.bench_cpu import default_out_dir
from minidisagg.config import PRESETS, CacheConfig, EngineConfig, ModelConfig
from minidisagg.engine.sampling import SamplingParams
from minidisagg.engine.sequence import Sequence, SequenceState
from minidisagg.kv.cache import PagedKVCache
from minidisagg.kv.pages import KVLayout, gather_layer, gather_pages, scatter_blocks, scatter_layer, scatter_pages
from minidisagg.transport.framing import server_handshake
from minidisagg.transport.inproc import InprocSender
from minidisagg.transport.kv_link import serve_kv_link
from minidisagg.transport.socket import SocketSender, listen, make_hello

KiB, MiB = 1 << 10, 1 << 20
SIZES = (64 * KiB, 1 * MiB, 16 * MiB, 64 * MiB)
QUICK_SIZES = (64 * KiB, 1 * MiB)
# Llama-8B's per-layer pages: 16 tokens x 8 KV heads x 128 dims x K,V x bf16 = 64 KiB a block.
BENCH_LAYOUT = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16)
FINGERPRINT = "bench-transport"
TCP, SOCKET, GLOO, DIST, COPY, INPROC = ("raw TCP sendall/recv_into", "socket", "raw gloo send/recv", "dist (gloo)",
                                         "tensor copy_", "inproc")
TCP_POOL = "raw TCP, recv_into pool-sized memory"  # a second reference for socket: no cache-hot reused buffer
CEILING_OF = {SOCKET: TCP, DIST: GLOO, INPROC: COPY}
GOAL = (SOCKET, 16 * MiB, 0.70)
MAX_MESSAGES_PER_SAMPLE = 2048
PROJECTION_LINKS_GBPS = {"PCIe/IB-class 25 GB/s": 25.0, "NVLink-class 400 GB/s": 400.0}
H200_BF16_MATMUL_TFLOPS, H200_HBM_TBPS = 779.0, 4.1  # measured on an H200, DESIGN.md "Measured facts"
GLOO_TAG, PIPE_TIMEOUT_S, TIMEOUT_S, RAW_HEAD_BYTES = 7, 120.0, 60.0, 24


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


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


@dataclass
class Case:
    """One message size: source pages, layers per transfer, transfers per timed sample."""

    message_bytes: int
    transfers_per_sample: int
    source: torch.Tensor  # [layers, 2, blocks, block_size, kv_heads, head_dim]

    @property
    def num_layers(self) -> int:
        """Layers (messages) per transfer."""
        return self.source.shape[0]

    @property
    def num_blocks(self) -> int:
        """Blocks per layer message."""
        return self.source.shape[2]

    @property
    def sample_bytes(self) -> int:
        """Payload bytes of one timed sample."""
        return self.message_bytes * self.num_layers * self.transfers_per_sample


def make_case(message_bytes: int, transfer_bytes: int, sample_bytes: int, seed: int = 0) -> Case:
    """Pages of ``message_bytes`` per layer in ``BENCH_LAYOUT``; up to 32 layers a transfer, sized to the budgets."""
    block_bytes = BENCH_LAYOUT.layer_nbytes(1)
    if message_bytes % block_bytes:
        raise ValueError(f"message size {message_bytes} is not a multiple of one block's {block_bytes} bytes")
    num_layers = max(1, min(BENCH_LAYOUT.num_layers, transfer_bytes // message_bytes))
    transfers = max(1, min(sample_bytes // (message_bytes * num_layers), MAX_MESSAGES_PER_SAMPLE // num_layers))
    shape = (num_layers, *BENCH_LAYOUT.layer_shape(message_bytes // block_bytes))
    return Case(message_bytes, transfers, torch.randn(shape, generator=torch.Generator().manual_seed(seed),
                                                       dtype=BENCH_LAYOUT.dtype))


def commit_state(transfer_id: str, num_tokens: int) -> SequenceState:
    """A plausible state to commit (prompt ids of the right length, one output token)."""
    return SequenceState(transfer_id, [0] * num_tokens, [1], dataclasses.asdict(SamplingParams(max_tokens=2)), {})


def transfer(sender: Any, tid: str, case: Case) -> None:
    """reserve -> one send_layer per layer -> commit."""
    num_tokens = case.num_blocks * BENCH_LAYOUT.block_size
    if not sender.reserve(tid, num_tokens, TIMEOUT_S):
        raise RuntimeError(f"receiver refused transfer {tid}")
    for layer in range(case.num_layers):
        sender.send_layer(tid, layer, case.source[layer])
    sender.commit(tid, commit_state(tid, num_tokens), case.message_bytes * case.num_layers, TIMEOUT_S)


def raw_tcp_sample(sock: socket.socket, case: Case, pool: bool = False) -> None:
    """The socket ceiling: per transfer, a header, N ``sendall`` of the message bytes, then the ack.

    The receiver lands every message in one reused buffer (the plain loop), or with ``pool`` in
    distinct memory the size of the transfer, as pages land in a KV pool.
    """
    views = [memoryview(case.source[layer].reshape(-1).view(torch.uint8).numpy()) for layer in range(case.num_layers)]
    head, ack = b"".join(x.to_bytes(8, "little") for x in (case.message_bytes, case.num_layers, pool)), bytearray(1)
    for _ in range(case.transfers_per_sample):
        sock.sendall(head)
        for view in views:
            sock.sendall(view)
        if sock.recv_into(ack) != 1:
            raise ConnectionError("raw TCP sink closed")


def gloo_sample(remote: RemoteReceivers, case: Case) -> None:
    """The dist ceiling: per transfer, N plain ``torch.distributed.send`` of the pages, then the receiver's ok."""
    import torch.distributed as torch_dist

    flat = [case.source[layer].reshape(-1).view(torch.uint8) for layer in range(case.num_layers)]
    for _ in range(case.transfers_per_sample):
        remote.post("gloo", case.message_bytes, case.num_layers)
        for tensor in flat:
            torch_dist.send(tensor, dst=0, tag=GLOO_TAG)
        remote.answer()


def copy_sample(dst: torch.Tensor, case: Case) -> None:
    """The inproc ceiling: ``dst[layer].copy_(src[layer])`` for every message of the sample."""
    for _ in range(case.transfers_per_sample):
        for layer in range(case.num_layers):
            dst[layer].copy_(case.source[layer])


def dist_status() -> Optional[str]:
    """None when the dist transport can be benchmarked, else why not."""
    try:
        import torch.distributed as torch_dist

        from minidisagg.transport import dist  # noqa: F401
    except ImportError as exc:
        return f"not yet available ({exc})"
    if not torch_dist.is_gloo_available():
        return "torch has no gloo backend here"
    return "a torch.distributed process group already exists in this process" if torch_dist.is_initialized() else None


def _paired_fraction(ceiling_s: Seq[float], transport_s: Seq[float]) -> float:
    """Median over repetitions of ceiling time / transport time (each pair measured back to back)."""
    return _sig(statistics.median(c / t for c, t in zip(ceiling_s, transport_s)), 3)


def _progress(console: Console, enabled: bool) -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=console, disable=not enabled)


def run_bandwidth(sizes: Seq[int] = SIZES, repeats: int = 9, transfer_bytes: int = 256 * MiB,
                  sample_bytes: int = 256 * MiB, with_dist: bool = True, threads: Optional[int] = None,
                  console: Optional[Console] = None, progress: bool = True) -> dict[str, Any]:
    """GB/s of every transport and ceiling at every message size; checks every transfer's bytes arrived."""
    console = console or Console(stderr=True, quiet=not progress)
    cases = [make_case(size, transfer_bytes, sample_bytes, seed=i) for i, size in enumerate(sizes)]
    pools = {c.num_blocks: c.num_layers for c in cases}
    dist_note = dist_status() if with_dist else "not requested"
    remote = RemoteReceivers(BENCH_LAYOUT, pools, with_dist=dist_note is None, threads=threads)
    local = PagedReceiver(BENCH_LAYOUT, pools)
    senders: dict[str, Any] = {**remote.senders, INPROC: InprocSender(local)}
    copy_dst = [torch.empty_like(c.source) for c in cases]
    ceilings: dict[str, Callable[[int], None]] = {TCP: lambda i: raw_tcp_sample(remote.raw, cases[i]),
                                                  TCP_POOL: lambda i: raw_tcp_sample(remote.raw, cases[i], pool=True),
                                                  COPY: lambda i: copy_sample(copy_dst[i], cases[i])}
    if DIST in senders:
        ceilings[GLOO] = lambda i: gloo_sample(remote, cases[i])
    methods = [m for pair in CEILING_OF.items() for m in reversed(pair) if m in senders or m in ceilings]
    methods.insert(1, TCP_POOL)
    seconds: dict[tuple[str, int], list[float]] = {(m, c.message_bytes): [] for m in methods for c in cases}
    ids = iter(range(1 << 62))

    def counters(method: str) -> dict[str, int]:
        return dict(local.counters) if method == INPROC else remote.counters(method)

    def run(method: str, i: int) -> float:
        case, before = cases[i], counters(method) if method in senders else None
        t0 = time.perf_counter()
        if before is None:
            ceilings[method](i)
        else:
            for _ in range(case.transfers_per_sample):
                transfer(senders[method], f"t{next(ids)}", case)
        elapsed = time.perf_counter() - t0
        if before is not None:  # the receiver saw every transfer, layer and byte of the sample
            after = counters(method)
            expected = {"commits": case.transfers_per_sample, "layers": case.transfers_per_sample * case.num_layers,
                        "bytes": case.sample_bytes}
            if {k: after[k] - before[k] for k in expected} != expected:
                raise AssertionError(f"{method} at {case.message_bytes} bytes: receiver counters {before} -> {after}, "
                                     f"expected +{expected}")
        return elapsed

    verified: dict[str, bool] = {}
    try:
        with _progress(console, progress) as bar:
            task = bar.add_task("bandwidth", total=(repeats + 1) * len(methods) * len(cases))
            for rep in range(-1, repeats):  # rep -1 warms every path up
                order = methods[rep % len(methods):] + methods[: rep % len(methods)]
                for i, case in enumerate(cases):
                    for method in order:
                        bar.update(task, description=f"rep {rep + 1}/{repeats} {_size(case.message_bytes)} {method}")
                        elapsed = run(method, i)
                        if rep >= 0:
                            seconds[(method, case.message_bytes)].append(elapsed)
                        bar.advance(task)
        for i, case in enumerate(cases):  # fresh pages, one more transfer each, every byte compared
            case.source.copy_(torch.randn(case.source.shape, dtype=case.source.dtype))
            for method, sender in senders.items():
                transfer(sender, f"verify{next(ids)}", replace(case, transfers_per_sample=1))
                n = case.num_layers
                got = digest(local.received(n)) if method == INPROC else remote.digest(method, n)
                verified[f"{method} {case.message_bytes}"] = got == digest(case.source)
    finally:
        remote.close()
    if not all(verified.values()):
        raise AssertionError(f"transfers delivered different bytes: {[k for k, ok in verified.items() if not ok]}")
    by_size = {c.message_bytes: c for c in cases}
    rows = []
    for method in methods:
        for size, case in by_size.items():
            mine, ceiling = seconds[(method, size)], CEILING_OF.get(method)
            row = {"transport": method, "message_bytes": size,
                   "GBps": _sig(case.sample_bytes / statistics.median(mine) / 1e9),
                   "GBps_best": _sig(case.sample_bytes / min(mine) / 1e9), "ceiling": ceiling, "ceiling_GBps": None,
                   "fraction_of_ceiling": None, "layers_per_transfer": case.num_layers,
                   "transfers_per_sample": case.transfers_per_sample, "seconds_per_repeat": [round(s, 5) for s in mine]}
            if ceiling:  # each repetition measured both back to back: the median of those paired ratios
                top = seconds[(ceiling, size)]
                row["ceiling_GBps"] = _sig(case.sample_bytes / statistics.median(top) / 1e9)
                row["fraction_of_ceiling"] = _paired_fraction(top, mine)
            if method == SOCKET:
                row["fraction_of_pool_destination_ceiling"] = _paired_fraction(seconds[(TCP_POOL, size)], mine)
            rows.append(row)
    return {"rows": rows, "verified": verified, "dist": dist_note or "measured"}


def run_kv_vs_prefill(model: str = "smollm2-135m", prompt_lens: Seq[int] = (128, 512, 2048), repeats: int = 3,
                      dtype: str = "float32", threads: Optional[int] = None, console: Optional[Console] = None,
                      progress: bool = True) -> list[dict[str, Any]]:
    """Prefill time of one prompt per length (``LLMEngine``) against shipping its KV over the socket transport."""
    from minidisagg.engine.llm_engine import LLMEngine
    from minidisagg.models.registry import load_model

    console = console or Console(stderr=True, quiet=not progress)
    with console.status(f"loading {model} (random weights)"):
        loaded = load_model(model, device="cpu", dtype=dtype, random_weights=True)
    longest, block_size = max(prompt_lens), 16
    config = EngineConfig(max_num_seqs=1, max_num_batched_tokens=longest,
                          cache=CacheConfig(block_size=block_size, num_blocks=longest // block_size + 2))
    engine = LLMEngine(loaded, config)
    layout = KVLayout.of(engine.kv_cache)
    remote = RemoteReceivers(layout, {config.cache.num_blocks: layout.num_layers}, threads=threads)
    sender, gen = remote.senders[SOCKET], torch.Generator().manual_seed(0)
    handed_off: list[Sequence] = []
    engine.handoff = handed_off.append  # keep the prefilled sequence's blocks, as a prefill worker does
    prefill_s: dict[int, list[float]] = {n: [] for n in prompt_lens}
    transfer_s: dict[int, list[float]] = {n: [] for n in prompt_lens}
    verified = True
    try:
        with _progress(console, progress) as bar:
            task = bar.add_task("kv vs prefill", total=(repeats + 1) * len(prompt_lens))
            for rep in range(-1, repeats):  # rep -1 warms up
                for n in prompt_lens:
                    bar.update(task, description=f"rep {rep + 1}/{repeats}  {n} tokens")
                    mark = len(engine.stats.steps)
                    engine.add_request(torch.randint(0, loaded.config.vocab_size, (n,), generator=gen).tolist(),
                                       SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
                    while engine.has_unfinished():
                        engine.step()
                    seq, tid = handed_off.pop(), f"kv{rep}-{n}"
                    t0 = time.perf_counter()  # as a prefill worker: reserve, gather + send each layer, commit
                    sender.reserve(tid, len(seq.prompt_token_ids), TIMEOUT_S)
                    for layer in range(layout.num_layers):
                        sender.send_layer(tid, layer, gather_layer(engine.kv_cache, layer, seq.block_table))
                    sender.commit(tid, SequenceState.of(seq), layout.request_nbytes(len(seq.block_table)), TIMEOUT_S)
                    elapsed = time.perf_counter() - t0
                    if rep == repeats - 1:  # the pages that arrived, byte for byte, against the sender's pool
                        sent = torch.stack([gather_layer(engine.kv_cache, layer, seq.block_table)
                                            for layer in range(layout.num_layers)])
                        verified &= remote.digest(SOCKET, layout.num_layers) == digest(sent)
                    engine.release_handed_off(seq)
                    if rep >= 0:
                        prefill_s[n].append(sum(s.elapsed_s for s in engine.stats.steps[mark:] if s.stage == "prefill"))
                        transfer_s[n].append(elapsed)
                    bar.advance(task)
    finally:
        remote.close()
    if not verified:
        raise AssertionError("KV pages shipped after prefill arrived different")
    rows = []
    for n in prompt_lens:
        nbytes = layout.request_nbytes(-(-n // block_size))
        p, t = statistics.median(prefill_s[n]), statistics.median(transfer_s[n])
        rows.append({"model": f"{model} {dtype}", "prompt_tokens": n, "kv_bytes": nbytes, "prefill_s": _sig(p),
                     "transfer_s": _sig(t), "transfer_GBps": _sig(nbytes / t / 1e9),
                     "transfer_over_prefill": _sig(t / p, 3)})
    return rows


def project_llama8b(socket_gbps_by_size: dict[int, float], prompt_lens: Seq[int] = (128, 512, 2048),
                    tflops: float = H200_BF16_MATMUL_TFLOPS, hbm_tbps: float = H200_HBM_TBPS) -> list[dict[str, Any]]:
    """PROJECTED (not measured) Llama-8B bf16 KV transfer time per link, next to a prefill-time estimate.

    Prefill estimate, a roofline lower bound: the larger of (2 x matmul params x tokens + 2 x layers x
    tokens^2 x q_size) FLOPs at ``tflops`` and one read of the bf16 weights at ``hbm_tbps`` (an H200's
    measured rates). The loopback link uses the socket transport's measured GB/s at the message
    size nearest (log scale) to one layer's pages.
    """
    cfg = PRESETS["llama-8b"]
    matmul_params = cfg.num_params() - cfg.vocab_size * cfg.hidden_size  # the embedding lookup is no matmul
    rows = []
    for n in prompt_lens:
        nbytes = n * cfg.kv_bytes_per_token(2)
        nearest = min(socket_gbps_by_size, key=lambda size: abs(math.log(size * cfg.num_layers / nbytes)))
        loopback = f"loopback TCP (socket, measured at {_size(nearest)})"
        links = {**PROJECTION_LINKS_GBPS, loopback: socket_gbps_by_size[nearest]}
        flops = 2 * matmul_params * n + 2 * cfg.num_layers * n * n * cfg.q_size
        prefill = max(flops / (tflops * 1e12), 2 * cfg.num_params() / (hbm_tbps * 1e12))
        for link, gbps in links.items():
            seconds = nbytes / (gbps * 1e9)
            rows.append({"model": "llama-8b bf16 (projection)", "prompt_tokens": n, "kv_bytes": nbytes, "link": link,
                         "link_GBps": _sig(gbps), "transfer_s": _sig(seconds), "prefill_estimate_s": _sig(prefill),
                         "transfer_over_prefill": _sig(seconds / prefill, 3)})
    return rows


def machine() -> dict[str, Any]:
    """``bench_cpu.machine_info`` (CPU model, cores, versions, load), or its basics without transformers."""
    try:
        from minidisagg.bench_cpu import machine_info

        return machine_info()
    except ImportError:
        return {"cpu": platform.processor(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                "torch": torch.__version__, "python": platform.python_version(), "loadavg_start": list(os.getloadavg())}


def run_transport_bench(sizes: Seq[int] = SIZES, repeats: int = 9, transfer_bytes: int = 256 * MiB,
                        sample_bytes: int = 256 * MiB, model: str = "smollm2-135m",
                        prompt_lens: Seq[int] = (128, 512, 2048), prefill_repeats: int = 3,
                        threads: Optional[int] = 1, progress: bool = True) -> dict[str, Any]:
    """The whole benchmark: bandwidth table, KV vs prefill, the Llama-8B projection; returns the result dict."""
    console, previous_threads = Console(stderr=True, quiet=not progress), torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        info = machine()
        bandwidth = run_bandwidth(sizes, repeats, transfer_bytes, sample_bytes, threads=threads, console=console,
                                  progress=progress)
        kv = run_kv_vs_prefill(model, prompt_lens, prefill_repeats, threads=threads, console=console, progress=progress)
    finally:
        torch.set_num_threads(previous_threads)
    info["loadavg_end"] = list(os.getloadavg())
    socket_gbps = {r["message_bytes"]: r["GBps"] for r in bandwidth["rows"] if r["transport"] == SOCKET}
    goal = next((r for r in bandwidth["rows"] if (r["transport"], r["message_bytes"]) == GOAL[:2]), None)
    return {
        "benchmark": "transport", "date": dt.datetime.now().isoformat(timespec="seconds"), "machine": info,
        "settings": {"message_sizes": list(sizes), "repeats": repeats, "transfer_bytes": transfer_bytes,
                     "sample_bytes": sample_bytes, "max_messages_per_sample": MAX_MESSAGES_PER_SAMPLE,
                     "torch_threads": threads or "default",
                     "pages": "Llama-8B per-layer page shape, bf16, 64 KiB a block",
                     "definition": "GBps = payload bytes of a sample / median sample seconds / 1e9 (best: fastest "
                                   "sample); fraction of ceiling = median over repetitions of ceiling time / "
                                   "transport time, both measured back to back; a transfer is reserve -> one "
                                   "send_layer per layer -> commit, acknowledged"},
        "rows": bandwidth["rows"], "verified": bandwidth["verified"], "dist": bandwidth["dist"],
        "kv_vs_prefill": kv, "projection_llama8b": project_llama8b(socket_gbps, prompt_lens),
        "goals": {} if goal is None else {
            f"socket >= {GOAL[2]:.2f} of raw TCP at {_size(GOAL[1])}": goal["fraction_of_ceiling"] >= GOAL[2],
            f"(reference) socket >= {GOAL[2]:.2f} of raw TCP into pool-sized memory at {_size(GOAL[1])}":
                goal["fraction_of_pool_destination_ceiling"] >= GOAL[2]},
    }


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def _num(x: Optional[float], fmt: str = ".2f", scale: float = 1.0) -> str:
    return "" if x is None else format(x * scale, fmt)


TableSpec = tuple[str, str, list[tuple[str, Callable[[dict[str, Any]], str]]]]
TABLES: list[TableSpec] = [
    ("KV transfer bandwidth", "rows", [
        ("transport", lambda r: r["transport"]), ("message", lambda r: _size(r["message_bytes"])),
        ("GB/s", lambda r: _num(r["GBps"])), ("best GB/s", lambda r: _num(r["GBps_best"])),
        ("ceiling", lambda r: r["ceiling"] or ""),
        ("ceiling GB/s", lambda r: _num(r["ceiling_GBps"])),
        ("fraction of ceiling", lambda r: _num(r["fraction_of_ceiling"])),
        ("fraction of raw TCP into pool-sized memory", lambda r: _num(r.get("fraction_of_pool_destination_ceiling")))]),
    ("KV transfer vs prefill (measured: LLMEngine prefill on this CPU, random weights; socket transfer)",
     "kv_vs_prefill", [
        ("model", lambda r: r["model"]), ("prompt tokens", lambda r: str(r["prompt_tokens"])),
        ("KV MB", lambda r: _num(r["kv_bytes"], ".1f", 1e-6)),
        ("prefill ms", lambda r: _num(r["prefill_s"], ".1f", 1e3)),
        ("transfer ms", lambda r: _num(r["transfer_s"], ".1f", 1e3)),
        ("transfer GB/s", lambda r: _num(r["transfer_GBps"])),
        ("transfer / prefill", lambda r: _num(r["transfer_over_prefill"], ".3f"))]),
    ("Llama-8B: a PROJECTION, not a measurement (KV bf16 / link GB/s; prefill = H200 roofline lower bound)",
     "projection_llama8b", [
        ("prompt tokens", lambda r: str(r["prompt_tokens"])), ("KV MB", lambda r: _num(r["kv_bytes"], ".1f", 1e-6)),
        ("link", lambda r: r["link"]), ("transfer ms", lambda r: _num(r["transfer_s"], ".3g", 1e3)),
        ("prefill estimate ms", lambda r: _num(r["prefill_estimate_s"], ".3g", 1e3)),
        ("transfer / prefill", lambda r: _num(r["transfer_over_prefill"], ".3f"))]),
]


def render_tables(result: dict[str, Any]) -> list[Table]:
    """The three tables (bandwidth, KV vs prefill, projection) for rich."""
    tables = []
    for title, key, columns in TABLES:
        table = Table(title=title)
        for i, (name, _) in enumerate(columns):
            table.add_column(name, justify="right" if i and name not in ("ceiling", "link") else "left")
        for row in result[key]:
            table.add_row(*(cell(row) for _, cell in columns))
        tables.append(table)
    return tables


def to_markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown report."""
    m, s = result["machine"], result["settings"]
    lines = [f"# KV transfer bandwidth ({result['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch threads {s['torch_threads']}; torch {m['torch']}; "
             f"load average {m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end. "
             f"{s['definition']}. Pages: {s['pages']}. Median of {s['repeats']} interleaved repetitions. "
             f"dist (gloo): {result['dist']}. Every transfer's bytes checked: {all(result['verified'].values())}."]
    for title, key, columns in TABLES:
        align = ["---" if name in ("transport", "model", "ceiling", "link") else "---:" for name, _ in columns]
        header = "| " + " | ".join(name for name, _ in columns) + " |"
        lines += ["", f"## {title}", "", header, "|" + "|".join(align) + "|"]
        lines += ["| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in result[key]]
    lines += ["", "Goals:", ""] + [f"- {'met' if ok else 'MISSED'}: {goal}" for goal, ok in result["goals"].items()]
    return "\n".join(lines) + "\n"


def plot_bandwidth(result: dict[str, Any], path: Path) -> None:
    """GB/s against message size (log x): a line per transport, its ceiling dashed in the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for color, (transport, ceiling) in zip(("tab:blue", "tab:orange", "tab:green"), CEILING_OF.items()):
        for name, style in ((transport, "-o"), (ceiling, "--"), (TCP_POOL if transport == SOCKET else "", ":")):
            rows = [r for r in result["rows"] if r["transport"] == name]
            if rows:
                ax.plot([r["message_bytes"] for r in rows], [r["GBps"] for r in rows], style, color=color,
                        label=name if name == transport else f"ceiling: {name}" if name == ceiling else name)
    sizes = sorted({r["message_bytes"] for r in result["rows"]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [_size(n) for n in sizes])
    ax.set(xlabel="message size (one layer's pages)", ylabel="GB/s", ylim=(0, None))
    ax.set_title(f"KV transfer bandwidth, {result['machine']['cpu']} ({result['machine']['cores']} cores)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(result: dict[str, Any], out_dir: Optional[Path] = None) -> list[Path]:
    """Write ``transport-<date>.json``, ``.md`` and ``.png``; returns their paths."""
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"transport-{result['date'][:10]}{ext}" for ext in (".json", ".md", ".png")]
    paths[0].write_text(json.dumps(result, indent=2) + "\n")
    paths[1].write_text(to_markdown(result))
    plot_bandwidth(result, paths[2])
    return paths


def main(argv: Optional[Seq[str]] = None) -> int:
    """``python -m minidisagg.bench_transport [--quick] [--repeats 9] [--threads 1] [--out-dir DIR]``."""
    parser = argparse.ArgumentParser(prog="minidisagg bench transport", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small sizes, 2 repeats, one short prompt")
    parser.add_argument("--repeats", type=int, default=None, help="default 9 (quick: 2)")
    parser.add_argument("--model", default="smollm2-135m", help="model of the KV-vs-prefill part (random weights)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in each process (default 1: a core each for sender and receiver; "
                             "0: torch's choice)")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: benchmarks/results")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    quick = dict(sizes=QUICK_SIZES, transfer_bytes=8 * MiB, sample_bytes=16 * MiB, prompt_lens=(128,),
                 prefill_repeats=1)
    result = run_transport_bench(repeats=args.repeats or (2 if args.quick else 9), model=args.model,
                                 threads=args.threads,
                                 progress=not args.no_progress, **(quick if args.quick else {}))
    console = Console()
    for table in render_tables(result):
        console.print(table)
    console.print(f"dist (gloo): {result['dist']}")
    for goal, ok in result["goals"].items():
        console.print(f"[{'green' if ok else 'red'}]{'met' if ok else 'MISSED'}[/]: {goal}")
    console.print("wrote " + ", ".join(str(p) for p in write_results(result, args.out_dir)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
