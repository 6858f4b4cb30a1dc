"""The running batch of a decode-only instance, advanced step by step in arithmetic and brought up to date on demand.

While an instance only decodes (nothing waits, the batch fits ``max_num_seqs`` and the pool), every
step is the same: each running sequence computes one token's KV, takes a slot, samples a filler
token. ``SteadyBatch`` keeps such a batch without touching its sequences at every step. Steps have
global indices; a sequence records the step its fields were last brought up to date at (its *sync
step*), and ``materialize`` applies the steps since then in one go: KV progress, blocks, tokens and
their times. What the rest of the fleet can observe is kept exact at every instant:

- the blocks the steps started so far have taken (``owed``, not yet in the sequences' tables), so
  ``free_blocks`` is what step-by-step simulation would report. A sequence whose block table is tight
  (as many blocks as its computed tokens need; the scheduler's own allocations are) takes a new block
  at the steps where its next token opens a block, i.e. every ``block_size`` steps at a fixed phase,
  so a count of sequences per phase gives the blocks of any run of steps in O(block_size);
- each step's time: the costs of a run of steps depend only on the batch size and the attention pairs
  (``q + b x step``), computed at once by ``StepCostModel.decode_costs_s`` and summed in order;
- which sequences stop at which step: a heap of (stop step, order of joining, sequence).

A change to the batch (a sequence adopted, one stopping) costs O(log batch + block_size), not O(batch).
"""

from __future__ import annotations

import heapq
from typing import Optional, Protocol

import numpy as np

from minidisagg.engine.sequence import Sequence
from minidisagg.kv.block_manager import BlockManager
from minidisagg.stages.modelled import FILLER_TOKEN_ID

PRUNE_STEPS = 4096  # drop step times no sequence needs any more once this many have piled up


class DecodeCosts(Protocol):
    """A cost model that prices runs of decode steps at once (``StepCostModel`` does)."""

    def decode_costs_s(self, batch_size: int, attention_pairs: np.ndarray) -> np.ndarray:
        """Seconds of decode steps of ``batch_size`` sequences at each of ``attention_pairs``."""


class SteadyBatch:
    """Running sequences advanced lazily by global step index; see the module docstring."""

    def __init__(self, blocks: BlockManager, max_model_len: int) -> None:
        self.blocks = blocks
        self.block_size = blocks.block_size
        self.max_model_len = max_model_len
        self.reset(0, 0.0)

    def reset(self, step: int, now_s: float) -> None:
        """Start empty at global step ``step``, which starts at ``now_s``."""
        self.sync: dict[int, int] = {}  # seq_id -> the step its fields are current at
        self.seqs: dict[int, Sequence] = {}
        self._heap: list[tuple[int, int, Sequence]] = []
        self._order = 0
        self.times_s: list[float] = [now_s]  # times_s[j - offset]: when step j starts (step j - 1 ends)
        self.offset = step
        self.accounted = step  # steps before this one have taken their blocks (counted in ``owed``)
        self.owed = 0
        self._per_phase = [0] * self.block_size  # sequences taking a block at steps j with j % block_size == phase
        self._q = 0  # sum of (num_tokens - sync step): the attention pairs of step j are q + len(self) x j

    def __len__(self) -> int:
        """Sequences in the batch."""
        return len(self.sync)

    @property
    def free_blocks(self) -> int:
        """The pool's free blocks once the steps started so far have taken theirs."""
        return self.blocks.num_free_blocks - self.owed

    @property
    def next_stop(self) -> int:
        """The step at whose start the first sequence has stopped (the end of its last step)."""
        return self._heap[0][0]

    def time_s(self, step: int) -> float:
        """When step ``step`` starts (as planned)."""
        return self.times_s[step - self.offset]

    def add(self, seq: Sequence, step: int) -> bool:
        """Take in a running sequence from step ``step`` on; False (nothing changed) if it cannot run lazily."""
        c = seq.num_computed_tokens
        tight = len(self.blocks.block_table(seq.seq_id)) == self.blocks.blocks_needed(c)
        steps_left = min(seq.params.max_tokens - len(seq.output_token_ids), self.max_model_len - seq.num_tokens)
        if not tight or steps_left < 1 or seq.seq_id in self.sync:
            return False
        self.sync[seq.seq_id] = step
        self.seqs[seq.seq_id] = seq
        self._q += seq.num_tokens - step
        self._per_phase[(step - c) % self.block_size] += 1
        heapq.heappush(self._heap, (step + steps_left, self._order, seq))
        self._order += 1
        return True

    def _blocks_in(self, start: int, num_steps: int) -> int:
        """Blocks the batch takes in steps ``start .. start + num_steps - 1``."""
        bs, per_phase = self.block_size, self._per_phase
        full, rem = divmod(num_steps, bs)
        first = start % bs  # the phases start % bs .. (start + rem - 1) % bs, wrapping around once at most
        last = first + rem
        taken = sum(per_phase[first:last]) + (sum(per_phase[:last - bs]) if last > bs else 0)
        return full * len(self.sync) + taken

    def account(self, step: int) -> None:
        """Steps before ``step`` have started: count the blocks they took."""
        if step > self.accounted:
            self.owed += self._blocks_in(self.accounted, step - self.accounted)
            self.accounted = step

    def fitting_steps(self, start: int, most: int) -> int:
        """The most steps from ``start`` (up to ``most``) whose blocks the free ones cover, so none preempts."""
        b, free = len(self.sync), self.free_blocks
        if b == 0 or (most // self.block_size + 1) * b <= free:
            return most
        cycles = free // b  # whole block_size-step cycles take b blocks each
        left, t, bs = free - cycles * b, 0, self.block_size
        while t < bs and self._per_phase[(start + t) % bs] <= left:
            left -= self._per_phase[(start + t) % bs]
            t += 1
        return min(most, cycles * bs + t)

    def plan(self, start: int, costs: DecodeCosts, work_start_s: Optional[float] = None) -> int:
        """Time the steps from ``start`` (which starts at ``time_s(start)``) to the next stop or as far as blocks go.

        ``work_start_s``: when the first step's work starts, if later than its boundary (sequences taken in
        first). Returns how many; the times of any steps planned beyond ``start`` before are replaced.
        """
        if start - self.offset > PRUNE_STEPS:
            lowest = min(self.sync.values())
            del self.times_s[:lowest - self.offset]
            self.offset = lowest
        num_steps = self.fitting_steps(start, self.next_stop - start)
        del self.times_s[start - self.offset + 1:]
        if num_steps < 1:
            return 0
        b = len(self.sync)
        first = self._q + b * start  # whole numbers below 2**53: exact in float64, as the int sums are
        step_s = costs.decode_costs_s(b, np.arange(first, first + b * num_steps, b, dtype=np.float64))
        step_s[0] += self.time_s(start) if work_start_s is None else work_start_s  # then the running sum: start + c0, + c1, ... in the order stepping adds them
        self.times_s.extend(np.add.accumulate(step_s).tolist())
        return num_steps

    def truncate(self, end: int) -> None:
        """Forget the planned steps from ``end`` on."""
        del self.times_s[end - self.offset + 1:]

    def materialize(self, seq: Sequence, step: int) -> None:
        """Apply steps ``sync .. step - 1`` to ``seq``: what each ``schedule`` + decode + update would have done."""
        first = self.sync[seq.seq_id]
        k = step - first
        if k <= 0:
            return
        seq.num_computed_tokens += k
        table = len(self.blocks.block_table(seq.seq_id))
        if self.blocks.blocks_needed(seq.num_computed_tokens) > table:
            self.owed -= len(self.blocks.grow(seq.seq_id, seq.num_computed_tokens)) - table
        seq.output_token_ids.extend([FILLER_TOKEN_ID] * k)
        times = self.times_s[first + 1 - self.offset:step + 1 - self.offset]
        record = getattr(seq.timeline, "record_tokens", None)
        if record is not None:
            record(times)
        else:
            seq.timeline.token_times_s.extend(times)
        self.sync[seq.seq_id] = step

    def _remove(self, seq: Sequence, step: int) -> None:
        self.materialize(seq, step)
        del self.sync[seq.seq_id], self.seqs[seq.seq_id]
        self._q -= seq.num_tokens - step
        self._per_phase[(step - seq.num_computed_tokens) % self.block_size] -= 1

    def pop_stopping(self, step: int) -> list[Sequence]:
        """The sequences whose last step ends at ``step``, in the order they joined, up to date and out of the batch."""
        if self._heap and self._heap[0][0] < step:
            raise RuntimeError(f"a sequence was due to stop at step {self._heap[0][0]}, before step {step}")
        stopping = []
        while self._heap and self._heap[0][0] == step:
            seq = heapq.heappop(self._heap)[2]
            self._remove(seq, step)
            stopping.append(seq)
        return stopping

    def release(self, step: int) -> None:
        """Bring every sequence up to ``step`` (the steps before it have all started) and empty the batch."""
        self.account(step)
        for seq in list(self.seqs.values()):
            self.materialize(seq, step)
        if self.owed:
            raise RuntimeError(f"the lazily advanced batch owed {self.owed} blocks its sequences did not take")
        self.reset(step, self.time_s(step) if self.offset <= step < self.offset + len(self.times_s) else 0.0)
