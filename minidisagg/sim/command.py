"""``minidisagg sim calibrate|plan``: calibrate a step-cost model on this device; search fleet splits with it."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence


TP_HELP = ("tensor-parallel degree of each instance. Only degrees the cost table measured are planned: the committed "
           "tables (benchmarks/results/gpu-*.json) time one GPU per instance, so TP is not in them today and only 1 "
           "is accepted; a --costs file is one instance as it was calibrated")


def _gpu_counts(text: str) -> list[int]:
    """``8`` -> [8]; ``8..1024`` -> [8, 16, ..., 1024] (powers of two between, both ends kept); ``2,3,6`` -> [2, 3, 6]."""
    try:
        if ".." in text:
            low, high = (int(x) for x in text.split(".."))
            if low > high:
                raise ValueError(f"--gpus: a range A..B needs A <= B, got {text!r} (try {high}..{low})")
            counts = sorted({low, high} | {2**k for k in range(31) if low < 2**k < high})
        else:
            counts = sorted({int(x) for x in text.split(",")})
    except ValueError as exc:
        if str(exc).startswith("--gpus"):
            raise
        raise ValueError(f"--gpus: expected N, A..B or a comma list of GPU counts, got {text!r}") from None
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


def _cost_source(args: argparse.Namespace):
    """(step-cost model, a line naming its source, the TP note) from --costs or --model with --card."""
    from minidisagg.sim.cost_table import GpuTable, costs_from_gpu_table, find_gpu_table
    from minidisagg.sim.costs import load_costs

    if args.costs:
        if args.tp != 1:
            raise ValueError(f"--tp {args.tp}: a --costs file is one calibrated instance; plan it at --tp 1")
        return load_costs(args.costs), f"costs: {args.costs}", "tensor parallelism: as calibrated in --costs"
    if not (args.model and args.card):
        raise ValueError("sim plan needs --costs FILE, or --model and --card to read a committed GPU cost table")
    table = GpuTable.load(args.table or find_gpu_table(args.card))
    if args.tp not in table.tensor_parallel_degrees(args.model):
        raise ValueError(f"--tp {args.tp}: {table.tp_note(args.model)}; plan at --tp 1, or measure TP rows first")
    return (costs_from_gpu_table(table, args.model), f"costs: {args.model} on {table.card} ({table.path.name})",
            table.tp_note(args.model))


def _serving_costs(args: argparse.Namespace):
    """(the card's committed serving-path costs or None, why none): None with --no-serving-costs, without --card,
    or when the committed GPU validation has no fits for the card; a corrupt validation file is an error."""
    from minidisagg.sim.serving import NoServingFits, load_serving_costs

    if args.no_serving_costs:
        return None, "--no-serving-costs"
    if not args.card:
        return None, "no --card to read them for"
    try:
        return load_serving_costs(args.card), ""
    except NoServingFits as exc:
        return None, str(exc)


def plan(argv: Sequence[str]) -> int:
    """``sim plan``: for each fleet size, the xPyD splits (and colocated) ranked by goodput per GPU under the SLO."""
    ap = argparse.ArgumentParser(prog="minidisagg sim plan", description=plan.__doc__ + " Costs come from a "
                                 "calibrated --costs file or from the committed GPU benchmark of --model on --card.")
    ap.add_argument("--costs", help="a step-cost JSON (minidisagg sim calibrate)")
    ap.add_argument("--model", help="with --card: read the model's rows from benchmarks/results/gpu-<card>-*.json")
    ap.add_argument("--card", help="h100, h200, ...: the newest committed table of that card, and its serving costs "
                    "(with --costs: only its serving costs)")
    ap.add_argument("--table", help="with --model: this gpu-*.json instead of the newest for --card")
    ap.add_argument("--tp", type=int, default=1, help=TP_HELP)
    ap.add_argument("--no-serving-costs", action="store_true",
                    help="plan on the device costs alone. By default the serving path's costs fitted for --card on the "
                         "committed two-GPU sweeps (benchmarks/results/sim-validation-gpu-*.json: KV commit, router "
                         "hand-over, reservation round trip, decode host work per sequence) are added, where that file "
                         "has the card")
    ap.add_argument("--gpus", default="2..8", help="N, A..B (powers of two between, e.g. 8..1024) or a comma list")
    ap.add_argument("--workload", choices=("chat", "summarization"),
                    help="bench disagg's workload (default: log-normal around --prompt-mean and --output-mean)")
    ap.add_argument("--rates-per-gpu", default="auto",
                    help="request rates per GPU to sweep, req/s (auto: 0.1 to 3x a capacity estimate from the costs, 1.25x apart)")
    ap.add_argument("--slo-ttft-ms", "--slo-ttft", type=float, required=True, help="TTFT target, ms")
    ap.add_argument("--slo-tpot-ms", "--slo-tpot", type=float, required=True, help="TPOT target, ms")
    ap.add_argument("--target", type=float, default=0.9, help="SLO attainment that goodput is read at")
    ap.add_argument("--prompt-mean", type=int, default=1024, help="log-normal prompt tokens, mean")
    ap.add_argument("--output-mean", type=int, default=250, help="log-normal output tokens, mean")
    ap.add_argument("--requests-per-gpu", type=int, default=40, help="requests simulated per GPU at each rate")
    ap.add_argument("--max-requests", type=int, default=20000,
                    help="cap on the requests of one simulated rate (large fleets: fewer per GPU)")
    ap.add_argument("--resolution", type=float, default=1 / 32,
                    help="beyond 8 GPUs, the best split is searched to this fraction of the fleet")
    ap.add_argument("--link-gbps", type=float, default=150.0,
                    help="KV link bandwidth per prefill instance, GB/s (two H100s over NCCL measured ~145)")
    ap.add_argument("--kv-bytes-per-token", type=int, default=0, help="default: --model's in bf16, else Llama-3-8B's")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--token-budget", type=int, default=2048)
    ap.add_argument("--num-blocks", type=int, default=16384)
    ap.add_argument("--policy", default="prefill_first", help="the colocated replicas' policy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the plan as JSON here, and its two figures (PNG) beside it")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(list(argv))
    from rich.progress import Progress

    from minidisagg.config import PRESETS
    from minidisagg.metrics import SLO
    from minidisagg.sim.fleet import FleetSpec
    from minidisagg.sim.instance import InstanceConfig
    from minidisagg.sim.link import LinkSpec
    from minidisagg.sim.plan import capacity_per_gpu_rps, plan_fleet, rate_grid
    from minidisagg.sim.plan_report import plan_lines, serving_meta, write_plan
    from minidisagg.sim.results import Trace
    from minidisagg.sim.serving import apply_serving_costs
    from minidisagg.workload import LogNormal, poisson_workload

    counts = _gpu_counts(args.gpus)
    costs, source, tp_note = _cost_source(args)
    serving, why_none = _serving_costs(args)
    serving_record = serving_meta(serving, why_none)
    slo = SLO(args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)
    if args.workload:
        from minidisagg.bench.disagg_sweep import workloads

        spec = next(w for w in workloads(smoke=False) if w.name == args.workload)
        prompts, outputs, mean_prompt, mean_output = spec.prompt_len, spec.output_len, spec.mean_prompt, spec.mean_output
    else:
        mean_prompt, mean_output = args.prompt_mean, args.output_mean
        prompts = LogNormal(mean_prompt, 0.5, 16, 8 * mean_prompt)
        outputs = LogNormal(mean_output, 0.5, 4, 8 * mean_output)
    kv_bytes = args.kv_bytes_per_token or (PRESETS[args.model].kv_bytes_per_token(2) if args.model in PRESETS else 131072)
    base = FleetSpec(1, instance=InstanceConfig(args.policy, args.max_num_seqs, args.token_budget, args.num_blocks),
                     link=LinkSpec("link", args.link_gbps), kv_bytes_per_token=kv_bytes)
    if serving is not None:
        base, costs = apply_serving_costs(serving, base, costs)
    if args.rates_per_gpu == "auto":
        rates = rate_grid(capacity_per_gpu_rps(costs, mean_prompt, mean_output, args.max_num_seqs))
    else:
        rates = _floats(args.rates_per_gpu, "--rates-per-gpu")

    def trace_for(gpus: int, rate: float) -> Trace:
        n = max(1, min(args.requests_per_gpu * gpus, args.max_requests))
        return Trace.of(poisson_workload(rate, n, prompts, outputs, seed=args.seed + int(rate * 1000)))

    print(source)
    print(serving_record["serving_costs_note"])
    print(tp_note)
    print(f"SLO: TTFT <= {args.slo_ttft_ms:g} ms, TPOT <= {args.slo_tpot_ms:g} ms at {args.target:.0%}; prompts ~"
          f"{mean_prompt}, outputs ~{mean_output} tokens; rates per GPU {', '.join(f'{r:g}' for r in rates)} req/s")
    with Progress(transient=True, disable=args.no_progress) as bar:
        tasks = {n: bar.add_task(f"{n} GPUs", total=None, start=n == counts[0]) for n in counts}

        def on_result(gpus: int, result, planned: int) -> None:
            bar.start_task(tasks[gpus])
            bar.update(tasks[gpus], advance=1, total=planned, description=f"{gpus} GPUs, {result.label}")

        fleet = plan_fleet(counts, base, costs, trace_for, rates, slo, args.target, resolution=args.resolution,
                           on_result=on_result)
    print("\n".join(plan_lines(fleet)))
    if args.out:
        meta = {"source": source, "tensor_parallel": tp_note, "model": args.model, "card": args.card,
                "workload": args.workload or f"log-normal prompts ~{mean_prompt}, outputs ~{mean_output}",
                "link_GBps": args.link_gbps, "kv_bytes_per_token": kv_bytes, **serving_record}
        title = (f"{args.model or 'costs'} on {args.card or args.costs}, {args.workload or 'log-normal'} workload"
                 + (", with serving costs" if serving else ""))
        for path in write_plan(fleet, args.out, title, **meta):
            print(f"written to {path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``calibrate`` or ``plan``, then that action's options."""
    argv = list(argv or [])
    actions = {"calibrate": calibrate, "plan": plan}
    if not argv or argv[0] not in actions:
        raise ValueError(f"minidisagg sim: expected one of {sorted(actions)}, then its options (--help)")
    return actions[argv[0]](argv[1:])
