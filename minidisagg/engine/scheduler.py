"""Iteration-level scheduling (Orca-style continuous batching) with pluggable policies.

The scheduler owns every request's lifecycle: waiting, running, handed off, finished. Each
engine step it asks a *policy* which work to run (decodes of running sequences, prefill chunks
of waiting ones) and makes that plan fit the KV pool: it asks the ``BlockManager`` for slots,
defers prefills that do not fit, and preempts (frees and later recomputes) the newest running
sequences when decodes run out of blocks. After the stages ran, ``update_from_output`` takes
the sampled tokens, applies the stopping rules and moves sequences between queues. Nothing in
it needs a model: ``tests/test_scheduler.py`` drives it with plain token lists.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

from minidisagg.engine.sequence import Sequence, SequenceStatus
from minidisagg.kv.block_manager import BlockManager
from minidisagg.engine.batch import PrefillChunk


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


@dataclass(frozen=True)
class StopRules:
    """When a sequence stops: end-of-sequence tokens, the context length, and stop strings.

    ``stop_string_hit`` says whether a sequence's text now contains one of its stop strings; the
    engine supplies it, as only the engine holds the tokenizer. Stop and length limits asked for
    by the request itself (``stop_token_ids``, ``max_tokens``, ``ignore_eos``) come from its params.
    """

    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int = 2**31
    stop_string_hit: Optional[Callable[[Sequence], bool]] = None

    def reason(self, seq: Sequence, token: int) -> Optional[str]:
        """``"stop"`` or ``"length"`` when ``seq`` must stop after ``token`` (already appended), else None."""
        p = seq.params
        if not p.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if p.stop_token_ids and token in p.stop_token_ids:
            return "stop"
        if p.stop and self.stop_string_hit is not None and self.stop_string_hit(seq):
            return "stop"
        if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None


@dataclass
class StepUpdate:
    """What one stage's tokens did: who got a token, who finished, who was handed off."""

    touched: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)
    handed_off: list[Sequence] = field(default_factory=list)


class Scheduler:
    """Holds the waiting and running queues, turns policy plans into feasible steps, and applies their outputs."""

    def __init__(self, policy: Policy | str, budget: StepBudget, blocks: BlockManager, lookahead_tokens: int = 0,
                 stop: StopRules = StopRules()) -> None:
        if isinstance(policy, str):
            if policy not in POLICIES:
                raise ValueError(f"unknown policy {policy!r}; known: {sorted(POLICIES)}")
            policy = POLICIES[policy]
        self.policy = policy
        self.budget = budget
        self.blocks = blocks
        self.stop = stop
        # With asynchronous scheduling the step after this one is queued before the next schedule:
        # a decode also takes the block its next token needs, when that leaves a free block for
        # every decode in the plan (so it never causes a preemption).
        self.lookahead_tokens = lookahead_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._finished: list[Sequence] = []  # finished since the last drain_finished()

    # ---- queues ------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new sequence for prefill."""
        if seq.status is not SequenceStatus.WAITING:
            raise ValueError(f"request {seq.request_id} is {seq.status.value}; only a waiting sequence can be added")
        self.waiting.append(seq)

    def has_work(self) -> bool:
        """Whether any sequence is waiting or running."""
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        """Sequences decoding now."""
        return len(self.running)

    def drain_finished(self) -> list[Sequence]:
        """Sequences finished since the last call (by their outputs, by the pool, or aborted), oldest first."""
        finished, self._finished = self._finished, []
        return finished

    # ---- planning ----------------------------------------------------------------------------
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
            table = self.blocks.allocate_slots(seq, 1)  # the slot of the token this step computes
            while table is None:
                victim = self._pick_victim(exclude=seq)
                if victim is None:
                    break
                self.preempt(victim)
                if victim in fitted:
                    fitted.remove(victim)
                table = self.blocks.allocate_slots(seq, 1)
            if table is not None:
                ahead = seq.num_tokens + self.lookahead_tokens
                if self.lookahead_tokens and self.blocks.num_extra_blocks(seq.seq_id, ahead) < self.blocks.num_free_blocks - len(decodes):
                    self.blocks.allocate_slots(seq, 1, lookahead=self.lookahead_tokens)
                fitted.append(seq)
            elif self.blocks.blocks_needed(seq.num_tokens) > self.blocks.num_blocks:
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
            admitted = self._allocate_prefill(chunk)
            while admitted is None and not self.running and self._preempt_waiting_behind(seq, fitted):
                admitted = self._allocate_prefill(chunk)  # nothing running will free blocks: take them from later prompts
            if admitted is not None:
                fitted.append(admitted)
            elif not any(owner != seq.seq_id for owner in self.blocks.owners()):
                self.finish(seq, "length")  # even the empty pool cannot hold it
            else:
                break  # keep arrival order: later prompts wait behind this one
        return fitted

    def _preempt_waiting_behind(self, seq: Sequence, fitted: list[PrefillChunk]) -> bool:
        """Preempt the newest other waiting sequence holding blocks (a part-done prefill); False if none."""
        taken = {c.seq.seq_id for c in fitted}
        for other in reversed(self.waiting):
            if other is not seq and other.seq_id not in taken and self.blocks.block_table(other.seq_id):
                self.preempt(other)
                return True
        return False

    def _allocate_prefill(self, chunk: PrefillChunk) -> Optional[PrefillChunk]:
        """Take the chunk's blocks, or None; a sequence starting its KV first shares its longest cached prefix.

        A cache hit moves ``num_computed_tokens`` past the shared blocks and shrinks the chunk to
        at most the tokens left, so the step computes only what the cache lacks.
        """
        seq = chunk.seq
        cached: list[int] = []
        if seq.num_computed_tokens == 0 and self.blocks.prefix_cache is not None and not self.blocks.block_table(seq.seq_id):
            cached = self.blocks.cached_prefix(seq.all_token_ids)
        num_cached_tokens = len(cached) * self.blocks.block_size
        num_tokens = min(chunk.num_tokens, seq.num_tokens - num_cached_tokens)
        if self.blocks.allocate_slots(seq, num_tokens, cached_blocks=cached) is None:
            return None
        if seq.num_cached_tokens is None:  # the first admission counts (as in vLLM), not a recompute's
            seq.num_cached_tokens = num_cached_tokens
        if not cached:
            return chunk
        seq.num_computed_tokens = num_cached_tokens
        return PrefillChunk(seq, num_tokens)

    def _pick_victim(self, exclude: Sequence) -> Sequence | None:
        for seq in reversed(self.running):
            if seq is not exclude:
                return seq
        for seq in reversed(self.waiting):
            if self.blocks.block_table(seq.seq_id):
                return seq
        return None

    # ---- lifecycle ---------------------------------------------------------------------------
    def update_from_output(self, seqs: list[Sequence], token_ids: list[Optional[int]], now_s: float,
                           hand_off: bool = False) -> StepUpdate:
        """Apply one stage's sampled tokens (``None``: no token yet, a prefill chunk that was not the last).

        A sequence whose prefill completed starts running; each token is appended and timed at
        ``now_s``; a sequence that meets a stopping rule finishes and frees its blocks. With
        ``hand_off``, a sequence that has just sampled its first token leaves the running queue
        with its blocks still owned (``hand_off``), for a decode worker to continue. With prefix
        caching, the full blocks the stage has just computed become cached first.
        """
        update = StepUpdate()
        for seq in seqs:  # before any of them finishes and lets its blocks go
            self.blocks.cache_full_blocks(seq)
        for seq, token in zip(seqs, token_ids):
            if token is None:
                continue
            if seq.status is SequenceStatus.WAITING:  # its prefill just completed
                self._start_running(seq)
                if seq.timeline.prefill_end_s is None:
                    seq.timeline.prefill_end_s = now_s
            seq.output_token_ids.append(token)
            seq.timeline.record_token(now_s)
            update.touched.append(seq)
            reason = self.stop.reason(seq, token)
            if reason is not None:
                self.finish(seq, reason)
                update.finished.append(seq)
            elif hand_off and seq.status is SequenceStatus.RUNNING and len(seq.output_token_ids) == 1:
                self.hand_off(seq)
                update.handed_off.append(seq)
        return update

    def _start_running(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def preempt(self, seq: Sequence) -> None:
        """Free a sequence's blocks and put it back at the front of the queue to be recomputed."""
        self.blocks.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            seq.status = SequenceStatus.WAITING
            self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark a sequence finished, drop it from the queues and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self._finished.append(seq)
        self.blocks.free(seq.seq_id)

    # ---- disaggregation ----------------------------------------------------------------------
    def hand_off(self, seq: Sequence) -> None:
        """Take a running sequence out of the queues for another engine to decode; its blocks stay owned."""
        if seq.status is not SequenceStatus.RUNNING:
            raise ValueError(f"request {seq.request_id} is {seq.status.value}; only a running sequence is handed off")
        self.running.remove(seq)
        seq.status = SequenceStatus.HANDED_OFF

    def release_handed_off(self, seq: Sequence) -> None:
        """The other engine holds a handed-off sequence now: free its blocks here."""
        if seq.status is not SequenceStatus.HANDED_OFF:
            raise ValueError(f"request {seq.request_id} is {seq.status.value}, not handed off")
        self.blocks.free(seq.seq_id)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "handed_off"

    def adopt(self, seq: Sequence) -> None:
        """Start decoding a sequence prefilled elsewhere; its blocks must already hold every token's KV but the last."""
        if seq.status is not SequenceStatus.WAITING or seq.num_prefill_tokens_left != 1:
            raise ValueError(f"request {seq.request_id}: only a sequence with every token's KV but the last "
                             f"can be adopted ({seq.num_prefill_tokens_left} tokens lack KV)")
        if self.blocks.blocks_needed(seq.num_computed_tokens) > len(self.blocks.block_table(seq.seq_id)):
            raise ValueError(f"request {seq.request_id}: its blocks cannot hold its {seq.num_computed_tokens} tokens of KV")
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
