"""One simulated serving instance: the engine's own ``Scheduler`` and block manager, stages priced by a cost model.

Each step follows ``LLMEngine.step``: admit what has arrived, ``Scheduler.schedule``, run the
planned stages (``stages.modelled``: KV progress and filler tokens, no model) in the planned
order, charge each its calibrated cost, and give the tokens to ``Scheduler.update_from_output``
at that stage's end. Only the model's forward pass is replaced; ``tests/test_sim.py`` holds an
instance's timelines against an ``LLMEngine`` replay with modelled stages, bit for bit.

The fast path. Between two changes, a decode-only instance repeats one step: every running
sequence decodes, each takes a slot, none stops. When nothing waits, the policy is a built-in
one (each plans every running decode when no prompt waits), the batch fits ``max_num_seqs`` and
the pool has the blocks, the instance plans
such a stretch at once, up to and including the first step that stops a sequence: the step times come
from ``StepCostModel.decode_costs_s`` accumulated in order (the same floating-point sums a step-by-step
run makes), and one event is set at the stretch's end. There the stretch is applied in bulk (tokens, KV
progress, blocks, token times), and the sequences its last step stops are stopped by the scheduler's own
``StopRules.reason`` and ``Scheduler.finish``, as ``update_from_output`` would. Anything that reaches the
instance earlier (an arrival, a reservation, an adopted sequence) cuts the stretch: the steps that started
before it are applied, the one in flight is planned again through ``Scheduler.schedule``, and the instance
is in exactly the state step-by-step simulation would have reached.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from minidisagg.engine.clock import SimulatedClock
from minidisagg.engine.scheduler import Scheduler, StepBudget, StopRules
from minidisagg.engine.sequence import Sequence
from minidisagg.engine.step_cost import StepCostModel
from minidisagg.kv.block_manager import BlockManager
from minidisagg.sim.events import STEP, EventLoop
from minidisagg.stages.base import Stage, StageResult, planned_runs
from minidisagg.stages.modelled import FILLER_TOKEN_ID, ModelledDecodeStage, ModelledPrefillStage

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
class _Stretch:
    seqs: list[Sequence]
    times_s: list[float]  # start of step 0, then the end of each step
    version: int
    finishes: bool  # whether its last step stops a sequence


@dataclass
class InstanceHooks:
    """What the fleet hears from an instance: finished sequences, hand-offs, blocks freed."""

    finished: Callable[["SimInstance", Sequence, float], None]
    handed_off: Optional[Callable[["SimInstance", Sequence, float], None]] = None
    blocks_freed: Optional[Callable[["SimInstance", float], None]] = None


@dataclass
class InstanceStats:
    """Counters: steps run through the scheduler, steps applied by the fast path, stretches."""

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
        self.stats = InstanceStats()
        self.pending: deque[Sequence] = deque()
        self._busy = False
        self._runs: list[tuple[Stage, list]] = []
        self._result: Optional[StageResult] = None
        self._stretch: Optional[_Stretch] = None
        self._version = 0

    # ---- inputs --------------------------------------------------------------------------------
    def submit(self, seq: Sequence, now_s: float) -> None:
        """A request reaches this instance at ``now_s``; the next step to start admits it."""
        p = seq.params
        if not p.ignore_eos or p.stop_token_ids or p.stop:
            raise ValueError(f"request {seq.request_id}: the simulator's tokens are fillers; it needs ignore_eos=True "
                             f"and no stop tokens or strings (its length is max_tokens)")
        self.interrupt(now_s)
        self.pending.append(seq)
        self.wake(now_s)

    def interrupt(self, now_s: float) -> None:
        """Something from outside touches this instance at ``now_s``: cut a planned stretch there first."""
        st = self._stretch
        if st is None:
            return
        n = len(st.times_s) - 1
        # steps that started before now_s; step 0 started when the stretch was planned, even at now_s itself
        # (a step of the stretch starting exactly at now_s counts as not started: a tie between two instances'
        # float times, which step-by-step simulation would break by event order)
        k = max(1, bisect.bisect_left(st.times_s, now_s, 0, n))
        self._stretch = None
        self._version += 1  # the stretch's event is void
        if k == n and st.finishes:  # the step in flight stops sequences: plan it through the scheduler
            self._apply_stretch(st, k - 1)
            self._plan_step()
            return
        # the step in flight stops nobody, and what it does is seen by no one before it ends: apply it with
        # the others (its slots were taken when it started), and start the next step when it ends
        self._apply_stretch(st, k)
        self.loop.push(st.times_s[k], STEP, self._start, self._version)

    def wake(self, now_s: float) -> None:
        """Start stepping at ``now_s`` if the instance is idle."""
        if not self._busy:
            self._busy = True
            self.loop.push(now_s, STEP, self._start, self._version)

    @property
    def is_idle(self) -> bool:
        """Whether no step is running or planned."""
        return not self._busy

    # ---- the step loop ---------------------------------------------------------------------------
    def _start(self, now_s: float, version: int) -> None:
        if version != self._version:
            return
        self.clock.wait_until(now_s)
        while self.pending:
            self.scheduler.add(self.pending.popleft())
        if not self.scheduler.has_work():
            self._busy = False
            return
        if self.fast and self._plan_stretch(now_s):
            return
        self._plan_step()

    def _plan_step(self) -> None:
        plan = self.scheduler.schedule()
        runs = planned_runs(plan, self.prefill_stage, self.decode_stage, self.clock.now())
        self._runs = [(stage, work) for stage, work in runs if work]
        if not self._runs:  # nothing fits (blocks held by reservations or hand-offs): wait for blocks_freed
            self._busy = False
            return
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
    def _plan_stretch(self, now_s: float) -> bool:
        """Plan a stretch of identical decode-only steps, up to the first that stops a sequence; False if none fits."""
        sched = self.scheduler
        running = sched.running
        b = len(running)
        if sched.waiting or self.pending or sched.lookahead_tokens or not 1 <= b <= sched.budget.max_num_seqs:
            return False
        max_len = self.config.max_model_len
        steps = min(min(s.params.max_tokens - len(s.output_token_ids), max_len - s.num_tokens) for s in running)
        if steps < 1:
            return False
        fast = self._fitting_steps(running, steps)
        if fast < 1:
            return False
        pairs0 = sum(s.num_tokens for s in running)
        pairs = pairs0 + b * np.arange(fast, dtype=np.int64)
        costs = self.costs.decode_costs_s(b, pairs.astype(np.float64))
        times = np.add.accumulate(np.concatenate(([now_s], costs))).tolist()
        self._stretch = _Stretch(list(running), times, self._version, fast == steps)
        self.stats.stretches += 1
        self.loop.push(times[-1], STEP, self._stretch_due, self._version)
        return True

    def _fitting_steps(self, running: list[Sequence], most: int) -> int:
        """The most steady steps (up to ``most``) whose slots the free blocks cover, so none can preempt."""
        blocks, free = self.blocks, self.blocks.num_free_blocks
        if free >= len(running) * (most // blocks.block_size + 1):
            return most  # a sequence grows by at most that many blocks in ``most`` steps

        def extra(m: int) -> int:
            return sum(blocks.num_extra_blocks(s.seq_id, s.num_computed_tokens + m) for s in running)

        if extra(most) <= free:
            return most
        lo, hi = 0, most  # extra(lo) <= free < extra(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if extra(mid) <= free else (lo, mid)
        return lo

    def _stretch_due(self, now_s: float, version: int) -> None:
        if version != self._version or self._stretch is None:
            return
        st, self._stretch = self._stretch, None
        self._apply_stretch(st, len(st.times_s) - 1)
        if st.finishes:  # its last step stops sequences: the scheduler's own stopping rules and finish
            stop = self.scheduler.stop
            for seq in st.seqs:
                reason = stop.reason(seq, seq.output_token_ids[-1])
                if reason is not None:
                    self.scheduler.finish(seq, reason)
        self._step_done(now_s)

    def _apply_stretch(self, st: _Stretch, num_steps: int) -> None:
        """Apply the first ``num_steps`` steps of a stretch: what ``schedule`` + decode + update would each do."""
        if num_steps > 0:
            times = st.times_s[1:num_steps + 1]
            filler = [FILLER_TOKEN_ID] * num_steps
            for seq in st.seqs:
                seq.num_computed_tokens += num_steps
                self.blocks.grow(seq.seq_id, seq.num_computed_tokens)
                seq.output_token_ids.extend(filler)
                record_tokens(seq.timeline, times)
            self.stats.fast_steps += num_steps
            self.stats.busy_s += times[-1] - st.times_s[0]
        self.clock.wait_until(st.times_s[num_steps])


def record_tokens(timeline: object, times_s: list[float]) -> None:
    """Record tokens at ``times_s`` (increasing, after every earlier token) on a timeline, as ``record_token`` would."""
    many = getattr(timeline, "record_tokens", None)
    if many is not None:
        many(times_s)
    else:
        timeline.token_times_s.extend(times_s)  # type: ignore[attr-defined]
