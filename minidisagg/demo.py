"""The interference demo: steady decodes on one engine while long prompts arrive.

A few requests decode from t=0; every ``long_every_steps`` decode steps a long prompt arrives.
Under ``prefill_first`` each long prefill stalls every running decode (an inter-token-latency
spike); ``chunked`` spreads it over steps with a token budget; disaggregated, the prefill runs
in another process and the decodes never wait for it.

The first view is a calibrated replay: the step costs are measured first (the fastest of a few
repeats per shape), then both colocated policies replay on a ``SimulatedClock`` that charges each
step its calibrated cost, so another program's load during the replay cannot change its timeline
or invert the lesson. The same workload then runs on wall time, colocated and disaggregated over
TCP (which only wall time can show), each engine warmed up first so that no one-time cost (first
calls, native kernel builds, CUDA graph capture) falls inside a measured run.
The host load is read before and after; above one runnable task per core, the wall-clock rows
include other programs' time, and the demo says so.

The wall-clock engines may step faster than the one-thread calibration: their arrivals are
re-timed to each warmed-up engine's measured decode step, so each long prompt still arrives after
the same number of decode steps. The decodes outlast the last arrival even where nothing stalls
them. The demo prints where its time went (loading, calibration, each group of runs).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from minidisagg.config import CacheConfig, EngineConfig
from minidisagg.course.claims import HostLoad, device_name, host_load
from minidisagg.demo_report import (CALIBRATED, DISAGG, POLICIES, WALL, DemoReport, DemoRun, demo_claims, demo_table,
                                     failure_notes)
from minidisagg.engine.calibrate import CalibrationPlan, calibrate_step_costs
from minidisagg.engine.clock import Clock, SimulatedClock, WallClock
from minidisagg.engine.llm_engine import LLMEngine, RequestOutput
from minidisagg.engine.replay import replay
from minidisagg.engine.step_cost import StepCostModel
from minidisagg.engine.steppable import Steppable
from minidisagg.models.registry import LoadedModel, load_model
from minidisagg.stages.modelled import use_modelled_stages
from minidisagg.workload import Scenario, TimedRequest


WARM_UP_DECODE_TOKENS = 12  # enough gaps that their lower quartile is a plain decode step, chunked or not


@dataclass(frozen=True)
class DemoSettings:
    """The interference scenario's sizes; when the long prompts arrive follows from the calibrated costs.

    ``scenario`` is lab 3's ``Scenario``: its timing fields are ignored here, as ``schedule`` derives
    them; its ``token_budget`` is the chunked engine's step budget.
    """

    scenario: Scenario = Scenario(num_decodes=4, decode_prompt_len=32, num_long=2, long_prompt_len=512,
                                  long_output_len=8, token_budget=128, seed=0)
    long_every_steps: int = 24  # decode steps between two long prompts, at least
    calibration_repeats: int = 3

    def __post_init__(self) -> None:
        sizes = {"num_decodes": self.scenario.num_decodes, "decode_prompt_len": self.scenario.decode_prompt_len,
                 "num_long": self.scenario.num_long, "long_prompt_len": self.scenario.long_prompt_len,
                 "long_output_len": self.scenario.long_output_len, "token_budget": self.scenario.token_budget,
                 "long_every_steps": self.long_every_steps, "calibration_repeats": self.calibration_repeats}
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"DemoSettings: {name} must be >= 1, got {value}")

    @classmethod
    def for_device(cls, device: torch.device) -> "DemoSettings":
        """Larger prompts and batches on a GPU, where a small prefill is too fast to see."""
        if device.type == "cuda":
            return cls(dataclasses.replace(cls.scenario, num_decodes=16, num_long=3, long_prompt_len=4096,
                                           token_budget=512), long_every_steps=40)
        return cls()

    def calibration_plan(self) -> CalibrationPlan:
        """Every shape the replays run: prefills up to a whole long prompt, decode batches up to all requests."""
        sc = self.scenario
        return CalibrationPlan.covering(sc.long_prompt_len, sc.num_decodes + 1, sc.long_prompt_len + sc.long_output_len,
                                        repeats=self.calibration_repeats)

    def schedule(self, costs: StepCostModel) -> "DemoSchedule":
        """When the long prompts arrive, how long the decodes run, and what the costs predict for the tail."""
        sc = self.scenario
        decode_s = costs.decode_cost_s(sc.num_decodes, sc.decode_prompt_len)
        chunks = range(0, sc.long_prompt_len, sc.token_budget)
        chunked_long_s = sum(costs.prefill_cost_s(min(sc.token_budget, sc.long_prompt_len - c), c) + decode_s
                             for c in chunks)
        # a period holds one chunked long prefill and long_every_steps plain decode steps; the decodes last
        # half a period past the last arrival even where nothing stalls them (disaggregated)
        period_s = chunked_long_s + self.long_every_steps * decode_s
        last_arrival_s = period_s / 2 + (sc.num_long - 1) * period_s
        output_len = math.ceil((last_arrival_s + period_s / 2) / decode_s)
        whole_step_s = costs.prefill_cost_s(sc.long_prompt_len) + decode_s
        chunk_step_s = costs.prefill_cost_s(min(sc.token_budget, sc.long_prompt_len), sc.long_prompt_len // 2) + decode_s
        timed = dataclasses.replace(sc, decode_output_len=output_len, long_every_s=period_s, start_long_s=period_s / 2)
        return DemoSchedule(period_s, output_len, whole_step_s / chunk_step_s, tuple(timed.workload()))

    def engine_config(self, policy: str, workload: Sequence[TimedRequest]) -> EngineConfig:
        """The colocated engine for ``policy`` (a whole prompt per step, or chunks), its KV pool sized for ``workload``."""
        sc = self.scenario
        whole = sc.long_prompt_len + sc.num_decodes * sc.decode_prompt_len
        budget = sc.token_budget if policy == "chunked" else whole
        blocks = sum(-(-(r.prompt_len + r.output_len) // 16) for r in workload) + len(workload) + 8
        return EngineConfig(max_num_seqs=sc.num_decodes + sc.num_long, max_num_batched_tokens=budget,
                            policy=policy, cache=CacheConfig(block_size=16, num_blocks=blocks))


@dataclass(frozen=True)
class DemoSchedule:
    """The workload that the calibrated costs call for, and the ITL-tail ratio they predict."""

    period_s: float  # between two long prompts
    decode_output_len: int  # tokens per steady decode: every long prompt arrives while they run
    predicted_tail_ratio: float  # a whole-prompt step over a chunk step (each with the decodes' step)
    workload: tuple[TimedRequest, ...]


def _split(label: str, clock: str, outs: list[RequestOutput], num_decodes: int, duration_s: float,
           start_s: float = 0.0) -> DemoRun:
    return DemoRun(label, outs[:num_decodes], outs[num_decodes:], duration_s, clock, start_s)


def warm_up(engine: Steppable, settings: DemoSettings) -> float:
    """Run the workload's shapes once through ``engine`` (decodes, a whole long prompt), so one-time costs stay out.

    Returns the lower quartile of the decodes' inter-token gaps there: this engine's plain decode step on this
    clock (the quartile skips chunk-stalled steps and a new process's first, slower calls).
    """
    if isinstance(engine, LLMEngine):
        engine.capture_cuda_graphs()
    start = engine.clock.now()
    sc = settings.scenario
    warm = dataclasses.replace(sc, decode_output_len=WARM_UP_DECODE_TOKENS, num_long=1, long_every_s=1.0,
                               long_output_len=2, start_long_s=0.0).workload()
    outs = replay(engine, [dataclasses.replace(r, arrival_s=r.arrival_s + start) for r in warm], sc.seed + 1)
    gaps = sorted(gap for o in outs[:sc.num_decodes] if o.metrics is not None for gap in o.metrics.itl_s)
    return gaps[len(gaps) // 4] if gaps else math.nan  # NaN: every warm-up decode failed


def retimed(workload: Sequence[TimedRequest], step_s: float, calibrated_step_s: float) -> list[TimedRequest]:
    """``workload`` with its arrivals scaled by ``step_s / calibrated_step_s`` (held within 4x either way).

    A wall-clock engine may step faster than the one-thread calibration (more threads, another process):
    scaled, each long prompt still arrives after the same number of decode steps, while the decodes run.
    Without a measured step (NaN: the warm-up's decodes failed) the arrivals stay as planned.
    """
    ratio = step_s / calibrated_step_s if calibrated_step_s > 0 else math.nan
    scale = min(4.0, max(0.25, ratio)) if math.isfinite(ratio) else 1.0  # unmeasured: keep the calibrated timing
    return [dataclasses.replace(r, arrival_s=r.arrival_s * scale) for r in workload]


def timed_replay(engine: Steppable, label: str, clock: str, workload: Sequence[TimedRequest],
                 settings: DemoSettings, progress: Optional[Progress] = None) -> DemoRun:
    """Replay ``workload`` from the engine clock's current time; arrivals and the duration count from there."""
    start = engine.clock.now()
    shifted = [dataclasses.replace(r, arrival_s=r.arrival_s + start) for r in workload]
    outs = replay(engine, shifted, settings.scenario.seed, progress, f"{label}, {clock}")
    return _split(label, clock, outs, settings.scenario.num_decodes, engine.clock.now() - start, start)


def colocated_run(loaded: LoadedModel, settings: DemoSettings, policy: str, workload: Sequence[TimedRequest],
                  costs: Optional[StepCostModel] = None, progress: Optional[Progress] = None,
                  calibrated_step_s: float = 0.0) -> DemoRun:
    """One colocated replay: on a calibrated ``SimulatedClock`` with ``costs``, else on wall time after a warm-up.

    The calibrated replay runs the engine's scheduler, block manager and timelines with modelled stages
    (``stages.modelled``): each step is charged its calibrated cost without a forward pass, so it takes
    well under a second on any host; its tokens are fillers, which no row reads.

    On wall time the arrivals are re-timed (``retimed``) from ``calibrated_step_s``, the calibrated decode step
    the workload was planned with, to the warmed-up engine's measured one.
    """
    clock: Clock = SimulatedClock(cost_model=costs) if costs is not None else WallClock()
    engine = LLMEngine(loaded, settings.engine_config(policy, workload), clock=clock)
    if costs is None:
        task = progress.add_task(f"{policy}, wall: warming up", total=None) if progress else None
        workload = retimed(workload, warm_up(engine, settings), calibrated_step_s)
        if progress is not None and task is not None:
            progress.remove_task(task)
    else:  # charged its calibrated costs, the forward pass would only spend time: the stages skip it
        use_modelled_stages(engine, costs)
    return timed_replay(engine, policy, CALIBRATED if costs is not None else WALL, workload, settings, progress)


def disagg_run(loaded: LoadedModel, model: str, settings: DemoSettings, workload: Sequence[TimedRequest],
               progress: Progress, calibrated_step_s: float) -> DemoRun:
    """One prefill and one decode process joined by TCP (the socket transport), on wall time, warmed up first
    (arrivals re-timed to its measured decode step, as in ``colocated_run``)."""
    from minidisagg.disagg.cluster import DisaggCluster

    cpu = loaded.device.type == "cpu"
    task = progress.add_task(f"{DISAGG}: starting two worker processes, warming up", total=None)
    sc = settings.scenario
    budget = max(2048, sc.long_prompt_len + sc.num_decodes * sc.decode_prompt_len)
    cluster = DisaggCluster(loaded, EngineConfig(max_num_batched_tokens=budget, cache=CacheConfig()),
                            transport="socket", model_ref=model, pin_cores=cpu, worker_threads=1 if cpu else 0)
    try:
        workload = retimed(workload, warm_up(cluster, settings), calibrated_step_s)
        progress.remove_task(task)
        return timed_replay(cluster, DISAGG, WALL, workload, settings, progress)
    finally:
        cluster.shutdown()


def calibrated_runs(loaded: LoadedModel, settings: DemoSettings, costs: StepCostModel,
                    workload: Sequence[TimedRequest], progress: Optional[Progress] = None) -> dict[str, DemoRun]:
    """Both colocated policies on the same calibrated clock: deterministic given ``costs``."""
    runs = [colocated_run(loaded, settings, p, workload, costs, progress) for p in POLICIES]
    return {r.key: r for r in runs}




def busy_note(load: HostLoad) -> str:
    """What a busy host means for the rows: the wall-clock ones include other programs' time."""
    return (f"The host is busy ({load.describe()}): the wall-clock rows include other programs' time and say "
            f"little; the calibrated rows charge each step its calibrated cost and do not depend on it "
            f"(--calibrated-only skips the wall-clock runs).")


def run_demo(model: str = "smollm2-135m", device: str = "auto", out_dir: str | Path = ".",
             settings: Optional[DemoSettings] = None, console: Optional[Console] = None,
             disagg: bool = True, wall: bool = True) -> DemoReport:
    """Calibrate, replay both policies on the calibrated clock, then on wall time and disaggregated; table, claims, PNG.

    Both wall-clock sides get the same compute: on CPU the colocated engine uses every core's thread,
    while the prefill and decode processes are each pinned to one core with one thread.
    """
    from minidisagg.plots import itl_timeline_figure

    t0 = time.perf_counter()
    console = console or Console()
    loaded = load_model(model, device=device)
    dev = loaded.device
    phases_s = {"loading": time.perf_counter() - t0}
    settings = settings or DemoSettings.for_device(dev)
    load_before = host_load()
    threads = torch.get_num_threads()
    where = f"{threads} CPU threads" if dev.type == "cpu" else device_name(dev)
    console.print(f"[bold]minidisagg demo[/]: {loaded.name} on {dev} ({loaded.dtype}), {where}; "
                  f"host {load_before.describe()}", highlight=False)
    if load_before.overloaded:
        console.print(busy_note(load_before), style="yellow", highlight=False)
    console.print(f"Calibrating step costs: the fastest of {settings.calibration_repeats} runs of each shape ...",
                  highlight=False)
    mark = time.perf_counter()
    costs = calibrate_step_costs(loaded, settings.calibration_plan(), seed=settings.scenario.seed)
    phases_s["calibration"] = time.perf_counter() - mark
    console.print(costs.describe(), style="dim", highlight=False)
    schedule = settings.schedule(costs)
    workload = list(schedule.workload)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} tokens"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        mark = time.perf_counter()
        runs = calibrated_runs(loaded, settings, costs, workload, progress)
        phases_s["calibrated replays"] = time.perf_counter() - mark
        if wall:
            mark = time.perf_counter()
            step_s = costs.decode_cost_s(settings.scenario.num_decodes, settings.scenario.decode_prompt_len)
            for policy in POLICIES:
                run = colocated_run(loaded, settings, policy, workload, progress=progress, calibrated_step_s=step_s)
                runs[run.key] = run
            phases_s["wall-clock colocated runs"] = time.perf_counter() - mark
            if disagg:
                mark = time.perf_counter()
                run = disagg_run(loaded, model, settings, workload, progress, step_s)
                runs[run.key] = run
                phases_s["disaggregated run"] = time.perf_counter() - mark
    load_after = host_load()
    title = (f"{settings.scenario.num_decodes} steady decodes while {settings.scenario.num_long} prompts of "
             f"{settings.scenario.long_prompt_len} tokens arrive")
    console.print(demo_table(runs, title))
    one_core = f" (as on one core: calibrated on {costs.cpu_threads} thread)" if costs.cpu_threads == 1 else ""
    notes = [f"{CALIBRATED}: a simulated clock charges each step its calibrated cost{one_core}, so load during the "
             f"replay cannot change these rows" + (f"; {WALL}: real time on this host after a warm-up, arrivals re-timed to the same decode steps" if wall else "")
             + (f"; {DISAGG}: a prefill and a decode process joined by TCP." if wall and disagg else ".")]
    if wall and disagg and dev.type == "cpu":
        notes.append(f"Colocated runs use {threads} threads; each disaggregated worker is pinned to one core "
                     f"with one thread.")
    busiest = max(load_before, load_after, key=lambda load: load.load_1min)
    if wall and busiest.overloaded:
        notes.append(busy_note(busiest))
    notes += failure_notes(runs)
    for note in notes:
        console.print(note, highlight=False)
    claims = demo_claims(runs, device_name(dev), busiest, schedule.predicted_tail_ratio)
    for c in claims:
        console.print(c.line(), markup=False, highlight=False)
    png = Path(out_dir) / "minidisagg-demo-itl.png"
    itl_timeline_figure([(f"{r.key}: inter-token latency of the steady decodes", [o.timeline for o in r.decodes],
                          [o.timeline for o in r.longs], r.start_s) for r in runs.values()], png, share_latency=True)
    elapsed_s = time.perf_counter() - t0
    console.print(f"ITL timelines written to [bold]{png}[/]", highlight=False)
    console.print(f"The demo took {elapsed_s:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in phases_s.items())
                  + f"); host {load_after.describe()} at the end.", highlight=False)
    return DemoReport(runs, costs, claims, load_before, load_after, png, elapsed_s, notes, phases_s)
