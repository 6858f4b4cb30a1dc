"""KV transfer bandwidth by transport and message size, each against its plain ceiling; KV transfer vs prefill.

One message is one layer's pages (one LAYER frame); one transfer is reserve -> N x send_layer
-> commit, timed until the commit is acknowledged, as a prefill worker does it. The receiving
side is always the real one: a ``KVReceiver`` scattering into a ``PagedKVCache`` (behind
``serve_kv_link`` in a separate process for socket and dist). Ceilings, measured in the same run:

- socket: a plain loop of ``sendall`` / ``recv_into`` of the same byte counts to that process
  (one reused message buffer, a 1-byte ack per transfer), the receiver in its own process so
  the GIL does not interfere; also the same loop landing the bytes in pool-sized memory;
- dist (gloo): plain ``torch.distributed`` send / recv of the same tensors between the two processes;
- inproc: ``dst.copy_(src)`` of the same bytes.

GB/s counts payload bytes once (1e9 bytes/s). Every repetition runs all methods back to back
(rotating who goes first); GB/s is the median over repetitions, the fraction of a ceiling the
median of the per-repetition ratios, so load from other processes hits both sides alike.
Torch runs one thread per process by default (two processes share two cores). The
KV-vs-prefill part times a real prefill (``LLMEngine``) and ships that request's pages over the
socket transport; a projection for Llama-8B follows.

Its parts: ``transport_names`` (transports, ceilings, sizes), ``transport_link`` (the receiving
process), ``transport_bandwidth`` (the bandwidth table), ``transport_prefill`` (KV vs prefill, the
projection) and ``transport_report`` (tables, Markdown, figure, files).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence as Seq
from typing import Any, Optional

import torch
from rich.console import Console

from minidisagg.bench.args import transport_parser
from minidisagg.bench.common import machine_info
from minidisagg.bench.transport_bandwidth import MAX_MESSAGES_PER_SAMPLE, run_bandwidth
from minidisagg.bench.transport_names import QUICK_SIZES, SIZES, SOCKET, MiB, size_label
from minidisagg.bench.transport_prefill import project_llama8b, run_kv_vs_prefill
from minidisagg.bench.transport_report import render_tables, write_results

GOAL = (SOCKET, 16 * MiB, 0.70)  # socket's fraction of raw TCP at this message size


def run_transport_bench(sizes: Seq[int] = SIZES, repeats: int = 9, transfer_bytes: int = 256 * MiB,
                        sample_bytes: int = 256 * MiB, model: str = "smollm2-135m",
                        prompt_lens: Seq[int] = (128, 512, 2048), prefill_repeats: int = 3,
                        threads: Optional[int] = 1, progress: bool = True) -> dict[str, Any]:
    """The whole benchmark: bandwidth table, KV vs prefill, the Llama-8B projection; returns the result dict."""
    console, previous_threads = Console(stderr=True, quiet=not progress), torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        info = machine_info()
        bandwidth = run_bandwidth(sizes, repeats, transfer_bytes, sample_bytes, threads=threads, console=console,
                                  progress=progress)
        kv = run_kv_vs_prefill(model, prompt_lens, prefill_repeats, threads=threads, console=console, progress=progress)
    finally:
        torch.set_num_threads(previous_threads)
    info["loadavg_end"] = list(os.getloadavg())
    socket_gbps = {r["message_bytes"]: r["GBps"] for r in bandwidth["rows"] if r["transport"] == SOCKET}
    goal = next((r for r in bandwidth["rows"] if (r["transport"], r["message_bytes"]) == GOAL[:2]), None)
    return {
        "benchmark": "transport", "date": dt.datetime.now().isoformat(timespec="seconds"), "machine": info,
        "settings": {"message_sizes": list(sizes), "repeats": repeats, "transfer_bytes": transfer_bytes,
                     "sample_bytes": sample_bytes, "max_messages_per_sample": MAX_MESSAGES_PER_SAMPLE,
                     "torch_threads": threads or "default",
                     "pages": "Llama-8B per-layer page shape, bf16, 64 KiB a block",
                     "definition": "GBps = payload bytes of a sample / median sample seconds / 1e9 (best: fastest "
                                   "sample); fraction of ceiling = median over repetitions of ceiling time / "
                                   "transport time, both measured back to back; a transfer is reserve -> one "
                                   "send_layer per layer -> commit, acknowledged"},
        "rows": bandwidth["rows"], "verified": bandwidth["verified"], "dist": bandwidth["dist"],
        "kv_vs_prefill": kv, "projection_llama8b": project_llama8b(socket_gbps, prompt_lens),
        "goals": {} if goal is None else {
            f"socket >= {GOAL[2]:.2f} of raw TCP at {size_label(GOAL[1])}": goal["fraction_of_ceiling"] >= GOAL[2],
            f"(reference) socket >= {GOAL[2]:.2f} of raw TCP into pool-sized memory at {size_label(GOAL[1])}":
                goal["fraction_of_pool_destination_ceiling"] >= GOAL[2]},
    }


def main(argv: Optional[Seq[str]] = None) -> int:
    """``python -m minidisagg.bench.transport [--quick] [--repeats 9] [--threads 1] [--out-dir DIR]``."""
    args = transport_parser().parse_args(argv)
    quick = dict(sizes=QUICK_SIZES, transfer_bytes=8 * MiB, sample_bytes=16 * MiB, prompt_lens=(128,),
                 prefill_repeats=1)
    result = run_transport_bench(repeats=args.repeats or (2 if args.quick else 9), model=args.model,
                                 threads=args.threads,
                                 progress=not args.no_progress, **(quick if args.quick else {}))
    console = Console()
    for table in render_tables(result):
        console.print(table)
    console.print(f"dist (gloo): {result['dist']}")
    for goal, ok in result["goals"].items():
        console.print(f"[{'green' if ok else 'red'}]{'met' if ok else 'MISSED'}[/]: {goal}")
    console.print("wrote " + ", ".join(str(p) for p in write_results(result, args.out_dir)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
