"""How fast the fleet simulator runs: simulated requests per second of host time, by fleet size and request count.

xPyD fleets (half prefill, half decode instances, least-loaded routing) on a Llama-8B-like H100 cost
model, Poisson arrivals at a rate that keeps every instance busy but not overloaded; each point is
simulated once with the fast path and, where small enough, once step by step (the ratio is the
fast path's gain, measured side by side). Writes ``benchmarks/results/sim-scale-<date>.json`` and ``.md``.
Each row records the host's load average (``/proc/loadavg``) before and after it: the host is shared.

    PYTHONPATH=. python benchmarks/sim_scale.py --points 8:2000 8:20000 64:20000 --big 1024:100000 1024:1000000
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

from minidisagg.engine.step_cost import StepCostModel
from minidisagg.sim import FleetSpec, InstanceConfig, Trace, simulate
from minidisagg.workload import Uniform, poisson_workload

# Llama-3-8B bf16 on one H100, rounded from the committed bench gpu rows' orders of magnitude (not a calibration:
# the simulator's speed depends on batch sizes and event counts, which this keeps realistic)
H100_8B = StepCostModel(prefill_fixed_s=5e-3, prefill_per_token_s=6e-5, prefill_per_pair_s=1e-10,
                        decode_batch_sizes=(1, 8, 32, 128, 256), decode_s=(7e-3, 7.5e-3, 9e-3, 14e-3, 22e-3),
                        decode_context_s=5e-9, decode_reference_context=512, device="h100 (synthetic)")
PER_DECODE_RPS = 20.0  # arrivals per decode instance per second


def trace_for(num_instances: int, num_requests: int, seed: int = 0) -> Trace:
    """Poisson arrivals for a fleet of ``num_instances``: prompts 128..1024 tokens, outputs 32..256."""
    rate = PER_DECODE_RPS * max(1, num_instances // 2)
    return Trace.of(poisson_workload(rate, num_requests, Uniform(128, 1024), Uniform(32, 256), seed=seed))


def one(num_instances: int, num_requests: int, fast: bool) -> dict:
    """Simulate one point and time it."""
    trace = trace_for(num_instances, num_requests)
    spec = FleetSpec(num_decode=num_instances - num_instances // 2, num_prefill=num_instances // 2,
                     instance=InstanceConfig("chunked", max_num_seqs=256, max_num_batched_tokens=2048, num_blocks=16384),
                     routing="least_loaded")
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = simulate(spec, H100_8B, trace, fast=fast)
    host_s = time.perf_counter() - t0
    stats = [i.stats for i in res.instances]
    return {"instances": num_instances, "requests": num_requests, "fast": fast, "host_s": host_s,
            "requests_per_host_s": num_requests / host_s, "events": res.num_events,
            "scheduled_steps": sum(s.scheduled_steps for s in stats), "fast_steps": sum(s.fast_steps for s in stats),
            "simulated_s": float((res.arrival_s + res.e2e_s).max()), "ttft_p50_s": res.percentile("ttft_s", 50),
            "tpot_p50_s": res.percentile("tpot_s", 50), "load_1min_before": load_before,
            "load_1min": os.getloadavg()[0], "requests_per_decode_instance": num_requests / spec.num_decode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", nargs="+", default=["8:20000", "64:20000", "1024:20000"],
                    help="INSTANCES:REQUESTS, each run fast and step by step")
    ap.add_argument("--big", nargs="*", default=["8:200000", "1024:100000", "1024:1000000"],
                    help="INSTANCES:REQUESTS, fast path only")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    rows = []
    for point in args.points:
        n, r = map(int, point.split(":"))
        for fast in (True, False):
            rows.append(one(n, r, fast))
            print(rows[-1], flush=True)
    for point in args.big:
        n, r = map(int, point.split(":"))
        rows.append(one(n, r, True))
        print(rows[-1], flush=True)
    date = datetime.date.today().isoformat()
    goal_rate = 1_000_000 / 60
    result = {"benchmark": "sim_scale", "date": date, "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores (shared)", "cost_model": H100_8B.describe(), "rows": rows,
              "goal": "1M requests on 1024 instances in <= 60 s: 16,667 requests per host second"}
    out = Path(args.out)
    (out / f"sim-scale-{date}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Simulator speed ({date})", "", f"{result['machine']}; cost model: {H100_8B.describe()}", "",
             "xPyD, half prefill and half decode instances, least-loaded routing, chunked decode instances, "
             f"{PER_DECODE_RPS:.0f} requests/s per decode instance, prompts 128..1024, outputs 32..256 tokens.", "",
             "| instances | requests | path | host s | requests / host s | events | scheduler steps | fast-path steps | load before, after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['instances']} | {r['requests']} | {'fast' if r['fast'] else 'step by step'} | "
                     f"{r['host_s']:.1f} | {r['requests_per_host_s']:.0f} | {r['events']} | {r['scheduled_steps']} | "
                     f"{r['fast_steps']} | {r['load_1min_before']:.1f}, {r['load_1min']:.1f} |")
    lines += ["", f"Goal: {goal_rate:.0f} requests per host second (1M on 1024 instances in 60 s)."]
    (out / f"sim-scale-{date}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
