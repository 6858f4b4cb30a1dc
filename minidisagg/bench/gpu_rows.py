"""Rows of the GPU benchmark: engine decode and prefill against their physical floors.

Each row is one measured figure with the floor it is judged against (``limit``): for decode,
weight bytes plus KV bytes read per step over the card's measured copy bandwidth; for prefill,
its FLOPs over the card's measured matmul rate. ``fraction_of_limit`` = limit / measured time.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from minidisagg.config import PRESETS, ModelConfig
from minidisagg.engine.batch import BatchItem
from minidisagg.engine.sampling import SamplingParams
from minidisagg.llm import LLM
from minidisagg.models.llama import weight_bytes
from minidisagg.roofline import time_fn_s


@dataclass
class Row:
    """One benchmark figure, in the JSON schema of ``benchmarks/results/gpu-*.json``."""

    name: str
    value: float
    unit: str
    limit: Optional[float] = None
    fraction_of_limit: Optional[float] = None
    hf_value: Optional[float] = None
    speedup_vs_hf: Optional[float] = None
    hf_compiled_value: Optional[float] = None
    speedup_vs_hf_compiled: Optional[float] = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The row without empty fields."""
        return {k: v for k, v in asdict(self).items() if v is not None and v != ""}


def with_floor(name: str, time_ms: float, floor_ms: float, note: str = "") -> Row:
    """A time row judged against a floor time (both ms)."""
    return Row(name, round(time_ms, 4), "ms", round(floor_ms, 4), round(floor_ms / time_ms, 3), note=note)


def prefill_flops(cfg: ModelConfig, num_tokens: int) -> float:
    """FLOPs of one causal prefill of ``num_tokens``: the layers' GEMMs, attention, and one LM-head row."""
    h, q, kv, f = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    per_token_gemm = 2 * (h * (q + 2 * kv) + q * h + h * 2 * f + f * h)
    attention = 2 * 2 * cfg.num_heads * cfg.head_dim * num_tokens * (num_tokens + 1) / 2  # QK^T and PV, causal
    return cfg.num_layers * (num_tokens * per_token_gemm + attention) + 2 * h * cfg.vocab_size


def decode_step_bytes(llm: LLM, batch: int, context_len: int) -> int:
    """Bytes one decode step must read at least: every weight once, plus each sequence's KV."""
    cfg = llm.loaded.config
    kv_per_token = cfg.kv_bytes_per_token(llm.loaded.model.dtype.itemsize)
    return weight_bytes(llm.loaded.model) + batch * context_len * kv_per_token


def engine_llm(model: str, max_num_seqs: int, max_model_len: int, cuda_graphs: bool,
               max_num_batched_tokens: int = 8192, async_scheduling: Optional[bool] = None) -> LLM:
    """A colocated engine on the GPU with random weights of ``model``'s real shape."""
    cfg = PRESETS[model]
    kv_budget_bytes = int(1.1 * max_num_seqs * max_model_len * cfg.kv_bytes_per_token(2)) + (16 << 20)
    return LLM(model, device="cuda", dtype="bfloat16", random_weights=True, max_num_seqs=max_num_seqs,
               max_model_len=max_model_len, max_num_batched_tokens=max_num_batched_tokens, cuda_graphs=cuda_graphs,
               kv_memory_budget_bytes=kv_budget_bytes, async_scheduling=async_scheduling)


def random_prompts(batch: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    """Fresh random prompt token ids."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, prompt_len), generator=gen).tolist()


def decode_step_ms(llm: LLM, batch: int, prompt_len: int, new_tokens: int, seed: int = 0) -> tuple[float, list[list[int]]]:
    """Median wall time of a decode step (the engine's whole step: schedule, graph or eager forward, sample)."""
    prompts = random_prompts(batch, prompt_len, llm.loaded.config.vocab_size, seed)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm
    outs = llm.generate(prompts, params, use_tqdm=False)
    gaps: list[float] = []
    for out in outs:
        itl = out.metrics.itl_s if out.metrics else ()
        gaps.extend(itl[2:])  # the first gaps may include the last prefill steps or graph capture
    return 1000 * statistics.median(gaps), [o.token_ids for o in outs]


def decode_row(model: str, batch: int, prompt_len: int, new_tokens: int, copy_bytes_per_s: float,
               cuda_graphs: bool = True, async_scheduling: bool = True) -> tuple[Row, list[list[int]]]:
    """The row ``decode <model> bs<batch>``; `` eager`` without CUDA graphs, `` sync`` with graphs but
    without asynchronous scheduling (the host reads each step's tokens before queuing the next)."""
    llm = engine_llm(model, max_num_seqs=max(batch, 1), max_model_len=prompt_len + new_tokens + 16, cuda_graphs=cuda_graphs,
                     async_scheduling=async_scheduling and cuda_graphs)
    try:
        ms, tokens = decode_step_ms(llm, batch, prompt_len, new_tokens)
        floor_ms = 1000 * decode_step_bytes(llm, batch, prompt_len + new_tokens // 2) / copy_bytes_per_s
    finally:
        llm.shutdown()
        del llm
        torch.cuda.empty_cache()
    suffix = " eager" if not cuda_graphs else ("" if async_scheduling else " sync")
    return with_floor(f"decode {model} bs{batch}{suffix}", ms, floor_ms), tokens


def prefill_row(model: str, num_tokens: int, mm_flops_per_s: float, llm: LLM, suffix: str = "") -> Row:
    """The row ``prefill <model> <num_tokens><suffix>``: one prompt through the model runner, timed on the device
    (by prefill CUDA graphs where the runner has them enabled and the prompt fits a bucket)."""
    runner = llm.engine.runner  # type: ignore[union-attr]
    bs = runner.kv_cache.block_size
    blocks = list(range(math.ceil(num_tokens / bs)))
    tokens = random_prompts(1, num_tokens, llm.loaded.config.vocab_size, seed=num_tokens)[0]
    item = BatchItem(tokens, 0, blocks, True)
    t_s = time_fn_s(lambda: runner.execute([item]), torch.device("cuda"), warmup=2, iters=5)
    floor_s = prefill_flops(llm.loaded.config, num_tokens) / mm_flops_per_s
    row = with_floor(f"prefill {model} {num_tokens}{suffix}", 1000 * t_s, 1000 * floor_s)
    row.note = f"{prefill_flops(llm.loaded.config, num_tokens) / t_s / 1e12:.0f} TFLOP/s"
    return row
