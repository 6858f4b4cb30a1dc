"""How fast the fleet simulator runs: simulated requests per second of host time, by fleet size and request count.

xPyD fleets (half prefill, half decode instances, least-loaded routing) on a Llama-8B-like H100 cost
model, Poisson arrivals at a rate that keeps every instance busy but not overloaded; each point is
simulated once with the fast path and, where small enough, once step by step (the ratio is the
fast path's gain, measured side by side). Writes ``benchmarks/results/<name>.json`` and ``.md`` (``--name``,
default ``sim-scale-<date>``; an existing file is not overwritten). Each row runs in a fresh process and records
the host's load average (``/proc/loadavg``) before and after it (the host is shared) and a digest of the
simulated per-request figures. ``--baseline DIR`` runs every row also with the ``minidisagg`` found in ``DIR``
(e.g. ``git archive <commit> | tar -x -C DIR``), just before the current code's: both on the same trace and
host minutes, and equal digests show both simulated the same outputs.

    PYTHONPATH=. python benchmarks/sim_scale.py --points 8:2000 8:20000 64:20000 --big 1024:100000 1024:1000000
    PYTHONPATH=. python benchmarks/sim_scale.py --baseline /tmp/old --baseline-label 75ca7af --name sim-scale-x
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
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
    digest = hashlib.sha256()
    for name in ("ttft_s", "tpot_s", "e2e_s", "num_output_tokens", "instance"):
        digest.update(getattr(res, name).tobytes())
    return {"instances": num_instances, "requests": num_requests, "fast": fast, "host_s": host_s,
            "requests_per_host_s": num_requests / host_s, "events": res.num_events,
            "scheduled_steps": sum(s.scheduled_steps for s in stats), "fast_steps": sum(s.fast_steps for s in stats),
            "simulated_s": float((res.arrival_s + res.e2e_s).max()), "ttft_p50_s": res.percentile("ttft_s", 50),
            "tpot_p50_s": res.percentile("tpot_s", 50), "load_1min_before": load_before,
            "load_1min": os.getloadavg()[0], "requests_per_decode_instance": num_requests / spec.num_decode,
            "outputs_sha256": digest.hexdigest()}


def _git_commit(path: Path) -> str:
    res = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if res.returncode != 0:
        return "unknown"
    dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no", "minidisagg"],
                           capture_output=True, text=True).stdout.strip()
    return res.stdout.strip() + ("+changes" if dirty else "")


def run_row(code_dir: Path, label: str, point: str, fast: bool) -> dict:
    """One row in a fresh process whose ``minidisagg`` is the one in ``code_dir``; ``code`` names it."""
    env = {**os.environ, "PYTHONPATH": str(code_dir)}
    proc = subprocess.run([sys.executable, __file__, "--one", f"{point}:{'fast' if fast else 'slow'}"], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{label} {point}: {proc.stderr[-2000:]}")
    return {"code": label, **json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", nargs="+", default=["8:20000", "64:20000", "1024:20000"],
                    help="INSTANCES:REQUESTS, each run fast and step by step")
    ap.add_argument("--big", nargs="*", default=["8:200000", "1024:100000", "1024:300000", "1024:1000000"],
                    help="INSTANCES:REQUESTS, fast path only")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default=None, help="file name without extension (default: sim-scale-<date>)")
    ap.add_argument("--baseline", default=None, help="a directory holding another minidisagg to run each row with too")
    ap.add_argument("--baseline-label", default=None, help="what to call the baseline code (default: its git commit)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # INSTANCES:REQUESTS:fast|slow, a row as JSON
    args = ap.parse_args()
    if args.one:
        n, r, path = args.one.split(":")
        print(json.dumps(one(int(n), int(r), path == "fast")))
        return
    date = datetime.date.today().isoformat()
    name = args.name or f"sim-scale-{date}"
    out = Path(args.out)
    if (out / f"{name}.json").exists() or (out / f"{name}.md").exists():
        raise SystemExit(f"{out / name}.json or .md exists: pass another --name")
    here = Path(__file__).resolve().parent.parent
    codes = [(here, _git_commit(here))]
    if args.baseline:
        base = Path(args.baseline).resolve()
        codes.insert(0, (base, args.baseline_label or _git_commit(base)))
    jobs = [(p, True) for p in args.points] + [(p, False) for p in args.points] + [(p, True) for p in args.big]
    jobs.sort(key=lambda j: (j[0] in args.big, int(j[0].split(":")[1]), int(j[0].split(":")[0]), not j[1]))
    rows = []
    for point, fast in jobs:
        for code_dir, label in codes:
            rows.append(run_row(code_dir, label, point, fast))
            print(rows[-1], flush=True)
    goal_rate = 1_000_000 / 60
    result = {"benchmark": "sim_scale", "date": date, "code": [label for _, label in codes],
              "python": platform.python_version(), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores (shared)", "cost_model": H100_8B.describe(), "rows": rows,
              "goal": "1M requests on 1024 instances in <= 60 s: 16,667 requests per host second"}
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Simulator speed ({date}; code {', '.join(result['code'])})", "",
             f"{result['machine']}, Python {result['python']}; cost model: {H100_8B.describe()}", "",
             "xPyD, half prefill and half decode instances, least-loaded routing, chunked decode instances, "
             f"{PER_DECODE_RPS:.0f} requests/s per decode instance, prompts 128..1024, outputs 32..256 tokens. "
             "Each row in a fresh process; rows of one point and path run one after the other.", "",
             "| code | instances | requests | path | host s | requests / host s | events | scheduler steps | "
             "fast-path steps | load before, after | outputs sha256 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['code']} | {r['instances']} | {r['requests']} | {'fast' if r['fast'] else 'step by step'} | "
                     f"{r['host_s']:.1f} | {r['requests_per_host_s']:.0f} | {r['events']} | {r['scheduled_steps']} | "
                     f"{r['fast_steps']} | {r['load_1min_before']:.1f}, {r['load_1min']:.1f} | "
                     f"{r['outputs_sha256'][:12]} |")
    lines += ["", f"Goal: {goal_rate:.0f} requests per host second (1M on 1024 instances in 60 s)."]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
