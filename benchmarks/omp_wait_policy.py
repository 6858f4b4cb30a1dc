"""Why stepping the engine from a process's main thread ran 5-10x slower on a loaded CPU host: OpenMP's wait policy.

Each round starts one child process per ``OMP_WAIT_POLICY`` (unset, ``PASSIVE``, ``ACTIVE``, and unset with
``GOMP_SPINCOUNT=10000``, a short spin; the policy
must be set before torch loads its OpenMP runtime, hence processes). A child loads the model once, then
times the same greedy work stepped from its main thread and from a second thread, alternately: a batch
of 8 prompts x 16 new tokens, and one prompt x 32 new tokens (batch-1 decode, where each op is small
and the threads' hand-offs are most frequent). Rounds interleave the policies so the host's load touches
them alike; ``/proc/loadavg`` is recorded per child. Writes ``omp-wait-policy-cpu-<date>.json`` and ``.md``.

    PYTHONPATH=. python benchmarks/omp_wait_policy.py --model smollm2-135m --rounds 3 [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable

POLICIES = ("unset", "PASSIVE", "ACTIVE", "spin 10k")  # spin 10k: unset policy, GOMP_SPINCOUNT=10000
PLACEMENTS = ("main thread", "second thread")
WORKLOADS = {"8 prompts x 16 tokens": (8, 16), "1 prompt x 32 tokens": (1, 32)}


def _child(model: str, repeats: int) -> dict[str, Any]:
    """In a child process: seconds per workload and placement, ``repeats`` alternating runs each."""
    from minidisagg.engine.sampling import SamplingParams
    from minidisagg.llm import LLM

    llm = LLM(model, device="cpu", dtype="float32")
    times: dict[str, dict[str, list[float]]] = {w: {p: [] for p in PLACEMENTS} for w in WORKLOADS}

    def timed(num_prompts: int, new_tokens: int) -> float:
        prompts = [{"prompt_token_ids": list(range(100 + i, 164 + i))} for i in range(num_prompts)]
        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t0

    def on_thread(fn: Callable[[], float]) -> float:
        out: list[float] = []
        worker = threading.Thread(target=lambda: out.append(fn()))
        worker.start()
        worker.join()
        return out[0]

    for shape in WORKLOADS.values():  # warm-up of both placements
        timed(*shape)
        on_thread(lambda: timed(*shape))
    load_before = os.getloadavg()[0]
    for _ in range(repeats):
        for name, shape in WORKLOADS.items():
            times[name]["main thread"].append(timed(*shape))
            times[name]["second thread"].append(on_thread(lambda: timed(*shape)))
    return {"times_s": times, "load_1min_before": load_before, "load_1min_after": os.getloadavg()[0]}


def busy_processes(count: int) -> list[subprocess.Popen]:
    """``count`` processes that spin a CPU each until killed: a host as busy as a shared one, on purpose."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def run(model: str, rounds: int, repeats: int, policies: tuple[str, ...] = POLICIES,
        background_load: int = 0) -> list[dict[str, Any]]:
    """All rounds: one child per policy per round, in turn (beside ``background_load`` busy processes); results."""
    from rich.progress import track

    plan = [(r, p) for r in range(rounds) for p in policies]
    busy = busy_processes(background_load)
    try:
        return _children(plan, model, repeats, track)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()


def _children(plan: list[tuple[int, str]], model: str, repeats: int, track: Callable) -> list[dict[str, Any]]:
    """One child process per (round, policy) of ``plan``, in order; their results."""
    runs = []
    for r, policy in track(plan, description="children (policy, round)"):
        env = dict(os.environ)
        env.pop("OMP_WAIT_POLICY", None)
        env.pop("GOMP_SPINCOUNT", None)
        env["MINIDISAGG_KEEP_OMP_POLICY"] = "1"  # the child's ``import minidisagg`` leaves the policy as given
        if policy == "spin 10k":
            env["GOMP_SPINCOUNT"] = "10000"
        elif policy != "unset":
            env["OMP_WAIT_POLICY"] = policy
        out = subprocess.run([sys.executable, __file__, "--child", "--model", model, "--repeats", str(repeats)],
                             env=env, capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            raise RuntimeError(f"child ({policy}) failed:\n{out.stderr[-2000:]}")
        runs.append({"round": r, "policy": policy, **json.loads(out.stdout.strip().splitlines()[-1])})
    return runs


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Median seconds per (workload, policy, placement) over every run, plus the spread (max / min)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for workload in WORKLOADS:
        for policy in [p for p in POLICIES if any(r["policy"] == p for r in runs)]:
            for placement in PLACEMENTS:
                xs = [t for r in runs if r["policy"] == policy for t in r["times_s"][workload][placement]]
                out.setdefault(workload, {})[f"{policy}, {placement}"] = {
                    "median_s": statistics.median(xs), "min_s": min(xs), "max_s": max(xs), "n": len(xs)}
    return out


def to_markdown(result: dict[str, Any], date: str) -> str:
    """The summary as a table: median (min-max) seconds, and each cell against PASSIVE on a second thread."""
    m, args = result["machine"], result["args"]
    loads = [r["load_1min_before"] for r in result["rows"]] + [r["load_1min_after"] for r in result["rows"]]
    lines = [f"# OpenMP wait policy and the stepping thread ({date})", "",
             f"{result['model']} float32 on {m['cpu']} ({m['cores']} cores, torch {m['torch']}, "
             f"{m['torch_threads']} torch threads); {args['rounds']} rounds x {args['repeats']} runs per child; "
             f"{args.get('background_load', 0)} busy processes beside it; "
             f"load average (1 min) {min(loads):.1f} to {max(loads):.1f}.", "",
             "| workload | policy, placement | median s | min-max s | / PASSIVE, second thread |", "|---|---|---:|---:|---:|"]
    for workload, cells in result["summary"].items():
        base = cells["PASSIVE, second thread"]["median_s"] if "PASSIVE, second thread" in cells else math.nan
        for cell, v in cells.items():
            lines.append(f"| {workload} | {cell} | {v['median_s']:.2f} | {v['min_s']:.2f}-{v['max_s']:.2f} | "
                         f"{v['median_s'] / base:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Parse the arguments; run as the parent (all rounds) or as one child."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="runs per workload and placement in each child")
    ap.add_argument("--policies", default=",".join(POLICIES), help=f"a subset of {', '.join(POLICIES)}")
    ap.add_argument("--background-load", type=int, default=0, help="busy processes to run beside the children")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    from minidisagg.bench.common import add_output_args, finish_run, machine_info

    add_output_args(ap, "omp-wait-policy")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.model, args.repeats)))
        return
    args.device = "cpu"
    info = machine_info()
    policies = tuple(p.strip() for p in args.policies.split(","))
    if not set(policies) <= set(POLICIES) or not policies:
        ap.error(f"--policies: choose from {', '.join(POLICIES)}")
    runs = run(args.model, args.rounds, args.repeats, policies, args.background_load)
    finish_run("omp_wait_policy", args, info, runs, summarise(runs), "omp-wait-policy", to_markdown)


if __name__ == "__main__":
    main()
