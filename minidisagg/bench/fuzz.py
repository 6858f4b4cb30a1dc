"""``minidisagg bench fuzz``: hundreds of hostile inputs against live workers, and a decode worker stopped by SIGSTOP.

The inputs come from ``disagg.fuzz`` (seeded); ``disagg.fuzz_checks`` runs them against a
decode, a prefill and a router process and checks the deployment after each: every process
alive, both KV pools whole, a greedy request (and every victim request an input attacked)
equal to the colocated engine's, and the promises an input tested kept. The table counts, per
category, the inputs tried, after how many every process was alive and both pools whole, the
requests lost, and the promises kept. With ``--sigstop-s`` the decode worker of a fresh
deployment is then stopped that long while it holds requests (``disagg.fuzz_stall``).
Results go to ``benchmarks/results/fuzz-<date>-seed<S>-n<N>.md`` and ``.json``.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence as Seq
from typing import Any, Optional

from rich.console import Console
from rich.table import Table

from minidisagg.bench.args import fuzz_parser
from minidisagg.bench.common import machine_info, progress_bar, write_result_files

COLUMNS = ("category", "inputs tried", "processes alive after each", "requests lost", "pool whole after each",
           "promises kept")


def summarize(results: Seq[Any]) -> list[dict[str, Any]]:
    """One row per category (in ``fuzz.CATEGORIES`` order) and a last row for all inputs."""
    from minidisagg.disagg.fuzz import CATEGORIES

    rows = []
    for category in [*CATEGORIES, "all"]:
        mine = [r for r in results if category in ("all", r.category)]
        if not mine:
            continue
        rows.append({"category": category, "inputs": len(mine), "alive": sum(r.alive for r in mine),
                     "requests": sum(r.requests for r in mine), "lost": sum(r.lost for r in mine),
                     "pool_whole": sum(r.pools_whole for r in mine),
                     "kept": sum(not r.notes for r in mine)})
    return rows


def cells(row: dict[str, Any]) -> list[str]:
    """A summary row as the table's cells."""
    n = row["inputs"]
    return [row["category"], str(n), f"{row['alive']}/{n}", f"{row['lost']} of {row['requests']}",
            f"{row['pool_whole']}/{n}", f"{row['kept']}/{n}"]


def stall_summary(report: Any) -> dict[str, Any]:
    """A SIGSTOP run as plain data."""
    return {"stop_s": report.stop_s, "deadline_s": report.deadline_s, "policy": report.policy,
            "held": [{"id": r, "ended_after_s": round(s, 2), "error": e} for r, s, e in report.held],
            "during_stop": [{"id": r, "ended_after_s": round(s, 2), "error": e} for r, s, e in report.during],
            "after_sigcont": [{"id": r, "tokens_as_colocated": ok, "error": e} for r, ok, e in report.after],
            "ended_within_deadline": report.ended_in_time, "every_later_request_ok": report.after_ok,
            "pools": report.pools, "pools_whole": report.pools_whole, "alive": report.alive,
            "seconds": round(report.seconds, 1)}


def markdown(result: dict[str, Any]) -> str:
    """The run as Markdown: settings, the table, what broke (if anything), the SIGSTOP run."""
    s, m = result["settings"], result["machine"]
    lines = [f"# Fuzz: hostile inputs against live workers ({result['date']})", "",
             f"{s['inputs']} inputs, seed {s['seed']}; decode, prefill and router processes of `{s['model']}` "
             f"(random weights, {s['num_kv_blocks']} KV blocks each), `--frame-deadline-s {s['frame_deadline_s']}`, "
             f"`--max-connections {s['max_connections']}`; {m['cpu']}, {m['cores']} cores, load "
             f"{m['loadavg_start'][0]:.1f} at the start; commit {m['minidisagg_commit']}; {result['seconds']:.0f} s.",
             "", "After each input: every process alive, both KV pools whole (HEALTH), a greedy request through the "
             "router (and each victim request of our own router that the input attacked; that router recomputes a "
             "request a worker fails, `kv_failure_policy=recompute`) equal to the colocated engine's; a lost request "
             "is one that was not. A promise is what the input tested beyond that (a stalled peer dropped after the "
             "deadline, a connection over the cap refused, a failed handshake closed). Tracebacks in the three "
             f"processes' logs (an input that reached an unexpected error path): {result['tracebacks']}.", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in result["table"]]
    broken = result["broken"]
    lines += ["", "Inputs that broke something: " + ("none." if not broken else f"{len(broken)}:")]
    lines += [f"- #{b['index']} {b['category']}: {b['name']}: {'; '.join(b['notes'])[:400]}" for b in broken[:20]]
    stall = result.get("sigstop")
    if stall:
        held = ", ".join(f"{h['ended_after_s']:.1f} s" for h in stall["held"])
        errors = sorted({str(h["error"])[:120] for h in stall["held"] + stall["during_stop"]})
        during = ", ".join(f"{h['ended_after_s']:.1f} s" for h in stall["during_stop"])
        later = sum(a["tokens_as_colocated"] for a in stall["after_sigcont"])
        lines += ["", f"## SIGSTOP of the decode worker for {stall['stop_s']:g} s", "",
                  f"Request deadline {stall['deadline_s']:g} s, `kv_failure_policy={stall['policy']}`. The "
                  f"{len(stall['held'])} requests it held ended {held} after submission; one submitted during the "
                  f"stop ended after {during}; their errors: {errors}. Ended within the deadline: "
                  f"{'yes' if stall['ended_within_deadline'] else 'NO'}. After SIGCONT: {later} of "
                  f"{len(stall['after_sigcont'])} later requests returned the colocated engine's tokens. Pools whole: "
                  f"{'yes' if stall['pools_whole'] else 'NO'} ({stall['pools']}). Whole run {stall['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def run_fuzz_bench(inputs: int, seed: int, sigstop_s: float = 0.0, deadline_s: float = 12.0, policy: str = "fail",
                   console: Optional[Console] = None) -> dict[str, Any]:
    """The whole benchmark; returns the result dict (``markdown`` renders it)."""
    import time

    from minidisagg.disagg.fuzz import generate_inputs
    from minidisagg.disagg.fuzz_checks import FuzzDeployment, FuzzSettings, run_fuzz

    console = console or Console(stderr=True)
    started_s, info, settings = time.monotonic(), machine_info(), FuzzSettings()
    deployment = FuzzDeployment(settings)
    try:
        with progress_bar(console, True) as progress:
            task = progress.add_task("fuzz inputs", total=inputs)
            results = run_fuzz(deployment, generate_inputs(seed, inputs), lambda r: progress.advance(task))
    finally:
        deployment.stop()
    tracebacks = sum(p.log_path.read_text(errors="replace").count("Traceback") for p in deployment.processes.values())
    result: dict[str, Any] = {
        "benchmark": "fuzz", "date": dt.datetime.now().isoformat(timespec="seconds"), "machine": info,
        "settings": {"inputs": inputs, "seed": seed, "model": settings.model, "num_kv_blocks": settings.num_kv_blocks,
                     "frame_deadline_s": settings.frame_deadline_s, "max_connections": settings.max_connections},
        "table": summarize(results), "tracebacks": tracebacks,
        "broken": [{"index": r.index, "category": r.category, "name": r.name, "notes": r.notes}
                   for r in results if r.notes or not r.alive or not r.pools_whole or r.lost]}
    if sigstop_s > 0:
        from minidisagg.disagg.fuzz_stall import stall_decode

        console.print(f"SIGSTOP of the decode worker for {sigstop_s:g} s ...")
        stall_deployment = FuzzDeployment(settings)
        try:
            result["sigstop"] = stall_summary(stall_decode(stall_deployment, sigstop_s, deadline_s, policy))
        finally:
            stall_deployment.stop()
    info["loadavg_end"] = list(os.getloadavg())
    result["seconds"] = time.monotonic() - started_s
    return result


def main(argv: Optional[Seq[str]] = None) -> int:
    """``minidisagg bench fuzz [--inputs 300] [--seed 0] [--sigstop-s 40] [--out-dir DIR]``; 1 if anything broke."""
    args = fuzz_parser().parse_args(argv)
    if args.inputs < 1:
        raise SystemExit("--inputs must be at least 1")
    if args.sigstop_s and args.sigstop_s <= args.deadline_s:
        raise SystemExit(f"--sigstop-s ({args.sigstop_s:g}) must exceed --deadline-s ({args.deadline_s:g}): the held "
                         f"requests must meet their deadline while the worker is stopped")
    console = Console()
    result = run_fuzz_bench(args.inputs, args.seed, args.sigstop_s, args.deadline_s, args.policy)
    table = Table(*COLUMNS, title=f"fuzz: {args.inputs} inputs, seed {args.seed}")
    for row in result["table"]:
        table.add_row(*cells(row))
    console.print(table)
    text = markdown(result)
    if "sigstop" in result:
        console.print("SIGSTOP" + text.split("## SIGSTOP", 1)[1], highlight=False)
    date = result["date"][:10]
    stem = f"fuzz-{date}-seed{args.seed}-n{args.inputs}"
    paths = write_result_files(result, stem, text, args.out_dir)
    console.print("wrote " + ", ".join(str(p) for p in paths))
    stall_ok = "sigstop" not in result or (result["sigstop"]["ended_within_deadline"]
                                           and result["sigstop"]["every_later_request_ok"])
    return 0 if not result["broken"] and not result["tracebacks"] and stall_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
