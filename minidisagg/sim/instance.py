"""One simulated serving instance: the engine's own ``Scheduler`` and block manager, stages priced by a cost model.

Each step follows ``LLMEngine.step``: admit what has arrived, ``Scheduler.schedule``, run the
planned stages (``stages.modelled``: KV progress and filler tokens, no model) in the planned
order, charge each its calibrated cost, and give the tokens to ``Scheduler.update_from_output``
at that stage's end. Only the model's forward pass is replaced; ``tests/test_sim.py`` holds an
instance's timelines against an ``LLMEngine`` replay with modelled stages, bit for bit.

The fast path. Between two changes, a decode-only instance repeats one step: every running
sequence decodes, each takes a slot, none stops. When nothing waits, the policy is a built-in one
(each plans every running decode when no prompt waits), the batch fits ``max_num_seqs`` and the pool
has the blocks, the instance keeps its running sequences in a ``SteadyBatch`` (``sim/steady.py``) and
plans a *segment* of such steps at once, up to the first step that stops a sequence or the last the
free blocks cover: one event at its end, step times from ``StepCostModel.decode_costs_s`` summed in
order (the floating-point sums a step-by-step run makes). There the sequences that stop are brought
up to date and stopped by the scheduler's own ``StopRules.reason`` and ``Scheduler.finish``, as
``update_from_output`` would; the others stay lazy and the next segment starts. What reaches the
instance meanwhile is taken in where step-by-step simulation would see it: a sequence adopted while
step k runs joins at step k + 1 (the segment is cut there and planned again with the larger batch),
a reservation of blocks counts against the blocks the started steps took and shortens the segment if
the rest no longer fits, and a new prompt cuts the segment after the step in flight, where every
sequence is brought up to date and the scheduler plans the next step. ``tests/test_sim.py`` holds
all of it bit for bit against step-by-step simulation.

A disaggregated prefill instance (``prefill_first``, every sequence handed off after its first token)
decodes nothing between steps; where its scheduler's plan is known in advance (whole prompts from the
front of the queue, all of which the free blocks hold), ``sim/prefill.py`` makes it without
``Scheduler.schedule``; the stage and ``update_from_output`` run as in any step.

Adoption, as ``disagg.decode_worker`` does it. A sequence whose KV landed while a step runs is taken
in at the next step boundary (``commit`` queues it; the loop adopts the queue before its next step),
one whose KV lands at an idle instance at once; each adoption costs the instance
``StepCostModel.decode_commit_s`` before the step starts, and the request's first token is emitted
when its adoption is done. In the fast path the step that takes sequences in starts its work that
much later (``SteadyBatch.plan``'s ``work_start_s``); ``next_boundary_s`` says when the step in
flight ends (where a reservation, which waits for the engine's lock, gets in).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

from minidisagg.engine.clock import SimulatedClock
from minidisagg.engine.scheduler import Scheduler, StepBudget, StopRules
from minidisagg.engine.sequence import Sequence
from minidisagg.engine.step_cost import StepCostModel
from minidisagg.kv.block_manager import BlockManager
from minidisagg.sim.events import STEP, EventLoop
from minidisagg.sim.prefill import plan_hand_off_prefill
from minidisagg.sim.steady import SteadyBatch
from minidisagg.stages.base import Stage, StageResult, planned_runs
from minidisagg.stages.modelled import ModelledDecodeStage, ModelledPrefillStage

FAST_PATH_POLICIES = ("prefill_first", "decode_first", "chunked")  # plan every running decode when nothing waits


@dataclass(frozen=True)
class InstanceConfig:
    """An instance's scheduling and KV pool: the fields of ``EngineConfig`` the scheduler reads."""

    policy: str = "chunked"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    num_blocks: int = 4096
    block_size: int = 16
    max_model_len: int = 2**31

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "num_blocks", "block_size", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"InstanceConfig.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class _Segment:
    start: int  # global step indices of the ``SteadyBatch``: steps start .. end - 1
    end: int
    at_start: bool  # planned when its first step started (else earlier, when a sequence joined)


@dataclass
class InstanceHooks:
    """What the fleet hears from an instance: finished sequences, hand-offs, blocks freed."""

    finished: Callable[["SimInstance", Sequence, float], None]
    handed_off: Optional[Callable[["SimInstance", Sequence, float], None]] = None
    blocks_freed: Optional[Callable[["SimInstance", float], None]] = None
    # at a step boundary, before admitting: None to go on, else the time to go on at (a reservation round trip)
    before_step: Optional[Callable[["SimInstance", float], Optional[float]]] = None


@dataclass
class InstanceStats:
    """Counters: steps planned by the scheduler, steps the fast path ran (decode segments' steps and prefill steps
    planned by ``sim/prefill.py``), segments it planned (``stretches``).

    ``extra``: ``joined`` (sequences adopted into a running segment), ``shortened`` (segments a reservation cut).
    """

    scheduled_steps: int = 0
    fast_steps: int = 0
    stretches: int = 0
    busy_s: float = 0.0
    extra: dict[str, int] = field(default_factory=dict)


class SimInstance:
    """An engine instance on a simulated clock; ``submit`` a sequence, the event loop does the rest."""

    def __init__(self, index: int, costs: StepCostModel, config: InstanceConfig, loop: EventLoop,
                 hooks: InstanceHooks, fast: bool = True) -> None:
        self.index = index
        self.costs = costs
        self.config = config
        self.loop = loop
        self.hooks = hooks
        self.blocks = BlockManager(config.num_blocks, config.block_size)
        budget = StepBudget(config.max_num_seqs, config.max_num_batched_tokens)
        self.scheduler = Scheduler(config.policy, budget, self.blocks, stop=StopRules(max_model_len=config.max_model_len))
        self.clock = SimulatedClock()  # charged each stage's modelled cost, which the stage already computed
        self.prefill_stage = ModelledPrefillStage(None, costs)  # type: ignore[arg-type] - no runner: no model
        self.decode_stage = ModelledDecodeStage(None, costs)  # type: ignore[arg-type]
        self.fast = fast and config.policy in FAST_PATH_POLICIES and hasattr(costs, "decode_costs_s")
        # a prefill instance that hands every sequence off: its steps are planned by ``sim/prefill.py`` where it can
        self._fast_prefill = fast and config.policy == "prefill_first" and hooks.handed_off is not None
        self.stats = InstanceStats()
        self.pending: deque[Sequence] = deque()
        self._busy = False
        self._runs: list[tuple[Stage, list]] = []
        self._result: Optional[StageResult] = None
        self.steady = SteadyBatch(self.blocks, config.max_model_len)
        self._segment: Optional[_Segment] = None
        self._step = 0  # the steady batch's step at the last segment's end
        self._leave_steady = False  # a sequence joined that cannot run lazily: let the scheduler plan next
        self._version = 0
        self._adopting: list[list] = []  # [sequence, first token recorded] adopted at the boundary ``_adopting_step``
        self._adopting_step = -1
        self._resumed = False  # this step boundary's ``before_step`` wait is over

    # ---- inputs --------------------------------------------------------------------------------
    def submit(self, seq: Sequence, now_s: float) -> None:
        """A request reaches this instance at ``now_s``; the next step to start admits it."""
        p = seq.params
        if not p.ignore_eos or p.stop_token_ids or p.stop:
            raise ValueError(f"request {seq.request_id}: the simulator's tokens are fillers; it needs ignore_eos=True "
                             f"and no stop tokens or strings (its length is max_tokens)")
        seg = self._segment
        if seg is not None:  # end the segment after the step in flight: the next step admits the prompt
            k = self._started(seg, now_s)
            self.steady.account(k)
            if k < seg.end:
                self._cut(k)
        self.pending.append(seq)
        self.wake(now_s)

    @property
    def num_free_blocks(self) -> int:
        """Free KV blocks at the current instant: the pool's, less those the decode steps started so far took."""
        return self.steady.free_blocks

    def interrupt(self, now_s: float) -> None:
        """Something from outside reads or changes the pool at ``now_s``: count the blocks of the steps started by then."""
        seg = self._segment
        if seg is not None:
            self.steady.account(self._started(seg, now_s))

    def reserved(self, now_s: float) -> None:
        """Blocks were taken at ``now_s`` (after ``interrupt``): shorten the planned segment to what still fits."""
        seg = self._segment
        if seg is not None:
            first = self.steady.accounted
            fitting = self.steady.fitting_steps(first, seg.end - first)
            if first + fitting < seg.end:
                self.stats.extra["shortened"] = self.stats.extra.get("shortened", 0) + 1
                self._cut(first + fitting)

    def adopt(self, seq: Sequence, now_s: float) -> None:
        """Start decoding a sequence prefilled elsewhere (``Scheduler.adopt``) from the next step to start.

        Its first token is emitted once the next step boundary's adoptions up to it are done (``decode_commit_s`` each).
        """
        self.scheduler.adopt(seq)
        seg = self._segment
        if seg is None:
            self._adopting.append([seq, False])  # ``_start`` takes it in
            self.wake(now_s)
            return
        k = self._started(seg, now_s)
        self.steady.account(k)
        if self._adopting_step != k:
            self._adopting, self._adopting_step = [], k  # those of an earlier boundary were all taken in
        self._adopting.append([seq, False])
        if self._leave_steady or len(self.scheduler.running) > self.config.max_num_seqs or not self.steady.add(seq, k):
            self._leave_steady = True  # the scheduler plans the step after the one in flight
            if k < seg.end:
                self._cut(k)
            return
        self.stats.extra["joined"] = self.stats.extra.get("joined", 0) + 1
        if k == seg.end:
            return  # it joins the next segment
        work_start_s = self.steady.time_s(k)
        for _ in self._adopting:
            work_start_s += self.costs.decode_commit_s
        self._adopting[-1][1] = True
        self._first_token(seq, work_start_s)
        self._end_segment(seg, k)
        if not self._plan_segment(k, at_start=False, work_start_s=work_start_s):
            self._leave_steady = True
            self._segment = _Segment(k, k, False)
            self._version += 1
            self.loop.push(self.steady.time_s(k), STEP, self._segment_done, self._version)

    def wake(self, now_s: float) -> None:
        """Start stepping at ``now_s`` if the instance is idle."""
        if not self._busy:
            self._busy = True
            self.loop.push(now_s, STEP, self._start, self._version)

    def next_boundary_s(self, now_s: float) -> float:
        """When the step in flight at ``now_s`` ends (``now_s`` if none is): where a call that waits for the engine gets in.

        A step that starts exactly at ``now_s`` is in flight: the instance's own events at an instant come first.
        """
        seg, st = self._segment, self.steady
        if seg is not None:
            k = bisect.bisect_right(st.times_s, now_s, seg.start - st.offset, seg.end - st.offset) + st.offset
            return st.time_s(max(k, seg.start + 1) if seg.at_start else k)
        if self._result is not None:
            return self.clock.now()  # the stage in flight ends then (a decode instance runs one stage a step)
        return now_s

    def resume(self, now_s: float) -> None:
        """End at ``now_s`` the wait that ``hooks.before_step`` left open (it returned ``math.inf``): the step starts."""
        self.loop.push(now_s, STEP, self._start, self._version)

    @property
    def is_idle(self) -> bool:
        """Whether no step is running or planned."""
        return not self._busy

    # ---- the step loop ---------------------------------------------------------------------------
    def _start(self, now_s: float, version: int) -> None:
        if version != self._version:
            return
        resumed, self._resumed = self._resumed, False
        if self.hooks.before_step is not None and not resumed:
            resume_s = self.hooks.before_step(self, now_s)
            if resume_s is not None and resume_s > now_s:
                self._resumed = True
                if resume_s != math.inf:  # inf: the answer's time is not known yet; ``resume`` is called then
                    self.loop.push(resume_s, STEP, self._start, self._version)
                return
        self.clock.wait_until(now_s)
        if self._adopting:
            self._take_in()
        if self.pending:
            self._release()
            while self.pending:
                self.scheduler.add(self.pending.popleft())
        if not self.scheduler.has_work():
            if resumed:  # what arrived during the wait gets its own round trip, once what else happens now has
                self.loop.push(now_s, STEP, self._start, self._version)
                return
            self._busy = False
            return
        if self.fast and not self._leave_steady and self._enter_steady(now_s):
            return
        self._release()
        self._plan_step()

    def _take_in(self) -> None:
        """At a step boundary: the adoptions queued for it, ``decode_commit_s`` each, each emitting its first token."""
        for entry in self._adopting:
            self.clock.advance(self.costs.decode_commit_s)
            self.stats.busy_s += self.costs.decode_commit_s
            if not entry[1]:
                self._first_token(entry[0], self.clock.now())
        self._adopting, self._adopting_step = [], -1

    @staticmethod
    def _first_token(seq: Sequence, t_s: float) -> None:
        tl = seq.timeline
        tl.transfer_end_s = tl.decode_start_s = t_s
        tl.record_token(t_s)

    def _plan_step(self) -> None:
        plan = plan_hand_off_prefill(self.scheduler) if self._fast_prefill else None
        fast = plan is not None
        if plan is None:
            plan = self.scheduler.schedule()
        runs = planned_runs(plan, self.prefill_stage, self.decode_stage, self.clock.now())
        self._runs = [(stage, work) for stage, work in runs if work]
        if not self._runs:  # nothing fits (blocks held by reservations or hand-offs): wait for blocks_freed
            self._busy = False
            return
        if fast:
            self.stats.fast_steps += 1
        else:
            self.stats.scheduled_steps += 1
        self._run_stage()

    def _run_stage(self) -> None:
        stage, work = self._runs.pop(0)
        self._result = stage.run(work)
        self.clock.advance(self._result.elapsed_s)
        self.stats.busy_s += self._result.elapsed_s
        self.loop.push(self.clock.now(), STEP, self._stage_end, self._version)

    def _stage_end(self, now_s: float, version: int) -> None:
        if version != self._version:
            return
        result, self._result = self._result, None
        hand_off = self.hooks.handed_off is not None
        update = self.scheduler.update_from_output(result.seqs, result.new_token_ids, now_s, hand_off=hand_off)
        for seq in update.handed_off:
            self.hooks.handed_off(self, seq, now_s)
        if self._runs:
            self._run_stage()
            return
        self._step_done(now_s)

    def _step_done(self, now_s: float) -> None:
        """The end of a step, as ``LLMEngine.step`` ends one: finished sequences get their finish time; next step."""
        freed = False
        for seq in self.scheduler.drain_finished():
            seq.timeline.finish_s = now_s if seq.timeline.finish_s is None else seq.timeline.finish_s
            self.hooks.finished(self, seq, now_s)
            freed = True
        if freed and self.hooks.blocks_freed is not None:
            self.hooks.blocks_freed(self, now_s)
        self._start(now_s, self._version)

    # ---- the fast path -------------------------------------------------------------------------------
    def _started(self, seg: _Segment, now_s: float) -> int:
        """The first step of ``seg`` not started before ``now_s`` (a step starting exactly then has not)."""
        st = self.steady
        k = bisect.bisect_left(st.times_s, now_s, seg.start - st.offset, seg.end - st.offset) + st.offset
        return max(k, seg.start + 1) if seg.at_start else k  # a segment planned at its start has started its first

    def _enter_steady(self, now_s: float) -> bool:
        """Plan a segment of decode-only steps from now; False if the scheduler must plan this step."""
        sched, st = self.scheduler, self.steady
        b = len(sched.running)
        if sched.waiting or self.pending or sched.lookahead_tokens or not 1 <= b <= sched.budget.max_num_seqs:
            return False
        if not len(st):
            st.reset(self._step, now_s)
            for seq in sched.running:
                if not st.add(seq, self._step):
                    return False
        elif len(st) != b:
            return False
        return self._plan_segment(self._step, at_start=True, work_start_s=self.clock.now())

    def _plan_segment(self, start: int, at_start: bool, work_start_s: Optional[float] = None) -> bool:
        num_steps = self.steady.plan(start, self.costs, work_start_s)
        if num_steps < 1:
            return False
        self._segment = _Segment(start, start + num_steps, at_start)
        self.stats.stretches += 1
        self._version += 1
        self.loop.push(self.steady.time_s(start + num_steps), STEP, self._segment_done, self._version)
        return True

    def _cut(self, end: int) -> None:
        """End the planned segment at step ``end`` (an event there) instead of where it was planned to end."""
        self._segment.end = end  # type: ignore[union-attr]
        self.steady.truncate(end)
        self._version += 1
        self.loop.push(self.steady.time_s(end), STEP, self._segment_done, self._version)

    def _end_segment(self, seg: _Segment, end: int) -> None:
        st = self.steady
        self.stats.fast_steps += end - seg.start
        self.stats.busy_s += st.time_s(end) - st.time_s(seg.start)
        self._segment = None
        self._step = end

    def _segment_done(self, now_s: float, version: int) -> None:
        if version != self._version or self._segment is None:
            return
        seg = self._segment
        if self._adopting_step != seg.end:  # those adopted at a boundary inside the segment are taken in
            self._adopting, self._adopting_step = [], -1
        self.steady.account(seg.end)
        self._end_segment(seg, seg.end)
        stop = self.scheduler.stop
        for seq in self.steady.pop_stopping(seg.end):  # the scheduler's own stopping rules and finish
            reason = stop.reason(seq, seq.output_token_ids[-1])
            if reason is None:
                raise RuntimeError(f"request {seq.request_id} was due to stop at step {seg.end}; its stopping rules disagree")
            self.scheduler.finish(seq, reason)
        self._step_done(now_s)

    def _release(self) -> None:
        """Bring every lazily advanced sequence up to date: the scheduler plans the next step."""
        if len(self.steady):
            self.steady.release(self._step)
        self._leave_steady = False

