"""A disaggregated deployment replayed on simulated clocks, with the same calibration as a colocated replay.

A prefill engine and a decode engine, each on its own ``SimulatedClock`` charged by one calibrated
``StepCostModel`` (so each phase gets a device as fast as the one calibrated), joined by a link
model: a request's KV pages leave when its prefill ends and reach the decode engine ``link.seconds``
later, and the decode engine adopts them at its next step boundary. The bookkeeping is the engine's
own (blocks reserved, pages gathered and scattered, the sequence adopted); the engines are
``interference_lab.make_engine``'s, whose stages do not run the model once a calibration is given
(each step is charged its calibrated cost and emits filler tokens). Because this replay and
``interference_lab.run_scenario`` charge the same costs, their latencies can be compared, and host
load during either cannot change them.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass
from typing import Optional

import torch

from minidisagg.course.interference_lab import Scenario, ScenarioRun, make_engine
from minidisagg.course.transfer_lab import LinkModel, fit_link
from minidisagg.engine.llm_engine import LLMEngine, RequestOutput
from minidisagg.engine.replay import submit_workload
from minidisagg.engine.sequence import Sequence, SequenceState
from minidisagg.engine.step_cost import StepCostModel
from minidisagg.kv.pages import KVLayout, gather_pages, scatter_pages
from minidisagg.models.registry import LoadedModel


@dataclass(order=True)
class _InFlight:
    """Pages on their way: they reach the decode engine at ``arrive_s``."""

    arrive_s: float
    order: int
    state: SequenceState
    pages: torch.Tensor
    num_bytes: int
    wire_s: float


def _next_step_s(engine: LLMEngine) -> float:
    """When ``engine`` would run its next step: now if it has work, else at its next arrival (inf: never)."""
    if engine.scheduler.has_work():
        return engine.clock.now()
    pending = getattr(engine, "_pending", [])
    return max(engine.clock.now(), pending[0][0]) if pending else math.inf


def link_from_handoffs(name: str, bytes_and_seconds: dict[int, float]) -> LinkModel:
    """A one-message-per-request ``LinkModel`` fitted to measured hand-offs: {KV bytes: seconds}."""
    return fit_link(name, {int(b): b / s / 1e9 for b, s in bytes_and_seconds.items() if s > 0})


def replay_disaggregated(loaded: LoadedModel, scenario: Scenario, costs: StepCostModel, link: LinkModel,
                         label: Optional[str] = None) -> ScenarioRun:
    """Replay ``scenario`` on a modelled 1P1D pair: prefill and decode engines charged by ``costs``, KV over ``link``.

    Each request's pages go as one message after its prefill (the engine's default, no overlap):
    ``transfer_start_s`` = prefill end, ``transfer_end_s`` = adoption (arrival, or the decode
    engine's next step boundary if it is mid-step), which is also when the first token is out.
    """
    workload = scenario.workload()
    prefill = make_engine(loaded, "prefill_first", scenario.token_budget, workload, costs=costs)
    decode = make_engine(loaded, "prefill_first", scenario.token_budget, workload, costs=costs)
    layout = KVLayout.of(prefill.kv_cache)
    handed: list[Sequence] = []
    prefill.handoff = handed.append
    ids = submit_workload(prefill, workload, scenario.seed)
    in_flight: list[_InFlight] = []
    order = itertools.count()
    done: dict[str, RequestOutput] = {}

    def collect(engine: LLMEngine, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if out.finished:
                done[out.request_id] = out
                engine.release(out.request_id)

    while len(done) < len(ids):
        prefill_at = _next_step_s(prefill)
        decode_at = decode.clock.now() if decode.scheduler.has_work() else (
            max(decode.clock.now(), in_flight[0].arrive_s) if in_flight else math.inf)
        if math.isinf(prefill_at) and math.isinf(decode_at):
            raise RuntimeError(f"replay stalled with {len(ids) - len(done)} requests unfinished")
        if prefill_at <= decode_at:  # the earlier engine moves first: nothing can arrive in its past
            collect(prefill, prefill.step())
            for seq in handed:
                now = prefill.clock.now()
                seq.timeline.token_times_s.clear()  # the first token reaches the client with its KV
                seq.timeline.transfer_start_s = now
                num_bytes = layout.request_nbytes(len(seq.block_table))
                wire_s = float(link.seconds(num_bytes))
                heapq.heappush(in_flight, _InFlight(now + wire_s, next(order), SequenceState.of(seq),
                                                    gather_pages(prefill.kv_cache, seq.block_table), num_bytes, wire_s))
                prefill.release_handed_off(seq)
            handed.clear()
            continue
        decode.clock.wait_until(decode_at)
        while in_flight and in_flight[0].arrive_s <= decode.clock.now():
            item = heapq.heappop(in_flight)
            key = f"transfer:{item.state.request_id}"
            num_tokens = len(item.state.prompt_token_ids) + len(item.state.output_token_ids) - 1
            blocks = decode.reserve(key, num_tokens)
            if blocks is None:
                raise RuntimeError("the decode pool is full; size it for the whole workload")
            scatter_pages(decode.kv_cache, blocks, item.pages)
            seq = decode.adopt(item.state, key)
            now = decode.clock.now()
            seq.timeline.transfer_end_s = seq.timeline.decode_start_s = now
            seq.timeline.kv_transfer_bytes, seq.timeline.kv_send_s = item.num_bytes, item.wire_s
            seq.timeline.record_token(now)
        collect(decode, decode.step())
    outs = [done[rid] for rid in ids]
    duration_s = max(prefill.clock.now(), decode.clock.now())
    return ScenarioRun(label or "disaggregated 1P1D (modelled)", outs[:scenario.num_decodes],
                       outs[scenario.num_decodes:], duration_s)
