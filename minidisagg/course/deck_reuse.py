"""Figures lecture 7 draws from the committed CPU runs of prefix caching (colocated and 1P1D), cache-aware routing
and the int8 / fp8 wire.

Each figure names the file it reads (``benchmarks/results/``); the break-even figure is modelled from
lab 5's Llama-8B H200 prefill estimate with the committed runs' hit rate and int8 byte ratio.
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch

from minidisagg.bench.transport_prefill import project_llama8b
from minidisagg.course import reuse_break_even as rbe
from minidisagg.course.deck_disagg import committed_result
from minidisagg.course.reuse_figures import wire_figure
from minidisagg.course.transfer_lab import PrefillCostModel, kv_layout

PREFIX_RUN = "prefix-cache-cpu-2026-12-07.json"
DECODE_REUSE_RUN = "prefix-cache-disagg-cpu-2026-12-08.json"
ROUTING_RUN = "cache-aware-routing-cpu-2026-12-07.json"
WIRE_RUN = "kv-wire-quant-cpu-2026-12-07.json"
WIRES = ("bfloat16", "int8", "fp8_e4m3")


def prefix_figure(run: dict[str, Any]) -> Any:
    """Median TTFT of the first and second request sharing a prefix, with and without the cache."""
    med = run["summary"]["median_ttft_s"]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    x = np.arange(2)
    for offset, (engine, color) in zip((-0.2, 0.2), (("plain", "tab:gray"), ("cached", "tab:green"))):
        ax.bar(x + offset, [1e3 * med[f"{engine}_{which}_ttft_s"] for which in ("first", "second")], 0.4, color=color,
               label="no cache" if engine == "plain" else "prefix caching")
    ax.set_xticks(x, ["first request", "second request (same prefix)"])
    ax.set(ylabel="median TTFT (ms)", title=f"{run['args']['prefix_tokens']}-token shared prefix ({run['_file']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def decode_reuse_figure(run: dict[str, Any], transport: str = "inproc") -> Any:
    """KV bytes the first and second request sharing a prefix moved in a 1P1D cluster, with and without prefix caching."""
    s = run["summary"][transport]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    x = np.arange(2)
    for offset, (engine, color) in zip((-0.2, 0.2), (("plain", "tab:gray"), ("cached", "tab:green"))):
        ax.bar(x + offset, [s[f"{engine}_{which}_kv_transfer_bytes"][0] / 1e6 for which in ("first", "second")], 0.4,
               color=color, label="no cache" if engine == "plain" else "prefix caching at both workers")
    cached_second_mb = s["cached_second_kv_transfer_bytes"][0] / 1e6
    ax.annotate(f"{s['second_over_first_bytes_cached']:.3f}x the first's", (1.2, cached_second_mb),
                xytext=(0, 4), textcoords="offset points", ha="center", fontsize=9)
    ax.set_xticks(x, ["first request", "second request (same prefix)"])
    ax.set(ylabel="KV bytes moved (MB)",
           title=f"1P1D {transport}, {run['args']['prefix_tokens']}-token shared prefix ({run['_file']})")
    ax.set_ylim(0, 1.35 * s["plain_first_kv_transfer_bytes"][0] / 1e6)  # room for the legend above the bars
    ax.legend(fontsize=8, loc="upper center", ncols=2)
    fig.tight_layout()
    return fig


def routing_figure(run: dict[str, Any]) -> Any:
    """Realised hit rate and mean TTFT of round robin and cache-aware routing."""
    s = run["summary"]
    names = ("round_robin", "cache_aware")
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2))
    left.bar(names, [s[n]["hit_rate"] for n in names], color=("tab:gray", "tab:blue"))
    left.set(ylim=(0, 1), ylabel="prompt tokens found cached", title="realised hit rate")
    right.bar(names, [1e3 * s[n]["mean_ttft_s"] for n in names], color=("tab:gray", "tab:blue"))
    right.set(ylabel="mean TTFT (ms)", title=f"2 prefill workers ({run['_file']})")
    fig.tight_layout()
    return fig


def wire_points(run: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """(bytes relative to float32 pages, greedy token agreement) per wire, from a committed run."""
    ratio = {"bfloat16": 0.5, **{w: run["bytes_time"]["float32"][w]["ratio"] for w in WIRES[1:]}}
    return ratio, {w: run["greedy"][w]["token_agreement"] for w in WIRES}


def committed_wire_figure(run: dict[str, Any]) -> Any:
    """Bytes against agreement from a committed wire run."""
    ratio, agree = wire_points(run)
    return wire_figure(ratio, agree, f"{run['num_prompts']} prompts x {run['tokens']} tokens ({run['_file']})")


def llama8b_estimate() -> tuple[Any, PrefillCostModel]:
    """Llama-8B's bf16 KV layout and lab 5's H200 roofline prefill estimate, fitted (an estimate, not a measurement)."""
    rows = project_llama8b({1 << 20: 1.0}, (16, 64, 256, 1024, 2048, 4096, 8192))  # only the prefill estimate is read
    est = {r["prompt_tokens"]: r["prefill_estimate_s"] for r in rows}
    return kv_layout("llama-8b", torch.bfloat16), PrefillCostModel.fit(list(est), list(est.values()))


def break_even_figure(hit_rate: float, int8_ratio: float, bandwidths_GBps: Any) -> tuple[Any, dict[str, list]]:
    """Modelled break-even length against link bandwidth for Llama-8B on an H200, one line per trick."""
    layout, prefill = llama8b_estimate()
    sweep = rbe.break_even_sweep(layout, prefill, bandwidths_GBps, rbe.tricks(hit_rate, int8_ratio))
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    rbe.break_even_axes(ax, sweep, bandwidths_GBps, "modelled: Llama-8B bf16, H200 prefill estimate")
    fig.tight_layout()
    return fig, sweep
