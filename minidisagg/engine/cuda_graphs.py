"""CUDA graphs for decode: one captured forward pass per batch-size bucket, replayed every step.

A decode step of a small model is hundreds of tiny kernels; launched one by one from Python,
the host's launch cost (tens of microseconds per Triton launch) dwarfs the GPU work, and the
step measures the CPU, not the memory system. A CUDA graph records the whole step once and
replays it with one launch. Inputs live in static device buffers that each step overwrites;
a batch smaller than its bucket is padded with rows that write no KV (slot -1) and are ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from minidisagg.kernels.attention import AttentionMetadata
from minidisagg.kv.cache import PagedKVCache
from minidisagg.models.llama import LlamaModel

DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PAD_SLOT = -1  # the KV write skips negative slots


def graph_batch_sizes(max_num_seqs: int, sizes: Sequence[int] = DEFAULT_BATCH_SIZES) -> tuple[int, ...]:
    """Bucket sizes to capture: the defaults up to ``max_num_seqs``, plus ``max_num_seqs`` itself."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    return tuple(sorted({s for s in sizes if s < max_num_seqs} | {max_num_seqs}))


def input_views(buf: torch.Tensor, bucket: int, max_blocks_per_seq: int) -> dict[str, torch.Tensor]:
    """Contiguous views of a packed int64 input buffer of ``bucket * (4 + max_blocks_per_seq)`` entries."""
    b = bucket
    return {
        "input_ids": buf[0:b], "positions": buf[b:2 * b], "slot_mapping": buf[2 * b:3 * b],
        "context_lens": buf[3 * b:4 * b], "block_tables": buf[4 * b:].view(b, max_blocks_per_seq),
    }


@dataclass
class HostInputs:
    """Numpy views of one bucket's host input buffer, made once at capture and written every step."""

    flat: np.ndarray  # the whole buffer, int64
    input_ids: np.ndarray  # [bucket]
    positions: np.ndarray  # [bucket]
    slot_mapping: np.ndarray  # [bucket]
    context_lens: np.ndarray  # [bucket]
    block_tables: np.ndarray  # [bucket, max_blocks_per_seq]

    @classmethod
    def of(cls, buf: torch.Tensor, bucket: int, max_blocks_per_seq: int) -> "HostInputs":
        """Views of a CPU buffer laid out by ``input_views``."""
        views = input_views(buf, bucket, max_blocks_per_seq)
        return cls(buf.numpy(), **{name: view.numpy() for name, view in views.items()})

    def pack(self, token_ids: Sequence[int], positions: Sequence[int], block_tables: Sequence[Sequence[int]],
             block_size: int) -> None:
        """Write one decode step's rows; rows past the batch are padding that writes no KV."""
        n, max_blocks = len(token_ids), self.block_tables.shape[1]
        self.flat[:] = 0
        slots: list[int] = []
        for row, (table, pos) in enumerate(zip(block_tables, positions)):
            if len(table) > max_blocks:
                raise ValueError(f"a block table of {len(table)} blocks exceeds the graph's {max_blocks}")
            if pos // block_size >= len(table):
                raise ValueError(f"position {pos} lies past a block table of {len(table)} blocks")
            self.block_tables[row, : len(table)] = table
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        self.input_ids[:n] = token_ids
        self.positions[:n] = positions
        self.slot_mapping[:n] = slots
        self.slot_mapping[n:] = PAD_SLOT
        self.context_lens[:n] = self.positions[:n] + 1
        self.context_lens[n:] = 1  # padding rows attend to one (harmless) key


@dataclass
class _CapturedStep:
    """One bucket: its graph, the static input buffers it reads and the logits it writes."""

    graph: torch.cuda.CUDAGraph
    host_inputs: torch.Tensor  # pinned int64: ids, positions, slots, context lens, block tables
    host_views: HostInputs  # numpy views of host_inputs
    device_inputs: torch.Tensor  # the same layout on the device; the graph reads views of it
    logits: torch.Tensor  # [bucket, vocab] float32
    copied: torch.cuda.Event  # the last host-to-device copy of the inputs has finished reading the host buffer


class DecodeGraphs:
    """Captures and replays decode steps of ``model`` over ``kv_cache`` for a set of batch buckets."""

    def __init__(self, model: LlamaModel, kv_cache: PagedKVCache, max_model_len: int,
                 batch_sizes: Sequence[int]) -> None:
        if model.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        if not batch_sizes:
            raise ValueError("CUDA graphs need at least one batch size")
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.max_blocks_per_seq = math.ceil(max_model_len / self.block_size)
        self.batch_sizes = tuple(sorted(set(batch_sizes)))
        self.pool = torch.cuda.graph_pool_handle()
        self._steps: dict[int, _CapturedStep] = {}

    @property
    def captured_batch_sizes(self) -> tuple[int, ...]:
        """Buckets captured so far."""
        return tuple(sorted(self._steps))

    def bucket_for(self, num_seqs: int) -> int | None:
        """The smallest bucket that holds ``num_seqs`` sequences, or None if the batch is too large."""
        for size in self.batch_sizes:
            if size >= num_seqs:
                return size
        return None

    def _views(self, buf: torch.Tensor, bucket: int) -> dict[str, torch.Tensor]:
        """Contiguous views of the packed input buffer."""
        return input_views(buf, bucket, self.max_blocks_per_seq)

    def _metadata(self, views: dict[str, torch.Tensor], bucket: int) -> AttentionMetadata:
        """Static metadata: every row one query; the number of attention splits pinned for the bucket."""
        from minidisagg.kernels.attention_triton import decode_num_splits, num_sms_of

        splits = decode_num_splits(self.max_blocks_per_seq * self.block_size, bucket,
                                   self.model.cfg.num_kv_heads, num_sms_of(self.model.device))
        return AttentionMetadata(
            query_starts=list(range(bucket)), query_lens=[1] * bucket,
            context_lens=[self.max_blocks_per_seq * self.block_size] * bucket,
            block_tables=views["block_tables"], context_lens_tensor=views["context_lens"],
            slot_mapping=views["slot_mapping"], num_splits=splits,
        )

    def _fill(self, step: _CapturedStep, token_ids: Sequence[int], positions: Sequence[int],
              block_tables: Sequence[Sequence[int]], device_token_ids: Optional[torch.Tensor] = None) -> None:
        """Write one step's inputs into the pinned host buffer (padding the rest) and copy it over.

        ``device_token_ids`` then overwrites the token ids on the device (tokens sampled by an
        earlier step that the host has not seen yet).
        """
        step.copied.synchronize()  # never overwrite the pinned buffer while a copy still reads it
        step.host_views.pack(token_ids, positions, block_tables, self.block_size)
        step.device_inputs.copy_(step.host_inputs, non_blocking=True)
        step.copied.record()
        if device_token_ids is not None:
            step.device_inputs[: len(token_ids)].copy_(device_token_ids)  # input_ids lead the buffer

    @torch.inference_mode()
    def capture(self, bucket: int) -> None:
        """Record the decode forward pass for ``bucket`` rows (warming up, and compiling kernels, first)."""
        if bucket in self._steps:
            return
        size = bucket * (4 + self.max_blocks_per_seq)
        host = torch.zeros(size, dtype=torch.int64).pin_memory()
        device_inputs = torch.zeros(size, dtype=torch.int64, device=self.model.device)
        views = self._views(device_inputs, bucket)
        views["slot_mapping"].fill_(PAD_SLOT)
        views["context_lens"].fill_(1)
        meta = self._metadata(views, bucket)

        def forward() -> torch.Tensor:
            hidden = self.model(views["input_ids"], views["positions"], self.kv_cache, meta)
            return self.model.compute_logits(hidden)

        side = torch.cuda.Stream(self.model.device)
        side.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                forward()
        torch.cuda.current_stream(self.model.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = forward()
        torch.cuda.synchronize(self.model.device)
        copied = torch.cuda.Event()
        copied.record()
        self._steps[bucket] = _CapturedStep(graph, host, HostInputs.of(host, bucket, self.max_blocks_per_seq),
                                            device_inputs, logits, copied)

    def capture_all(self) -> None:
        """Capture every bucket, largest first (so smaller ones reuse its memory pool)."""
        for bucket in sorted(self.batch_sizes, reverse=True):
            self.capture(bucket)

    @torch.inference_mode()
    def run(self, token_ids: Sequence[int], positions: Sequence[int], block_tables: Sequence[Sequence[int]],
            device_token_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One decode step by graph replay; float32 logits [len(token_ids), vocab] (a fresh tensor).

        ``device_token_ids``, when given, are the step's token ids on the device (``token_ids`` are
        then placeholders).
        """
        n = len(token_ids)
        bucket = self.bucket_for(n)
        if bucket is None:
            raise ValueError(f"a decode batch of {n} exceeds the largest CUDA graph bucket {self.batch_sizes[-1]}")
        if bucket not in self._steps:
            self.capture(bucket)
        step = self._steps[bucket]
        self._fill(step, token_ids, positions, block_tables, device_token_ids)
        step.graph.replay()
        return step.logits[:n].clone()
