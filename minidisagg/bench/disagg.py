"""``minidisagg bench disagg``: disaggregated 1P1D against two colocated replicas on the same two GPUs.

For each model: two colocated engines, one per GPU, behind a least-loaded router
(``ReplicaCluster``; policies ``prefill_first`` and ``chunked``), then 1P1D with the prefill
worker on GPU 0 and the decode worker on GPU 1, KV over the ``dist`` transport (NCCL),
layer-wise overlap on and off. Each runs timed Poisson workloads ("chat": prompts ~1k,
outputs ~250; "summarization": prompts ~4k, outputs ~100) at increasing rates; SLOs are
multiples of unloaded latencies measured first on one replica. The report: SLO attainment
against rate, goodput per GPU, p50/p99 TTFT and ITL at a fixed rate, ITL timelines, a TTFT
breakdown, KV bytes and bandwidth against a plain send/recv ceiling, and a greedy check
that disaggregated tokens equal colocated ones. Results: ``disagg-<card>-<date>.{json,md}``
and PNGs under ``--out`` (rewritten after every phase, so a cut-off run still leaves them).

GPU run (two GPUs of one host; everything under $OUT; at most ``--time-budget-s`` of sweeps)::

    NCCL_NVLS_ENABLE=0 python -m minidisagg.cli bench disagg --models llama-1b,llama-8b --out $OUT --time-budget-s 540

CPU smoke (model ``tiny``, gloo, both workers on the CPU, few requests; under a minute)::

    python -m minidisagg.cli bench disagg --smoke --out /tmp/disagg-smoke

A run is, per model: three deployments started (weights, CUDA graphs, NCCL), calibration, the
greedy check, the KV probe and ceiling, and eight sweeps of a few rates each (what each part
took on H100s is in ``benchmarks/NOTES.md``, "Figures behind the code"). The time budget is
split over the models and then over the sweeps left; a sweep skips the rates that would
overrun its share and stops after the first rate below 50% attainment, so the whole run ends
within the budget plus one rate and a shutdown.
Every wait has a timeout: worker start (300 s), each request (deadline after the last arrival),
transfers (the NCCL process group's timeout), the ceiling (120 s).
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from minidisagg.bench.args import disagg_parser
from minidisagg.bench.disagg_link import compare_greedy, greedy_prompts, greedy_tokens, measure_ceiling, probe_transfer
from minidisagg.bench.disagg_report import card_name, machine_summary, write_results
from minidisagg.bench.disagg_sweep import Sweep, calibrate, choose_slo, rate_grid, workloads
from minidisagg.config import CacheConfig, EngineConfig
from minidisagg.disagg.replicas import ReplicaCluster
from minidisagg.kv.pages import KVLayout

CONFIGS = ("colocated-prefill_first", "colocated-chunked", "disagg-overlap", "disagg-no-overlap")
GPUS_PER_CONFIG = 2  # 2 replicas, or 1 prefill + 1 decode worker


@dataclass
class Settings:
    """Everything that shapes a run (recorded in the JSON)."""

    models: list[str]
    devices: list[str]
    smoke: bool = False
    time_budget_s: float = 480.0
    window_s: float = 4.0  # arrivals span about this long at each rate
    min_requests: int = 10
    max_requests: int = 150
    rate_multipliers: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0, 1.4, 2.0])
    rates_rps: Optional[list[float]] = None  # explicit rates instead of the calibrated grid
    fixed_rate_index: int = 1
    refine_points: int = 3  # per sweep, after the grid: lower rates if the lowest fails, then bisection
    ttft_slo_scale: float = 5.0
    tpot_slo_scale: float = 1.5
    max_num_seqs: int = 64
    prefill_token_budget: int = 2048
    chunked_token_budget: int = 512
    num_kv_blocks: Optional[int] = None
    kv_layout: Optional[str] = None  # KV pool layout of every engine (None: the device default)
    batch_invariant: bool = False
    greedy_prompts: int = 4
    greedy_tokens: int = 16
    probe_tokens: int = 2048
    calibration_repeats: int = 3
    timeline_requests: int = 24
    reserve_s: float = 20.0  # per model, for what is not a sweep or a launch (calibration, probe, ceiling)
    threads: int = 0
    seed: int = 0


def smoke_settings(out_models: Optional[list[str]] = None) -> Settings:
    """The CPU smoke run: tiny model, both workers on the CPU, a few requests at two rates."""
    return Settings(models=out_models or ["tiny"], devices=["cpu", "cpu"], smoke=True, time_budget_s=45.0,
                    window_s=0.4, min_requests=4, max_requests=4, rates_rps=[4.0, 12.0, 40.0], fixed_rate_index=0,
                    ttft_slo_scale=5.0, tpot_slo_scale=3.0, max_num_seqs=16, prefill_token_budget=512,
                    chunked_token_budget=64, num_kv_blocks=256, batch_invariant=True, greedy_prompts=3,
                    greedy_tokens=6, probe_tokens=128, calibration_repeats=1, timeline_requests=4, reserve_s=3.0,
                    threads=1, refine_points=1)


class Budget:
    """The run's time budget: split over models, then over the sweeps left."""

    def __init__(self, total_s: float) -> None:
        self.total_s = total_s
        self.start = time.monotonic()

    def left_s(self) -> float:
        """Seconds left of the whole budget."""
        return self.total_s - (time.monotonic() - self.start)


def _engine_config(s: Settings, policy: str = "prefill_first") -> EngineConfig:
    budget = s.chunked_token_budget if policy == "chunked" else s.prefill_token_budget
    return EngineConfig(max_num_seqs=s.max_num_seqs, max_num_batched_tokens=budget, policy=policy,
                        batch_invariant=s.batch_invariant, cache=CacheConfig(num_blocks=s.num_kv_blocks,
                                                                             layout=s.kv_layout))


def _disagg(model: str, s: Settings, overlap: bool) -> Any:
    from minidisagg import LLM

    device = "cpu" if s.devices[0] == "cpu" else "cuda"
    return LLM(model, device=device, mode="disagg", transport="dist", random_weights=True, seed=s.seed,
               kv_overlap=overlap, max_num_seqs=s.max_num_seqs, max_num_batched_tokens=s.prefill_token_budget,
               num_kv_blocks=s.num_kv_blocks, kv_layout=s.kv_layout, batch_invariant=s.batch_invariant,
               request_timeout_s=300.0,
               prefill_devices=[s.devices[0]], decode_devices=[s.devices[1]], worker_threads=s.threads)


def greedy_check(engine: Any, reference: list[Optional[list[int]]], prompts: list[list[int]],
                 max_tokens: int) -> dict[str, Any]:
    """``compare_greedy`` of ``engine``'s tokens against ``reference``; a check that raises is recorded as unequal,
    with its error, so the report always has the key and says why."""
    try:
        return compare_greedy(reference, greedy_tokens(engine, prompts, max_tokens))
    except Exception as exc:  # noqa: BLE001 - the sweeps still run; the report says what failed
        return {"num_prompts": len(prompts), "equal": False, "mismatches": [],
                "error": f"{type(exc).__name__}: {exc}"}


def run_model(model: str, s: Settings, budget: Budget, model_budget_s: float, save: Callable[[], None],
              res: dict[str, Any], log: Callable[[str], None] = print) -> None:
    """Every phase for one model, filling ``res`` as it goes (``save`` after each phase)."""
    t0 = time.monotonic()
    specs = workloads(s.smoke)
    sweeps_left = len(CONFIGS) * len(specs)
    launches_left, launch_s = 3, 0.0

    def allowance() -> float:
        model_left = model_budget_s - (time.monotonic() - t0) - launches_left * launch_s - s.reserve_s
        return max(0.0, min(model_left, budget.left_s() - s.reserve_s)) / max(1, sweeps_left)

    def sweep_all(config: str, engine: Any, assignment: Optional[Callable[[], dict[str, int]]] = None) -> None:
        nonlocal sweeps_left
        for spec in specs:
            sweep = plans[spec.name]
            if budget.left_s() <= s.reserve_s:  # out of time: record what was not measured
                res.setdefault("skipped_sweeps", []).append(f"{config} {spec.name}")
                sweeps_left -= 1
                continue
            result = Sweep(config, spec, sweep["slo"], sweep["rates"], s.window_s, s.min_requests, s.max_requests,
                           sweep["drain_s"], sweep["tail_s"], s.seed, s.refine_points).run(
                engine, allowance(), sweep["rates"][min(s.fixed_rate_index, len(sweep["rates"]) - 1)],
                s.timeline_requests, assignment, log)
            result["goodput_per_gpu_rps"] = result["goodput_rps"] / GPUS_PER_CONFIG
            res["sweeps"].append(result)
            sweeps_left -= 1
            save()

    plans: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    with ReplicaCluster(model, _engine_config(s), s.devices, random_weights=True, seed=s.seed,
                        threads=s.threads) as replicas:
        launch_s, launches_left = time.monotonic() - started, 2
        res["launch_s"] = {"replicas": launch_s}
        for spec in specs:
            cal = calibrate(replicas, spec, s.seed, s.calibration_repeats)
            slo = choose_slo(cal, s.ttft_slo_scale, s.tpot_slo_scale)
            rates = s.rates_rps or rate_grid(cal, spec, GPUS_PER_CONFIG, s.rate_multipliers)
            tail_s = cal.ttft_s + spec.mean_output * cal.tpot_s
            plans[spec.name] = {"slo": slo, "rates": rates, "tail_s": tail_s, "drain_s": max(5.0, 4 * tail_s)}
            res["calibration"][spec.name] = {"ttft_s": cal.ttft_s, "tpot_s": cal.tpot_s, "rates_rps": rates,
                                             "fixed_rate_rps": rates[min(s.fixed_rate_index, len(rates) - 1)],
                                             "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s}}
        cfg, dtype = replicas.model_config, replicas.loaded.dtype
        prompts = greedy_prompts(cfg.vocab_size, s.greedy_prompts, s.seed)
        reference = greedy_tokens(replicas, prompts, s.greedy_tokens)
        save()
        for policy in ("prefill_first", "chunked"):
            replicas.set_config(_engine_config(s, policy))
            sweep_all(f"colocated-{policy}", replicas, lambda: replicas.assignment)
    # the ceiling before the disaggregated sweeps, so a run cut short by its budget still has it
    layout = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 16, dtype)
    res["kv_ceiling"] = measure_ceiling(layout, s.probe_tokens, s.devices, repeats=3 if s.smoke else 5)
    save()
    for overlap in (True, False):
        started = time.monotonic()
        launches_left -= 1
        if budget.left_s() <= s.reserve_s + launch_s:
            res.setdefault("skipped_sweeps", []).extend(f"disagg-{'' if overlap else 'no-'}overlap {w.name}"
                                                        for w in specs)
            sweeps_left -= len(specs)
            continue
        try:
            llm = _disagg(model, s, overlap)
        except Exception as exc:  # noqa: BLE001 - the other deployment and the ceiling still run
            res.setdefault("errors", []).append(f"disagg (overlap={overlap}) did not start: {exc}")
            sweeps_left -= len(specs)
            continue
        try:
            res["launch_s"]["disagg-overlap" if overlap else "disagg-no-overlap"] = time.monotonic() - started
            greedy_tokens(llm.engine, prompts[:1], 2)  # warm-up: the first NCCL transfer sets up the link
            if overlap:
                res["greedy_check"] = greedy_check(llm.engine, reference, prompts, s.greedy_tokens)
                log(f"  greedy check: disaggregated == colocated on {len(prompts)} prompts: "
                    f"{res['greedy_check']['equal']}")
            else:
                res["kv_probe"] = probe_transfer(llm.engine, s.probe_tokens, 3, s.seed)
            save()
            sweep_all("disagg-overlap" if overlap else "disagg-no-overlap", llm.engine)
        finally:
            llm.shutdown()


def run_bench(s: Settings, out_dir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole benchmark; returns the result dict (also written under ``out_dir``)."""
    budget = Budget(s.time_budget_s)
    result: dict[str, Any] = {"benchmark": "disagg", "date": dt.datetime.now().isoformat(timespec="seconds"),
                              "card": card_name(s.devices), "machine": machine_summary(s.devices),
                              "settings": vars(s).copy(), "models": {}, "errors": []}
    save = lambda: write_results(result, out_dir, plots=False)  # noqa: E731
    for i, model in enumerate(s.models):
        res: dict[str, Any] = {"calibration": {}, "sweeps": []}
        result["models"][model] = res
        model_budget_s = budget.left_s() / (len(s.models) - i)
        log(f"{model}: {model_budget_s:.0f} s of the time budget")
        try:
            run_model(model, s, budget, model_budget_s, save, res, log)
        except Exception as exc:  # noqa: BLE001 - keep what was measured, say what failed
            result["errors"].append(f"{model}: {type(exc).__name__}: {exc}")
            log(f"  {model} failed: {exc}")
        result["errors"] += [f"{model}: {e}" for e in res.get("errors", [])]
    result["elapsed_s"] = time.monotonic() - budget.start
    from minidisagg.bench.disagg_report import evaluate_goals

    result["goals"] = evaluate_goals(result)
    result["paths"] = [str(p) for p in write_results(result, out_dir, plots=True)]
    return result


def parse_args(argv: Sequence[str]) -> tuple[Settings, Path]:
    """Command-line flags -> (Settings, output folder)."""
    parser = disagg_parser()
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.smoke:
        s = smoke_settings(models if args.models != parser.get_default("models") else None)
    else:
        s = Settings(models=models, devices=[d.strip() for d in args.devices.split(",")])
    for name in ("time_budget_s", "window_s", "ttft_slo_scale", "tpot_slo_scale"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    if args.rates:
        s.rates_rps = sorted(float(r) for r in args.rates.split(","))
    s.seed = args.seed
    s.kv_layout = args.kv_layout
    if len(s.devices) != 2:
        raise ValueError(f"--devices needs exactly two devices, got {s.devices}")
    if not s.smoke and any(d.startswith("cuda") for d in s.devices) and torch.cuda.device_count() < 2:
        raise ValueError(f"this machine shows {torch.cuda.device_count()} CUDA device(s); the benchmark needs two "
                         "(use --smoke for the CPU run)")
    if s.time_budget_s <= 0:
        raise ValueError(f"--time-budget-s must be > 0, got {s.time_budget_s}")
    return s, args.out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``minidisagg bench disagg``."""
    from minidisagg.bench.common import default_out_dir

    s, out = parse_args(list(argv or []))
    result = run_bench(s, out or default_out_dir())
    for goal, ok in result["goals"].items():
        print(f"{'met' if ok else 'MISSED'}: {goal}")
    for error in result["errors"]:
        print(f"error: {error}")
    print("wrote " + ", ".join(result["paths"]))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
