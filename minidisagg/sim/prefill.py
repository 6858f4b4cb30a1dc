"""A prefill instance's step planned without the scheduler's general plan, where that plan is known in advance.

A disaggregated prefill instance runs ``prefill_first`` and hands every sequence off after its first
token, so between steps it decodes nothing: ``Scheduler.schedule`` then always plans the same thing,
whole prompts from the front of the waiting queue while they fit ``max_num_seqs`` and the token budget
(the first one always), each given the blocks its prompt needs, in queue order. When the pool holds
all of them at once and none of them has KV yet (no recompute after a preemption, no prefix cache to
share from), every allocation succeeds exactly as the scheduler's would, and ``plan_hand_off_prefill``
returns that plan at a fraction of the cost; otherwise it changes nothing and returns None, and the
scheduler plans the step. ``tests/test_sim.py`` holds it bit for bit against step-by-step simulation,
which always asks the scheduler, under block pressure included.
"""

from __future__ import annotations

from typing import Optional

from minidisagg.engine.batch import PrefillChunk
from minidisagg.engine.scheduler import POLICIES, Scheduler, StepPlan


def plan_hand_off_prefill(sched: Scheduler) -> Optional[StepPlan]:
    """What ``sched.schedule()`` would plan for a ``prefill_first`` scheduler with nothing running, or None.

    None (nothing changed) when the case is not that one: something runs, nothing waits, another policy,
    lookahead or a prefix cache, a waiting sequence with KV already, or prompts the free blocks do not all hold.
    """
    blocks, budget = sched.blocks, sched.budget
    if (sched.running or not sched.waiting or sched.policy is not POLICIES["prefill_first"]
            or sched.lookahead_tokens or blocks.prefix_cache is not None):
        return None
    chunks: list[PrefillChunk] = []
    used = needed = 0
    for seq in sched.waiting:  # as ``prefill_first`` admits whole prompts, with nothing in flight
        n = seq.num_prefill_tokens_left
        if len(chunks) >= budget.max_num_seqs or (chunks and used + n > budget.max_num_batched_tokens):
            break
        if seq.num_computed_tokens or blocks.block_table(seq.seq_id):
            return None
        chunks.append(PrefillChunk(seq, n))
        used += n
        needed += blocks.blocks_needed(n)
    if needed > blocks.num_free_blocks:
        return None  # the scheduler fits what it can (and keeps arrival order)
    for chunk in chunks:
        seq = chunk.seq
        blocks.grow(seq.seq_id, chunk.num_tokens)
        if seq.num_cached_tokens is None:
            seq.num_cached_tokens = 0
    return StepPlan(prefills=chunks)
