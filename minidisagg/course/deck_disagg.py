"""Figures and tables lectures 4 and 5 draw: a 1P1D request's TTFT in parts, and the committed two-GPU runs.

The TTFT breakdown runs live (the ``tiny`` model, in-process workers, one request at a time); the
rest reads ``benchmarks/results/disagg-*.json`` (``minidisagg bench disagg``). Figures are sized for
960x700 slides.
"""

from __future__ import annotations

import random
from typing import Any, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from minidisagg.metrics import failure_reason

PARTS = ("queue", "prefill", "sender wait", "transfer span")
PART_COLORS = ("tab:gray", "tab:blue", "tab:orange", "tab:red")
DISAGG_CONFIGS = ("disagg-no-overlap", "disagg-overlap")
COLOCATED = "colocated-prefill_first"


def ttft_breakdown(prompt_lens: Sequence[int] = (128, 512, 1024), model: str = "tiny", repeats: int = 3,
                   overlap: bool = False) -> list[dict[str, Any]]:
    """One request at a time through an in-process 1P1D ``LLM``: each prompt length's TTFT in parts (seconds).

    Parts follow each other on one clock: queue (arrival to prefill start), prefill, sender wait
    (prefill end to the first byte sent), transfer span (first byte to adoption, when the first token
    is out); with ``overlap`` the span starts during the prefill instead. Of ``repeats`` runs the
    fastest (by TTFT) is kept. ``wire_s`` is the time inside the send calls, part of the span.
    """
    from minidisagg.engine.sampling import SamplingParams
    from minidisagg.llm import LLM

    rng = random.Random(0)
    rows = []
    with LLM(model, device="cpu", dtype="float32", mode="disagg", transport="inproc", kv_overlap=overlap) as llm:
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        llm.generate([{"prompt_token_ids": [rng.randrange(100, 4000) for _ in range(16)]}], params)  # warm-up
        for n in prompt_lens:
            runs, failed = [], []
            for _ in range(repeats):
                out = llm.generate([{"prompt_token_ids": [rng.randrange(100, 4000) for _ in range(n)]}], params)[0]
                if failure_reason(out) is not None:  # a failed repeat has no breakdown; the others still count
                    failed.append(failure_reason(out))
                    continue
                m, tl = out.metrics, out.timeline
                runs.append({"prompt_tokens": n, "ttft_s": m.ttft_s, "queue_s": m.queue_s, "prefill_s": m.prefill_s,
                             "sender wait_s": tl.transfer_start_s - tl.prefill_end_s,
                             "transfer span_s": m.kv_transfer_s or 0.0, "wire_s": m.kv_send_s,
                             "kv_bytes": m.kv_transfer_bytes})
            if not runs:
                raise RuntimeError(f"every {n}-token request failed: {'; '.join(sorted(set(failed)))}")
            rows.append(min(runs, key=lambda r: r["ttft_s"]))
    return rows


def ttft_breakdown_figure(rows: Sequence[dict[str, Any]]) -> Figure:
    """Stacked bars of the parts of each request's TTFT (they follow each other, so they add up), TTFT marked."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.4))
    labels = [f"{r['prompt_tokens']} tok\n{r['kv_bytes'] / 1e6:.1f} MB KV" for r in rows]
    bottom = np.zeros(len(rows))
    for part, color in zip(PARTS, PART_COLORS):
        vals = np.array([1e3 * r[f"{part}_s"] for r in rows])
        ax.bar(labels, vals, bottom=bottom, color=color, label=part)
        bottom += vals
    ax.plot(labels, [1e3 * r["ttft_s"] for r in rows], "k_", markersize=30, label="TTFT")
    ax.set_ylabel("ms")
    ax.set_title("tiny model, 1 prefill + 1 decode worker, in-process, KV sent after the prefill", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


TWO_GPU_RUN = "disagg-h200-2026-11-28.json"  # the run lectures 4-5 and lab 4 read: their prose states its verdicts
TRANSPORT_RUN = "transport-2026-11-27.json"  # the CPU transport run lecture 5 reads


def committed_result(name: str) -> dict[str, Any]:
    """A committed benchmark result (``benchmarks/results/<name>``) as a dict, ``_file`` added."""
    import json

    from minidisagg.course.deck_figures import results_dir

    data = json.loads((results_dir() / name).read_text())
    data["_file"] = name
    return data


def two_gpu_run(name: str = TWO_GPU_RUN) -> dict[str, Any]:
    """The committed ``minidisagg bench disagg`` result the course reads."""
    return committed_result(name)


def _sweeps(result: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {(model, s["workload"], s["config"]): s for model, m in result["models"].items() for s in m["sweeps"]}


def headline_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per model and workload of a two-GPU run: goodput per GPU (colocated, best 1P1D) and ITL p99 at the fixed rate."""
    sweeps = _sweeps(result)
    rows = []
    for model, m in result["models"].items():
        for workload, cal in m["calibration"].items():
            colo = sweeps.get((model, workload, COLOCATED))
            dis = [sweeps[k] for k in ((model, workload, c) for c in DISAGG_CONFIGS) if k in sweeps]
            if colo is None or not dis:
                continue
            best = max(dis, key=lambda s: s["goodput_per_gpu_rps"])

            def itl_p99(sweep: dict[str, Any]) -> Optional[float]:
                point = next((p for p in sweep["points"] if abs(p["rate_rps"] - cal["fixed_rate_rps"]) < 1e-6), None)
                return None if point is None else point["itl_p99_s"]

            rows.append({"model": model, "workload": workload, "colocated_per_gpu": colo["goodput_per_gpu_rps"],
                         "disagg_per_gpu": best["goodput_per_gpu_rps"], "best_disagg": best["config"],
                         "fixed_rate_rps": cal["fixed_rate_rps"], "colocated_itl_p99_s": itl_p99(colo),
                         "disagg_itl_p99_s": itl_p99(best)})
    return rows


def overlap_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per model and workload of a two-GPU run: 1P1D goodput with the KV sent after the prefill and layer by layer."""
    sweeps = _sweeps(result)
    rows = []
    for model, m in result["models"].items():
        for workload in m["calibration"]:
            after, layerwise = sweeps.get((model, workload, DISAGG_CONFIGS[0])), sweeps.get((model, workload, DISAGG_CONFIGS[1]))
            if after is not None and layerwise is not None:
                rows.append({"model": model, "workload": workload, "after_prefill_rps": after["goodput_rps"],
                             "layerwise_rps": layerwise["goodput_rps"]})
    return rows


def overlap_figure(rows: Sequence[dict[str, Any]], card: str) -> Figure:
    """Grouped bars: 1P1D goodput, KV sent after the prefill against layer by layer, per model and workload."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.4))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["after_prefill_rps"] for r in rows], 0.4, color="tab:cyan", label="after the prefill (default)")
    ax.bar(x + 0.2, [r["layerwise_rps"] for r in rows], 0.4, color="tab:blue", label="layer by layer (kv_overlap=True)")
    ax.set_xticks(x, [f"{r['model']}\n{r['workload']}" for r in rows], fontsize=9)
    ax.set(ylabel="goodput (req/s)", title=f"1P1D goodput on two {card.upper()}s, by how the KV is sent")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def kv_link_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per model of a two-GPU run: the lone-request KV probe (transfer, its share of TTFT, GB/s against one message)."""
    rows = []
    for model, m in result["models"].items():
        probe, ceiling = m.get("kv_probe"), m.get("kv_ceiling")
        if not probe or not ceiling:
            continue
        rows.append({"model": model, "prompt_tokens": probe["prompt_tokens"], "kv_bytes": probe["kv_bytes"],
                     "transfer_s": probe["transfer_s"], "transfer_over_ttft": probe["transfer_over_ttft"],
                     "achieved_GBps": probe["achieved_GBps"], "one_message_GBps": ceiling["one_message_GBps"]})
    return rows


def kv_link_figure(rows: Sequence[dict[str, Any]], card: str) -> Figure:
    """Horizontal bars: each model's lone KV transfer GB/s against one plain message of the same bytes."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 2.6))
    y = np.arange(len(rows))
    ax.barh(y + 0.2, [r["one_message_GBps"] for r in rows], 0.4, color="tab:gray", label="one plain NCCL message")
    ax.barh(y - 0.2, [r["achieved_GBps"] for r in rows], 0.4, color="tab:green", label="the engine's KV transfer")
    ax.set_yticks(y, [f"{r['model']}, {r['prompt_tokens']} tok\n{r['kv_bytes'] / 1e6:.0f} MB" for r in rows], fontsize=9)
    ax.set(xlabel="GB/s over NVLink", title=f"one request's KV between two {card.upper()}s",
           xlim=(0, 1.5 * max(r["one_message_GBps"] for r in rows)))
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig
