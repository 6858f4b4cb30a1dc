"""Validate the fleet simulator against the committed two-GPU ``bench disagg`` sweeps.

For every sweep (configuration x workload) of a committed ``disagg-<card>-<date>.json``, the simulator
replays the very requests the sweep generated at each measured rate (``Sweep.requests_at``: the same
lengths, arrivals and seeds) on the same deployment: two colocated replicas (least-loaded routing) or one
prefill and one decode instance joined by a link at the sweep's measured KV bandwidth, each instance
priced by a step-cost model calibrated on the same card (``python -m minidisagg.sim.costs``). It compares
SLO attainment per rate, goodput (the 90% crossing, ``metrics.goodput``) and the sign of disaggregated
against colocated goodput per GPU. Layer-wise overlap of the KV transfer is not modelled: both disagg
configurations are simulated alike. Writes ``benchmarks/results/sim-validation-gpu-<date>.json`` and ``.md``.

    PYTHONPATH=. python benchmarks/sim_gpu_validation.py \\
        --pair benchmarks/results/disagg-h100-2026-11-28.json benchmarks/results/sim-costs-llama-8b-h100-2026-12-07.json
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from minidisagg.bench.disagg_sweep import Sweep, workloads
from minidisagg.metrics import SLO, goodput
from minidisagg.sim import FleetSpec, InstanceConfig, LinkSpec, Trace, simulate
from minidisagg.sim.costs import load_costs

KV_BYTES_PER_TOKEN = {"llama-8b": 131072, "llama-1b": 32768}  # bf16: 2 x layers x KV heads x head dim x 2 bytes
NUM_BLOCKS = 16384  # the GPU pools hold far more than these sweeps keep in flight


def simulate_sweep(sweep: dict, settings: dict, model: str, probe: dict, costs_path: str) -> dict:
    """Simulated attainment at each measured rate of one committed sweep."""
    costs = load_costs(costs_path)
    spec = {w.name: w for w in workloads(False)}[sweep["workload"]]
    slo = SLO(**sweep["slo"])
    config = sweep["config"]
    gen = Sweep(config, spec, slo, [], settings["window_s"], settings["min_requests"], settings["max_requests"],
                0.0, 0.0, seed=settings["seed"])
    if config.startswith("colocated-"):
        policy = config.split("-", 1)[1]
        budget = settings["chunked_token_budget"] if policy == "chunked" else settings["prefill_token_budget"]
        fleet = FleetSpec(2, 0, InstanceConfig(policy, settings["max_num_seqs"], budget, NUM_BLOCKS),
                          routing="least_loaded")
    else:
        link = LinkSpec("measured", probe["best_GBps"], 0.0)
        fleet = FleetSpec(1, 1, InstanceConfig("prefill_first", settings["max_num_seqs"],
                                               settings["prefill_token_budget"], NUM_BLOCKS),
                          link=link, kv_bytes_per_token=KV_BYTES_PER_TOKEN[model])
    rows = []
    for point in sweep["points"]:
        requests = gen.requests_at(point["rate_rps"])
        res = simulate(fleet, costs, Trace.of(requests))
        rows.append({"rate_rps": point["rate_rps"], "num_requests": len(requests), "measured": point["attainment"],
                     "simulated": res.attainment(slo), "measured_ttft_p50_s": point["ttft_p50_s"],
                     "simulated_ttft_p50_s": res.percentile("ttft_s", 50), "measured_tpot_p50_s": point["tpot_p50_s"],
                     "simulated_tpot_p50_s": res.percentile("tpot_s", 50)})
    rates = [r["rate_rps"] for r in rows]
    return {"config": config, "workload": sweep["workload"], "rows": rows,
            "measured_goodput_rps": goodput(rates, [r["measured"] for r in rows]),
            "simulated_goodput_rps": goodput(rates, [r["simulated"] for r in rows])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", nargs=2, action="append", metavar=("SWEEP_JSON", "COSTS_JSON"), required=True)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    results = []
    for sweep_path, costs_path in args.pair:
        data = json.loads(Path(sweep_path).read_text())
        for model, m in data["models"].items():
            for sweep in m["sweeps"]:
                r = simulate_sweep(sweep, data["settings"], model, m["kv_probe"], costs_path)
                r.update(card=data["card"], model=model, sweep_file=sweep_path, costs_file=costs_path)
                results.append(r)
                print(r["card"], r["config"], r["workload"], [(x["rate_rps"], x["measured"], round(x["simulated"], 2))
                                                             for x in r["rows"]], flush=True)
    signs = []
    for card, model, wl in sorted({(r["card"], r["model"], r["workload"]) for r in results}):
        group = {r["config"]: r for r in results if (r["card"], r["model"], r["workload"]) == (card, model, wl)}
        colo = group.get("colocated-prefill_first")
        dis = [r for c, r in group.items() if c.startswith("disagg")]
        if colo and dis:
            # per GPU: both deployments use two GPUs, so goodput compares directly
            meas = max(r["measured_goodput_rps"] for r in dis) - colo["measured_goodput_rps"]
            sim = max(r["simulated_goodput_rps"] for r in dis) - colo["simulated_goodput_rps"]
            signs.append({"card": card, "model": model, "workload": wl, "measured_disagg_minus_colocated_rps": meas,
                          "simulated_disagg_minus_colocated_rps": sim, "sign_agrees": (meas > 0) == (sim > 0)})
    date = datetime.date.today().isoformat()
    out = Path(args.out)
    (out / f"sim-validation-gpu-{date}.json").write_text(json.dumps({"benchmark": "sim_gpu_validation", "date": date,
                                                                      "sweeps": results, "signs": signs}, indent=1))
    lines = [f"# Simulator against the committed two-GPU sweeps ({date})", "",
             "Attainment measured / simulated at each measured rate (the same requests), goodput = the 90% crossing.", "",
             "| card | model | config | workload | rate req/s: attainment measured / simulated | goodput measured / simulated |",
             "|---|---|---|---|---|---|"]
    for r in results:
        pts = ", ".join(f"{x['rate_rps']}: {x['measured']:.2f} / {x['simulated']:.2f}" for x in r["rows"])
        lines.append(f"| {r['card']} | {r['model']} | {r['config']} | {r['workload']} | {pts} | "
                     f"{r['measured_goodput_rps']:.2f} / {r['simulated_goodput_rps']:.2f} |")
    lines += ["", "Disaggregated (best of the two) minus colocated prefill_first goodput, req/s:", "",
              "| card | model | workload | measured | simulated | sign agrees |", "|---|---|---|---|---|---|"]
    lines += [f"| {s['card']} | {s['model']} | {s['workload']} | {s['measured_disagg_minus_colocated_rps']:+.2f} | "
              f"{s['simulated_disagg_minus_colocated_rps']:+.2f} | {'yes' if s['sign_agrees'] else 'NO'} |" for s in signs]
    (out / f"sim-validation-gpu-{date}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
