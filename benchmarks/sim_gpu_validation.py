"""Validate the fleet simulator against the committed two-GPU ``bench disagg`` sweeps, without a GPU.

For every sweep (configuration x workload) of the committed ``disagg-<card>-<date>*.json`` files, the
simulator replays the very requests the sweep generated at each measured rate (``Sweep.requests_at``: the
same lengths, arrivals and seeds) on the same deployment: two colocated replicas (least-loaded routing) or
one prefill and one decode instance joined by a link at the sweep's measured KV bandwidth.

Cost model (``sim.costs.costs_from_gpu_rows``): the committed ``bench gpu`` rows of an H100 (prefill of whole
prompts, decode by batch with CUDA graphs; KV read per context token at the measured read bandwidth), the
rows file nearest in date to the sweep. ``anchored`` (the headline) then scales its prefill and its decode
so that they match the sweep run's own unloaded calibration (``calibration``: TTFT of a mean prompt, TPOT
of a lone request, measured before the sweeps on the sweep's cards): this carries the model to the H200 and
to the engine version the sweep ran; ``rows`` is the unscaled model, for comparison. The decode instance's
per-request KV commit (``StepCostModel.decode_commit_s``) is fitted from measured timelines: at the lowest
measured rate of each disaggregated sweep of a file and model, the measured median ``transfer_s`` (prefill
end to adoption on the decode worker) less the simulated one with no commit cost (the link plus the wait for
the decode step boundary); one value for every file, the median of these over all of them, floored at 0
(``commit_residuals``, then ``main``): the commit is host work of the decode worker, and a median is not moved
by the early runs whose lowest rate already queued hundreds of milliseconds. ``anchored, commit 0`` leaves it
out, for comparison. Apart from those lowest rates' TTFT breakdowns the sweep
points never enter a model.

``anchored + serving costs`` (the headline since 2026-12-08b) adds what the real serving path costs and the device
rows lack, as the simulator's mechanisms, each fitted per card on the *other* committed files of that card (the
predicted file never enters its own fit; ``SERVING_FITS``): the router's hand-over of each request
(``FleetSpec.submit_s``), the reservation's round trip over the link (``LinkSpec.control_rtt_s``), host work per
decoding sequence and step (``StepCostModel.decode_per_seq_s``) and the KV commit, refitted the same way; since
2026-12-08c also the decode attention's extra cost per context token (``ServingCosts.decode_context_extra``), fitted
jointly with the per-sequence work by least squares (``sim.serving.fit_decode_terms``) on the batch that Little's law
gives the measured run (the simulated mean batch x measured / simulated TPOT), not the simulated one.

Compared: SLO attainment per rate, goodput (the 90% crossing, ``metrics.goodput``) per GPU, and the sign of
the best disaggregated against the best colocated goodput. Layer-wise overlap of the KV transfer is not
modelled (both disagg configurations simulate alike). Writes ``benchmarks/results/sim-validation-gpu-<date>``.

    PYTHONPATH=. python benchmarks/sim_gpu_validation.py [--tag b]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import json
import math
import statistics
from pathlib import Path

from minidisagg.bench.disagg_sweep import Sweep, workloads
from minidisagg.engine.step_cost import StepCostModel
from minidisagg.metrics import SLO, goodput
from minidisagg.sim import FleetSpec, InstanceConfig, LinkSpec, Trace, simulate
from minidisagg.sim.costs import costs_from_gpu_rows
from minidisagg.sim.serving import VALUES, ServingCosts, apply_serving_costs, fit_decode_terms
from minidisagg.sim.validation_report import NO_COMMIT, SENSITIVITY, SERVING, write

KV_BYTES_PER_TOKEN = {"llama-8b": 131072, "llama-1b": 32768}  # bf16: 2 x layers x KV heads x head dim x 2 bytes
NUM_BLOCKS = 16384  # the GPU pools hold far more than these sweeps keep in flight


def rows_file_for(sweep_date: str, rows_files: list[str]) -> str:
    """The committed bench gpu rows nearest in date to a sweep (the earlier one on a tie)."""
    day = datetime.date.fromisoformat(sweep_date[:10])

    def distance(path: str) -> tuple[int, str]:
        stem = Path(path).stem
        return abs((datetime.date.fromisoformat(stem[-10:]) - day).days), stem
    return min(rows_files, key=distance)


def anchored(costs: StepCostModel, calibration: dict, model: str) -> tuple[StepCostModel, dict]:
    """``costs`` with prefill and decode scaled to the sweep run's unloaded TTFT and TPOT (geometric mean over workloads)."""
    specs = {w.name: w for w in workloads(False)}
    pre, dec = [], []
    for name, cal in calibration.items():
        spec = specs[name]
        pre.append(cal["ttft_s"] / costs.prefill_cost_s(spec.mean_prompt))
        dec.append(cal["tpot_s"] / costs.decode_cost_s(1, spec.mean_prompt + spec.mean_output // 2))
    sp, sd = math.exp(statistics.mean(map(math.log, pre))), math.exp(statistics.mean(map(math.log, dec)))
    scaled = dataclasses.replace(
        costs, prefill_fixed_s=costs.prefill_fixed_s * sp, prefill_per_token_s=costs.prefill_per_token_s * sp,
        prefill_per_pair_s=costs.prefill_per_pair_s * sp, decode_s=tuple(t * sd for t in costs.decode_s),
        decode_context_s=costs.decode_context_s * sd, prefill_points=())
    return scaled, {"prefill_scale": sp, "decode_scale": sd}


def fleet_for(config: str, settings: dict, model: str, probe: dict) -> FleetSpec:
    """The deployment a sweep ran, as a simulated fleet (no serving costs: ``apply_serving_costs`` adds them)."""
    if config.startswith("colocated-"):
        policy = config.split("-", 1)[1]
        budget = settings["chunked_token_budget"] if policy == "chunked" else settings["prefill_token_budget"]
        return FleetSpec(2, 0, InstanceConfig(policy, settings["max_num_seqs"], budget, NUM_BLOCKS),
                         routing="least_loaded")
    link = LinkSpec("measured", probe.get("achieved_GBps") or probe["best_GBps"], 0.0)
    return FleetSpec(1, 1, InstanceConfig("prefill_first", settings["max_num_seqs"], settings["prefill_token_budget"],
                                          NUM_BLOCKS), link=link, kv_bytes_per_token=KV_BYTES_PER_TOKEN[model])


def _generator(sweep: dict, settings: dict) -> Sweep:
    spec = {w.name: w for w in workloads(False)}[sweep["workload"]]
    return Sweep(sweep["config"], spec, SLO(**sweep["slo"]), [], settings["window_s"], settings["min_requests"],
                 settings["max_requests"], 0.0, 0.0, seed=settings["seed"])


def _breakdown(res) -> dict:
    """Median queue (arrival to prefill start) and transfer (prefill end to adoption) seconds of a simulated run."""
    ms = res.metrics()
    spans = {"queue_s": [tl.prefill_start_s - tl.arrival_s for tl in res.timelines],
             "transfer_s": [m.transfer_s for m in ms if m.transfer_s is not None]}
    return {k: statistics.median(v) if v else None for k, v in spans.items()}


def mean_decode_batch(res) -> float:
    """Sequences decoding at once, on average over the run, per instance that decodes (Little's law on the timelines)."""
    tls = res.timelines
    start, end = min(tl.token_times_s[0] for tl in tls), max(tl.finish_s for tl in tls)
    busy = sum(tl.finish_s - tl.token_times_s[0] for tl in tls)
    return busy / max(end - start, 1e-12) / len({int(i) for i in res.instance}) if end > start else 1.0


def commit_residuals(sweeps: list[dict], settings: dict, model: str, probe: dict, costs: StepCostModel) -> list[float]:
    """At each disaggregated sweep's lowest rate: measured less simulated (no commit cost) median transfer_s."""
    residuals = []
    for sweep in sweeps:
        if not sweep["config"].startswith("disagg") or not sweep["points"]:
            continue
        low = min(sweep["points"], key=lambda p: p["rate_rps"])
        measured = (low.get("breakdown_median_s") or {}).get("transfer_s")
        if measured is None:
            continue
        res = simulate(fleet_for(sweep["config"], settings, model, probe), dataclasses.replace(costs, decode_commit_s=0.0),
                       Trace.of(_generator(sweep, settings).requests_at(low["rate_rps"])), keep_timelines=True)
        residuals.append(measured - _breakdown(res)["transfer_s"])
    return residuals


def _costs_of(data: dict, model: str, m: dict, rows_files: list[str]) -> tuple[str, StepCostModel, StepCostModel, dict]:
    rows_path = rows_file_for(data["date"], rows_files)
    rows_costs = costs_from_gpu_rows(rows_path, model, KV_BYTES_PER_TOKEN[model])
    return (rows_path, rows_costs, *anchored(rows_costs, m["calibration"], model))


def serving_costs(card: str, source: Path, **values: float) -> ServingCosts:
    """``ServingCosts`` of ``card`` with the given values, the others 0 (no serving costs at all when none is given)."""
    return ServingCosts(**{k: values.get(k, 0.0) for k in VALUES}, card=card, source=source)


def _run(sweep: dict, settings: dict, model: str, probe: dict, costs: StepCostModel, rate: float,
         serving: ServingCosts):
    fleet, priced = apply_serving_costs(serving, fleet_for(sweep["config"], settings, model, probe), costs)
    return simulate(fleet, priced, Trace.of(_generator(sweep, settings).requests_at(rate)), keep_timelines=True)


def mean_decode_context(requests) -> float:
    """Context tokens of a decoding sequence, on average over its decode steps (prompt + half its output), per step."""
    steps = [max(0, r.output_len - 1) for r in requests]
    return sum((r.prompt_len + r.output_len / 2) * n for r, n in zip(requests, steps)) / max(1, sum(steps))


def _lowest(sweep: dict) -> dict:
    return min(sweep["points"], key=lambda p: p["rate_rps"])


def queue_residuals(group: list[tuple], configs: str, serving: ServingCosts) -> list[float]:
    """At each ``configs`` sweep's lowest rate: measured less simulated median queue (arrival to prefill start)."""
    out = []
    for sweep, settings, model, probe, anchor in group:
        if not sweep["config"].startswith(configs) or not sweep["points"]:
            continue
        low = _lowest(sweep)
        measured = (low.get("breakdown_median_s") or {}).get("queue_s")
        if measured is not None:
            res = _run(sweep, settings, model, probe, anchor, low["rate_rps"], serving)
            out.append(measured - _breakdown(res)["queue_s"])
    return out


def decode_residuals(group: list[tuple], serving: ServingCosts) -> list[tuple[float, float, float]]:
    """At every rate of each disaggregated sweep (a decode-only instance), ``fit_decode_terms``' point: (the measured
    run's mean decode batch by Little's law, that batch's context seconds, measured less simulated TPOT p50).

    Little's law: the same requests at the same rate keep ``batch / TPOT`` alike, so the measured run decoded
    ``simulated batch x measured / simulated TPOT`` sequences at once; dividing by the simulated batch instead
    overstates the per-sequence cost wherever the measured steps are the slower ones.
    """
    out = []
    for sweep, settings, model, probe, anchor in group:
        if not sweep["config"].startswith("disagg"):
            continue
        for point in sweep["points"]:
            if point.get("tpot_p50_s") is None:
                continue
            res = _run(sweep, settings, model, probe, anchor, point["rate_rps"], serving)
            sim_tpot = res.percentile("tpot_s", 50)
            batch = mean_decode_batch(res) * point["tpot_p50_s"] / sim_tpot
            context = mean_decode_context(_generator(sweep, settings).requests_at(point["rate_rps"]))
            context_s = batch * anchor.decode_context_s * max(0.0, context - anchor.decode_reference_context)
            out.append((batch, context_s, point["tpot_p50_s"] - sim_tpot))
    return out


def _median0(values: list[float]) -> float:
    return max(0.0, statistics.median(values)) if values else 0.0


def fit_serving(group: list[tuple], commit_residuals_s: list[float], card: str,
                source: Path) -> tuple[ServingCosts, dict]:
    """``SERVING_FITS`` on ``group`` (sweeps of the files used for fitting), in order; floored at 0."""
    serving = serving_costs(card, source, decode_commit_s=_median0(commit_residuals_s))
    submit = queue_residuals(group, "colocated", serving)
    serving = dataclasses.replace(serving, submit_s=_median0(submit))
    rtt = queue_residuals(group, "disagg", serving)
    serving = dataclasses.replace(serving, control_rtt_s=_median0(rtt))
    points = decode_residuals(group, serving)
    per_seq, extra = fit_decode_terms(points) if points else (0.0, 0.0)
    serving = dataclasses.replace(serving, decode_per_seq_s=per_seq, decode_context_extra=extra)
    return serving, {"commit_residuals": len(commit_residuals_s), "submit_residuals": len(submit),
                     "rtt_residuals": len(rtt), "decode_residuals": len(points)}


SERVING_FITS = """Fitted per card, leaving the predicted file out: for each sweep file, on the other committed files of \
the same card (H100: three of four; H200: two of three), medians, in this order: (1) the decode instance's KV commit \
(the 1P1D hand-off's commit residuals at each disaggregated sweep's lowest rate); (2) the router's hand-over \
(``submit_s``): measured less simulated median queue at each colocated sweep's lowest rate; (3) the reservation's \
round trip (``control_rtt_s``): the same at each disaggregated sweep's lowest rate, with (1) and (2) in; (4) host \
work per decoding sequence and step (``decode_per_seq_s``) and the decode attention's extra cost per context token \
(``decode_context_extra``, a fraction of the rows' KV read): measured less simulated TPOT p50 at every rate of each \
disaggregated sweep, with (1) to (3) in, fitted by non-negative least squares as per sequence x the measured run's \
mean decode batch (Little's law: the simulated batch x measured / simulated TPOT) + extra x that batch's context \
seconds."""


def simulate_sweep(sweep: dict, settings: dict, model: str, probe: dict, models: dict) -> dict:
    """Simulated attainment at each measured rate of one committed sweep, under each (cost model, serving costs)."""
    slo = SLO(**sweep["slo"])
    gen = _generator(sweep, settings)
    points = sorted(sweep["points"], key=lambda p: p["rate_rps"])
    rates = [p["rate_rps"] for p in points]
    out = {"config": sweep["config"], "workload": sweep["workload"], "rates_rps": rates,
           "measured": [p["attainment"] for p in points], "measured_goodput_rps": goodput(rates, [p["attainment"]
                                                                                                 for p in points])}
    disagg = sweep["config"].startswith("disagg")
    for key, (costs, serving) in models.items():
        fleet, priced = apply_serving_costs(serving, fleet_for(sweep["config"], settings, model, probe), costs)
        sims = [simulate(fleet, priced, Trace.of(gen.requests_at(r)), keep_timelines=True) for r in rates]
        out[key] = {"attainment": [s.attainment(slo) for s in sims],
                    "ttft_p50_s": [s.percentile("ttft_s", 50) for s in sims],
                    "tpot_p50_s": [s.percentile("tpot_s", 50) for s in sims],
                    "mean_decode_batch": [mean_decode_batch(s) for s in sims]}
        out[key]["goodput_rps"] = goodput(rates, out[key]["attainment"])
        if disagg:
            out[key]["breakdown_median_s"] = [_breakdown(s) for s in sims]
    out["measured_breakdown_median_s"] = [p.get("breakdown_median_s") for p in points]
    out["measured_ttft_p50_s"] = [p["ttft_p50_s"] for p in points]
    out["measured_tpot_p50_s"] = [p["tpot_p50_s"] for p in points]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweeps", nargs="*", help="bench disagg JSONs (default: every committed disagg-h100/h200 one)")
    ap.add_argument("--rows", nargs="*", help="bench gpu JSONs (default: every committed gpu-h100-*.json)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="", help="appended to the date in the results' names (e.g. b)")
    args = ap.parse_args()
    sweep_files = args.sweeps or sorted(p for p in glob.glob("benchmarks/results/disagg-h[12]00-2026-*.json"))
    rows_files = args.rows or sorted(glob.glob("benchmarks/results/gpu-h100-*.json"))
    date = datetime.date.today().isoformat() + args.tag
    source = Path(args.out) / f"sim-validation-gpu-{date}.json"
    results, residuals, groups = [], {}, {}
    files = [(Path(path).stem, json.loads(Path(path).read_text())) for path in sweep_files]
    for stem, data in files:  # the KV commit first: one value fitted over every file
        for model, m in data["models"].items():
            anchor = _costs_of(data, model, m, rows_files)[2]
            residuals[f"{stem} {model}"] = commit_residuals(m["sweeps"], data["settings"], model, m["kv_probe"], anchor)
            groups.setdefault(stem, []).extend((sw, data["settings"], model, m["kv_probe"], anchor) for sw in m["sweeps"])
    every = [x for xs in residuals.values() for x in xs]
    commit_s = max(0.0, statistics.median(every)) if every else 0.0
    print(f"decode_commit_s fitted: {1e3 * commit_s:.2f} ms (median of {len(every)} residuals)", flush=True)
    fits = {}
    for stem, data in files:  # the serving costs: per card, on the other files of that card
        others = [o for o, d in files if o != stem and d["card"] == data["card"]]
        group = [g for o in others for g in groups[o]]
        commits = [x for key, xs in residuals.items() if key.split()[0] in others for x in xs]
        serving, counts = fit_serving(group, commits, data["card"], source)
        serving = dataclasses.replace(serving, fitted_on=tuple(others))
        fits[stem] = {**serving.as_dict(), **counts}
        print(f"{stem}: serving costs fitted on {others}: {serving}", flush=True)
    for stem, data in files:
        serving = serving_costs(data["card"], source, **{k: fits[stem][k] for k in VALUES})
        for model, m in data["models"].items():
            rows_path, rows_costs, anchor, scales = _costs_of(data, model, m, rows_files)
            scales["decode_commit_s"] = commit_s
            old = serving_costs(data["card"], source, decode_commit_s=commit_s)
            slower = dataclasses.replace(anchor, decode_s=tuple(1.1 * t for t in anchor.decode_s),
                                         decode_context_s=1.1 * anchor.decode_context_s)
            models = {SERVING: (anchor, serving), "anchored": (anchor, old), "rows": (rows_costs, old),
                      SENSITIVITY: (slower, old), NO_COMMIT: (anchor, serving_costs(data["card"], source))}
            for sweep in m["sweeps"]:
                r = simulate_sweep(sweep, data["settings"], model, m["kv_probe"], models)
                r.update(card=data["card"], model=model, sweep_file=f"{stem}.json", rows_file=Path(rows_path).name,
                         anchor_scales=scales, serving=fits[stem])
                results.append(r)
                print(stem, model, r["config"], r["workload"], r["measured"],
                      [round(a, 2) for a in r[SERVING]["attainment"]], flush=True)
    md = write(results, args.out, {"decode_commit_s": commit_s, "residuals_s": residuals, "serving_fits": fits},
               SERVING_FITS, args.tag)
    print(md.read_text())


if __name__ == "__main__":
    main()
