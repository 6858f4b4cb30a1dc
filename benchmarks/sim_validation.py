"""Validate the fleet simulator against measured runs of the engine on this CPU, fitted and predicted held out.

Workloads: the demo's (``minidisagg.demo``: steady decodes while 512-token prompts arrive, arrivals planned
from an in-run calibration and re-timed to the warmed-up engine's decode step, as the demo does) and lab 3's
CPU timeline (``Scenario()``: 4 decodes, two 384-token prompts at 0.2 s and 1.0 s). Configurations:
colocated ``prefill_first`` and ``chunked`` (one torch thread, this process) and 1P1D over the socket
transport (two one-thread worker processes, as the demo runs it). ``--rounds`` rounds each run every
(workload, configuration) once, interleaved, so the host's load touches them alike.

Cost models come from the measured runs themselves, never from the round they predict:
- colocated: every stage run's shape and wall time plus the host time before it (``sim.costs.RecordingClock``),
  fitted by medians (``sim.costs.fit_costs``) over all colocated runs of one round;
- 1P1D: the prefill worker's steps read from the requests' timelines (prefill start to end, by batch) and the
  decode worker's from its token times (one step per distinct time, context from the token index); its KV
  commit (``decode_commit_s``) the median over adopted requests of adoption (the first token) less the later
  of the KV's landing and the decode step boundary before it (``commit_samples``);
- the socket link: ``run_bandwidth`` at the KV's message sizes in this run, median GB/s.
A run is predicted by a model fitted on the other runs of its round (held out: never its own steps, but the
same minutes of host load; a 1P1D run's workers from the other workload's 1P1D run), and for comparison by
one fitted on the other rounds, by its own round's (in sample), and by the engine's calibration.
Writes ``benchmarks/results/sim-validation-cpu-<date>.json`` and ``.md``.

    PYTHONPATH=. python benchmarks/sim_validation.py --rounds 2
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pickle
import statistics
import time
from pathlib import Path

import torch

from minidisagg.config import CacheConfig, EngineConfig
from minidisagg.demo import DemoSettings, retimed, timed_replay, warm_up
from minidisagg.engine.calibrate import calibrate_step_costs, cpu_threads
from minidisagg.engine.llm_engine import LLMEngine
from minidisagg.engine.step_cost import DECODE, PREFILL, StepShape
from minidisagg.metrics import percentile
from minidisagg.models.registry import load_model
from minidisagg.sim import FleetSpec, InstanceConfig, Trace, simulate
from minidisagg.sim.costs import RecordingClock, costs_to_dict, fit_costs
from minidisagg.sim.link import LinkSpec, links_from_transport_rows
from minidisagg.workload import Scenario

FIGURES = (("TTFT p50", "ttft", 50), ("TTFT p90", "ttft", 90), ("ITL p50", "itl", 50), ("ITL p99", "itl", 99))
GOALS = {"TTFT p50": 0.15, "ITL p99": 0.15}  # median absolute relative error, held out
POLICIES = ("prefill_first", "chunked")
DISAGG = "1P1D socket"


def figures(outs) -> dict[str, float]:
    """The four compared figures, in seconds, over every request of a run."""
    pools = {"ttft": [o.metrics.ttft_s for o in outs], "itl": [g for o in outs for g in o.metrics.itl_s]}
    return {name: percentile(pools[pool], q) for name, pool, q in FIGURES}


def sim_figures(res) -> dict[str, float]:
    """The same figures from a simulation."""
    ms = res.metrics()
    pools = {"ttft": [m.ttft_s for m in ms], "itl": [g for m in ms for g in m.itl_s]}
    return {name: percentile(pools[pool], q) for name, pool, q in FIGURES}


def colocated_config(workload_name: str, settings: DemoSettings, policy: str, workload) -> EngineConfig:
    """The engine the demo (or lab 3) runs for ``policy``."""
    if workload_name == "demo":
        return dataclasses.replace(settings.engine_config(policy, workload), async_scheduling=False)
    blocks = sum(-(-(r.prompt_len + r.output_len) // 16) for r in workload) + len(workload) + 8
    return EngineConfig(max_num_seqs=min(64, len(workload)), max_num_batched_tokens=settings.scenario.token_budget,
                        policy=policy, cache=CacheConfig(num_blocks=blocks), async_scheduling=False)


def disagg_timings(outs, workload) -> tuple[list, list]:
    """(prefill worker, decode worker) stage runs read from a 1P1D run's request timelines."""
    by_step: dict[tuple[float, float], list[int]] = {}
    decode_steps: dict[float, list[int]] = {}
    events = []
    for o, req in zip(outs, workload):  # outputs come in workload order
        tl, n = o.timeline, req.prompt_len
        if tl.prefill_start_s is not None and tl.prefill_end_s is not None:
            by_step.setdefault((tl.prefill_start_s, tl.prefill_end_s), []).append(n)
        events += tl.token_times_s[:1]
        for i, t in enumerate(tl.token_times_s[1:], start=1):  # token i: a step over a sequence of n + i tokens
            decode_steps.setdefault(t, []).append(n + i)
    prefill = [(StepShape(PREFILL, len(ns), sum(ns), float(sum(k * (k + 1) / 2 for k in ns))), end - start)
               for (start, end), ns in by_step.items() if end > start]
    times = sorted(set(decode_steps) | set(events))
    decode = []
    for prev, t in zip(times, times[1:]):
        if t in decode_steps and t - prev > 0:
            ctx = decode_steps[t]
            decode.append((StepShape(DECODE, len(ctx), len(ctx), float(sum(ctx))), t - prev))
    return prefill, decode


def commit_samples(outs) -> list[float]:
    """Per adopted request: seconds from the later of its KV's landing and the decode step end before it to its adoption."""
    import bisect

    step_ends = sorted(t for o in outs for t in o.timeline.token_times_s[1:])
    samples = []
    for o in outs:
        tl = o.timeline
        if tl.transfer_end_s is None or (tl.kv_landed_s is None and tl.transfer_start_s is None):
            continue
        i = bisect.bisect_right(step_ends, tl.transfer_end_s)
        landed_s = tl.kv_landed_s if tl.kv_landed_s is not None else tl.transfer_start_s  # not every link says
        since_s = max(landed_s, step_ends[i - 1] if i else landed_s)
        if tl.transfer_end_s >= since_s:
            samples.append(tl.transfer_end_s - since_s)
    return samples


def measure_link(kv_bytes_per_layer: int) -> tuple[LinkSpec, list[dict]]:
    """The socket transport's line (latency + bytes / median GB/s), measured now at the KV's message sizes."""
    from minidisagg.bench.transport_bandwidth import run_bandwidth

    block = 64 << 10  # the bench's page size: messages are whole blocks
    layer = max(block, kv_bytes_per_layer // block * block)
    sizes = sorted({block, layer, 4 * layer})
    out = run_bandwidth(sizes, repeats=3, transfer_bytes=8 << 20, sample_bytes=16 << 20, with_dist=False,
                        threads=1, progress=False)
    rows = [r for r in out["rows"] if r["transport"] == "socket"]
    return links_from_transport_rows(rows, gbps_key="GBps")["socket"], rows


def run_one(loaded, name: str, settings: DemoSettings, config: str, planned, step_s: float) -> dict:
    """One measured run on wall time (warmed up first) and what the cost fits need from it."""
    sc = settings.scenario
    if config == DISAGG:
        from minidisagg.disagg.cluster import DisaggCluster

        budget = max(2048, sc.long_prompt_len + sc.num_decodes * sc.decode_prompt_len)
        engine = DisaggCluster(loaded, EngineConfig(max_num_batched_tokens=budget, cache=CacheConfig()),
                               transport="socket", model_ref="smollm2-135m", pin_cores=True, worker_threads=1)
    else:
        engine = LLMEngine(loaded, colocated_config(name, settings, config, planned), clock=RecordingClock(),
                           policy=config)
    try:
        warm_step_s = warm_up(engine, settings)
        workload = retimed(planned, warm_step_s, step_s) if name == "demo" else list(planned)
        if config != DISAGG:
            engine.clock.restart()
        load_before = os.getloadavg()[0]
        run = timed_replay(engine, config, "wall", workload, settings)
    finally:
        if config == DISAGG:
            engine.shutdown()
    outs = run.decodes + run.longs
    row = {"workload": name, "config": config, "measured_s": figures(outs),
           "load_1min": [load_before, os.getloadavg()[0]], "workload_": workload}
    if config == DISAGG:
        row["timings_"] = disagg_timings(outs, workload)
        row["commit_samples_s"] = commit_samples(outs)
        fields = ("arrival_s", "prefill_start_s", "prefill_end_s", "transfer_start_s", "kv_landed_s", "transfer_end_s")

        def since(t_s):  # seconds from the replay's start, for the record
            return None if t_s is None else round(t_s - run.start_s, 4)
        row["timelines"] = [{**{k: since(getattr(o.timeline, k)) for k in fields}, "prompt_len": r.prompt_len,
                             "token_times_s": [since(t) for t in o.timeline.token_times_s[:3]]}
                            for o, r in zip(outs, workload)]
    else:
        row["timings_"] = engine.clock.timings
    return row


def predict(row: dict, colocated_costs, disagg_costs, link: LinkSpec, kv_bytes_per_token: int, num_layers: int,
            settings: dict) -> dict[str, float]:
    """The simulator's figures for a measured row's workload and configuration."""
    trace = Trace.of(row["workload_"])
    if row["config"] == DISAGG:
        prefill_costs, decode_costs = disagg_costs
        icfg = InstanceConfig("prefill_first", 256, 2048, 1 << 16, 16)
        spec = FleetSpec(1, 1, icfg, link=link, kv_bytes_per_token=kv_bytes_per_token, messages_per_transfer=num_layers)
        return sim_figures(simulate(spec, decode_costs, trace, keep_timelines=True, prefill_costs=prefill_costs))
    cfg = colocated_config(row["workload"], settings[row["workload"]], row["config"], row["workload_"])
    icfg = InstanceConfig(row["config"], cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.cache.num_blocks,
                          cfg.cache.block_size)
    return sim_figures(simulate(FleetSpec(1, instance=icfg), colocated_costs, trace, keep_timelines=True))


def fit_round(rows: list[dict]) -> tuple:
    """(colocated model, (1P1D prefill model, 1P1D decode model)) fitted on one round's measured runs."""
    colo = [t for r in rows if r["config"] != DISAGG for t in r["timings_"]]
    colocated = fit_costs(colo, load_1min=statistics.mean(r["load_1min"][1] for r in rows), cpu_threads=1)
    pre = [t for r in rows if r["config"] == DISAGG for t in r["timings_"][0]]
    dec = [t for r in rows if r["config"] == DISAGG for t in r["timings_"][1]]
    if not pre or not dec:
        return colocated, (colocated, colocated)
    # each worker's own phase from its own steps; the other phase (never run there) from the colocated fit
    prefill = fit_costs(pre + [t for t in colo if t[0].phase == DECODE], cpu_threads=1)
    decode = fit_costs(dec + [t for t in colo if t[0].phase == PREFILL], cpu_threads=1)
    commits = [c for r in rows if r["config"] == DISAGG for c in r.get("commit_samples_s", [])]
    if commits:
        decode = dataclasses.replace(decode, decode_commit_s=statistics.median(commits))
    return colocated, (prefill, decode)


def summarise(rows: list[dict], key: str) -> dict[str, float]:
    """Median absolute relative error of ``key`` predictions over ``rows``."""
    return {n: statistics.median(abs(r[key][n]) for r in rows) for n, _, _ in FIGURES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="measured runs of every (workload, configuration); >= 2")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--no-disagg", action="store_true", help="colocated only (no worker processes)")
    ap.add_argument("--workloads", default="demo,lab3")
    ap.add_argument("--save-raw", help="also pickle the measured runs here (for --from-raw)")
    ap.add_argument("--from-raw", help="analyse runs saved by --save-raw instead of measuring")
    args = ap.parse_args()
    if args.rounds < 2:
        raise SystemExit("--rounds must be >= 2: every round is predicted by a model fitted on another")
    t0 = time.perf_counter()
    if args.from_raw:  # analyse measured runs saved by --save-raw again, without measuring
        with open(args.from_raw, "rb") as f:
            raw = pickle.load(f)
        return analyse(raw, args, t0)
    loaded = load_model("smollm2-135m", device="cpu")
    settings = {"demo": DemoSettings(), "lab3": DemoSettings(scenario=Scenario())}
    names = args.workloads.split(",")
    configs = POLICIES if args.no_disagg else (*POLICIES, DISAGG)
    kv_bytes_per_token = loaded.config.kv_bytes_per_token(4)  # fp32 pages
    num_layers = loaded.config.num_layers
    with cpu_threads(1):  # the colocated runs' thread count (each worker process runs one thread too)
        sc = settings["demo"].scenario
        link, link_rows = measure_link(kv_bytes_per_token // num_layers * sc.long_prompt_len)
        print("link", link, flush=True)
        calibrated = calibrate_step_costs(loaded, settings["demo"].calibration_plan(), progress=False,
                                          seed=settings["demo"].scenario.seed)
        sc = settings["demo"].scenario
        step_s = calibrated.decode_cost_s(sc.num_decodes, sc.decode_prompt_len)
        planned = {"demo": settings["demo"].schedule(calibrated).workload, "lab3": tuple(Scenario().workload())}
        rows = []
        for rnd in range(args.rounds):
            for name in names:
                for config in configs:
                    row = run_one(loaded, name, settings[name], config, planned[name], step_s)
                    row["round"] = rnd
                    rows.append(row)
                    print(rnd, name, config, {k: f"{1e3 * v:.1f}" for k, v in row["measured_s"].items()},
                          row["load_1min"], flush=True)
    raw = {"rows": rows, "calibrated": calibrated, "link": link, "link_rows": link_rows,
           "kv_bytes_per_token": kv_bytes_per_token, "num_layers": num_layers,
           "measured_s": time.perf_counter() - t0, "load_1min_end": os.getloadavg()[0]}
    if args.save_raw:
        with open(args.save_raw, "wb") as f:
            pickle.dump(raw, f)
    analyse(raw, args, t0)


def analyse(raw: dict, args, t0: float) -> None:
    """Fit, predict every measured run under each scheme, and write the results."""
    rows, calibrated, link, link_rows = raw["rows"], raw["calibrated"], raw["link"], raw["link_rows"]
    kv_bytes_per_token, num_layers = raw["kv_bytes_per_token"], raw["num_layers"]
    settings = {"demo": DemoSettings(), "lab3": DemoSettings(scenario=Scenario())}
    args.rounds = max(r["round"] for r in rows) + 1
    models = [fit_round([r for r in rows if r["round"] == rnd]) for rnd in range(args.rounds)]
    for r in rows:
        others = fit_round([x for x in rows if x["round"] != r["round"]])
        beside = fit_round([x for x in rows if x["round"] == r["round"] and x is not r])
        cal = (calibrated, (calibrated, calibrated))
        variants = (("held_out", beside), ("other_rounds", others), ("fit", models[r["round"]]), ("calibrated", cal))
        for key, (colo, dis) in variants:
            pred = predict(r, colo, dis, link, kv_bytes_per_token, num_layers, settings)
            r[f"predicted_{key}_s"] = pred
            r[f"error_{key}"] = {k: (pred[k] - r["measured_s"][k]) / r["measured_s"][k] for k in pred}
        print(r["round"], r["workload"], r["config"], {k: f"{1e3 * v:.0f}/{1e3 * r['predicted_held_out_s'][k]:.0f}"
                                                       for k, v in r["measured_s"].items()}, flush=True)
    write(rows, models, calibrated, link, link_rows, args, raw.get("measured_s", time.perf_counter() - t0),
          raw.get("load_1min_end", os.getloadavg()[0]))


def write(rows, models, calibrated, link, link_rows, args, elapsed_s: float, load_end: float) -> None:
    """The JSON and Markdown results."""
    groups = sorted({(r["workload"], r["config"]) for r in rows})
    spread = {}
    for g in groups:
        reps = [r["measured_s"] for r in rows if (r["workload"], r["config"]) == g]
        spread[f"{g[0]} {g[1]}"] = {k: (max(x[k] for x in reps) - min(x[k] for x in reps))
                                    / statistics.median(x[k] for x in reps) for k in reps[0]}
    summary = {key: summarise(rows, f"error_{key}") for key in ("held_out", "other_rounds", "fit", "calibrated")}
    median_spread = {n: statistics.median(s[n] for s in spread.values()) for n, _, _ in FIGURES}
    date = datetime.date.today().isoformat()
    public = [{k: v for k, v in r.items() if not k.endswith("_")} for r in rows]
    held = summary["held_out"]
    result = {"benchmark": "sim_validation", "date": date, "device": "cpu", "torch_threads": 1,
              "model": "smollm2-135m", "workloads": args.workloads, "rounds": args.rounds, "rows": public,
              "median_abs_rel_error": summary, "measured_spread": spread, "median_measured_spread": median_spread,
              "link": dataclasses.asdict(link), "link_rows": link_rows, "calibration": calibrated.describe(),
              "fitted_models": [{"colocated": costs_to_dict(c), "1p1d_prefill": costs_to_dict(p),
                                 "1p1d_decode": costs_to_dict(d)} for c, (p, d) in models],
              "goals": {k: {"target": v, "met": held[k] <= v} for k, v in GOALS.items()},
              "elapsed_s": elapsed_s, "cpu_count": os.cpu_count()}
    out = Path(args.out)
    (out / f"sim-validation-cpu-{date}.json").write_text(json.dumps(result, indent=1))
    pct = lambda x: f"{100 * x:+.0f}%"  # noqa: E731
    lines = [f"# Simulator against measured runs, CPU ({date})", "",
             "smollm2-135m, one torch thread; the demo's workload (4 steady decodes, two 512-token prompts) and lab 3's "
             "(4 decodes, two 384-token prompts); colocated prefill_first and chunked, and 1P1D over the socket "
             "(two one-thread worker processes). Measured: the real engine on wall time, warmed up. Predicted: "
             "`minidisagg.sim` on the same requests, with cost models fitted (`sim.costs.fit_costs`, medians) to the "
             "measured steps of the same round's other runs, never the run predicted (held out; the same minutes "
             "of host load), beside fits on the other rounds, the in-sample fit and the engine's calibration "
             "(fastest of 3 repeats per shape, this run). Socket link measured in this run: "
             f"{link.bandwidth_GBps:.2f} GB/s + {1e6 * link.latency_s:.0f} us a message.", "",
             "| workload | config | round | load | " + " | ".join(f"{n} ms: measured / held out (fit, calibrated)"
                                                          for n, _, _ in FIGURES) + " |",
             "|---|---|---|---|" + "---|" * len(FIGURES)]
    for r in rows:
        cells = [f"{1e3 * r['measured_s'][n]:.0f} / {1e3 * r['predicted_held_out_s'][n]:.0f} "
                 f"{pct(r['error_held_out'][n])} ({pct(r['error_fit'][n])}, {pct(r['error_calibrated'][n])})"
                 for n, _, _ in FIGURES]
        lines.append(f"| {r['workload']} | {r['config']} | {r['round']} | {r['load_1min'][1]:.1f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Median absolute relative error over the runs:", "",
              "| prediction | " + " | ".join(n for n, _, _ in FIGURES) + " |", "|---|" + "---:|" * len(FIGURES)]
    for key, label in (("held_out", "held out: fitted on the same round's other runs (headline)"),
                       ("other_rounds", "held out: fitted on the other rounds"),
                       ("fit", "in sample: fitted on the run's own round, itself included"),
                       ("calibrated", "engine calibration (fastest of 3 per shape), no fit")):
        lines.append(f"| {label} | " + " | ".join(f"{100 * summary[key][n]:.0f}%" for n, _, _ in FIGURES) + " |")
    for config in sorted({r["config"] for r in rows}):
        mine = summarise([r for r in rows if r["config"] == config], "error_held_out")
        lines.append(f"| held out, {config} runs only | " + " | ".join(f"{100 * mine[n]:.0f}%" for n, _, _ in FIGURES) + " |")
    lines.append("| measured runs' own spread, median over configs ((max - min) / median) | "
                 + " | ".join(f"{100 * median_spread[n]:.0f}%" for n, _, _ in FIGURES) + " |")
    lines += ["", "Spread of the measured runs by config: " + "; ".join(
        f"{g}: " + ", ".join(f"{n} {100 * v:.0f}%" for n, v in s.items()) for g, s in spread.items()), "",
        "Goals (median absolute error, held out): " + ", ".join(
            f"{k} <= {100 * v:.0f}%: {'met' if held[k] <= v else 'NOT met'}" for k, v in GOALS.items()), "",
        f"Engine calibration: {calibrated.describe()}", "",
        f"Held-out model of round 0 (colocated): {models[0][0].describe()}", "",
        f"Load average (1 min) at the end: {load_end:.1f} on {os.cpu_count()} cores; measuring took {elapsed_s:.0f} s."]
    (out / f"sim-validation-cpu-{date}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
