"""The model runner: turns a list of work items into packed tensors, runs the model, returns logits."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch

from minidisagg.accel import stock  # noqa: F401  (records the stock model's functions before any user code runs)
from minidisagg.engine.batch import BatchItem
from minidisagg.engine.cuda_graphs import DecodeGraphs, graph_batch_sizes
from minidisagg.engine.prefill_graphs import PREFILL_BUCKETS, PrefillGraphs
from minidisagg.kernels.attention import AttentionMetadata
from minidisagg.kernels.triton_support import use_triton
from minidisagg.kv.cache import PagedKVCache
from minidisagg.models.llama import LlamaModel

if TYPE_CHECKING:
    from minidisagg.accel.native_decode import NativeCpuDecode
    from minidisagg.engine.compiled import CompiledCpuDecode

log = logging.getLogger(__name__)


class ModelRunner:
    """Owns the model and the KV pool; executes one forward pass over a packed batch.

    Every step runs the model's own code (``LlamaModel.forward``), directly or through a fast path
    built from it: a CUDA graph captured from it (``cuda_graphs``), or one ``torch.compile`` graph
    traced from it on the CPU (``compile_cpu``). The one exception is the opt-in accelerator
    ``native_cpu_decode`` (``minidisagg/accel``), a C++ copy of the stock model's decode step that
    refuses to run when the model is not the stock one.
    """

    def __init__(self, model: LlamaModel, kv_cache: PagedKVCache, batch_invariant: bool = False,
                 cuda_graphs: bool = False, max_model_len: Optional[int] = None, max_num_seqs: int = 64,
                 async_scheduling: Optional[bool] = None, compile_cpu: bool = False,
                 native_cpu_decode: bool = False) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.batch_invariant = batch_invariant
        self.device = model.device
        self.max_model_len = min(max_model_len or model.cfg.max_position, model.cfg.max_position)
        self.layer_hook: Optional[Callable[[int], None]] = None  # called after each layer's KV is written
        self.decode_graphs: Optional[DecodeGraphs] = None
        if cuda_graphs and graphs_supported(model, batch_invariant):
            self.decode_graphs = DecodeGraphs(model, kv_cache, self.max_model_len, graph_batch_sizes(max_num_seqs))
        # Whether the decode stage may queue the next step before reading this one's tokens (see
        # ``EngineConfig.async_scheduling``); by default only where graphs make a step cheap to launch.
        self.async_scheduling = self.decode_graphs is not None if async_scheduling is None else async_scheduling
        self.compiled_decode: Optional[CompiledCpuDecode] = None
        # The opt-in C++ CPU decode step (``EngineConfig.native_cpu_decode``), set up at the first step it could run.
        self._native_decode_wanted = native_cpu_decode and not batch_invariant and self.device.type == "cpu"
        self._native_decode: Optional[NativeCpuDecode] = None
        self.prefill_graphs: Optional[PrefillGraphs] = None  # opt-in: ``enable_prefill_graphs``
        if compile_cpu:
            self.enable_compiled_cpu_decode()

    def enable_prefill_graphs(self, buckets: Sequence[int] = PREFILL_BUCKETS) -> None:
        """Run fresh single-prompt prefills of up to ``max(buckets)`` tokens by CUDA graph replay (CUDA only)."""
        if not graphs_supported(self.model, self.batch_invariant):
            raise ValueError("prefill CUDA graphs need a CUDA model on the Triton kernels, without batch_invariant")
        self.prefill_graphs = PrefillGraphs(self.model, self.kv_cache, buckets)

    def enable_compiled_cpu_decode(self) -> None:
        """Run batch-1 CPU decode steps through one compiled graph (``EngineConfig.compile_cpu``), if possible."""
        if self.batch_invariant:
            log.warning("compile_cpu is ignored with batch_invariant=True (its kernels fix their own shapes)")
            return
        from minidisagg.engine.compiled import compiled_cpu_decode  # imports the compiler stack only when asked

        self.compiled_decode = compiled_cpu_decode(self.model, self.kv_cache, self.max_model_len)

    def _prepare(self, items: list[BatchItem]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        bs = self.kv_cache.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts, lens, ctx_lens, logit_rows = [], [], [], []
        max_blocks = max(len(it.block_table) for it in items)
        table_rows: list[list[int]] = []  # block tables padded with zeros to max_blocks
        for i, it in enumerate(items):
            n = len(it.token_ids)
            end = it.start_pos + n
            if n < 1 or -(-end // bs) > len(it.block_table):
                raise ValueError(f"batch item {i}: {n} tokens ending at {end} do not fit {len(it.block_table)} blocks")
            starts.append(len(input_ids))
            lens.append(n)
            ctx_lens.append(end)
            input_ids.extend(it.token_ids)
            positions.extend(range(it.start_pos, end))
            slots.extend(it.block_table[p // bs] * bs + p % bs for p in range(it.start_pos, end))
            table_rows.append(list(it.block_table) + [0] * (max_blocks - len(it.block_table)))
            if it.want_logits:
                logit_rows.append(len(input_ids) - 1)
        dev = self.device
        meta = AttentionMetadata(
            query_starts=starts,
            query_lens=lens,
            context_lens=ctx_lens,
            block_tables=torch.tensor(table_rows, dtype=torch.long, device=dev),
            context_lens_tensor=torch.tensor(ctx_lens, dtype=torch.long, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            batch_invariant=self.batch_invariant,
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        return ids, pos, meta, logit_rows

    def execute(self, items: list[BatchItem], device_token_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the items as one packed batch; returns float32 logits for items with ``want_logits``, in order.

        ``device_token_ids`` ([len(items)] int64, on the model's device) replaces the items' token
        ids in a decode batch (one token per item): the tokens a previous step sampled on the
        device, used before they have reached the host.
        """
        if not items:
            raise ValueError("execute() needs at least one batch item")
        if device_token_ids is not None and (device_token_ids.shape != (len(items),)
                                             or any(len(it.token_ids) != 1 for it in items)):
            raise ValueError(f"device_token_ids must hold one token per decode item ({len(items)}), "
                             f"got shape {tuple(device_token_ids.shape)}")
        if self._graph_eligible(items):
            return self.decode_graphs.run(  # type: ignore[union-attr]
                [it.token_ids[0] for it in items], [it.start_pos for it in items], [it.block_table for it in items],
                device_token_ids)
        if device_token_ids is None and self._prefill_graph_eligible(items):
            logits = self.prefill_graphs.run(items[0].token_ids, items[0].block_table)  # type: ignore[union-attr]
            return logits if items[0].want_logits else logits[:0]
        if device_token_ids is None and self._compiled_eligible(items):
            logits = self.compiled_decode.run(  # type: ignore[union-attr]
                items[0].token_ids[0], items[0].start_pos, items[0].block_table)
            if logits is not None:
                return logits
        if device_token_ids is None and self._native_eligible(items):
            native = self.native_decode()
            if native is not None and native.applies():
                return native.run([it.token_ids[0] for it in items], [it.start_pos for it in items],
                                  [it.block_table for it in items])
        ids, pos, meta, logit_rows = self._prepare(items)
        if device_token_ids is not None:
            ids = device_token_ids
        with torch.inference_mode():
            hidden = self.model(ids, pos, self.kv_cache, meta, self.layer_hook)
            if len(logit_rows) != hidden.shape[0]:
                hidden = hidden[torch.tensor(logit_rows, dtype=torch.long, device=self.device)]
            return self.model.compute_logits(hidden, self.batch_invariant)

    def _graph_eligible(self, items: list[BatchItem]) -> bool:
        """A pure decode batch that fits a captured bucket, with no per-layer Python hook to call."""
        graphs = self.decode_graphs
        return (graphs is not None and self.layer_hook is None and graphs.bucket_for(len(items)) is not None
                and all(len(it.token_ids) == 1 and it.want_logits for it in items))

    def _prefill_graph_eligible(self, items: list[BatchItem]) -> bool:
        """One fresh prompt or first chunk (nothing cached before it) within a bucket, with no per-layer hook."""
        graphs = self.prefill_graphs
        return (graphs is not None and self.layer_hook is None and len(items) == 1 and items[0].start_pos == 0
                and graphs.bucket_for(len(items[0].token_ids)) is not None)

    def _compiled_eligible(self, items: list[BatchItem]) -> bool:
        """One decode token wanting logits, with no per-layer Python hook to call."""
        return (self.compiled_decode is not None and self.layer_hook is None and len(items) == 1
                and len(items[0].token_ids) == 1 and items[0].want_logits)

    def _native_eligible(self, items: list[BatchItem]) -> bool:
        """A pure decode batch wanting logits on a CPU engine that asked for the native step, with no per-layer hook."""
        return (self._native_decode_wanted and self.layer_hook is None
                and all(len(it.token_ids) == 1 and it.want_logits for it in items))

    def native_decode(self) -> Optional[NativeCpuDecode]:
        """The opt-in C++ decode step, built on first call; None where it does not apply or does not build."""
        if self._native_decode_wanted and self._native_decode is None:
            from minidisagg.accel.native_decode import native_cpu_decode

            self._native_decode = native_cpu_decode(self.model, self.kv_cache)
            self._native_decode_wanted = self._native_decode is not None
        return self._native_decode

    def synchronize(self) -> None:
        """Wait for queued device work (so timings are honest on CUDA)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def graphs_supported(model: LlamaModel, batch_invariant: bool) -> bool:
    """CUDA graphs need a CUDA model on the Triton kernels (the torch references size tensors on the host)."""
    if model.device.type != "cuda" or batch_invariant:
        return False
    return use_triton(torch.empty(0, device=model.device))
