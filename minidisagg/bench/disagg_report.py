"""Goals, Markdown and files of ``minidisagg bench disagg`` (see ``bench.disagg``)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from minidisagg.bench.common import machine_info
from minidisagg.bench.disagg_result import (
    COLOCATED_BASELINE,
    DISAGG_CONFIGS,
    find_sweep,
    fixed_rate_rows,
    requests_path,
    split_requests,
)
from minidisagg.metrics import failure_note

GOODPUT_RATIO_GOAL = 1.5
KV_FRACTION_GOAL = 0.70
HEADER_DEFAULTS = {"devices": "?", "time_budget_s": math.nan, "ttft_slo_scale": "?", "tpot_slo_scale": "?"}


def card_name(devices: Sequence[str]) -> str:
    """A short name of the accelerator for file names: ``h100``, ``h200``, ... or ``cpu``."""
    if all(d == "cpu" for d in devices) or not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    found = re.search(r"\b([a-z]\d{2,4})\b", name)
    return found.group(1) if found else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def machine_summary(devices: Sequence[str]) -> dict[str, Any]:
    """Library versions, the CPU, and each GPU used."""
    info = machine_info()
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None
    info["devices"] = list(devices)
    return info


def evaluate_goals(result: dict[str, Any]) -> dict[str, bool]:
    """The issue's goals, each with the numbers that decide it in its name.

    A part of the result that is missing or malformed (a phase that failed) makes its goal MISSED,
    saying why, instead of failing the report.
    """
    try:
        return _goals(result)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        return {f"the goals could not be evaluated: the result is incomplete ({type(exc).__name__}: {exc})": False}


def _goals(result: dict[str, Any]) -> dict[str, bool]:
    goals: dict[str, bool] = {}
    best_ratio, where, no_ratio = 0.0, "", []
    for model, res in result["models"].items():
        for workload in sorted({s["workload"] for s in res["sweeps"]}):
            base = find_sweep(res, COLOCATED_BASELINE, workload)
            disagg = [s for c in DISAGG_CONFIGS if (s := find_sweep(res, c, workload))]
            if base is None or not disagg:
                continue
            best, base_rps = max(s["goodput_per_gpu_rps"] for s in disagg), base["goodput_per_gpu_rps"]
            if base_rps <= 0:  # the baseline met 90% at no rate tried (its lowest was too high): no ratio to take
                if best > 0:
                    no_ratio.append(f"{model} {workload}")
                continue
            ratio = best / base_rps
            if ratio > best_ratio or not where:
                best_ratio, where = ratio, f"{model} {workload}"
    if where:
        unranked = (f"; no ratio on {', '.join(no_ratio)}: the baseline met 90% at no rate tried, "
                    "disaggregated did") if no_ratio else ""
        goals[f"best disagg goodput per GPU >= {GOODPUT_RATIO_GOAL}x 2-replica {COLOCATED_BASELINE} on some workload "
              f"(best: {best_ratio:.2f}x, {where}{unranked})"] = best_ratio >= GOODPUT_RATIO_GOAL
    for model, res in result["models"].items():
        probe, ceiling = res.get("kv_probe", {}), res.get("kv_ceiling", {})
        key = f"{probe.get('ceiling', probe.get('messages', 'per_layer'))}_GBps"  # the ceiling the probe is held to
        if "achieved_GBps" in probe and key in ceiling:
            fraction = probe["achieved_GBps"] / ceiling[key]
            res["kv_fraction_of_ceiling"] = fraction
            goals[f"{model}: KV transfer of a {probe['prompt_tokens']}-token request >= {KV_FRACTION_GOAL:.0%} of plain "
                  f"send/recv of the same bytes, {key.removesuffix('_GBps').replace('_', ' ')} "
                  f"({probe['achieved_GBps']:.3g} of {ceiling[key]:.3g} GB/s = {fraction:.0%})"] = fraction >= KV_FRACTION_GOAL
        check = res.get("greedy_check")
        if isinstance(check, dict) and "equal" in check:
            goals[f"{model}: disaggregated greedy tokens == colocated on {check.get('num_prompts', '?')} prompts"] = \
                bool(check["equal"])
        elif res.get("sweeps") or res.get("errors"):  # the model ran, but the check did not
            why = "; ".join(res.get("errors", [])) or "the run ended before it"
            goals[f"{model}: disaggregated greedy tokens == colocated (not checked: {why[:300]})"] = False
    return goals


def _ms(x: Optional[float]) -> str:
    return "" if x is None else f"{1e3 * x:.1f}"


def reading(result: dict[str, Any]) -> list[str]:
    """Generated sentences carrying the main numbers (to be edited into prose)."""
    lines = []
    for model, res in result["models"].items():
        for workload in sorted({s["workload"] for s in res["sweeps"]}):
            parts = [f"{s['config']} {s['goodput_per_gpu_rps']:.3g}" for s in res["sweeps"] if s["workload"] == workload]
            lines.append(f"- {model}, {workload}: goodput per GPU (req/s at 90% attainment): " + ", ".join(parts) + ".")
        for row in fixed_rate_rows(res):
            if row["config"] in (COLOCATED_BASELINE, "disagg-overlap"):
                lines.append(f"- {model}, {row['workload']} at {row['rate_rps']:.3g} req/s, {row['config']}: ITL p50/p99 "
                             f"{_ms(row['itl_p50_s'])}/{_ms(row['itl_p99_s'])} ms, TTFT p50/p99 "
                             f"{_ms(row['ttft_p50_s'])}/{_ms(row['ttft_p99_s'])} ms.")
        probe = res.get("kv_probe", {})
        if "achieved_GBps" in probe:
            moved = (f"its pages move in {_ms(probe['kv_move_s'])} ms, from complete on the prefill GPU to in the "
                     f"decode pool ({probe['achieved_GBps']:.1f} GB/s); the hand-off adds {_ms(probe['transfer_s'])} ms "
                     "after the prefill ends" if probe.get("kv_move_s") is not None else
                     f"KV in {_ms(probe['transfer_s'])} ms ({probe['achieved_GBps']:.1f} GB/s)")
            lines.append(f"- {model}: a {probe['prompt_tokens']}-token request moves {probe['kv_bytes'] / 1e6:.1f} MB of "
                         f"KV: {moved}, {probe['transfer_over_ttft']:.1%} of its TTFT.")
    return lines or ["- (no sweep finished)"]


def to_markdown(result: dict[str, Any]) -> str:
    """The report: settings, SLOs, goodput, fixed-rate latencies, KV link, goals, a generated reading."""
    m, s = result.get("machine", {}), {**HEADER_DEFAULTS, **result.get("settings", {})}
    lines = [f"# Disaggregated 1P1D vs 2 colocated replicas ({result.get('card', '?')}, {result.get('date', '?')})", "",
             f"Devices {s['devices']} ({', '.join(m.get('gpus', [m.get('cpu', '?')]))}); torch {m.get('torch')}; "
             f"elapsed {result.get('elapsed_s', 0):.0f} s of a {s['time_budget_s']:.0f} s budget. SLOs are "
             f"{s['ttft_slo_scale']}x the unloaded TTFT of a mean-length prompt and {s['tpot_slo_scale']}x the "
             "unloaded TPOT of a lone request, both measured on one colocated replica before the sweeps: TTFT room "
             "for a few prompts of queueing; TPOT room for modest batching, not for decode steps stalled behind "
             "prefills. Goodput = the rate where the share of requests meeting both crosses 90% (interpolated between "
             "the last rate that meets it and the first that does not; after the grid, up to "
             f"{s.get('refine_points', 0)} extra rate{'' if s.get('refine_points', 0) == 1 else 's'} per sweep, marked *, halve below a lowest rate that misses or "
             "split the bracket around the crossing); per GPU = / 2 for both set-ups "
             "(two replicas, or one prefill + one decode GPU). Requests unfinished at the deadline count as misses."]
    for model, res in result.get("models", {}).items():
        lines += ["", f"## {model}", ""]
        try:
            lines += _model_section(res)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:  # a phase that failed left it partial
            lines.append(f"Error: this model's result is incomplete ({type(exc).__name__}: {exc}); the section ends here.")
        if "greedy_check" not in res:
            lines.append("Greedy check: not run (see the errors).")
        for error in res.get("errors", []):
            lines.append(f"Error: {error}")
        if res.get("skipped_sweeps"):
            lines.append(f"Not measured (time budget): {', '.join(res['skipped_sweeps'])}.")
    lines += ["", "## Goals", ""] + [f"- {'met' if ok else 'MISSED'}: {g}" for g, ok in result.get("goals", {}).items()]
    lines += [f"- error: {e}" for e in result.get("errors", [])]
    try:
        lines += ["", "## Reading (generated; edit into prose)", ""] + reading(result)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        lines.append(f"(no reading: the result is incomplete, {type(exc).__name__}: {exc})")
    return "\n".join(lines) + "\n"


def _failed_lines(res: dict[str, Any]) -> list[str]:
    """One line per measured point in which requests failed: how many and why."""
    lines = []
    for sw in res.get("sweeps", []):
        for p in sw.get("points", []):
            if p.get("num_failed") or (p.get("num_finished", p.get("num_requests")) != p.get("num_requests")):
                failures = p.get("failures") or {"unrecorded reason": p["num_requests"] - p["num_finished"]}
                lines.append(f"Failed requests, {sw['workload']} {sw['config']} at {p['rate_rps']:.3g} req/s: "
                             f"{failure_note(p['num_requests'], failures)} (counted as SLO misses).")
    return lines


def _model_section(res: dict[str, Any]) -> list[str]:
    """One model's tables: calibration, goodput, fixed-rate latencies, the KV link, failures and errors."""
    lines = ["| workload | unloaded TTFT ms | unloaded TPOT ms | SLO TTFT ms | SLO TPOT ms | "
              "rates (req/s) |", "|---|---:|---:|---:|---:|---|"]
    for w, c in res["calibration"].items():
        lines.append(f"| {w} | {_ms(c['ttft_s'])} | {_ms(c['tpot_s'])} | {_ms(c['slo']['ttft_s'])} | "
                     f"{_ms(c['slo']['tpot_s'])} | {', '.join(f'{r:.3g}' for r in c['rates_rps'])} |")
    lines += ["", "| workload | configuration | goodput req/s | per GPU | attainment by rate | skipped rates |",
              "|---|---|---:|---:|---|---|"]
    for sw in res["sweeps"]:
        curve = ", ".join(f"{p['rate_rps']:.3g}{'*' if p.get('refinement') else ''}: {p['attainment']:.2f}"
                          for p in sw["points"])
        lines.append(f"| {sw['workload']} | {sw['config']} | {sw['goodput_rps']:.3g} | "
                     f"{sw['goodput_per_gpu_rps']:.3g} | {curve} | {', '.join(f'{r:.3g}' for r in sw['skipped_rates_rps'])} |")
    lines += ["", "At the fixed rate:", "", "| workload | configuration | req/s | TTFT p50 ms | TTFT p99 ms | "
              "ITL p50 ms | ITL p99 ms | queue ms | prefill ms | transfer ms | decode queue ms | KV MB/req | "
              "transfer span / TTFT |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in fixed_rate_rows(res):
        b, kv = r["breakdown_median_s"], r["kv_bytes_per_request_median"]
        ratio = r["transfer_over_ttft_median"]
        lines.append(f"| {r['workload']} | {r['config']} | {r['rate_rps']:.3g} | {_ms(r['ttft_p50_s'])} | "
                     f"{_ms(r['ttft_p99_s'])} | {_ms(r['itl_p50_s'])} | {_ms(r['itl_p99_s'])} | "
                     f"{_ms(b['queue_s'])} | {_ms(b['prefill_s'])} | {_ms(b['transfer_s'])} | "
                     f"{_ms(b['decode_queue_s'])} | {'' if kv is None else f'{kv / 1e6:.1f}'} | "
                     f"{'' if ratio is None else f'{ratio:.3f}'} |")
    probe, ceiling = res.get("kv_probe", {}), res.get("kv_ceiling", {})
    lines += ["", "Breakdown medians: queue = arrival to prefill start; transfer = prefill end to the first token "
              "on the decode side (what the transfer adds to TTFT); decode queue = first token to the first "
              "decode step. Transfer span = transfer start to adoption: from the first layer sent with overlap "
              "(it runs during the prefill), from the prefill's end without (the pages, announced ahead, "
              "may already be on their way).", "", f"KV link: probe {json.dumps(probe)}; plain send/recv ceiling {json.dumps(ceiling)}."]
    if "greedy_check" in res:
        lines.append(f"Greedy check: {json.dumps(res['greedy_check'])}.")
    return lines + _failed_lines(res)


def write_results(result: dict[str, Any], out_dir: Path, plots: bool = True) -> list[Path]:
    """Write ``disagg-<card>-<date>.json`` (the summary) and ``.md``, the per-request part under ``raw/``, and the
    PNGs (drawn from the whole result); returns the paths, the per-request file last."""
    from minidisagg.bench.disagg_plots import write_plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    card, date = result.get("card") or "unknown-card", str(result.get("date") or "undated")[:10]
    stem = out_dir / f"disagg-{card}-{date}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    raw_path = requests_path(json_path)

    def write_summary() -> None:
        """The summary JSON, the per-request JSON and the Markdown, from the result as it stands."""
        summary, raw = split_requests(result)
        json_path.write_text(json.dumps(summary, indent=1, default=str) + "\n")
        raw_path.parent.mkdir(parents=True, exist_ok=True)
        raw_path.write_text(json.dumps(raw, default=str) + "\n")
        md_path.write_text(to_markdown(result))

    write_summary()
    figures: list[Path] = []
    if plots:
        try:
            figures = write_plots(result, stem)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:  # an incomplete result: keep the rest
            result.setdefault("errors", []).append(f"figures not drawn, the result is incomplete: "
                                                   f"{type(exc).__name__}: {exc}")
            write_summary()
    return [json_path, md_path, *figures, raw_path]
