"""Validate the fleet simulator against measured runs of the engine on this CPU.

The demo's workload (``minidisagg.demo``: steady decodes while long prompts arrive), colocated, under
``prefill_first`` and ``chunked``. For each: calibrate the step costs (the demo's calibration, one
thread), run the real engine on wall time (one thread, warmed up; arrivals re-timed to its measured
decode step, as the demo does), then simulate the very workload that ran with ``minidisagg.sim`` on the
calibration, and compare TTFT p50/p90 and ITL p50/p99. The measured runs are repeated to show their
own spread. Writes ``benchmarks/results/sim-validation-cpu-<date>.json`` and ``.md``.

    PYTHONPATH=. python benchmarks/sim_validation.py --repeats 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from minidisagg.demo import DemoSettings, retimed, timed_replay, warm_up
from minidisagg.engine.calibrate import calibrate_step_costs, cpu_threads
from minidisagg.engine.clock import WallClock
from minidisagg.engine.llm_engine import LLMEngine
from minidisagg.metrics import percentile
from minidisagg.models.registry import load_model
from minidisagg.sim import FleetSpec, InstanceConfig, Trace, links_from_transport_json, simulate

FIGURES = (("TTFT p50", "ttft", 50), ("TTFT p90", "ttft", 90), ("ITL p50", "itl", 50), ("ITL p99", "itl", 99))
GOALS = {"TTFT p50": 0.15, "ITL p99": 0.15}  # median absolute relative error


def figures(ttfts: list[float], itls: list[float]) -> dict[str, float]:
    """The four compared figures, in seconds."""
    pools = {"ttft": ttfts, "itl": itls}
    return {name: percentile(pools[pool], q) for name, pool, q in FIGURES}


def disagg_rows(loaded, settings: DemoSettings, schedule, step_s: float, costs, args) -> list[dict]:
    """1P1D over TCP, as the demo runs it (two one-thread processes), against the simulator with the socket link."""
    from minidisagg.config import CacheConfig, EngineConfig
    from minidisagg.disagg.cluster import DisaggCluster

    sc = settings.scenario
    budget = max(2048, sc.long_prompt_len + sc.num_decodes * sc.decode_prompt_len)
    config = EngineConfig(max_num_batched_tokens=budget, cache=CacheConfig())
    link = links_from_transport_json(args.link_json)["socket"]
    kv_bytes_per_token = loaded.config.kv_bytes_per_token(4)  # fp32 pages
    rows = []
    for rep in range(args.repeats):
        cluster = DisaggCluster(loaded, config, transport="socket", model_ref="smollm2-135m", pin_cores=True,
                                worker_threads=1)
        try:
            workload = retimed(schedule.workload, warm_up(cluster, settings), step_s)
            run = timed_replay(cluster, "disagg 1P1D", "wall", workload, settings)
        finally:
            cluster.shutdown()
        outs = run.decodes + run.longs
        measured = figures([o.metrics.ttft_s for o in outs], [g for o in outs for g in o.metrics.itl_s])
        icfg = InstanceConfig("prefill_first", config.max_num_seqs, budget, 1 << 16, 16)
        sim = simulate(FleetSpec(1, 1, icfg, link=link, kv_bytes_per_token=kv_bytes_per_token,
                                 messages_per_transfer=loaded.config.num_layers), costs, Trace.of(workload),
                       keep_timelines=True)
        ms = sim.metrics()
        predicted = figures([m.ttft_s for m in ms], [g for m in ms for g in m.itl_s])
        rows.append({"policy": "1P1D socket", "repeat": rep, "measured_s": measured, "predicted_s": predicted,
                     "rel_error": {k: (predicted[k] - measured[k]) / measured[k] for k in measured},
                     "load_1min": os.getloadavg()[0], "link": link.__dict__})
        print("1P1D", rep, {k: f"{1e3 * measured[k]:.1f}/{1e3 * predicted[k]:.1f} ms" for k in measured}, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="measured runs per policy")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--disagg", action="store_true", help="also 1P1D over the socket transport (two processes)")
    ap.add_argument("--link-json", default="benchmarks/results/transport-2026-11-27.json",
                    help="bench transport result whose 'socket' rows give the simulated link")
    args = ap.parse_args()
    t0 = time.perf_counter()
    loaded = load_model("smollm2-135m", device="cpu")
    settings = DemoSettings()
    costs = calibrate_step_costs(loaded, settings.calibration_plan(), progress=False, seed=settings.scenario.seed)
    schedule = settings.schedule(costs)
    step_s = costs.decode_cost_s(settings.scenario.num_decodes, settings.scenario.decode_prompt_len)
    rows = []
    with cpu_threads(1):  # the calibration's thread count: the simulator predicts a one-thread engine
        for policy in ("prefill_first", "chunked"):
            cfg = settings.engine_config(policy, schedule.workload)
            for rep in range(args.repeats):
                engine = LLMEngine(loaded, cfg, clock=WallClock(), policy=policy)
                workload = retimed(schedule.workload, warm_up(engine, settings), step_s)
                run = timed_replay(engine, policy, "wall", workload, settings)
                outs = run.decodes + run.longs
                measured = figures([o.metrics.ttft_s for o in outs],
                                   [g for o in outs for g in o.metrics.itl_s])
                icfg = InstanceConfig(policy, cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.cache.num_blocks,
                                      cfg.cache.block_size)
                sim = simulate(FleetSpec(1, instance=icfg), costs, Trace.of(workload), keep_timelines=True)
                ms = sim.metrics()
                predicted = figures([m.ttft_s for m in ms], [g for m in ms for g in m.itl_s])
                rows.append({"policy": policy, "repeat": rep, "measured_s": measured, "predicted_s": predicted,
                             "rel_error": {k: (predicted[k] - measured[k]) / measured[k] for k in measured},
                             "load_1min": os.getloadavg()[0]})
                print(policy, rep, {k: f"{1e3 * measured[k]:.1f}/{1e3 * predicted[k]:.1f} ms" for k in measured},
                      flush=True)
    if args.disagg:
        rows += disagg_rows(loaded, settings, schedule, step_s, costs, args)
    policies = sorted({r["policy"] for r in rows})
    summary = {name: statistics.median(abs(r["rel_error"][name]) for r in rows) for name, _, _ in FIGURES}
    spread = {}
    for policy in policies:
        reps = [r["measured_s"] for r in rows if r["policy"] == policy]
        spread[policy] = {k: (max(x[k] for x in reps) - min(x[k] for x in reps)) / statistics.median(x[k] for x in reps)
                          for k in reps[0]}
    date = datetime.date.today().isoformat()
    result = {"benchmark": "sim_validation", "date": date, "device": "cpu", "torch_threads": 1,
              "model": "smollm2-135m", "workload": "the demo's (minidisagg.demo, DemoSettings())",
              "calibration": costs.describe(), "rows": rows, "median_abs_rel_error": summary,
              "measured_spread": spread, "goals": {k: {"target": v, "met": summary[k] <= v} for k, v in GOALS.items()},
              "elapsed_s": time.perf_counter() - t0, "cpu_count": os.cpu_count()}
    out = Path(args.out)
    (out / f"sim-validation-cpu-{date}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Simulator against measured runs, CPU ({date})", "",
             "smollm2-135m, one torch thread, the demo's workload (4 steady decodes, 2 prompts of 512 tokens), "
             "colocated (and 1P1D over TCP with --disagg: a prefill and a decode process, one thread each). "
             "Measured: the real engine on wall time, warmed up. Predicted: `minidisagg.sim` on the "
             "same workload and the demo's calibration (fastest of 3 repeats per shape, one thread).", "",
             f"Calibration: {costs.describe()}", "",
             "| policy | run | " + " | ".join(f"{n} measured / predicted ms (error)" for n, _, _ in FIGURES) + " |",
             "|---|---|" + "---|" * len(FIGURES)]
    for r in rows:
        cells = [f"{1e3 * r['measured_s'][n]:.1f} / {1e3 * r['predicted_s'][n]:.1f} ({100 * r['rel_error'][n]:+.0f}%)"
                 for n, _, _ in FIGURES]
        lines.append(f"| {r['policy']} | {r['repeat']} | " + " | ".join(cells) + " |")
    lines += ["", "Median absolute relative error over the runs: "
              + ", ".join(f"{n} {100 * v:.0f}%" for n, v in summary.items()), "",
              "Spread of the measured runs themselves ((max - min) / median): "
              + "; ".join(f"{p}: " + ", ".join(f"{n} {100 * v:.0f}%" for n, v in s.items()) for p, s in spread.items()),
              "", "Goals (median absolute error): " + ", ".join(
                  f"{k} <= {100 * v:.0f}%: {'met' if summary[k] <= v else 'NOT met'}" for k, v in GOALS.items()),
              "", f"Load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
              f"took {time.perf_counter() - t0:.0f} s."]
    (out / f"sim-validation-cpu-{date}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    torch.manual_seed(0)
    np.random.seed(0)
    main()
