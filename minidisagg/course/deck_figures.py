"""Figures the lecture decks draw from the project's own measurements (committed results or quick runs).

Committed results are read from ``benchmarks/results/`` (what ``minidisagg bench`` wrote); a GPU
run (``gpu-<card>-<date>.json``) or a two-GPU run (``disagg-*.json``) is used when present.
Quick runs use the ``tiny`` model on a simulated clock, so a cell takes a few seconds on a CPU.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from minidisagg.config import PRESETS, CacheConfig, EngineConfig
from minidisagg.roofline import (Ceilings, arithmetic_intensity, gemm_bytes, gemm_flops, measure_copy_bandwidth,
                                 measure_matmul_rate)

NO_GPU_RUN = "no GPU run recorded"


def results_dir() -> Path:
    """``benchmarks/results`` of the checkout this package lives in."""
    return Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def latest_result(prefix: str, results: Optional[Path] = None) -> Optional[dict]:
    """The newest ``<prefix>-*.json`` as a dict, or None; adds ``_file``.

    Newest by the ``date`` the run recorded (ISO 8601, so it sorts as text), else by the date in
    its name: ``disagg-h100-2026-11-28-run1.json`` is older than a later ``disagg-h200-2026-11-28.json``.
    """
    runs = []
    for path in (results or results_dir()).glob(f"{prefix}-*.json"):
        data = json.loads(path.read_text())
        named = re.search(r"\d{4}-\d{2}-\d{2}", path.stem)
        date = str(data.get("date") or (named.group(0) if named else ""))
        runs.append((date, path.name, data))
    if not runs:
        return None
    date, name, data = max(runs, key=lambda run: run[:2])
    data["_file"] = name
    return data


def latest_gpu_run(results: Optional[Path] = None) -> Optional[dict]:
    """The newest ``minidisagg bench gpu`` result, or None."""
    return latest_result("gpu", results)


def gpu_status(results: Optional[Path] = None) -> str:
    """One line for a slide: which GPU run the figures use, or that there is none."""
    run = latest_gpu_run(results)
    if run is None:
        return NO_GPU_RUN
    return f"GPU run: {run['card']}, torch {run.get('torch', '?')} ({run['_file']})"


def gpu_ceilings(run: dict) -> Ceilings:
    """The copy bandwidth and matmul rate a GPU run measured, as ``Ceilings``."""
    return Ceilings(run["card"], "bfloat16", float(run["copy_GBps"]) * 1e9, float(run["mm_TFLOPs"]) * 1e12)


def gpu_fraction_figure(run: dict) -> Figure:
    """Each GPU benchmark row as a fraction of its own limit (1.0 = at the roof), titled with the card.

    Two panels sized for a 960x700 slide: the kernels, and the whole-model decode and prefill rows.
    """
    rows = run["rows"]
    is_model = [r["name"].startswith(("decode ", "prefill ")) for r in rows]
    panels = [("kernels", [r for r, m in zip(rows, is_model) if not m]),
              ("whole model", [r for r, m in zip(rows, is_model) if m])]
    panels = [(title, group) for title, group in panels if group]
    fig, axes = plt.subplots(1, len(panels), figsize=(9.5, 5.6), squeeze=False,
                             gridspec_kw={"width_ratios": [1.0] * len(panels)})
    for ax, (title, group) in zip(axes[0], panels):
        small = len(group) > 14
        ax.barh([r["name"] for r in group], [r["fraction_of_limit"] for r in group], color="tab:green")
        for i, r in enumerate(group):
            ax.text(r["fraction_of_limit"], i, f" {r['value']:.3g} {r['unit']}", va="center", fontsize=6 if small else 8)
        ax.tick_params(axis="y", labelsize=7)
        ax.invert_yaxis()
        ax.axvline(1.0, color="k", lw=1)
        ax.set_xlim(0, 1.35)
        ax.set_xlabel("fraction of the card's measured limit", fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"{run['card']} (torch {run.get('torch', '?')})", fontsize=10)
    fig.subplots_adjust(left=0.25, right=0.97, wspace=0.95, top=0.9, bottom=0.1)
    return fig


def quick_cpu_ceilings(threads: int = 2) -> Ceilings:
    """CPU copy bandwidth and fp32 matmul rate, measured small (about a second)."""
    torch.set_num_threads(threads)
    return Ceilings("cpu", "float32", measure_copy_bandwidth("cpu", 64 << 20, iters=5),
                    measure_matmul_rate("cpu", torch.float32, size=768, iters=5))


def roofline_figure(devices: Sequence[Ceilings], model: str = "llama-8b",
                    tokens: Sequence[int] = (1, 8, 64, 512, 4096), dtype: torch.dtype = torch.bfloat16) -> Figure:
    """Rooflines of the given devices, with the model's FFN up-projection GEMM at several token counts."""
    cfg = PRESETS[model]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ai = np.logspace(-1, 4, 200)
    for dev, color in zip(devices, ("tab:blue", "tab:orange", "tab:green")):
        roof = np.minimum(dev.matmul_flops_per_s, ai * dev.copy_bytes_per_s)
        ax.plot(ai, roof / 1e12, color=color, label=f"{dev.device}: ridge {dev.ridge_flops_per_byte:.0f} FLOP/B")
    for m in tokens:
        x = arithmetic_intensity(m, cfg.intermediate_size, cfg.hidden_size, dtype)
        ax.axvline(x, color="gray", ls=":", lw=1)
        ax.text(x, 0.02, f" {m} tok", rotation=90, va="bottom", fontsize=8, color="gray",
                transform=ax.get_xaxis_transform())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per byte moved)")
    ax.set_ylabel("attainable TFLOP/s")
    ax.set_title(f"{model} FFN GEMM ({cfg.hidden_size}x{cfg.intermediate_size}, {str(dtype)[6:]}): "
                 "decode on the slope, prefill on the flat roof", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def matmul_sweep(ms: Sequence[int], n: int = 1536, k: int = 576, dtype: torch.dtype = torch.float32,
                 device: str = "cpu") -> list[dict]:
    """Time ``F.linear`` of m tokens through one (n x k) weight (SmolLM2's up projection) for each m.

    The same weight every call: a small one stays in the CPU's caches (deck 1 shows what that does).
    """
    from minidisagg.course.gemm_lab import min_time_s

    w = torch.randn(n, k, dtype=dtype, device=device)
    rows = []
    for m in ms:
        x = torch.randn(m, k, dtype=dtype, device=device)
        t = min_time_s(lambda: F.linear(x, w), torch.device(device), warmup=2, iters=7)  # the fastest: load only adds
        rows.append({"m": m, "seconds": t, "ai": arithmetic_intensity(m, n, k, dtype),
                     "flops_per_s": gemm_flops(m, n, k) / t, "bytes_per_s": gemm_bytes(m, n, k, dtype) / t})
    return rows


def matmul_sweep_figure(rows: Sequence[dict], ceilings: Ceilings) -> Figure:
    """Measured matmul rate against arithmetic intensity, under the device's roofline; time per call beside it."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ai = np.logspace(np.log10(rows[0]["ai"] / 2), np.log10(rows[-1]["ai"] * 4), 100)
    ax.plot(ai, np.minimum(ceilings.matmul_flops_per_s, ai * ceilings.copy_bytes_per_s) / 1e9, "k-", lw=1,
            label="roofline (measured copy + matmul)")
    ax.plot([r["ai"] for r in rows], [r["flops_per_s"] / 1e9 for r in rows], "o-", label="F.linear, measured")
    for r in rows:
        ax.annotate(f"m={r['m']}", (r["ai"], r["flops_per_s"] / 1e9), fontsize=8, xytext=(3, -10),
                    textcoords="offset points")
    ax.set(xscale="log", yscale="log", xlabel="FLOP per byte", ylabel="GFLOP/s", title=f"{ceilings.device} roofline")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax2.plot([r["m"] for r in rows], [1e3 * r["seconds"] for r in rows], "o-")
    ax2.set(xscale="log", yscale="log", xlabel="tokens in the batch (m)", ylabel="ms per matmul",
            title="time per call")
    ax2.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def cpu_decode_figure(result: dict) -> Figure:
    """Decode tokens/s of each configuration at each batch size, from a ``bench cpu`` result."""
    batches = sorted({r["batch"] for r in result["rows"]})
    names = list(dict.fromkeys(r["name"] for r in result["rows"]))
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = [next((r["tokens_per_s"] for r in result["rows"] if r["name"] == name and r["batch"] == b), 0)
                for b in batches]
        ax.bar(np.arange(len(batches)) + i * width, vals, width, label=name)
    ax.set_xticks(np.arange(len(batches)) + 0.4 - width / 2, [f"batch {b}" for b in batches])
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"SmolLM2-135M decode, {result['machine']['cpu']}, {result['machine']['cores']} cores "
                 f"({result['_file']})", fontsize=9)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def kv_size_figure(models: Sequence[str] = ("smollm2-135m", "llama-1b", "llama-8b"),
                   context: Sequence[int] = (512, 2048, 8192, 32768), dtype_bytes: int = 2) -> Figure:
    """KV-cache bytes of one request against its context length, per model (whole-model, K and V)."""
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for name in models:
        per_token = PRESETS[name].kv_bytes_per_token(dtype_bytes)
        ax.plot(context, [c * per_token / 1e9 for c in context], "o-",
                label=f"{name}: {per_token / 1024:.0f} KiB per token")
    ax.set(xscale="log", yscale="log", xlabel="tokens in context", ylabel="KV cache per request (GB)",
           title=f"KV cache size, {8 * dtype_bytes}-bit")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def block_table_figure(prompt_lens: Sequence[int], num_blocks: int = 24, block_size: int = 16,
                       free_after: Sequence[int] = ()) -> Figure:
    """The KV pool as the engine's ``BlockManager`` fills it: which request owns each block.

    For each index ``i`` in ``free_after``, request ``i - 1`` finishes just before request ``i`` arrives.
    """
    from minidisagg.kv.block_manager import BlockManager

    bm = BlockManager(num_blocks, block_size)
    for i, n in enumerate(prompt_lens):
        if i in free_after:  # the previous request finishes before this one arrives
            bm.free(f"req{i - 1}")
        bm.grow(f"req{i}", n)
    owner = np.full(num_blocks, -1)
    for key in bm.owners():
        for b in bm.block_table(key):
            owner[b] = int(str(key)[3:])
    fig, ax = plt.subplots(figsize=(9, 1.6))
    colors = plt.get_cmap("tab10")
    for b, o in enumerate(owner):
        ax.add_patch(plt.Rectangle((b, 0), 0.95, 1, color="lightgray" if o < 0 else colors(o)))
        ax.text(b + 0.47, 0.5, "" if o < 0 else f"r{o}", ha="center", va="center", fontsize=8, color="white")
    ax.set_xlim(0, num_blocks)
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ax.set_xlabel(f"physical block (of {block_size} token slots); gray = free")
    fig.tight_layout()
    return fig


def quick_engine(policy: str = "prefill_first", budget: int = 1 << 20, model: str = "tiny", costs=None):
    """A colocated engine on a simulated clock (latencies of a dedicated machine, no sleeping).

    With ``costs`` (a calibrated ``StepCostModel``) each step is charged its calibrated cost.
    """
    from minidisagg.engine.clock import SimulatedClock
    from minidisagg.engine.llm_engine import LLMEngine
    from minidisagg.models.registry import load_model

    from minidisagg.engine.replay import replay
    from minidisagg.workload import TimedRequest

    loaded = load_model(model, device="cpu", dtype="float32", random_weights=True)
    engine = LLMEngine(loaded, EngineConfig(policy=policy, max_num_batched_tokens=budget, cache=CacheConfig()),
                       clock=SimulatedClock(cost_model=costs))
    replay(engine, [TimedRequest(0.0, 64, 4)])  # one-time costs (first calls, allocations) stay out of the figures
    engine.clock = SimulatedClock(cost_model=costs)
    return engine


def interference_runs(long_prompt_len: int = 1024, chunk_budget: int = 128, num_decodes: int = 3,
                      decode_tokens: int = 48, long_at_fraction: float = 0.3, model: str = "tiny") -> dict:
    """Steady decodes while one long prompt arrives, under ``prefill_first`` and ``chunked``: outputs per policy.

    Step costs are calibrated first and charged on a simulated clock, so host load cannot change the figure.
    The long prompt arrives ``long_at_fraction`` of the way through the decodes' expected run, while they
    are still decoding. Each run also carries the calibration (``"costs"``) and the long prompt's arrival
    (``"long_arrival_s"``).
    """
    from minidisagg.engine.calibrate import CalibrationPlan, calibrate_step_costs
    from minidisagg.engine.replay import replay
    from minidisagg.models.registry import load_model
    from minidisagg.workload import interference_workload

    loaded = load_model(model, device="cpu", dtype="float32", random_weights=True)
    costs = calibrate_step_costs(loaded, CalibrationPlan.covering(long_prompt_len, num_decodes + 1,
                                                                  long_prompt_len + decode_tokens), progress=False)
    decodes_s = decode_tokens * costs.decode_cost_s(num_decodes, 16 + decode_tokens // 2)
    start_long_s = long_at_fraction * decodes_s
    workload = interference_workload(num_decodes, 16, decode_tokens, 1, long_prompt_len, 1.0, long_output_len=2,
                                     start_long_s=start_long_s)
    runs: dict = {}
    for policy, budget in (("prefill_first", 1 << 20), ("chunked", chunk_budget)):
        engine = quick_engine(policy, budget, model, costs)
        outs = replay(engine, workload)
        runs[policy] = {"decodes": outs[:num_decodes], "longs": outs[num_decodes:], "duration_s": engine.clock.now(),
                        "costs": costs, "long_arrival_s": start_long_s}
    return runs


def interference_numbers(runs: dict) -> dict[str, dict[str, float]]:
    """Per policy: the steady decodes' ITL p50 / p99, the long prompt's TTFT, when the decodes ended (seconds)."""
    from minidisagg.metrics import percentile

    numbers = {}
    for policy, r in runs.items():
        gaps = [g for o in r["decodes"] for g in o.metrics.itl_s]
        numbers[policy] = {"itl_p50_s": percentile(gaps, 50.0), "itl_p99_s": percentile(gaps, 99.0),
                           "long_ttft_s": r["longs"][0].metrics.ttft_s,
                           "decodes_end_s": min(o.timeline.token_times_s[-1] for o in r["decodes"]),
                           "long_arrival_s": r["long_arrival_s"]}
    return numbers


def interference_claims(runs: dict) -> list:
    """The three things every interference figure in the decks shows, checked on its numbers (CPU, tiny model)."""
    from minidisagg.course.claims import claim

    n = interference_numbers(runs)
    first, chunked = n["prefill_first"], n["chunked"]
    return [
        claim("the long prompt arrives while the steady decodes are running",
              first["long_arrival_s"] < first["decodes_end_s"],
              f"arrives at {first['long_arrival_s']:.2f} s, decodes end at {first['decodes_end_s']:.2f} s"),
        claim("prefill_first stalls the decodes: their p99 ITL is at least 3x their median",
              first["itl_p99_s"] >= 3 * first["itl_p50_s"],
              f"p50 {1e3 * first['itl_p50_s']:.1f} ms, p99 {1e3 * first['itl_p99_s']:.1f} ms"),
        claim("chunking lowers the decodes' p99 ITL by at least 1.5x", first["itl_p99_s"] >= 1.5 * chunked["itl_p99_s"],
              f"{1e3 * first['itl_p99_s']:.1f} ms -> {1e3 * chunked['itl_p99_s']:.1f} ms"),
        claim("chunking delays the long prompt's first token", chunked["long_ttft_s"] > first["long_ttft_s"],
              f"TTFT {1e3 * first['long_ttft_s']:.1f} ms -> {1e3 * chunked['long_ttft_s']:.1f} ms"),
    ]


def gpu_course_run(results: Optional[Path] = None) -> Optional[dict]:
    """The newest committed ``course-gpu-<card>-<date>.md`` (a ``course verify --gpu`` report): file, card, claim lines.

    ``claims`` maps a notebook (``solutions/03_interference.ipynb``) to the CLAIM lines it printed there.
    """
    reports = sorted((results or results_dir()).glob("course-gpu-*.md"), key=lambda p: re.findall(r"\d{4}-\d\d-\d\d", p.stem)[-1])
    if not reports:
        return None
    path = reports[-1]
    text = path.read_text()
    card = text.splitlines()[0].removeprefix("# course verify on ").split(" (")[0]
    claims: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("### "):
            current = claims.setdefault(line[4:].strip(), [])
        elif current is not None and line.startswith("- CLAIM"):
            current.append(line[2:])
    return {"file": path.name, "card": card, "claims": claims, "figure": path.with_name(path.stem + "-lab3-itl.png")}


def interference_figure(runs: dict) -> Figure:
    """ITL timelines of the steady decodes, one panel per policy (the engine's own plot)."""
    from minidisagg.plots import itl_timeline_figure

    return itl_timeline_figure([(f"tiny model, {policy}", [o.timeline for o in r["decodes"]],
                                 [o.timeline for o in r["longs"]], 0.0) for policy, r in runs.items()])


def transport_figure(result: dict) -> Figure:
    """KV bandwidth of each transport against message size, its measured ceiling dashed (``bench transport``)."""
    fig, ax = plt.subplots(figsize=(8, 3.8))
    rows = result["rows"]
    for t in ("socket", "dist (gloo)", "inproc"):
        mine = [r for r in rows if r["transport"] == t]
        if not mine:
            continue
        line, = ax.plot([r["message_bytes"] for r in mine], [r["GBps"] for r in mine], "o-", label=t)
        ceil = mine[0]["ceiling"]
        ref = [r for r in rows if r["transport"] == ceil]
        ax.plot([r["message_bytes"] for r in ref], [r["GBps"] for r in ref], "--", color=line.get_color(),
                alpha=0.6, label=f"ceiling: {ceil}")
    ax.set(xscale="log", xlabel="message bytes (one layer's pages)", ylabel="GB/s",
           title=f"KV transfer, {result['machine']['cpu']} ({result['_file']})")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def kv_vs_prefill_figure(result: dict) -> Figure:
    """Transfer time over prefill time by prompt length: measured on this CPU and projected for Llama-8B links."""
    fig, ax = plt.subplots(figsize=(8, 3.8))
    measured = result.get("kv_vs_prefill") or []
    if measured:
        ax.plot([r["prompt_tokens"] for r in measured], [r["transfer_s"] / r["prefill_s"] for r in measured], "ko-",
                label="measured: smollm2-135m on this CPU, socket")
    proj = result.get("projection_llama8b") or []
    for link in dict.fromkeys(r["link"] for r in proj):
        mine = [r for r in proj if r["link"] == link]
        ax.plot([r["prompt_tokens"] for r in mine], [r["transfer_over_prefill"] for r in mine], "s--",
                label=f"Llama-8B projection: {link}")
    ax.axhline(1.0, color="crimson", lw=1)
    ax.text(0.01, 1.1, "transfer = prefill", color="crimson", fontsize=8, transform=ax.get_yaxis_transform())
    ax.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="KV transfer time / prefill time")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig

