"""Lab 3 helpers: replay the interference scenario on one colocated engine and read off its latencies.

Replays run on a ``SimulatedClock``: time jumps over idle gaps, and each engine step is charged the
cost its shape had when the model was calibrated (``calibrate``, before any replay), so a replay never
sleeps and another program's load during it cannot change its timeline. Both policies of every
comparison are replayed with the same calibration. By default a calibrated replay does not run the
model again (``stages.modelled``): the engine's scheduler, KV blocks and timelines do all the work, the
forward pass is replaced by its calibrated cost, and a replay takes milliseconds instead of minutes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence

from minidisagg.config import CacheConfig, EngineConfig
from minidisagg.course.device import LabDevice
from minidisagg.engine.calibrate import CalibrationPlan, calibrate_step_costs
from minidisagg.engine.clock import SimulatedClock
from minidisagg.engine.llm_engine import LLMEngine, RequestOutput
from minidisagg.engine.replay import replay
from minidisagg.engine.scheduler import Policy
from minidisagg.engine.step_cost import StepCostModel
from minidisagg.metrics import (RequestTimeline, Summary, count_failures, failure_note, failure_reason, percentile,
                                summarize_outputs)
from minidisagg.models.registry import LoadedModel
from minidisagg.stages.modelled import use_modelled_stages
from minidisagg.workload import Fixed, Scenario, TimedRequest, Uniform, poisson_workload

KV_SLACK_BLOCKS = 8


@dataclass(frozen=True)
class LabSizes:
    """Every size lab 3 runs at: small on a CPU, real shapes and long prompts on a GPU."""

    model: str
    timeline: Scenario
    sweep: Scenario  # one long prompt over a few decodes: the base of the length and budget sweeps
    long_prompt_lens: tuple[int, ...]
    token_budgets: tuple[int, ...]
    load_rates_rps: tuple[float, ...]
    load_num_requests: int
    load_prompt_lens: tuple[int, int]
    load_output_len: int
    slider_lens: tuple[int, int, int]  # min, max, step of the widget's long-prompt slider
    load_token_budget: int = 128  # the chunked budget under Poisson load: below most of the load's prompts

    @classmethod
    def for_lab(cls, lab: LabDevice) -> "LabSizes":
        """Sizes that show the effect within seconds on ``lab``'s device."""
        if lab.is_gpu:
            return cls("llama-1b",
                       Scenario(num_decodes=16, decode_output_len=96, num_long=3, long_prompt_len=8192,
                                long_every_s=0.5, start_long_s=0.2, token_budget=2048),
                       Scenario(num_decodes=8, decode_output_len=32, num_long=1, long_prompt_len=8192,
                                start_long_s=0.05, token_budget=2048),
                       (1024, 2048, 4096, 8192, 16384), (512, 1024, 2048, 4096, 8192),
                       (10.0, 20.0, 40.0, 80.0), 32, (512, 4096), 16, (1024, 16384, 1024), load_token_budget=512)
        return cls(lab.real_model, Scenario(),
                   Scenario(num_decodes=2, decode_output_len=12, num_long=1, long_prompt_len=512,
                            start_long_s=0.1, token_budget=128),
                   (64, 128, 256, 512), (64, 128, 256, 512), (1.0, 2.0, 4.0), 6, (64, 384), 8, (64, 768, 64))


@dataclass
class ScenarioRun:
    """One replay of a scenario: outputs of the steady decodes and of the long prompts."""

    label: str
    decodes: list[RequestOutput]
    longs: list[RequestOutput]
    duration_s: float

    @property
    def finished_decodes(self) -> list[RequestOutput]:
        """The steady decodes that finished with latency figures (failed ones are in ``failures``)."""
        return [o for o in self.decodes if failure_reason(o) is None]

    @property
    def finished_longs(self) -> list[RequestOutput]:
        """The long prompts that finished with latency figures."""
        return [o for o in self.longs if failure_reason(o) is None]

    @property
    def failures(self) -> dict[str, int]:
        """Why requests of this run failed: reason -> count (empty when every request finished)."""
        return count_failures(self.decodes + self.longs)

    @property
    def num_failed(self) -> int:
        """Requests of this run that failed (an error, an abort, a timeout, no output token)."""
        return sum(self.failures.values())

    def failure_note(self) -> str:
        """``label: 1 of 6 requests failed: <reason> (1)``, or "" when none did."""
        note = failure_note(len(self.decodes) + len(self.longs), self.failures)
        return f"{self.label}: {note}" if note else ""

    @property
    def decode_itl_s(self) -> list[float]:
        """Every inter-token gap of every finished steady decode, pooled."""
        return [gap for o in self.finished_decodes for gap in o.metrics.itl_s]

    @property
    def itl_p50_s(self) -> float:
        """Median inter-token latency of the steady decodes (NaN without any gap)."""
        gaps = self.decode_itl_s
        return percentile(gaps, 50.0) if gaps else math.nan

    @property
    def itl_p99_s(self) -> float:
        """99th-percentile inter-token latency of the steady decodes (NaN without any gap)."""
        gaps = self.decode_itl_s
        return percentile(gaps, 99.0) if gaps else math.nan

    @property
    def itl_max_s(self) -> float:
        """The longest inter-token gap any steady decode saw: the worst stall (NaN without any gap)."""
        return max(self.decode_itl_s, default=math.nan)

    @property
    def long_ttft_s(self) -> float:
        """Mean time to first token of the finished long prompts (NaN without any)."""
        longs = self.finished_longs
        return sum(o.metrics.ttft_s for o in longs) / len(longs) if longs else math.nan

    @property
    def long_prefill_s(self) -> float:
        """Mean time from the first to the last prefill step of the finished long prompts (NaN without any)."""
        longs = self.finished_longs
        return sum(o.metrics.prefill_s for o in longs) / len(longs) if longs else math.nan

    @property
    def output_tokens_per_s(self) -> float:
        """Output tokens of every request over the replay's duration."""
        return sum(len(o.token_ids) for o in self.decodes + self.longs) / self.duration_s

    def panel(self, title: Optional[str] = None) -> tuple[str, list[RequestTimeline], list[RequestTimeline], float]:
        """This run as one panel of ``minidisagg.plots.itl_timeline_figure``."""
        return (title or self.label, [o.timeline for o in self.decodes], [o.timeline for o in self.longs], 0.0)

    def describe(self) -> str:
        """One line: ITL p50 / p99, long-prompt TTFT and throughput."""
        return (f"{self.label:<28} ITL p50 {1e3 * self.itl_p50_s:7.1f} ms   ITL p99 {1e3 * self.itl_p99_s:7.1f} ms   "
                f"long-prompt TTFT {1e3 * self.long_ttft_s:7.1f} ms   {self.output_tokens_per_s:6.1f} tokens/s"
                + (f"   {self.num_failed} failed" if self.num_failed else ""))


def during_decodes(scenario: Scenario, costs: StepCostModel, first_at: float = 0.15, spread: float = 0.6) -> Scenario:
    """``scenario`` with its long prompts arriving while the steady decodes run, timed by the calibrated decode step.

    The decodes would run for ``decode_output_len`` steps undisturbed; the first long prompt arrives ``first_at`` of
    the way through, the rest spread over the next ``spread`` of it. A GPU decodes so fast that fixed arrival times
    would come after the decodes have finished.
    """
    step_s = costs.decode_cost_s(scenario.num_decodes, scenario.decode_prompt_len + scenario.decode_output_len // 2)
    run_s = scenario.decode_output_len * step_s
    return dataclasses.replace(scenario, start_long_s=first_at * run_s,
                               long_every_s=spread * run_s / max(1, scenario.num_long))


def kv_blocks_for(workload: Sequence[TimedRequest], block_size: int = 16) -> int:
    """A KV pool just large enough to hold every request of ``workload`` at once (plus a little slack)."""
    return sum(-(-(r.prompt_len + r.output_len) // block_size) for r in workload) + KV_SLACK_BLOCKS


def calibrate(loaded: LoadedModel, sizes: LabSizes, repeats: int = 3, progress: bool = True) -> StepCostModel:
    """Time every step shape lab 3 replays (prefill chunks, decode batches, their context) on ``loaded``'s device.

    Run it once, before any replay: every replay then charges these costs, whatever the host does meanwhile.
    """
    longest = max(sizes.timeline.long_prompt_len, sizes.sweep.long_prompt_len, *sizes.long_prompt_lens,
                  sizes.load_prompt_lens[1])
    biggest_chunk = max(longest, *sizes.token_budgets, sizes.timeline.token_budget)
    max_batch = max(sizes.timeline.num_decodes + sizes.timeline.num_long, sizes.sweep.num_decodes + 1,
                    sizes.load_num_requests)
    context = longest + max(sizes.timeline.decode_output_len, sizes.load_output_len)
    return calibrate_step_costs(loaded, CalibrationPlan.covering(biggest_chunk, max_batch, context, repeats), progress)


def make_engine(loaded: LoadedModel, policy: Policy | str, token_budget: int,
                workload: Sequence[TimedRequest], max_num_seqs: int = 64,
                costs: Optional[StepCostModel] = None, run_model: bool = False) -> LLMEngine:
    """A colocated engine on a simulated clock, with a KV pool and CUDA graphs (on a GPU) sized for ``workload``.

    With ``costs`` each step is charged its calibrated cost, and unless ``run_model`` the stages do not run the
    model (the tokens are fillers); without ``costs``, each step is charged its own wall time.
    """
    name = policy if isinstance(policy, str) else getattr(policy, "__name__", "custom")
    config = EngineConfig(max_num_seqs=min(max_num_seqs, len(workload)), max_num_batched_tokens=token_budget,
                          policy=name, cache=CacheConfig(num_blocks=kv_blocks_for(workload)))
    engine = LLMEngine(loaded, config, clock=SimulatedClock(cost_model=costs), policy=policy)
    if costs is not None and not run_model:
        use_modelled_stages(engine, costs)
    else:
        engine.capture_cuda_graphs()  # now, so that no replayed step pays for a capture
    return engine


def run_scenario(loaded: LoadedModel, scenario: Scenario, policy: Policy | str, label: Optional[str] = None,
                 costs: Optional[StepCostModel] = None, **changes: int | float) -> ScenarioRun:
    """Replay ``scenario`` (with any field replaced by ``changes``) under ``policy``, charging ``costs`` per step."""
    scenario = dataclasses.replace(scenario, **changes) if changes else scenario
    workload = scenario.workload()
    engine = make_engine(loaded, policy, scenario.token_budget, workload, costs=costs)
    outs = replay(engine, workload, scenario.seed)
    name = label or (policy if isinstance(policy, str) else getattr(policy, "__name__", "custom policy"))
    return ScenarioRun(name, outs[: scenario.num_decodes], outs[scenario.num_decodes:], engine.clock.now())


def warm_up(loaded: LoadedModel) -> None:
    """Run small replays under both built-in policies, so one-time costs (kernel builds, caches) stay out of timings.

    On a GPU the replays cover several chunk shapes: each new tile size of a Triton kernel compiles once.
    """
    shapes = [(64, 32)] if loaded.device.type == "cpu" else [(60, 32), (1000, 300), (4100, 2048)]
    for long_prompt_len, token_budget in shapes:
        scenario = Scenario(num_decodes=2, decode_prompt_len=16, decode_output_len=4, num_long=1,
                            long_prompt_len=long_prompt_len, start_long_s=0.0, token_budget=token_budget)
        for policy in ("prefill_first", "chunked"):
            run_scenario(loaded, scenario, policy)


def run_load(loaded: LoadedModel, sizes: LabSizes, rate_rps: float, policy: Policy | str, token_budget: int,
             seed: int = 1, costs: Optional[StepCostModel] = None) -> Summary:
    """Replay Poisson arrivals at ``rate_rps`` (sizes from ``sizes``) and summarise every request."""
    low, high = sizes.load_prompt_lens
    workload = poisson_workload(rate_rps, sizes.load_num_requests, Uniform(low, high), Fixed(sizes.load_output_len), seed)
    engine = make_engine(loaded, policy, token_budget, workload, costs=costs)
    outs = replay(engine, workload, seed)
    return summarize_outputs(outs, engine.clock.now())


def pooled_itl_percentile_s(token_times_s: Sequence[Sequence[float]], q: float) -> float:
    """The q-th percentile of every gap between consecutive token times, pooled over requests."""
    gaps = [b - a for times in token_times_s for a, b in zip(times, times[1:])]
    return percentile(gaps, q)
