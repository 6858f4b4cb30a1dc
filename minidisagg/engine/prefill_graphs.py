"""CUDA graphs for short prefills: one captured forward pass per token-count bucket, replayed per prompt.

A prefill of a few hundred tokens through a small model is a few hundred kernels of microseconds
each; launched from Python, the host's launch cost is most of the time (``benchmarks/NOTES.md``).
Here a fresh prompt (one sequence, nothing cached before it) of ``n`` tokens runs in the graph of
the smallest bucket >= ``n``: its tokens first, padding after them. Attention is causal, so the
real tokens never see the padding, and the padding writes no KV (slot -1, as decode graphs do).
Only the last real token's logits are computed. The graph runs the model's own code, so its
tokens and logits match eager prefill up to the kernels' summation order (tested on the GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from minidisagg.engine.cuda_graphs import PAD_SLOT
from minidisagg.kernels.attention import AttentionMetadata
from minidisagg.kv.cache import PagedKVCache
from minidisagg.models.llama import LlamaModel

PREFILL_BUCKETS: tuple[int, ...] = (128, 256, 512, 1024, 2048)


@dataclass
class _CapturedPrefill:
    """One bucket: its graph, the device buffer it reads (ids, slots, last row) and the logits it writes."""

    graph: torch.cuda.CUDAGraph
    inputs: torch.Tensor  # int64: token ids [bucket], KV slots [bucket], the last real token's row, block table
    logits: torch.Tensor  # [1, vocab] float32


class PrefillGraphs:
    """Captures and replays prefills of one fresh prompt of ``model`` over ``kv_cache``, per token bucket."""

    def __init__(self, model: LlamaModel, kv_cache: PagedKVCache, buckets: Sequence[int] = PREFILL_BUCKETS) -> None:
        if model.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        too_long = [b for b in buckets if b > model.cfg.max_position]
        if not buckets or too_long:
            raise ValueError(f"prefill buckets must be non-empty and at most {model.cfg.max_position} tokens, "
                             f"got {buckets}")
        self.model = model
        self.kv_cache = kv_cache
        self.buckets = tuple(sorted(set(buckets)))
        self.pool = torch.cuda.graph_pool_handle()
        self._steps: dict[int, _CapturedPrefill] = {}
        self.graph_replays = 0  # prefills run by replay so far

    def bucket_for(self, num_tokens: int) -> Optional[int]:
        """The smallest bucket that holds ``num_tokens`` tokens, or None if the prompt is longer than all."""
        return next((b for b in self.buckets if b >= num_tokens), None)

    @torch.inference_mode()
    def capture(self, bucket: int) -> None:
        """Record the prefill forward pass for ``bucket`` tokens (warming up, and autotuning kernels, first)."""
        if bucket in self._steps:
            return
        dev = self.model.device
        table_len = -(-bucket // self.kv_cache.block_size)
        inputs = torch.zeros(2 * bucket + 1 + table_len, dtype=torch.int64, device=dev)
        ids, slots, last = inputs[:bucket], inputs[bucket : 2 * bucket], inputs[2 * bucket : 2 * bucket + 1]
        slots.fill_(PAD_SLOT)
        positions = torch.arange(bucket, device=dev)
        meta = AttentionMetadata(
            query_starts=[0], query_lens=[bucket], context_lens=[bucket],
            block_tables=inputs[2 * bucket + 1 :].view(1, table_len),  # the prompt's blocks, padded with block 0
            context_lens_tensor=torch.tensor([bucket], device=dev), slot_mapping=slots,
        )
        meta.seq_info  # built now: a host-to-device copy cannot be captured

        def forward() -> torch.Tensor:
            hidden = self.model(ids, positions, self.kv_cache, meta)
            return self.model.compute_logits(hidden.index_select(0, last))

        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                forward()
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = forward()
        torch.cuda.synchronize(dev)
        self._steps[bucket] = _CapturedPrefill(graph, inputs, logits)

    @property
    def captured_buckets(self) -> tuple[int, ...]:
        """Buckets captured so far."""
        return tuple(sorted(self._steps))

    def capture_all(self) -> None:
        """Capture every bucket, largest first (so smaller ones reuse its memory pool)."""
        for bucket in sorted(self.buckets, reverse=True):
            self.capture(bucket)

    @torch.inference_mode()
    def run(self, token_ids: Sequence[int], block_table: Sequence[int]) -> torch.Tensor:
        """Prefill one fresh prompt by graph replay (its KV lands in ``block_table``); float32 logits [1, vocab]."""
        n = len(token_ids)
        bucket = self.bucket_for(n)
        bs = self.kv_cache.block_size
        if bucket is None or n < 1:
            raise ValueError(f"a prompt of {n} tokens has no prefill graph bucket (buckets {self.buckets})")
        if -(-n // bs) > len(block_table):
            raise ValueError(f"{n} tokens do not fit {len(block_table)} blocks of {bs}")
        if bucket not in self._steps:
            self.capture(bucket)
        step = self._steps[bucket]
        host = [0] * step.inputs.numel()
        host[:n] = token_ids
        host[bucket : bucket + n] = [block_table[p // bs] * bs + p % bs for p in range(n)]
        host[bucket + n : 2 * bucket] = [PAD_SLOT] * (bucket - n)
        host[2 * bucket] = n - 1
        used = -(-n // bs)
        host[2 * bucket + 1 : 2 * bucket + 1 + used] = block_table[:used]
        step.inputs.copy_(torch.tensor(host, dtype=torch.int64).pin_memory(), non_blocking=True)
        step.graph.replay()
        self.graph_replays += 1
        return step.logits.clone()
