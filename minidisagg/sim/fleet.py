"""A fleet of simulated instances: colocated replicas behind a router, or xPyD pools joined by KV links.

Colocated: each request goes to one replica (round robin or least loaded) and is served there.
xPyD, as ``disagg`` serves it: the router picks a prefill and a decode instance for each request.
At its next step boundary the prefill instance asks the decode instance to reserve blocks for the
prompt's KV (``reserve_many``; credit-based admission: a full decode instance makes the request
wait for blocks to free). The reservation takes the decode engine's lock, so it gets in at the
decode instance's next step boundary, and the prefill instance waits for it before its step. The
prefill instance, running ``prefill_first``, hands the sequence off after its first token; its KV
crosses the prefill instance's link (shared by its concurrent transfers); the decode instance
adopts it at its next step boundary (``decode_commit_s`` each), and only then is the first token
emitted, as the decode worker emits it. Two serving costs are optional: the router's hand-over of each
request (``FleetSpec.submit_s``) and the reservation's round trip over the link (``LinkSpec.control_rtt_s``).
"""

from __future__ import annotations

import gc
import math
from collections import deque
from dataclasses import dataclass
from typing import Optional

from minidisagg.engine.sampling import SamplingParams
from minidisagg.engine.sequence import Sequence
from minidisagg.engine.step_cost import StepCostModel
from minidisagg.metrics import RequestTimeline
from minidisagg.sim.events import INPUT, EventLoop
from minidisagg.sim.instance import InstanceConfig, InstanceHooks, SimInstance
from minidisagg.sim.link import LinkSpec, SharedLink
from minidisagg.sim.results import CompactTimeline, SimResult, Trace
from minidisagg.sim.router import InstancePicker
from minidisagg.stages.modelled import FILLER_TOKEN_ID


@dataclass(frozen=True)
class FleetSpec:
    """What to simulate: ``num_prefill`` = 0 means ``num_decode`` colocated replicas, else an xPyD deployment.

    In xPyD each prefill instance sends its KV over a link of its own (``link``: its NVLink port or NIC),
    which its concurrent transfers share; ``messages_per_transfer`` latencies are paid per transfer.
    ``submit_s``: the router's hand-over of a request (its submission message, the instance's inbox): the
    request reaches its instance this long after it arrived (it is routed on arrival).
    """

    num_decode: int
    num_prefill: int = 0
    instance: InstanceConfig = InstanceConfig()
    prefill_instance: Optional[InstanceConfig] = None  # default: ``instance`` with the prefill_first policy
    routing: str = "round_robin"
    link: LinkSpec = LinkSpec("nvlink", 300.0, 0.0)
    kv_bytes_per_token: int = 131072  # Llama-3-8B bf16: 2 x 32 layers x 8 KV heads x 128 x 2 bytes
    messages_per_transfer: int = 1
    submit_s: float = 0.0

    def __post_init__(self) -> None:
        if self.num_decode < 1 or self.num_prefill < 0:
            raise ValueError(f"need num_decode >= 1 and num_prefill >= 0, got {self.num_prefill}P{self.num_decode}D")
        if not (self.submit_s >= 0 and math.isfinite(self.submit_s)):
            raise ValueError(f"FleetSpec.submit_s must be >= 0 and finite, got {self.submit_s}")

    @property
    def num_instances(self) -> int:
        """Instances in the fleet (GPUs, at one instance per GPU)."""
        return self.num_decode + self.num_prefill


class Fleet:
    """Runs one trace through the fleet described by a ``FleetSpec``; ``run`` returns a ``SimResult``."""

    def __init__(self, spec: FleetSpec, costs: StepCostModel, prefill_costs: Optional[StepCostModel] = None,
                 fast: bool = True, keep_timelines: bool = False) -> None:
        self.spec = spec
        self.loop = EventLoop()
        self.keep_timelines = keep_timelines
        disagg = spec.num_prefill > 0
        hooks = InstanceHooks(self._finished, blocks_freed=self._blocks_freed if disagg else None)
        self.decode = [SimInstance(i, costs, spec.instance, self.loop, hooks, fast) for i in range(spec.num_decode)]
        self.prefill: list[SimInstance] = []
        if disagg:
            cfg = spec.prefill_instance or InstanceConfig(**{**spec.instance.__dict__, "policy": "prefill_first"})
            phooks = InstanceHooks(self._prefill_finished, handed_off=self._handed_off, before_step=self._reserve_round)
            self.prefill = [SimInstance(i, prefill_costs or costs, cfg, self.loop, phooks, fast)
                            for i in range(spec.num_prefill)]
            self.links = [SharedLink(spec.link, self.loop) for _ in self.prefill]
        self.pick_decode = InstancePicker(spec.num_decode, spec.routing)
        self.pick_prefill = InstancePicker(max(1, spec.num_prefill), spec.routing)
        self._params: dict[int, SamplingParams] = {}
        self._credits: list[deque] = [deque() for _ in self.decode]  # requests waiting for decode blocks
        self._inbox: list[list[Sequence]] = [[] for _ in self.prefill]  # arrived, not yet asked for blocks
        self._route_p: dict[int, int] = {}
        self._route_d: dict[int, int] = {}
        self._capacity_tokens = min(i.blocks.capacity_tokens for i in (self.decode[0], *self.prefill[:1]))

    # ---- requests in ------------------------------------------------------------------------------
    def run(self, trace: Trace) -> SimResult:
        """Simulate every request of ``trace`` to its end; results come back in trace order."""
        self.trace = trace
        self.result = SimResult.empty(trace, self.keep_timelines)
        self._arrivals = iter(range(len(trace)))
        self._next_arrival()
        # Python's cyclic collector walks every container of the oldest generation at each full collection,
        # among them each instance's per-block lists (num_blocks entries each: 16M at 1024 x 16384): that
        # made a 1024-instance fleet cost up to 1.8x per request what a small one does. A run makes no
        # reference cycles per request (``tests/test_sim.py`` checks), so the collector pauses while it runs.
        enabled = gc.isenabled()
        gc.disable()
        try:
            self.loop.run()
        finally:
            if enabled:
                gc.enable()
        stuck = [i for i in self.prefill + self.decode if i.is_idle and i.scheduler.has_work()]
        if stuck:
            inst = stuck[0]
            waiting = [(s.num_computed_tokens, s.num_tokens) for s in list(inst.scheduler.waiting)[:4]]
            raise RuntimeError(f"the fleet stalled: {len(stuck)} instance(s) hold requests their scheduler plans no step "
                               f"for; e.g. one with {inst.num_free_blocks} of {inst.blocks.num_blocks} blocks "
                               f"free, {inst.scheduler.num_running} running and waiting (computed, total tokens) "
                               f"{waiting}: no plan although requests wait (more "
                               f"num_blocks, or a smaller token budget)")
        self.result.check_complete()
        self.result.num_events = self.loop.num_events
        self.result.instances = self.prefill + self.decode
        return self.result

    def _next_arrival(self) -> None:
        i = next(self._arrivals, None)
        if i is not None:
            self.loop.push(float(self.trace.arrival_s[i]), INPUT, self._arrive, i)

    def _arrive(self, now_s: float, i: int) -> None:
        self._next_arrival()
        out = int(self.trace.output_len[i])
        params = self._params.get(out)
        if params is None:
            params = self._params[out] = SamplingParams(temperature=0, max_tokens=out, ignore_eos=True)
        prompt = int(self.trace.prompt_len[i])
        if prompt + out > self._capacity_tokens:  # more than a pool holds: name the first such pool
            for inst in (self.decode[0], *self.prefill[:1]):
                if inst.blocks.blocks_needed(prompt + out) > inst.blocks.num_blocks:
                    raise ValueError(f"request {i}: {prompt} + {out} tokens need "
                                     f"{inst.blocks.blocks_needed(prompt + out)} KV blocks; an instance's pool has "
                                     f"{inst.blocks.num_blocks} (raise num_blocks)")
        timeline = RequestTimeline(now_s) if self.keep_timelines else CompactTimeline(now_s)
        seq = Sequence(i, str(i), [FILLER_TOKEN_ID] * prompt, params, timeline)
        if self.keep_timelines:
            self.result.timelines[i] = timeline
        d = self.pick_decode.pick()
        self._route_d[i] = d
        if self.prefill:
            self._route_p[i] = self.pick_prefill.pick()
        if self.spec.submit_s > 0:
            self.loop.push(now_s + self.spec.submit_s, INPUT, self._submit, seq)
        else:
            self._submit(now_s, seq)

    def _submit(self, now_s: float, seq: Sequence) -> None:
        """The routed request reaches its instance (a prefill instance's next step boundary asks for its blocks)."""
        i = seq.seq_id
        if not self.prefill:
            d = self._route_d[i]
            seq.blocks = self.decode[d].blocks
            self.decode[d].submit(seq, now_s)
            return
        p = self._route_p[i]
        self._inbox[p].append(seq)
        self.prefill[p].wake(now_s)

    # ---- xPyD ---------------------------------------------------------------------------------------
    def _reserve_round(self, inst: SimInstance, now_s: float) -> Optional[float]:
        """A prefill instance's step boundary: ask for blocks for what arrived; the step waits for the answers.

        Each decode instance answers at its next step boundary (all asked at once: the wait is the longest).
        """
        inbox = self._inbox[inst.index]
        if not inbox:
            return None
        self._inbox[inst.index] = []
        by_decode: dict[int, list[Sequence]] = {}
        for seq in inbox:
            by_decode.setdefault(self._route_d[seq.seq_id], []).append(seq)
        half_s = self.spec.link.control_rtt_s / 2
        if half_s > 0:  # the asks travel half the round trip; the answers, the other half
            self.loop.push(now_s + half_s, INPUT, self._asks_arrive, (inst, by_decode))
            return math.inf  # ``_asks_arrive`` resumes the instance once the last answer is back
        return self._ask(now_s, by_decode)

    def _ask(self, now_s: float, by_decode: dict[int, list[Sequence]]) -> float:
        """Asks for blocks reach their decode instances at ``now_s``: each answers at its next step boundary."""
        resume_s = now_s
        for d, seqs in by_decode.items():
            at_s = self.decode[d].next_boundary_s(now_s)
            if at_s > now_s:
                self.loop.push(at_s, INPUT, self._reserve, (d, seqs))
            else:
                self._reserve(now_s, (d, seqs))
            resume_s = max(resume_s, at_s)
        return resume_s

    def _asks_arrive(self, now_s: float, payload: tuple[SimInstance, dict[int, list[Sequence]]]) -> None:
        inst, by_decode = payload
        inst.resume(self._ask(now_s, by_decode) + self.spec.link.control_rtt_s / 2)

    def _reserve(self, now_s: float, payload: tuple[int, list[Sequence]]) -> None:
        d, seqs = payload
        self._credits[d].extend(seqs)
        self._grant(d, now_s)

    def _grant(self, d: int, now_s: float) -> None:
        """Reserve decode blocks for waiting requests of decode instance ``d`` (arrival order; those that fit)."""
        queue = self._credits[d]
        if not queue:
            return
        inst = self.decode[d]
        inst.interrupt(now_s)
        blocks = inst.blocks
        still = deque()
        for seq in queue:
            needed = blocks.blocks_needed(len(seq.prompt_token_ids))
            if needed + inst.scheduler.num_running > inst.num_free_blocks:
                still.append(seq)
                continue
            blocks.grow(("kv", seq.seq_id), len(seq.prompt_token_ids))
            p = self.prefill[self._route_p[seq.seq_id]]
            seq.blocks = p.blocks
            p.submit(seq, now_s)
        if len(still) < len(queue):
            inst.reserved(now_s)
        self._credits[d] = still

    def _handed_off(self, inst: SimInstance, seq: Sequence, now_s: float) -> None:
        tl = seq.timeline
        tl.transfer_start_s = now_s
        if isinstance(tl, CompactTimeline):  # the client gets the first token from the decode instance
            tl.clear_tokens()
        else:
            tl.token_times_s.clear()
        num_bytes = self.spec.kv_bytes_per_token * seq.num_computed_tokens
        seq.timeline.kv_transfer_bytes = num_bytes
        self.links[inst.index].send(now_s, num_bytes, self.spec.messages_per_transfer, self._landed, (inst, seq))

    def _landed(self, now_s: float, payload: tuple[SimInstance, Sequence]) -> None:
        p, seq = payload
        p.scheduler.release_handed_off(seq)
        p.wake(now_s)  # its freed blocks may let a waiting prompt in
        d = self.decode[self._route_d[seq.seq_id]]
        d.interrupt(now_s)
        tl = seq.timeline
        tl.kv_landed_s = now_s
        adopted = Sequence(seq.seq_id, seq.request_id, seq.prompt_token_ids, seq.params, tl,
                           output_token_ids=list(seq.output_token_ids), num_computed_tokens=seq.num_tokens - 1,
                           blocks=d.blocks)
        d.blocks.rename(("kv", seq.seq_id), seq.seq_id)
        d.adopt(adopted, now_s)

    def _blocks_freed(self, inst: SimInstance, now_s: float) -> None:
        self._grant(inst.index, now_s)

    def _prefill_finished(self, inst: SimInstance, seq: Sequence, now_s: float) -> None:
        """A request that ended at its prefill (one output token): its decode reservation goes back."""
        d = self._route_d[seq.seq_id]
        self.decode[d].interrupt(now_s)
        self.decode[d].blocks.free(("kv", seq.seq_id))
        self._finished(inst, seq, now_s)
        self._grant(d, now_s)

    # ---- requests out ------------------------------------------------------------------------------
    def _finished(self, inst: SimInstance, seq: Sequence, now_s: float) -> None:
        i = seq.seq_id
        self.result.record(i, seq, inst.index)
        self.pick_decode.done(self._route_d.pop(i))
        if self.prefill:
            self.pick_prefill.done(self._route_p.pop(i))


def simulate(spec: FleetSpec, costs: StepCostModel, trace: Trace, fast: bool = True,
             keep_timelines: bool = False, prefill_costs: Optional[StepCostModel] = None) -> SimResult:
    """Run ``trace`` through the fleet ``spec``, every instance priced by ``costs``."""
    return Fleet(spec, costs, prefill_costs, fast, keep_timelines).run(trace)

