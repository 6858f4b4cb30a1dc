"""The decode stage run one step ahead of the host (asynchronous scheduling).

With asynchronous scheduling (``ModelRunner.async_scheduling``) a batch runs one step ahead:
once step n is queued on the device, step n+1 is queued behind it at once, fed by step n's
tokens as they sit on the device (sampled there too), and only then does the host wait for step
n's tokens. The host's work between steps (stopping rules, outputs, the next schedule) then
overlaps step n+1 on the device instead of leaving the device idle. If the next step's batch
turns out different (a sequence finished or was preempted, a new one joined), the step queued
ahead is dropped: it wrote the KV of tokens the next real step writes again, into blocks still
owned by their sequences, or freed blocks that no later work on the same stream has read yet.
A step queued ahead samples with copies of the sequences' generators, which replace the
originals only if the step is used, so seeded sampling draws the same tokens either way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch

from minidisagg.engine.batch import BatchItem
from minidisagg.engine.runner import ModelRunner
from minidisagg.engine.sampling import sample_on_device
from minidisagg.engine.sequence import Sequence
from minidisagg.stages.base import StageResult
from minidisagg.stages.decode import DecodeStage, check_ready_to_decode


@dataclass
class QueuedDecode:
    """A decode step queued on the device whose tokens the host has not read yet."""

    seqs: list[Sequence]
    positions: list[int]  # the position each sequence's input token takes
    slots: list[int]  # the KV slot each input token is written to
    token_ids: torch.Tensor  # [len(seqs)] the sampled tokens, on the device
    host_token_ids: torch.Tensor  # [len(seqs)] their copy on the host (pinned on CUDA)
    copied: Optional[torch.cuda.Event]  # recorded once the copy to the host is queued (None on CPU)
    generators: Optional[list[Optional[torch.Generator]]] = None  # copies it sampled with (queued ahead only)
    input_token_ids: Optional[list[int]] = None  # the step's input tokens, once the host knows them

    def settle(self) -> None:
        """Wait until the device has finished this step (only), including its KV writes."""
        if self.copied is not None:
            self.copied.synchronize()

    def read(self) -> list[int]:
        """Wait for this step and return its tokens."""
        self.settle()
        return self.host_token_ids.tolist()


@dataclass
class LookaheadStats:
    """How often a step queued ahead was used, and how often it was dropped."""

    used: int = 0
    dropped: int = 0


class AsyncDecodeStage(DecodeStage):
    """The decode step, queued one step ahead of the host (see the module docstring)."""

    def __init__(self, runner: ModelRunner) -> None:
        super().__init__(runner)
        self._ahead: Optional[QueuedDecode] = None
        self.lookahead = LookaheadStats()

    def run(self, work: list[Sequence]) -> StageResult:
        """One decode iteration: use the step queued ahead if it is exactly this one, and queue the next."""
        check_ready_to_decode(work)
        new_tokens, elapsed = self._run_ahead(work)
        for seq in work:
            seq.num_computed_tokens += 1
        return StageResult(list(work), new_tokens, elapsed, len(work))

    def settle(self) -> None:
        """Wait for the step queued ahead, if any, so that blocks freed meanwhile are quiet on the device."""
        if self._ahead is not None:
            self._ahead.settle()

    def _run_ahead(self, work: list[Sequence]) -> tuple[list[Optional[int]], float]:
        """Use (or queue) this step, queue the next one behind it, then read this step's tokens."""
        t0 = time.perf_counter()
        step = self._take_ahead(work)
        if step is None:
            step = self._queue(work, [s.num_tokens - 1 for s in work], None, ahead=False)
            step.input_token_ids = [s.last_token_id for s in work]
        if self._may_queue_next(work):
            self._ahead = self._queue(work, [p + 1 for p in step.positions], step.token_ids, ahead=True)
        tokens = step.read()
        if self._ahead is not None:
            self._ahead.input_token_ids = tokens
        return list(tokens), time.perf_counter() - t0

    def _queue(self, work: list[Sequence], positions: list[int], device_token_ids: Optional[torch.Tensor],
               ahead: bool) -> QueuedDecode:
        """Queue one decode step at ``positions``; its tokens stay on the device for now.

        A step queued ``ahead`` samples with copies of the generators (see the module docstring).
        """
        bs = self.runner.kv_cache.block_size
        items = [BatchItem([seq.last_token_id if device_token_ids is None else 0], pos, seq.block_table, True)
                 for seq, pos in zip(work, positions)]
        logits = self.runner.execute(items, device_token_ids)
        generators = [_copy(s.generator) for s in work] if ahead else [s.generator for s in work]
        token_ids = sample_on_device(logits, [s.params for s in work], generators)
        copied = None
        if token_ids.is_cuda:
            host = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
            host.copy_(token_ids, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        else:
            host = token_ids
        slots = [seq.block_table[pos // bs] * bs + pos % bs for seq, pos in zip(work, positions)]
        return QueuedDecode(list(work), positions, slots, token_ids, host, copied, generators if ahead else None)

    def _may_queue_next(self, work: list[Sequence]) -> bool:
        """Whether the step after this one can be queued now, for the same batch.

        Not when a sequence is sure to stop after this token (no next step for it), when its next
        position is past the context, or when that position needs a block it does not hold yet
        (the scheduler takes that block a step early only while the pool has room to spare).
        """
        bs = self.runner.kv_cache.block_size
        for seq in work:
            next_pos = seq.num_tokens  # this step samples the token at num_tokens; the next step writes its KV
            if len(seq.output_token_ids) + 1 >= seq.params.max_tokens or next_pos + 1 >= self.runner.max_model_len:
                return False
            if next_pos // bs >= len(seq.block_table):
                return False
        return True

    def _take_ahead(self, work: list[Sequence]) -> Optional[QueuedDecode]:
        """The step queued ahead, if it is exactly this step (same sequences, positions, tokens, slots)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        bs = self.runner.kv_cache.block_size
        same = len(ahead.seqs) == len(work) and ahead.input_token_ids is not None and all(
            a is s and s.num_tokens - 1 == pos and s.last_token_id == tok
            and pos // bs < len(s.block_table) and s.block_table[pos // bs] * bs + pos % bs == slot
            for a, s, pos, tok, slot in zip(ahead.seqs, work, ahead.positions, ahead.input_token_ids, ahead.slots)
        )
        if same:
            self.lookahead.used += 1
            for seq, generator in zip(work, ahead.generators or ()):
                seq.generator = generator  # the copy drew this step's token: it carries on
            return ahead
        self.lookahead.dropped += 1
        return None


def _copy(generator: Optional[torch.Generator]) -> Optional[torch.Generator]:
    """A generator in the same state as ``generator`` (None stays None)."""
    if generator is None:
        return None
    copy = torch.Generator(device=generator.device)
    copy.set_state(generator.get_state())
    return copy
