"""Lab 5 support code: which handed-off requests a decode worker accepts, under a KV block budget.

A decode worker's pool holds the running batch's KV, and every running sequence grows by one
token per step, taking a new block whenever it crosses a block boundary. Handed-off requests wait
in arrival order, each needing the blocks of its prompt's KV. ``replay_admission`` steps a simulated
decode worker (a step counter, no wall time) under an admission rule and counts what the rule
costs: preemptions (a running sequence evicted because the pool ran dry, to be computed again),
and steps each request waited.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

AdmissionRule = Callable[[list[int], int, int], list[int]]


def first_fit_in_order(needs_blocks: Sequence[int], free_blocks: int, reserve_blocks: int) -> list[int]:
    """Indices (oldest first) of the waiting requests accepted now: each in turn if it fits what the reserve leaves."""
    spare = free_blocks - reserve_blocks
    admitted = []
    for i, need in enumerate(needs_blocks):
        if need <= spare:
            admitted.append(i)
            spare -= need
    return admitted


@dataclass(frozen=True)
class HandedOff:
    """One request reaching the decode worker: when, its prompt length and how many tokens it will decode."""

    arrival_step: int
    prompt_len: int
    output_len: int


@dataclass
class AdmissionReplay:
    """What one replay of a decode worker counted."""

    steps: int = 0
    preemptions: int = 0
    waits: list[int] = field(default_factory=list)

    @property
    def mean_wait_steps(self) -> float:
        """Mean steps from a request's arrival to its (last) admission."""
        return sum(self.waits) / max(1, len(self.waits))


def random_handoffs(count: int, seed: int, mean_gap_steps: float = 3.0, block_size: int = 16) -> list[HandedOff]:
    """A queue of hand-offs with mixed prompt (16..1024) and output (8..256) lengths, arriving at random."""
    rng = random.Random(seed)
    step, out = 0.0, []
    for _ in range(count):
        step += rng.expovariate(1.0 / mean_gap_steps)
        out.append(HandedOff(int(step), rng.choice((16, 64, 128, 256, 512, 1024)), rng.choice((8, 32, 64, 128, 256))))
    return out


def replay_admission(rule: AdmissionRule, handoffs: Sequence[HandedOff], pool_blocks: int, block_size: int = 16,
                     reserve_per_running: int = 1, recompute_steps: int = 8, max_steps: int = 100_000) -> AdmissionReplay:
    """Step a decode worker admitting with ``rule`` (reserve: ``reserve_per_running`` blocks per running sequence).

    A preempted sequence frees its blocks and rejoins the back of the queue after ``recompute_steps``
    (its KV computed again), needing the blocks of everything it holds so far.
    """
    def blocks_for(tokens: int) -> int:
        return -(-tokens // block_size)

    pending = sorted(handoffs, key=lambda h: h.arrival_step)
    queue: list[tuple[int, int, int, int]] = []  # (ready_step, tokens, tokens_left, first_arrival)
    running: list[list[int]] = []  # [tokens, tokens_left, blocks]
    result, used, step = AdmissionReplay(), 0, 0
    while (pending or queue or running) and step < max_steps:
        while pending and pending[0].arrival_step <= step:
            h = pending.pop(0)
            queue.append((h.arrival_step, h.prompt_len, h.output_len, h.arrival_step))
        ready = [q for q in queue if q[0] <= step]
        needs = [blocks_for(q[1]) for q in ready]
        if any(n > pool_blocks for n in needs):
            raise ValueError(f"a request needs more blocks ({max(needs)}) than the pool has ({pool_blocks})")
        chosen = rule(needs, pool_blocks - used, reserve_per_running * len(running))
        if sum(needs[i] for i in set(chosen)) > pool_blocks - used:
            raise ValueError("the rule admitted more blocks than are free")
        for i in sorted(set(chosen)):
            _, tokens, left, first = ready[i]
            running.append([tokens, left, needs[i]])
            used += needs[i]
            result.waits.append(step - first)
            queue.remove(ready[i])
        for seq in list(running):  # oldest first: each decodes one token
            if seq not in running:
                continue  # preempted earlier in this step
            if seq[0] + 1 > seq[2] * block_size:
                while used >= pool_blocks and running[-1] is not seq:
                    victim = running.pop()
                    used -= victim[2]
                    result.preemptions += 1
                    queue.append((step + recompute_steps, victim[0], victim[1], step))
                if used >= pool_blocks:
                    continue  # nothing left to evict but itself: it waits a step
                seq[2] += 1
                used += 1
            seq[0] += 1
            seq[1] -= 1
            if seq[1] <= 0:
                running.remove(seq)
                used -= seq[2]
        step += 1
    result.steps = step
    return result
