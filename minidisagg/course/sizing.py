"""Reference answers to the sizing tasks of labs 1 and 2: a decode batch for a latency budget, a KV pool, admission.

The lab notebooks never import this module: a learner's function is compared with it by the checks,
and later cells reach it only through ``checking.learner_or_reference`` once a task's check has run.
"""

from __future__ import annotations

from typing import Sequence

import torch

from minidisagg.config import ModelConfig
from minidisagg.course.kv_lab import Request, blocks_for
from minidisagg.roofline import dtype_bytes, gemm_bytes, gemm_flops, roofline_time_s


def decode_step_bound_s(gemm_shapes: Sequence[tuple[int, int]], num_layers: int, batch: int, dtype: torch.dtype,
                        peak_flops_per_s: float, bandwidth_bytes_per_s: float) -> float:
    """Roofline time of one decode step's weight GEMMs: each (out, in) GEMM of every layer bound on its own."""
    per_layer = sum(roofline_time_s(gemm_flops(batch, out_f, in_f), gemm_bytes(batch, out_f, in_f, dtype),
                                    peak_flops_per_s, bandwidth_bytes_per_s) for out_f, in_f in gemm_shapes)
    return num_layers * per_layer


def decode_batch_for_budget(gemm_shapes: Sequence[tuple[int, int]], num_layers: int, dtype: torch.dtype,
                            peak_flops_per_s: float, bandwidth_bytes_per_s: float, step_budget_s: float,
                            max_batch: int) -> int:
    """The largest decode batch (at most ``max_batch``) whose step meets ``step_budget_s`` on the roofline; 0 if none."""
    def fits(batch: int) -> bool:
        return decode_step_bound_s(gemm_shapes, num_layers, batch, dtype, peak_flops_per_s,
                                   bandwidth_bytes_per_s) <= step_budget_s

    if max_batch < 1 or not fits(1):
        return 0
    low, high = 1, max_batch  # the step's bound never falls as the batch grows: bisect for the last batch that fits
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low


def kv_pool_plan(cfg: ModelConfig, dtype: torch.dtype, kv_memory_bytes: int, block_size: int,
                 request_tokens: int) -> tuple[int, int]:
    """(KV blocks that fit in ``kv_memory_bytes``, requests of ``request_tokens`` tokens that fit in them at once)."""
    block_bytes = 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * dtype_bytes(dtype)
    num_blocks = kv_memory_bytes // block_bytes
    blocks_per_request = -(-request_tokens // block_size)
    return num_blocks, num_blocks // blocks_per_request


def admit_fcfs(waiting: Sequence[Request], running: Sequence[Request], free_blocks: int, block_size: int) -> int:
    """How many requests from the head of ``waiting`` to start so that no admitted or running one can run out of blocks."""
    reserved = sum(blocks_for(r.tokens_at_most, block_size) - blocks_for(r.tokens_now, block_size) for r in running)
    budget = free_blocks - reserved
    admitted = 0
    for request in waiting:
        need = blocks_for(request.tokens_at_most, block_size)
        if need > budget:
            break  # first come, first served: a later, smaller request does not jump the queue
        budget -= need
        admitted += 1
    return admitted
