"""Lab 6 support code: per-phase costs measured on the device, the engine replayed on simulated clocks, placement.

A sweep of request rates in wall time is too slow on a CPU, so the lab measures what one prefill
and one decode step cost (``phase_costs``: before any replay, the fastest of several repeats), then
replays workloads through the engine's own scheduler, block manager and timelines on
``SimulatedClock``s, with stages that charge those measured costs
instead of running the model. Disaggregated workers are separate engines: prefill engines hand
sequences off, and after the KV transfer time each lands on a decode engine (``reserve`` + ``adopt``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import ipywidgets as widgets
import traitlets

from minidisagg.config import CacheConfig, EngineConfig
from minidisagg.course.phase_costs import (CostCalibration, PhaseCosts, lower_envelope,  # noqa: F401 (the lab's names)
                                           measure_phase_costs)
from minidisagg.engine.clock import SimulatedClock
from minidisagg.engine.llm_engine import LLMEngine
from minidisagg.engine.replay import replay, submit_workload
from minidisagg.engine.scheduler import Policy
from minidisagg.engine.sequence import Sequence as EngineSequence
from minidisagg.engine.sequence import SequenceState
from minidisagg.metrics import SLO, RequestMetrics, goodput, slo_attainment
from minidisagg.models.registry import LoadedModel
from minidisagg.engine.batch import PrefillChunk
from minidisagg.stages.base import StageResult
from minidisagg.stages.decode import DecodeStage
from minidisagg.stages.prefill import PrefillStage
from minidisagg.workload import TimedRequest

FILLER_TOKEN = 100  # what a costed stage "samples": an ordinary token (the replay ignores EOS anyway)


class CostedPrefillStage(PrefillStage):
    """A prefill that charges the measured cost of its batch instead of running the model."""

    def __init__(self, runner: Any, costs: PhaseCosts) -> None:
        super().__init__(runner)
        self.costs = costs

    def run(self, work: list[PrefillChunk]) -> StageResult:
        """Advance each chunk, 'sample' a filler token where a prefill ends, and report the modelled time."""
        tokens = [FILLER_TOKEN if c.is_last else None for c in work]
        for chunk in work:
            chunk.seq.num_computed_tokens += chunk.num_tokens
        elapsed = self.costs.prefill.batch_seconds([c.num_tokens for c in work])
        return StageResult([c.seq for c in work], tokens, elapsed, sum(c.num_tokens for c in work))


class CostedDecodeStage(DecodeStage):
    """A decode step that charges the measured cost of its batch size instead of running the model."""

    def __init__(self, runner: Any, costs: PhaseCosts) -> None:
        super().__init__(runner)
        self.costs = costs

    def run(self, work: list[EngineSequence]) -> StageResult:
        """One modelled decode iteration."""
        for seq in work:
            seq.num_computed_tokens += 1
        return StageResult(list(work), [FILLER_TOKEN] * len(work), self.costs.decode_step_s(len(work)), len(work))


def pool_blocks(costs: PhaseCosts, workload: Sequence[TimedRequest], block_size: int = 16) -> int:
    """A KV pool that holds ``max_batch`` of the workload's longest requests (memory is not what this lab limits)."""
    longest = max((r.prompt_len + r.output_len for r in workload), default=1)
    return costs.max_batch * -(-longest // block_size) + 16


def simulated_engine(loaded: LoadedModel, costs: PhaseCosts, policy: Policy | str, num_blocks: int = 4096,
                     max_num_batched_tokens: int = 2048) -> LLMEngine:
    """An ``LLMEngine`` on a ``SimulatedClock`` whose stages charge ``costs`` (``loaded`` only shapes the pool).

    ``policy`` is a built-in policy's name or any function of the scheduler's ``Policy`` shape.
    """
    name = policy if isinstance(policy, str) else getattr(policy, "__name__", "custom")
    config = EngineConfig(max_num_seqs=costs.max_batch, max_num_batched_tokens=max_num_batched_tokens, policy=name,
                          cache=CacheConfig(block_size=16, num_blocks=num_blocks))
    engine = LLMEngine(loaded, config, clock=SimulatedClock(), policy=policy)
    engine.prefill_stage = CostedPrefillStage(engine.runner, costs)
    engine.decode_stage = CostedDecodeStage(engine.runner, costs)
    return engine


def replay_colocated(loaded: LoadedModel, costs: PhaseCosts, workload: Sequence[TimedRequest], num_gpus: int = 1,
                     policy: Policy | str = "prefill_first", seed: int = 0,
                     token_budget: int = 2048) -> list[RequestMetrics]:
    """``num_gpus`` colocated engines, requests dealt round robin; each replays its share on its own clock."""
    metrics: list[RequestMetrics] = []
    for gpu in range(num_gpus):
        share = list(workload[gpu::num_gpus])
        if share:
            engine = simulated_engine(loaded, costs, policy, pool_blocks(costs, share), token_budget)
            metrics += [out.metrics for out in replay(engine, share, seed=seed + gpu) if out.metrics is not None]
    return metrics


def _prefill_handoffs(engine: LLMEngine, costs: PhaseCosts, share: Sequence[TimedRequest], seed: int,
                      name: str) -> tuple[list[tuple[float, SequenceState]], list[RequestMetrics]]:
    """Run one prefill engine over its share; returns (KV arrival time, state) per handed-off request."""
    handed: list[tuple[float, SequenceState]] = []
    done: list[EngineSequence] = []

    def on_handoff(seq: EngineSequence) -> None:
        now = engine.clock.now()
        seq.timeline.token_times_s.clear()  # the client gets the first token with the KV, from decode
        seq.timeline.transfer_start_s = now
        seq.timeline.kv_transfer_bytes = len(seq.prompt_token_ids) * costs.kv_bytes_per_token
        state = dataclasses.replace(SequenceState.of(seq), request_id=f"{name}-{seq.request_id}")
        handed.append((now + costs.transfer_s(len(seq.prompt_token_ids)), state))
        done.append(seq)

    engine.handoff = on_handoff
    submit_workload(engine, share, seed)
    finished_here: list[RequestMetrics] = []
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished and out.metrics is not None:  # a one-token request ends at prefill
                finished_here.append(out.metrics)
        for seq in done:
            engine.release_handed_off(seq)
        done.clear()
    return handed, finished_here


def _decode_arrivals(engine: LLMEngine, arrivals: list[tuple[float, SequenceState]]) -> list[RequestMetrics]:
    """Adopt each sequence once its KV has arrived and blocks are free; decode everything to the end."""
    arrivals = sorted(arrivals, key=lambda a: a[0])
    metrics: list[RequestMetrics] = []
    i = 0
    while i < len(arrivals) or engine.has_unfinished():
        if not engine.has_unfinished():
            engine.clock.wait_until(arrivals[i][0])
        now = engine.clock.now()
        while i < len(arrivals) and arrivals[i][0] <= now:
            state = arrivals[i][1]
            key = f"transfer:{state.request_id}"
            if engine.reserve(key, len(state.prompt_token_ids) + len(state.output_token_ids)) is None:
                if not engine.has_unfinished():
                    raise RuntimeError(f"request {state.request_id} can never fit this decode engine's KV pool")
                break  # full: the KV waits until running sequences finish
            seq = engine.adopt(state, key)
            seq.timeline.transfer_end_s = seq.timeline.decode_start_s = now
            seq.timeline.record_token(now)
            i += 1
        if engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    if out.metrics is not None:
                        metrics.append(out.metrics)
                    engine.release(out.request_id)
    return metrics


def replay_disagg(loaded: LoadedModel, costs: PhaseCosts, workload: Sequence[TimedRequest], num_prefill: int,
                  num_decode: int, seed: int = 0, prefill_policy: Policy | str = "prefill_first",
                  token_budget: int = 2048) -> list[RequestMetrics]:
    """xPyD on simulated clocks: prefill engines hand off, KV lands after ``costs.transfer_s``, decode engines adopt.

    Requests go round robin to prefill engines, and in KV arrival order round robin to decode engines.
    A decode engine that is full makes arrived KV wait (no request is dropped).
    """
    if num_prefill < 1 or num_decode < 1:
        raise ValueError(f"need at least one prefill and one decode engine, got {num_prefill}P{num_decode}D")
    arrivals: list[tuple[float, SequenceState]] = []
    metrics: list[RequestMetrics] = []
    for p in range(num_prefill):
        share = list(workload[p::num_prefill])
        if share:
            engine = simulated_engine(loaded, costs, prefill_policy, pool_blocks(costs, share), token_budget)
            handed, finished = _prefill_handoffs(engine, costs, share, seed + p,
                                                 f"p{p}")
            arrivals += handed
            metrics += finished
    arrivals.sort(key=lambda a: a[0])
    for d in range(num_decode):
        engine = simulated_engine(loaded, costs, "decode_first", pool_blocks(costs, workload))
        metrics += _decode_arrivals(engine, arrivals[d::num_decode])
    return metrics


@dataclass(frozen=True)
class Placement:
    """A deployment: ``num_prefill`` = 0 means colocated on ``num_decode`` GPUs, else xPyD."""

    num_prefill: int
    num_decode: int

    @property
    def num_gpus(self) -> int:
        """GPUs the deployment uses."""
        return self.num_prefill + self.num_decode

    @property
    def name(self) -> str:
        """'colocated x2' or '1P1D'."""
        return f"colocated x{self.num_decode}" if self.num_prefill == 0 else f"{self.num_prefill}P{self.num_decode}D"

    def replay(self, loaded: LoadedModel, costs: PhaseCosts, workload: Sequence[TimedRequest],
               seed: int = 0, policy: Policy | str = "prefill_first", token_budget: int = 2048) -> list[RequestMetrics]:
        """Replay ``workload`` on this deployment (simulated clocks, measured costs).

        ``policy`` schedules the colocated engines, or the prefill engines of xPyD (decode engines decode first).
        """
        if self.num_prefill == 0:
            return replay_colocated(loaded, costs, workload, self.num_decode, policy, seed, token_budget)
        return replay_disagg(loaded, costs, workload, self.num_prefill, self.num_decode, seed, policy, token_budget)


def attainment_table(metrics_by_rate: dict[float, Sequence[RequestMetrics]], slo: SLO) -> dict[str, list[float]]:
    """Per rate (ascending): attainment of TTFT alone, TPOT alone and both, via ``metrics.slo_attainment``."""
    rates = sorted(metrics_by_rate)
    big = 1e9
    out: dict[str, list[float]] = {"rate_rps": rates, "ttft": [], "tpot": [], "both": []}
    for rate in rates:
        ms = metrics_by_rate[rate]
        out["ttft"].append(slo_attainment(ms, SLO(slo.ttft_s, big)))
        out["tpot"].append(slo_attainment(ms, SLO(big, slo.tpot_s)))
        out["both"].append(slo_attainment(ms, slo))
    return out


def sweep_goodput_rps(metrics_by_rate: dict[float, Sequence[RequestMetrics]], slo: SLO, target: float = 0.9) -> float:
    """Goodput (req/s) of a replayed rate sweep: the engine's ``slo_attainment`` per rate, then ``metrics.goodput``."""
    rates = list(metrics_by_rate)
    return goodput(rates, [slo_attainment(metrics_by_rate[r], slo) for r in rates], target)


@dataclass(frozen=True)
class WorkloadShape:
    """The mean request of a workload: prompt tokens and output tokens (>= 2, so decode has work)."""

    prompt_len: int
    output_len: int

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.output_len < 2:
            raise ValueError(f"need prompt_len >= 1 and output_len >= 2, got {self.prompt_len}, {self.output_len}")


def prefill_instance_goodput(costs: PhaseCosts, shape: WorkloadShape, slo: SLO) -> float:
    """Requests/s one prefill GPU takes while the mean TTFT (M/D/1 queue + prefill + transfer) meets the SLO.

    With service time S, transfer T and slack R = ttft_s - S - T, the M/D/1 mean wait rho S / (2 (1 - rho))
    equals R at rate 2R / (S (S + 2R)); no slack means no goodput.
    """
    service = costs.prefill_s(shape.prompt_len)
    slack = slo.ttft_s - service - costs.transfer_s(shape.prompt_len)
    if slack <= 0:
        return 0.0
    return 2 * slack / (service * (service + 2 * slack))


def decode_instance_goodput(costs: PhaseCosts, shape: WorkloadShape, slo: SLO) -> float:
    """Requests/s one decode GPU takes while TPOT meets the SLO: the largest batch B whose step fits the
    TPOT target (at most ``max_batch``), divided by how long each request stays (output_len - 1 steps)."""
    if costs.decode_step_s(1) > slo.tpot_s:
        return 0.0
    if costs.decode_per_seq_s == 0:
        batch = float(costs.max_batch)
    else:
        batch = min(float(costs.max_batch), (slo.tpot_s - costs.decode_fixed_s) / costs.decode_per_seq_s)
    return batch / ((shape.output_len - 1) * costs.decode_step_s(batch))


def system_goodput(costs: PhaseCosts, shape: WorkloadShape, slo: SLO, num_prefill: int, num_decode: int) -> float:
    """Model goodput (requests/s) of xPyD: the slower side limits, min(x * prefill, y * decode)."""
    if num_prefill < 1 or num_decode < 1:
        raise ValueError(f"need at least one prefill and one decode GPU, got {num_prefill}P{num_decode}D")
    return min(num_prefill * prefill_instance_goodput(costs, shape, slo),
               num_decode * decode_instance_goodput(costs, shape, slo))


class SLOSliders(widgets.HBox):
    """Two sliders, TTFT and TPOT targets in ms, whose ``value`` is the pair in seconds (for ``interactive_figure``)."""

    value = traitlets.Tuple()

    def __init__(self, ttft_s: float, tpot_s: float, max_ttft_s: float, max_tpot_s: float) -> None:
        self.ttft = widgets.FloatSlider(value=ttft_s * 1e3, min=max_ttft_s * 1e3 / 50, max=max_ttft_s * 1e3,
                                        step=max_ttft_s * 1e3 / 200, description="TTFT SLO ms", readout_format=".0f")
        self.tpot = widgets.FloatSlider(value=tpot_s * 1e3, min=max_tpot_s * 1e3 / 50, max=max_tpot_s * 1e3,
                                        step=max_tpot_s * 1e3 / 200, description="TPOT SLO ms", readout_format=".0f")
        super().__init__([self.ttft, self.tpot])
        self.value = (ttft_s, tpot_s)
        for slider in (self.ttft, self.tpot):
            slider.observe(lambda _: setattr(self, "value", (self.ttft.value / 1e3, self.tpot.value / 1e3)), names="value")

