"""KV transfer bandwidth of every transport and its plain ceiling, at every message size.

One message is one layer's pages (one LAYER frame); one transfer is reserve -> N x send_layer
-> commit, timed until the commit is acknowledged, as a prefill worker does it. Every
repetition runs all methods back to back (rotating who goes first); GB/s is the median over
repetitions, the fraction of a ceiling the median of the per-repetition ratios, so load from
other processes hits both sides alike.
"""

from __future__ import annotations

import dataclasses
import socket
import statistics
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
from rich.console import Console

from minidisagg.bench.common import progress_bar
from minidisagg.bench.transport_link import GLOO_TAG, TIMEOUT_S, PagedReceiver, RemoteReceivers, digest
from minidisagg.bench.transport_names import (
    BENCH_LAYOUT,
    CEILING_OF,
    COPY,
    DIST,
    GLOO,
    INPROC,
    SIZES,
    SOCKET,
    TCP,
    TCP_POOL,
    MiB,
    round_sig,
    size_label,
)
from minidisagg.engine.sampling import SamplingParams
from minidisagg.engine.sequence import SequenceState
from minidisagg.transport.inproc import InprocSender

MAX_MESSAGES_PER_SAMPLE = 2048


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
    return round_sig(statistics.median(c / t for c, t in zip(ceiling_s, transport_s)), 3)


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
        with progress_bar(console, progress) as bar:
            task = bar.add_task("bandwidth", total=(repeats + 1) * len(methods) * len(cases))
            for rep in range(-1, repeats):  # rep -1 warms every path up
                order = methods[rep % len(methods):] + methods[: rep % len(methods)]
                for i, case in enumerate(cases):
                    for method in order:
                        bar.update(task, description=f"rep {rep + 1}/{repeats} {size_label(case.message_bytes)} {method}")
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
                   "GBps": round_sig(case.sample_bytes / statistics.median(mine) / 1e9),
                   "GBps_best": round_sig(case.sample_bytes / min(mine) / 1e9), "ceiling": ceiling, "ceiling_GBps": None,
                   "fraction_of_ceiling": None, "layers_per_transfer": case.num_layers,
                   "transfers_per_sample": case.transfers_per_sample, "seconds_per_repeat": [round(s, 5) for s in mine]}
            if ceiling:  # each repetition measured both back to back: the median of those paired ratios
                top = seconds[(ceiling, size)]
                row["ceiling_GBps"] = round_sig(case.sample_bytes / statistics.median(top) / 1e9)
                row["fraction_of_ceiling"] = _paired_fraction(top, mine)
            if method == SOCKET:
                row["fraction_of_pool_destination_ceiling"] = _paired_fraction(seconds[(TCP_POOL, size)], mine)
            rows.append(row)
    return {"rows": rows, "verified": verified, "dist": dist_note or "measured"}
