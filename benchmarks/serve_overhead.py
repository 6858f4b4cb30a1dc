"""What does the HTTP path add to TTFT and ITL? (A diagnostic, not a benchmark of record.)

Runs one timed workload twice on the same engine: in process (``add_request`` with arrival times on
the wall clock, ``step`` until done; latencies from the engine's timelines, and TTFT also as the stepping
caller saw it, ``ttft_seen_by_caller``: in disagg mode after the hop from the decode worker) and through the HTTP
server (``bench serve``'s client, streaming; latencies seen by the client). Same prompts, same
Poisson arrivals, greedy, ``ignore_eos`` so both runs generate the same number of tokens.

    python benchmarks/serve_overhead.py --model smollm2-135m --num-prompts 16 --rate 1 [--mode disagg] [--out FILE]

``--mode disagg`` runs both on one prefill and one decode worker process (socket transport) behind the
router, so the HTTP figures include the decode server's token stream and the router's hand-offs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from typing import Any

from minidisagg import LLM, SamplingParams
from minidisagg.bench.common import machine_info
from minidisagg.bench.serve import run_load
from minidisagg.bench.serve_data import BenchRequest, poisson_gaps_s, synthetic
from minidisagg.server.launch import start_in_thread


def quantiles_ms(values_s: list[float]) -> dict[str, float]:
    """p50 / p90 / p99 in milliseconds."""
    cuts = statistics.quantiles([v * 1000 for v in values_s], n=100, method="inclusive")
    return {"p50": cuts[49], "p90": cuts[89], "p99": cuts[98]}


def in_process(llm: LLM, requests: list[BenchRequest], rate: float, seed: int) -> dict[str, list[float]]:
    """TTFT and ITL of the workload run by stepping the engine directly, from a thread of its own as the server does.

    (On this project's 2-core CPU host, stepping from the main thread ran several times slower than from another
    thread, for reasons not yet known; the comparison keeps that difference out.)
    """
    found: dict[str, dict[str, list[float]]] = {}
    worker = threading.Thread(target=lambda: found.update(run=_in_process(llm, requests, rate, seed)))
    worker.start()
    worker.join()
    if "run" not in found:
        raise RuntimeError("the in-process run failed (see the traceback above)")
    return found["run"]


def _in_process(llm: LLM, requests: list[BenchRequest], rate: float, seed: int) -> dict[str, list[float]]:
    engine = llm.engine
    gaps = poisson_gaps_s(rate, seed)
    start = engine.clock.now()
    arrival = start
    ids, arrivals = [], {}
    for req in requests:
        ids.append(engine.add_request(req.prompt, SamplingParams(temperature=0, max_tokens=req.max_tokens,
                                                                 ignore_eos=True), arrival_time=arrival))
        arrivals[ids[-1]] = arrival
        arrival += next(gaps)
    done: dict[str, Any] = {}
    seen_s: dict[str, float] = {}  # when ``step`` first returned a token of each request
    while len(done) < len(ids):
        for out in engine.step():
            if out.token_ids and out.request_id not in seen_s:
                seen_s[out.request_id] = engine.clock.now()
            if out.finished:
                done[out.request_id] = out.metrics
                engine.release(out.request_id)
    return {"ttft": [done[i].ttft_s for i in ids], "itl": [gap for i in ids for gap in done[i].itl_s],
            "ttft_seen": [seen_s[i] - arrivals[i] for i in ids]}


def over_http(llm: LLM, name: str, requests: list[BenchRequest], rate: float, seed: int) -> dict[str, list[float]]:
    """TTFT and ITL of the workload sent through the HTTP server, as its client sees them."""
    handle = start_in_thread(llm, name)
    try:
        results, _ = asyncio.run(run_load(handle.url, name, requests, rate, False, True, {}, 600.0, None, seed))
    finally:
        handle.stop()
    failed = [r.error for r in results if r.error]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed: {failed[0]}")
    return {"ttft": [r.ttft_s for r in results], "itl": [gap for r in results for gap in r.itl_s]}


def main() -> None:
    """Run both, print the percentiles and their differences."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--rate", type=float, default=1.0)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--switch-interval-s", type=float, default=None,
                        help="sys.setswitchinterval for the whole run (default: Python's 0.005)")
    parser.add_argument("--mode", choices=["colocated", "disagg"], default="colocated")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.switch_interval_s is not None:
        sys.setswitchinterval(args.switch_interval_s)
    disagg = {"mode": "disagg", "transport": "socket", "num_prefill": 1, "num_decode": 1} if args.mode == "disagg" else {}
    llm = LLM(args.model, device=args.device, **disagg)
    requests = synthetic(args.num_prompts, args.input_len, args.output_len, args.seed)
    in_process(llm, requests, float("inf"), args.seed)  # warm-up: the first run of each shape pays for set-up
    t0 = time.perf_counter()
    # in process, HTTP, in process again: the spread of the two in-process runs is the noise to judge by
    runs = {"in_process": in_process(llm, requests, args.rate, args.seed),
            "http": over_http(llm, args.model, requests, args.rate, args.seed),
            "in_process_again": in_process(llm, requests, args.rate, args.seed)}
    result: dict[str, Any] = {"model": args.model, "device": str(llm.device), "machine": machine_info(),
                              "settings": vars(args), "wall_s": time.perf_counter() - t0}
    for metric in ("ttft", "itl"):
        got = {name: quantiles_ms(run[metric]) for name, run in runs.items()}
        if metric == "ttft":  # in process, as the stepping caller saw it (disagg: after the hop from the decode worker)
            result["ttft_seen_by_caller"] = {name: quantiles_ms(run["ttft_seen"]) for name, run in runs.items()
                                             if "ttft_seen" in run}
        result[metric] = {**got, "http_minus_in_process_ms": {q: got["http"][q] - got["in_process"][q]
                                                              for q in ("p50", "p90", "p99")}}
        print(f"{metric.upper():5s} " + "  ".join(f"{name} p50/p90/p99 {v['p50']:.1f}/{v['p90']:.1f}/{v['p99']:.1f} ms"
                                                  for name, v in got.items())
              + f"  (http - in-process p50: {result[metric]['http_minus_in_process_ms']['p50']:+.1f} ms)")
    print("TTFT as the stepping caller saw it, p50: " + "  ".join(f"{name} {v['p50']:.1f} ms"
                                                            for name, v in result["ttft_seen_by_caller"].items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    llm.shutdown()


if __name__ == "__main__":
    main()
