"""KV transfer against prefill: a real prefill's pages shipped over the socket transport, and a Llama-8B projection."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence as Seq
from typing import Any, Optional

import torch
from rich.console import Console

from minidisagg.bench.common import progress_bar
from minidisagg.bench.transport_link import TIMEOUT_S, RemoteReceivers, digest
from minidisagg.bench.transport_names import SOCKET, round_sig, size_label
from minidisagg.config import PRESETS, CacheConfig, EngineConfig
from minidisagg.engine.sampling import SamplingParams
from minidisagg.engine.sequence import Sequence, SequenceState
from minidisagg.kv.pages import KVLayout, gather_layer

PROJECTION_LINKS_GBPS = {"PCIe/IB-class 25 GB/s": 25.0, "NVLink-class 400 GB/s": 400.0}
H200_BF16_MATMUL_TFLOPS, H200_HBM_TBPS = 779.0, 4.1  # measured on an H200, DESIGN.md "Measured facts"


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
        with progress_bar(console, progress) as bar:
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
        rows.append({"model": f"{model} {dtype}", "prompt_tokens": n, "kv_bytes": nbytes, "prefill_s": round_sig(p),
                     "transfer_s": round_sig(t), "transfer_GBps": round_sig(nbytes / t / 1e9),
                     "transfer_over_prefill": round_sig(t / p, 3)})
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
        loopback = f"loopback TCP (socket, measured at {size_label(nearest)})"
        links = {**PROJECTION_LINKS_GBPS, loopback: socket_gbps_by_size[nearest]}
        flops = 2 * matmul_params * n + 2 * cfg.num_layers * n * n * cfg.q_size
        prefill = max(flops / (tflops * 1e12), 2 * cfg.num_params() / (hbm_tbps * 1e12))
        for link, gbps in links.items():
            seconds = nbytes / (gbps * 1e9)
            rows.append({"model": "llama-8b bf16 (projection)", "prompt_tokens": n, "kv_bytes": nbytes, "link": link,
                         "link_GBps": round_sig(gbps), "transfer_s": round_sig(seconds), "prefill_estimate_s": round_sig(prefill),
                         "transfer_over_prefill": round_sig(seconds / prefill, 3)})
    return rows
