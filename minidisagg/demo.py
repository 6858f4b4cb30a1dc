"""The interference demo: steady decodes on one engine while long prompts arrive.

Each policy replays the same timed workload on wall time: a handful of requests decode
continuously from t=0, and every few seconds a long prompt arrives. Under
``prefill_first`` every long prefill stalls all running decodes (an inter-token-latency
spike); ``chunked`` spreads the prefill over steps with a token budget.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from minidisagg.config import CacheConfig, EngineConfig
from minidisagg.engine.llm_engine import LLMEngine, RequestOutput
from minidisagg.engine.replay import replay
from minidisagg.metrics import summarize
from minidisagg.models.registry import load_model
from minidisagg.workload import interference_workload


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the interference scenario (the CPU defaults finish in well under two minutes)."""

    num_decodes: int = 4
    decode_prompt_len: int = 32
    decode_output_len: int = 160
    num_long: int = 3
    long_prompt_len: int = 768
    long_every_s: float = 2.0
    start_long_s: float = 1.0
    chunk_budget_tokens: int = 128
    seed: int = 0

    @classmethod
    def for_device(cls, device: torch.device) -> "DemoSettings":
        """Larger prompts and batches on a GPU, where a small prefill is too fast to see."""
        if device.type == "cuda":
            return cls(num_decodes=16, decode_output_len=400, num_long=4, long_prompt_len=4096, long_every_s=1.0,
                       start_long_s=0.5, chunk_budget_tokens=512)
        return cls()


@dataclass
class DemoRun:
    """One configuration's replay: the steady decodes and the long prompts, and how long it took."""

    label: str
    decodes: list[RequestOutput]
    longs: list[RequestOutput]
    duration_s: float
    start_s: float = 0.0

    def summary_row(self) -> list[str]:
        """Cells of this run's row in the demo table."""
        every = self.decodes + self.longs
        s = summarize([o.metrics for o in self.decodes], self.duration_s)
        ttft = summarize([o.metrics for o in every], self.duration_s)
        moved = sum(o.metrics.kv_transfer_bytes for o in every)
        moving_s = sum(o.metrics.kv_send_s for o in every)  # time on the wire, not waiting for layers
        tokens_per_s = sum(len(o.token_ids) for o in every) / self.duration_s
        return [self.label, f"{ttft.ttft_p50_s:.2f}", f"{ttft.ttft_p99_s:.2f}", f"{1e3 * s.itl_p50_s:.0f}",
                f"{1e3 * s.itl_p99_s:.0f}", f"{tokens_per_s:.1f}", f"{moved / 1e6:.1f}" if moved else "-",
                f"{moved / moving_s / 1e9:.2f}" if moved and moving_s else "-"]


def _split(label: str, outs: list[RequestOutput], num_decodes: int, duration_s: float, start_s: float = 0.0) -> DemoRun:
    return DemoRun(label, outs[:num_decodes], outs[num_decodes:], duration_s, start_s)


def run_demo(model: str = "smollm2-135m", device: str = "auto", out_dir: str | Path = ".",
             settings: Optional[DemoSettings] = None, console: Optional[Console] = None,
             disagg: bool = True) -> dict[str, DemoRun]:
    """Replay the interference scenario colocated (prefill_first, chunked) and disaggregated; table + PNG.

    Both sides get the same compute: on CPU the colocated engine uses every core's thread, while
    the prefill and decode processes are each pinned to one core with one thread.
    """
    from minidisagg.disagg.cluster import DisaggCluster
    from minidisagg.plots import itl_timeline_figure

    console = console or Console()
    loaded = load_model(model, device=device)
    dev = loaded.device
    settings = settings or DemoSettings.for_device(dev)
    threads = torch.get_num_threads()
    where = f"{threads} CPU threads" if dev.type == "cpu" else torch.cuda.get_device_name(dev)
    console.print(f"[bold]minidisagg demo[/]: {loaded.name} on {dev} ({loaded.dtype}), {where}", highlight=False)
    workload = interference_workload(
        settings.num_decodes, settings.decode_prompt_len, settings.decode_output_len, settings.num_long,
        settings.long_prompt_len, settings.long_every_s, long_output_len=8, start_long_s=settings.start_long_s,
    )
    runs: dict[str, DemoRun] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} tokens"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        for policy, budget in (("prefill_first", 1 << 20), ("chunked", settings.chunk_budget_tokens)):
            label = f"colocated, {policy}"
            engine = LLMEngine(loaded, EngineConfig(policy=policy, max_num_batched_tokens=budget, cache=CacheConfig()))
            outs = replay(engine, workload, settings.seed, progress, label)
            runs[label] = _split(label, outs, settings.num_decodes, engine.clock.now())
        if disagg:
            label = "disagg 1P1D, socket"
            task = progress.add_task(f"{label}: starting two worker processes", total=None)
            cluster = DisaggCluster(loaded, EngineConfig(cache=CacheConfig()), transport="socket",
                                    model_ref=model, pin_cores=dev.type == "cpu", worker_threads=1 if dev.type == "cpu" else 0)
            progress.remove_task(task)
            try:
                start = cluster.clock.now()
                shifted = [dataclasses.replace(r, arrival_s=r.arrival_s + start) for r in workload]
                outs = replay(cluster, shifted, settings.seed, progress, label)
                runs[label] = _split(label, outs, settings.num_decodes, cluster.clock.now() - start, start)
            finally:
                cluster.shutdown()
    table = Table(title=f"{settings.num_decodes} steady decodes while {settings.num_long} prompts of "
                        f"{settings.long_prompt_len} tokens arrive")
    table.add_column("run", no_wrap=True)
    for col in ("TTFT p50 s", "TTFT p99 s", "ITL p50 ms", "ITL p99 ms", "tok/s", "KV MB", "KV GB/s"):
        table.add_column(col, justify="right")
    for run in runs.values():
        table.add_row(*run.summary_row())
    console.print(table)
    if disagg and dev.type == "cpu":
        console.print(f"Colocated runs use {threads} threads; each disaggregated worker is pinned to one core "
                      f"with one thread.", highlight=False)
    png = Path(out_dir) / "minidisagg-demo-itl.png"
    itl_timeline_figure(
        [(f"{r.label}: inter-token latency of the steady decodes", [o.timeline for o in r.decodes],
          [o.timeline for o in r.longs], r.start_s) for r in runs.values()],
        png,
    )
    console.print(f"ITL timelines written to [bold]{png}[/]")
    return runs
