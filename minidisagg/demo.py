"""The interference demo: steady decodes on one engine while long prompts arrive.

Each policy replays the same timed workload on wall time: a handful of requests decode
continuously from t=0, and every few seconds a long prompt arrives. Under
``prefill_first`` every long prefill stalls all running decodes (an inter-token-latency
spike); ``chunked`` spreads the prefill over steps with a token budget.
"""

from __future__ import annotations

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
class PolicyRun:
    """One policy's replay: the engine's outputs split into steady decodes and long prompts."""

    policy: str
    decodes: list[RequestOutput]
    longs: list[RequestOutput]
    duration_s: float


def run_demo(model: str = "smollm2-135m", device: str = "auto", out_dir: str | Path = ".",
             settings: Optional[DemoSettings] = None, console: Optional[Console] = None) -> dict[str, PolicyRun]:
    """Run the interference scenario under ``prefill_first`` and ``chunked``; print a table, save a PNG."""
    from minidisagg.plots import itl_timeline_figure

    console = console or Console()
    loaded = load_model(model, device=device)
    settings = settings or DemoSettings.for_device(loaded.model.device)
    threads = torch.get_num_threads()
    console.print(f"[bold]minidisagg demo[/]: {loaded.name} on {loaded.model.device} ({loaded.model.dtype}), "
                  f"{threads} CPU threads" if loaded.model.device.type == "cpu" else "")
    workload = interference_workload(
        settings.num_decodes, settings.decode_prompt_len, settings.decode_output_len, settings.num_long,
        settings.long_prompt_len, settings.long_every_s, long_output_len=8, start_long_s=settings.start_long_s,
    )
    budgets = {"prefill_first": 1 << 20, "chunked": settings.chunk_budget_tokens}
    runs: dict[str, PolicyRun] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} tokens"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        for policy, budget in budgets.items():
            config = EngineConfig(policy=policy, max_num_batched_tokens=budget, max_num_seqs=64,
                                  cache=CacheConfig())
            engine = LLMEngine(loaded, config)
            outs = replay(engine, workload, settings.seed, progress, policy)
            runs[policy] = PolicyRun(policy, outs[: settings.num_decodes], outs[settings.num_decodes:], engine.clock.now())
    table = Table(title=f"{settings.num_decodes} steady decodes + {settings.num_long} prompts of "
                        f"{settings.long_prompt_len} tokens")
    for col in ("policy", "ITL p50 (ms)", "ITL p99 (ms)", "max ITL (ms)", "long-prompt TTFT p50 (s)", "decode tok/s"):
        table.add_column(col, justify="right")
    for run in runs.values():
        s = summarize([o.metrics for o in run.decodes], run.duration_s)
        max_itl = max(max(o.metrics.itl_s) for o in run.decodes)
        long_ttft = summarize([o.metrics for o in run.longs], run.duration_s).ttft_p50_s
        table.add_row(run.policy, f"{1e3 * s.itl_p50_s:.1f}", f"{1e3 * s.itl_p99_s:.1f}", f"{1e3 * max_itl:.1f}",
                      f"{long_ttft:.2f}", f"{s.output_tokens_per_s:.1f}")
    console.print(table)
    png = Path(out_dir) / "minidisagg-demo-itl.png"
    itl_timeline_figure(
        [(f"{r.policy}: inter-token latency of the steady decodes", [o.timeline for o in r.decodes],
          [o.timeline for o in r.longs]) for r in runs.values()],
        png,
    )
    console.print(f"ITL timeline written to [bold]{png}[/]")
    return runs
