"""Lab 5 support code: KV bytes per request, measured prefill, decode and link models, layer-wise pipelining,
and what the KV pool's memory order costs a request's pages on their way out and in.

The bandwidth measurement itself is ``minidisagg.bench.transport_bandwidth``'s; this module turns its
results and a few timed prefills into small models (seconds as a function of prompt length or
bytes) that the lab plots, projects onto other links and asks questions of.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from minidisagg.bench import transport_names as names
from minidisagg.bench.transport_bandwidth import run_bandwidth
from minidisagg.config import PRESETS, CacheConfig, EngineConfig, ModelConfig
from minidisagg.disagg.cluster import DisaggCluster
from minidisagg.engine.calibrate import cpu_threads
from minidisagg.engine.llm_engine import LLMEngine
from minidisagg.engine.replay import run_to_completion
from minidisagg.engine.sampling import SamplingParams
from minidisagg.engine.sequence import SequenceState
from minidisagg.kv.cache import KV_POOL_LAYOUTS, PagedKVCache
from minidisagg.kv.pages import KVLayout, block_region, gather_blocks, scatter_blocks
from minidisagg.metrics import RequestMetrics
from minidisagg.models.registry import LoadedModel
from minidisagg.sim.link import LinkSpec
from minidisagg.transport.base import KVSender

# Nominal per-direction figures of three link classes (vendor datasheet numbers, not measured here).
NOMINAL_LINKS_GBPS: dict[str, float] = {
    "NVLink (nominal ~400 GB/s)": 400.0,
    "InfiniBand 400 Gb/s NIC (nominal ~50 GB/s)": 50.0,
    "datacenter TCP (nominal ~3 GB/s)": 3.0,
}
TRANSPORTS = (names.INPROC, names.SOCKET, names.DIST)


def kv_layout(model: str | ModelConfig, dtype: torch.dtype, block_size: int = 16) -> KVLayout:
    """The KV wire layout of a model shape (a preset name or a ``ModelConfig``)."""
    config = PRESETS[model] if isinstance(model, str) else model
    return KVLayout(config.num_layers, config.num_kv_heads, config.head_dim, block_size, dtype)


def kv_bytes(layout: KVLayout, prompt_len: int) -> int:
    """Bytes a prompt's KV occupies on the wire: whole blocks, every layer, K and V."""
    if prompt_len < 1:
        raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
    return layout.request_nbytes(-(-prompt_len // layout.block_size))


@dataclass(frozen=True)
class PrefillCostModel:
    """Prefill seconds of one prompt: fixed_s + per_token_s * n + per_token_sq_s * n**2 (all >= 0)."""

    fixed_s: float
    per_token_s: float
    per_token_sq_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("fixed_s", "per_token_s", "per_token_sq_s"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"PrefillCostModel.{name} must be finite and >= 0, got {value}")

    def seconds(self, prompt_len: Any) -> Any:
        """Predicted prefill time of a prompt of ``prompt_len`` tokens (an int or a numpy array)."""
        n = np.asarray(prompt_len, dtype=np.float64) if not isinstance(prompt_len, (int, float)) else float(prompt_len)
        return self.fixed_s + self.per_token_s * n + self.per_token_sq_s * n * n

    def batch_seconds(self, prompt_lens: Sequence[int]) -> float:
        """One packed prefill of several prompts: the fixed cost once, the per-token terms per prompt."""
        return self.fixed_s + sum(self.per_token_s * n + self.per_token_sq_s * n * n for n in prompt_lens)

    @classmethod
    def fit(cls, prompt_lens: Sequence[int], seconds: Sequence[float], quadratic: bool = True) -> PrefillCostModel:
        """Least-squares fit to measured (length, seconds) points; a term that fits negative is dropped."""
        if len(prompt_lens) != len(seconds) or len(prompt_lens) < 2:
            raise ValueError("fit needs at least two (prompt_len, seconds) points of equal count")
        n = np.asarray(prompt_lens, dtype=np.float64)
        y = np.asarray(seconds, dtype=np.float64)
        columns = [np.ones_like(n), n, n * n] if quadratic and len(n) >= 3 else [np.ones_like(n), n]
        active = list(range(len(columns)))
        while True:  # non-negative least squares by dropping negative terms (3 unknowns at most)
            coef, *_ = np.linalg.lstsq(np.stack([columns[i] for i in active], axis=1), y, rcond=None)
            if (coef >= 0).all() or len(active) == 1:
                break
            active.pop(int(np.argmin(coef)))
        full = [0.0, 0.0, 0.0]
        for i, c in zip(active, coef):
            full[i] = max(0.0, float(c))
        return cls(*full)

    def describe(self) -> str:
        """The fitted formula with units."""
        return (f"prefill(n) = {self.fixed_s * 1e3:.1f} ms + {self.per_token_s * 1e6:.1f} us x n"
                f" + {self.per_token_sq_s * 1e9:.3f} ns x n^2")


@dataclass(frozen=True)
class LinkModel(LinkSpec):
    """Seconds to move bytes over a link: a fixed cost per message plus bytes / bandwidth (the simulator's
    ``LinkSpec``, taking numpy arrays of sizes too)."""

    def seconds(self, num_bytes: Any, num_messages: int = 1) -> Any:
        """Time to send ``num_bytes`` split into ``num_messages`` messages (an int or a numpy array of bytes)."""
        return self.latency_s * num_messages + np.asarray(num_bytes, dtype=np.float64) / (self.bandwidth_GBps * 1e9)

    def request_seconds(self, layout: KVLayout, prompt_len: int) -> float:
        """Time to ship one prompt's KV, one message per layer."""
        return float(self.seconds(kv_bytes(layout, prompt_len), layout.num_layers))


def measure_bandwidth(sizes: Sequence[int] = (64 * names.KiB, 256 * names.KiB, 1 * names.MiB, 4 * names.MiB),
                      repeats: int = 3, transfer_bytes: int = 8 * names.MiB, sample_bytes: int = 16 * names.MiB,
                      with_dist: bool = True) -> dict[str, Any]:
    """``bench.transport_bandwidth.run_bandwidth`` at lab size: every transport and ceiling at every message size."""
    return run_bandwidth(sizes, repeats, transfer_bytes, sample_bytes, with_dist=with_dist, threads=1,
                               progress=False)


def bandwidth_by_size(result: dict[str, Any], best: bool = True) -> dict[str, dict[int, float]]:
    """GB/s by transport (and ceiling) name, then by message size, from a ``measure_bandwidth`` result.

    ``best``: the fastest repetition (load from other processes only ever slows a sample), else the median.
    """
    table: dict[str, dict[int, float]] = {}
    for row in result["rows"]:
        table.setdefault(row["transport"], {})[row["message_bytes"]] = row["GBps_best" if best else "GBps"]
    return table


def fit_link(name: str, gbps_by_size: dict[int, float]) -> LinkModel:
    """A ``LinkModel`` fitted to measured GB/s per message size (time per message = latency + bytes / bandwidth)."""
    sizes = np.asarray(sorted(gbps_by_size), dtype=np.float64)
    seconds = np.asarray([size / (gbps_by_size[int(size)] * 1e9) for size in sizes])
    slope, intercept = np.polyfit(sizes, seconds, 1) if len(sizes) > 1 else (seconds[0] / sizes[0], 0.0)
    if slope <= 0:  # noise made bigger messages look free: fall back to the best measured bandwidth
        return LinkModel(name, max(gbps_by_size.values()))
    return LinkModel(name, 1.0 / slope / 1e9, max(0.0, float(intercept)))


def measure_prefill(loaded: LoadedModel, prompt_lens: Sequence[int], repeats: int = 2, seed: int = 0) -> dict[int, float]:
    """Fastest seconds of a whole-prompt prefill per length, timed by the engine's own prefill stage.

    The fastest of ``repeats`` (not the median): load from other processes only ever adds time.
    """
    longest, block_size = max(prompt_lens), 16
    config = EngineConfig(max_num_seqs=1, max_num_batched_tokens=longest,
                          cache=CacheConfig(block_size=block_size, num_blocks=longest // block_size + 4))
    engine = LLMEngine(loaded, config)
    gen = torch.Generator().manual_seed(seed)
    times: dict[int, list[float]] = {n: [] for n in prompt_lens}
    for rep in range(-1, repeats):  # rep -1 warms up, on the shortest prompt only
        for n in prompt_lens if rep >= 0 else prompt_lens[:1]:
            mark = len(engine.stats.steps)
            ids = torch.randint(100, loaded.config.vocab_size, (n,), generator=gen).tolist()
            engine.add_request({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
            while engine.has_unfinished():
                for out in engine.step():
                    engine.release(out.request_id)
            if rep >= 0:
                times[n].append(sum(s.elapsed_s for s in engine.stats.steps[mark:] if s.stage == "prefill"))
    return {n: min(t) for n, t in times.items()}


def measure_decode_steps(loaded: LoadedModel, batch_sizes: Sequence[int], steps: int = 4, prompt_len: int = 16,
                         seed: int = 0) -> dict[int, float]:
    """Fastest decode step seconds at each batch size, timed by the engine's own decode stage.

    The smallest batch runs once untimed first (the first decode in a process pays one-time costs).
    """
    largest = max(batch_sizes)
    blocks = largest * (-(-(prompt_len + steps + 2) // 16)) + 4
    config = EngineConfig(max_num_seqs=largest, max_num_batched_tokens=max(2048, largest * prompt_len),
                          cache=CacheConfig(block_size=16, num_blocks=blocks))
    engine = LLMEngine(loaded, config, policy="prefill_first")
    gen = torch.Generator().manual_seed(seed)
    best: dict[int, float] = {}
    for batch in [min(batch_sizes), *batch_sizes]:
        mark = len(engine.stats.steps)
        for _ in range(batch):
            ids = torch.randint(100, loaded.config.vocab_size, (prompt_len,), generator=gen).tolist()
            engine.add_request({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=steps + 1,
                                                                         ignore_eos=True))
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    engine.release(out.request_id)
        times = [s.elapsed_s for s in engine.stats.steps[mark:] if s.stage == "decode" and s.num_seqs == batch]
        best[batch] = min(times)
    return best


def fit_decode(step_s_by_batch: dict[int, float]) -> tuple[float, float]:
    """(fixed_s, per_seq_s) of a straight line through measured decode steps, both clamped to >= 0."""
    batches = sorted(step_s_by_batch)
    if len(batches) < 2:
        return step_s_by_batch[batches[0]], 0.0
    n = len(batches)
    mean_b = sum(batches) / n
    mean_t = sum(step_s_by_batch[b] for b in batches) / n
    slope = sum((b - mean_b) * (step_s_by_batch[b] - mean_t) for b in batches) / sum((b - mean_b) ** 2 for b in batches)
    slope = max(0.0, slope)
    return max(0.0, mean_t - slope * mean_b), slope


class PacedSender(KVSender):
    """Wraps a sender so its pages move no faster than ``bandwidth_GBps``: a slow link, emulated by waiting.

    The wait happens on the sender thread, as a NIC's transfer would; the prefill keeps computing.
    """

    def __init__(self, inner: KVSender, bandwidth_GBps: float) -> None:
        super().__init__()
        self.inner, self.bandwidth_GBps = inner, bandwidth_GBps
        self.name = f"{inner.name} paced to {bandwidth_GBps:g} GB/s"

    def reserve(self, transfer_id: str, num_tokens: int, timeout_s: float, block_keys: Sequence[bytes] = ()) -> bool:
        """Reserve on the wrapped link."""
        return self.inner.reserve(transfer_id, num_tokens, timeout_s, block_keys)

    def take_num_shared_blocks(self, transfer_id: str) -> int:
        """What the wrapped link's grant said about shared blocks."""
        return self.inner.take_num_shared_blocks(transfer_id)

    def send_layer(self, transfer_id: str, layer: int, pages: torch.Tensor) -> None:
        """Send, then wait until the pages would have crossed a link of the set bandwidth."""
        t0 = time.perf_counter()
        self.inner.send_layer(transfer_id, layer, pages)
        nbytes = pages.numel() * pages.element_size()
        remaining_s = nbytes / (self.bandwidth_GBps * 1e9) - (time.perf_counter() - t0)
        if remaining_s > 0:
            time.sleep(remaining_s)
        self.stats.send_s += time.perf_counter() - t0
        self.stats.bytes_sent += nbytes

    def commit(self, transfer_id: str, state: SequenceState, num_bytes: int, timeout_s: float) -> None:
        """Commit on the wrapped link."""
        self.inner.commit(transfer_id, state, num_bytes, timeout_s)
        self.stats.num_transfers += 1

    def cancel(self, transfer_id: str) -> None:
        """Cancel on the wrapped link."""
        self.inner.cancel(transfer_id)


def measure_overlap(loaded: LoadedModel, prompt_len: int, link_GBps: Optional[float], repeats: int = 2,
                    seed: int = 0) -> dict[str, list[RequestMetrics]]:
    """TTFT of 1P1D (inproc workers, link paced to ``link_GBps`` or unpaced) with ``kv_overlap`` off and on.

    Requests run one at a time, so TTFT = prefill + whatever part of the transfer was not hidden.
    Both deployments run side by side and take turns, one request each per round, so a change in
    the host's load falls on both alike; on a CPU they run on one torch thread (``cpu_threads``), whose
    time another program's load changes far less than a multi-threaded op's. Returns metrics per
    setting: ``"sequential"`` (off) and ``"layer-wise"`` (on), ``repeats`` of each after one warm-up round.
    """
    with cpu_threads(1 if loaded.device.type == "cpu" else 0):
        return _measure_overlap(loaded, prompt_len, link_GBps, repeats, seed)


def _measure_overlap(loaded: LoadedModel, prompt_len: int, link_GBps: Optional[float], repeats: int,
                     seed: int) -> dict[str, list[RequestMetrics]]:
    blocks = 2 * (-(-prompt_len // 16)) + 8
    config = EngineConfig(max_num_seqs=4, max_num_batched_tokens=max(prompt_len, 256),
                          cache=CacheConfig(block_size=16, num_blocks=blocks))
    gen = torch.Generator().manual_seed(seed)
    modes = (("sequential", False), ("layer-wise", True))
    clusters: dict[str, DisaggCluster] = {}
    results: dict[str, list[RequestMetrics]] = {label: [] for label, _ in modes}
    try:
        for label, overlap in modes:
            clusters[label] = cluster = DisaggCluster(loaded, config, transport="inproc", overlap=overlap)
            if link_GBps is not None:
                for worker in cluster.prefill_workers:
                    worker.senders = {name: PacedSender(s, link_GBps) for name, s in worker.senders.items()}
        for rep in range(-1, repeats):  # rep -1 warms up
            ids = torch.randint(100, loaded.config.vocab_size, (prompt_len,), generator=gen).tolist()
            for label, cluster in clusters.items():
                rid = cluster.add_request({"prompt_token_ids": ids},
                                          SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
                out = run_to_completion(cluster, [rid])[0]
                if out.error:
                    raise RuntimeError(f"request failed: {out.error}")
                if rep >= 0 and out.metrics is not None:
                    results[label].append(out.metrics)
    finally:
        for cluster in clusters.values():
            cluster.shutdown()
    return results


@dataclass(frozen=True)
class LayoutCopies:
    """One request's pages leaving a pool and landing in another of the same ``layout`` (fastest of the runs).

    ``gather_s``: pages out of the sender's pool, block first and contiguous, ready for one send;
    ``scatter_s``: the same pages into the receiver's reserved blocks; ``in_place``: both were the
    pools' own memory (a ``block_major`` pool, blocks in one run), so neither copied anything.
    """

    layout: str
    num_bytes: int
    gather_s: float
    scatter_s: float
    in_place: bool


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_layout_copies(model: ModelConfig, dtype: torch.dtype, device: str | torch.device, prompt_len: int,
                          repeats: int = 5, block_size: int = 16, seed: int = 0) -> list[LayoutCopies]:
    """For each pool layout: time the copies a ``prompt_len``-token request's pages need to leave and land.

    Both pools hold the request in a run of consecutive blocks (what the FIFO block manager hands
    out), at different places. The landed pages are checked against the sent ones, bit for bit.
    """
    if prompt_len < 1 or repeats < 1:
        raise ValueError(f"prompt_len and repeats must be >= 1, got {prompt_len} and {repeats}")
    num_blocks = -(-prompt_len // block_size)
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    results = []
    for layout in KV_POOL_LAYOUTS:
        sender = PagedKVCache(model, num_blocks + 1, block_size, dtype, device, layout=layout)
        receiver = PagedKVCache(model, num_blocks + 3, block_size, dtype, device, layout=layout)
        sender.kv.copy_(torch.randn(sender.kv.shape, generator=gen).to(dtype))
        sent_ids, landed_ids = list(range(1, num_blocks + 1)), list(range(3, num_blocks + 3))
        gather_times, scatter_times = [], []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            pages = gather_blocks(sender, sent_ids)
            _sync(device)
            t1 = time.perf_counter()
            region = block_region(receiver, landed_ids)
            if region is not None:  # a transport receives straight into it; here the "wire" is a copy
                region.copy_(pages)
                landed = region
            else:
                landed = pages.clone()
            _sync(device)
            t2 = time.perf_counter()
            scatter_blocks(receiver, landed_ids, landed)
            _sync(device)
            t3 = time.perf_counter()
            gather_times.append(t1 - t0)
            scatter_times.append(t3 - t2)
        if not torch.equal(receiver.by_block[3:], sender.by_block[1:]):
            raise AssertionError(f"{layout}: the landed pages differ from the sent ones")
        in_place = block_region(sender, sent_ids) is not None and block_region(receiver, landed_ids) is not None
        results.append(LayoutCopies(layout, pages.numel() * pages.element_size(), min(gather_times),
                                    min(scatter_times), in_place))
    return results


def layout_copies_figure(copies: Sequence[LayoutCopies], title: str, wire_ms: Optional[float] = None) -> Any:
    """Stacked bars: each layout's gather and scatter times; a dashed line at ``wire_ms`` (the link, same bytes)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 2.6))
    names = [c.layout for c in copies]
    gather_ms = [c.gather_s * 1e3 for c in copies]
    ax.barh(names, gather_ms, color="tab:orange", label="gather (out of the sender's pool)")
    ax.barh(names, [c.scatter_s * 1e3 for c in copies], left=gather_ms, color="tab:purple",
            label="scatter (into the receiver's pool)")
    if wire_ms is not None:
        ax.axvline(wire_ms, color="black", ls="--", lw=1, label=f"link, same bytes: {wire_ms:.0f} ms")
    ax.set(xlabel="ms, fastest of the runs", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig

