"""Iteration-level scheduling (Orca-style continuous batching) with pluggable policies.

Each engine step the scheduler asks a *policy* which work to run (decodes of running
sequences, prefill chunks of waiting ones), then makes that plan fit the KV pool: it
grows block tables, defers prefills that do not fit, and preempts (frees and later
recomputes) the newest running sequences when decodes run out of blocks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from minidisagg.engine.sequence import Sequence, SequenceStatus
from minidisagg.kv.block_manager import BlockManager
from minidisagg.stages.base import PrefillChunk


@dataclass(frozen=True)
class StepBudget:
    """Per-step limits: sequences in flight and tokens computed in one step."""

    max_num_seqs: int
    max_num_batched_tokens: int


@dataclass
class StepPlan:
    """One step's work. ``prefill_before_decode`` orders the two stage runs within the step."""

    prefills: list[PrefillChunk] = field(default_factory=list)
    decodes: list[Sequence] = field(default_factory=list)
    prefill_before_decode: bool = True

    @property
    def is_empty(self) -> bool:
        """Whether there is nothing to run."""
        return not self.prefills and not self.decodes


Policy = Callable[[list[Sequence], list[Sequence], StepBudget], StepPlan]
POLICIES: dict[str, Policy] = {}


def register_policy(name: str) -> Callable[[Policy], Policy]:
    """Decorator adding a policy to the registry under ``name``."""

    def add(fn: Policy) -> Policy:
        POLICIES[name] = fn
        return fn

    return add


def _admit_whole_prompts(waiting: list[Sequence], budget: StepBudget, in_flight: int, tokens_used: int) -> list[PrefillChunk]:
    chunks: list[PrefillChunk] = []
    for seq in waiting:
        n = seq.num_prefill_tokens_left
        over_budget = tokens_used + n > budget.max_num_batched_tokens
        if in_flight + len(chunks) >= budget.max_num_seqs or (over_budget and (chunks or tokens_used)):
            break  # a prompt longer than the whole budget still runs, alone
        chunks.append(PrefillChunk(seq, n))
        tokens_used += n
    return chunks


@register_policy("prefill_first")
def prefill_first(waiting: list[Sequence], running: list[Sequence], budget: StepBudget) -> StepPlan:
    """New prompts first: while any wait, a step runs only whole-prompt prefills and decodes stall."""
    chunks = _admit_whole_prompts(waiting, budget, len(running), 0)
    if chunks:
        return StepPlan(prefills=chunks)
    return StepPlan(decodes=list(running[: budget.max_num_seqs]))


@register_policy("decode_first")
def decode_first(waiting: list[Sequence], running: list[Sequence], budget: StepBudget) -> StepPlan:
    """Every step decodes all running sequences first, then admits whole prompts that fit the budget."""
    decodes = list(running[: budget.max_num_seqs])
    chunks = _admit_whole_prompts(waiting, budget, len(decodes), len(decodes))
    return StepPlan(prefills=chunks, decodes=decodes, prefill_before_decode=False)


@register_policy("chunked")
def chunked(waiting: list[Sequence], running: list[Sequence], budget: StepBudget) -> StepPlan:
    """Sarathi-style: all running decodes, then prefill chunks filling the rest of the token budget."""
    decodes = list(running[: budget.max_num_seqs])
    left = budget.max_num_batched_tokens - len(decodes)
    chunks: list[PrefillChunk] = []
    for seq in waiting:
        if left <= 0 or len(decodes) + len(chunks) >= budget.max_num_seqs:
            break
        n = min(seq.num_prefill_tokens_left, left)
        chunks.append(PrefillChunk(seq, n))
        left -= n
    return StepPlan(prefills=chunks, decodes=decodes, prefill_before_decode=False)


class PolicyError(ValueError):
    """A scheduling policy returned a plan that breaks the scheduler's rules."""


class Scheduler:
    """Holds the waiting and running queues and turns policy plans into feasible steps."""

    def __init__(self, policy: Policy | str, budget: StepBudget, blocks: BlockManager, lookahead_tokens: int = 0) -> None:
        if isinstance(policy, str):
            if policy not in POLICIES:
                raise ValueError(f"unknown policy {policy!r}; known: {sorted(POLICIES)}")
            policy = POLICIES[policy]
        self.policy = policy
        self.budget = budget
        self.blocks = blocks
        # With asynchronous scheduling the step after this one is queued before the next schedule:
        # a decode also takes the block its next token needs, when that leaves a free block for
        # every decode in the plan (so it never causes a preemption).
        self.lookahead_tokens = lookahead_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.finished: list[Sequence] = []  # finished by the scheduler itself; the engine drains it

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence for prefill."""
        self.waiting.append(seq)

    def has_work(self) -> bool:
        """Whether any sequence is waiting or running."""
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        """Ask the policy for a plan, check it, and fit it into the KV pool."""
        plan = self.policy(list(self.waiting), list(self.running), self.budget)
        self._check(plan)
        decodes = self._fit_decodes(plan.decodes)
        prefills = self._fit_prefills(plan.prefills)
        if not decodes and not prefills and self.running:
            decodes = self._fit_decodes(list(self.running[: self.budget.max_num_seqs]))
        return StepPlan(prefills, decodes, plan.prefill_before_decode)

    def _check(self, plan: StepPlan) -> None:
        running_ids = {s.seq_id for s in self.running}
        for seq in plan.decodes:
            if seq.seq_id not in running_ids:
                raise PolicyError(f"policy scheduled a decode for request {seq.request_id}, which is not running")
        # The waiting queue can be long while the batch is full: look at it only when a prefill is planned.
        waiting_ids = {s.seq_id for s in self.waiting} if plan.prefills else set()
        seen: set[int] = set()
        for chunk in plan.prefills:
            if chunk.seq.seq_id not in waiting_ids or chunk.seq.seq_id in seen:
                raise PolicyError(f"policy scheduled a prefill for request {chunk.seq.request_id}, which is not waiting (or twice)")
            if not 1 <= chunk.num_tokens <= chunk.seq.num_prefill_tokens_left:
                raise PolicyError(
                    f"policy gave request {chunk.seq.request_id} a chunk of {chunk.num_tokens} tokens; "
                    f"it has {chunk.seq.num_prefill_tokens_left} left"
                )
            seen.add(chunk.seq.seq_id)
        if len(plan.decodes) + len(plan.prefills) > self.budget.max_num_seqs:
            raise PolicyError(f"plan has {len(plan.decodes) + len(plan.prefills)} sequences; max_num_seqs is {self.budget.max_num_seqs}")

    def _fit_decodes(self, decodes: list[Sequence]) -> list[Sequence]:
        fitted: list[Sequence] = []
        for seq in decodes:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_tokens = seq.num_tokens
            fits = self.blocks.can_grow(seq.seq_id, num_tokens)
            while not fits:
                victim = self._pick_victim(exclude=seq)
                if victim is None:
                    break
                self.preempt(victim)
                if victim in fitted:
                    fitted.remove(victim)
                fits = self.blocks.can_grow(seq.seq_id, num_tokens)
            if fits:
                seq.block_table = self.blocks.grow(seq.seq_id, num_tokens)
                ahead = num_tokens + self.lookahead_tokens
                if self.lookahead_tokens and self.blocks.num_extra_blocks(seq.seq_id, ahead) < self.blocks.num_free_blocks - len(decodes):
                    seq.block_table = self.blocks.grow(seq.seq_id, ahead)
                fitted.append(seq)
            elif self.blocks.blocks_needed(num_tokens) > self.blocks.num_blocks:
                self.finish(seq, "length")  # alone, it would overflow the whole KV pool
            else:
                self.preempt(seq)  # the rest is held by blocks it cannot take (e.g. incoming KV): retry later
        return fitted

    def _fit_prefills(self, chunks: list[PrefillChunk]) -> list[PrefillChunk]:
        fitted: list[PrefillChunk] = []
        for chunk in chunks:
            seq = chunk.seq
            if seq.status is not SequenceStatus.WAITING:
                continue
            target = seq.num_computed_tokens + chunk.num_tokens
            if self.blocks.can_grow(seq.seq_id, target):
                seq.block_table = self.blocks.grow(seq.seq_id, target)
                fitted.append(chunk)
            elif not any(owner != seq.seq_id for owner in self.blocks.owners()):
                self.finish(seq, "length")  # even the empty pool cannot hold it
            else:
                break  # keep arrival order: later prompts wait behind this one
        return fitted

    def _pick_victim(self, exclude: Sequence) -> Sequence | None:
        for seq in reversed(self.running):
            if seq is not exclude:
                return seq
        for seq in reversed(self.waiting):
            if self.blocks.block_table(seq.seq_id):
                return seq
        return None

    def preempt(self, seq: Sequence) -> None:
        """Free a sequence's blocks and put it back at the front of the queue to be recomputed."""
        self.blocks.free(seq.seq_id)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            seq.status = SequenceStatus.WAITING
            self.waiting.appendleft(seq)

    def on_prefill_done(self, seq: Sequence) -> None:
        """Move a sequence whose prefill completed from waiting to running."""
        self.waiting.remove(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark a sequence finished, drop it from the queues and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.finished.append(seq)
        self.blocks.free(seq.seq_id)
        seq.block_table = []
