"""``minidisagg sim calibrate|plan``: calibrate a step-cost model on this device; search fleet splits with it."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence


def _gpu_counts(text: str) -> list[int]:
    """``8`` -> [8]; ``2..16`` -> [2, 4, 8, 16] (powers of two between, both ends kept); ``2,3,6`` -> [2, 3, 6]."""
    try:
        if ".." in text:
            low, high = (int(x) for x in text.split(".."))
            counts = sorted({low, high} | {2**k for k in range(31) if low < 2**k < high})
        else:
            counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--gpus: expected N, A..B or a comma list, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise ValueError(f"--gpus: GPU counts must be >= 1, got {text!r}")
    return counts


def _floats(text: str, name: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise ValueError(f"{name}: every value must be > 0, got {text!r}")
    return values


def calibrate(argv: Sequence[str]) -> int:
    """``sim calibrate``: time the engine's stages on this device and save the step-cost model as JSON."""
    ap = argparse.ArgumentParser(prog="minidisagg sim calibrate", description=calibrate.__doc__)
    ap.add_argument("--model", default="llama-8b", help="a model name (random weights: costs need only its shapes)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-prompt", type=int, default=2048, help="longest prefill timed, tokens")
    ap.add_argument("--max-batch", type=int, default=64, help="largest decode batch timed")
    ap.add_argument("--max-context", type=int, default=0, help="longest context timed (default: --max-prompt)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args(list(argv))
    from minidisagg.sim.costs import calibrate_costs, save_costs

    costs = calibrate_costs(args.model, args.device, args.max_prompt, args.max_batch, args.max_context, args.repeats)
    save_costs(costs, args.out, model=args.model)
    print(costs.describe())
    print(f"written to {args.out}")
    return 0


def plan(argv: Sequence[str]) -> int:
    """``sim plan``: for each GPU count, every split (colocated, xPyD) ranked by goodput per GPU under the SLO."""
    ap = argparse.ArgumentParser(prog="minidisagg sim plan", description=plan.__doc__)
    ap.add_argument("--costs", required=True, help="a step-cost JSON (minidisagg sim calibrate)")
    ap.add_argument("--gpus", default="2..8", help="N, A..B (powers of two between) or a comma list")
    ap.add_argument("--rates-per-gpu", default="0.5,1,2,4,8", help="request rates per GPU to sweep, req/s")
    ap.add_argument("--slo-ttft-ms", type=float, required=True)
    ap.add_argument("--slo-tpot-ms", type=float, required=True)
    ap.add_argument("--prompt-mean", type=int, default=1024, help="log-normal prompt tokens, mean")
    ap.add_argument("--output-mean", type=int, default=250, help="log-normal output tokens, mean")
    ap.add_argument("--requests-per-gpu", type=int, default=100, help="requests simulated per GPU at each rate")
    ap.add_argument("--link-gbps", type=float, default=150.0, help="KV link bandwidth per prefill instance, GB/s")
    ap.add_argument("--kv-bytes-per-token", type=int, default=131072, help="default: Llama-3-8B in bf16")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--token-budget", type=int, default=2048)
    ap.add_argument("--num-blocks", type=int, default=16384)
    ap.add_argument("--policy", default="prefill_first", help="the colocated replicas' policy")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(list(argv))
    from minidisagg.metrics import SLO
    from minidisagg.sim.costs import load_costs
    from minidisagg.sim.fleet import FleetSpec
    from minidisagg.sim.instance import InstanceConfig
    from minidisagg.sim.link import LinkSpec
    from minidisagg.sim.plan import plan_splits
    from minidisagg.sim.results import Trace
    from minidisagg.workload import LogNormal, poisson_workload

    costs = load_costs(args.costs)
    slo = SLO(args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)
    rates = _floats(args.rates_per_gpu, "--rates-per-gpu")
    prompts = LogNormal(args.prompt_mean, 0.5, 16, 8 * args.prompt_mean)
    outputs = LogNormal(args.output_mean, 0.5, 4, 8 * args.output_mean)
    base = FleetSpec(1, instance=InstanceConfig(args.policy, args.max_num_seqs, args.token_budget, args.num_blocks),
                     link=LinkSpec("link", args.link_gbps), kv_bytes_per_token=args.kv_bytes_per_token)
    for gpus in _gpu_counts(args.gpus):
        n = args.requests_per_gpu * gpus

        def trace_at(rate: float) -> Trace:
            return Trace.of(poisson_workload(rate, n, prompts, outputs, seed=args.seed + int(rate * 1000)))

        results = plan_splits(gpus, base, costs, trace_at, rates, slo)
        print(f"{gpus} GPUs (rates {', '.join(f'{r * gpus:g}' for r in rates)} req/s, {n} requests each):")
        for r in results:
            atts = " ".join(f"{a:.2f}" for a in r.attainments)
            print(f"  {r.label:>14}  goodput {r.goodput_rps:7.2f} req/s  per GPU {r.goodput_per_gpu_rps:6.2f}  "
                  f"attainment {atts}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``calibrate`` or ``plan``, then that action's options."""
    argv = list(argv or [])
    actions = {"calibrate": calibrate, "plan": plan}
    if not argv or argv[0] not in actions:
        raise ValueError(f"minidisagg sim: expected one of {sorted(actions)}, then its options (--help)")
    return actions[argv[0]](argv[1:])
