"""Take a disaggregated deployment's KV transfer apart: lone long requests, traced step by step.

For each model, KV pool layout and GIL switch interval of the workers, a 1P1D deployment over the ``dist``
transport (NCCL between two GPUs, gloo on the CPU) without layer-wise overlap moves a lone
``--tokens``-token request ``--repeats`` times. Both workers log a timestamp at each step of
each transfer (``MINIDISAGG_KV_TRACE=1``, see ``minidisagg/transport/trace.py``); the script
merges them into one timeline per transfer and prints the median time of every step after the
hand-off, beside the plain send/recv ceiling of the same bytes measured in the same run.

    python benchmarks/probe_kv_link.py --models llama-8b,llama-1b --switch-intervals-ms 0.5,5 --out /tmp/probe
    python benchmarks/probe_kv_link.py --models tiny --devices cpu,cpu --tokens 128   # on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

os.environ["MINIDISAGG_KV_TRACE"] = "1"  # the worker processes inherit it

from minidisagg import LLM  # noqa: E402
from minidisagg.bench.disagg_link import greedy_prompts, greedy_tokens, measure_ceiling, probe_transfer  # noqa: E402
from minidisagg.config import PRESETS  # noqa: E402
from minidisagg.kv.pages import KVLayout  # noqa: E402
from minidisagg.transport.trace import read_trace  # noqa: E402


def step_medians_ms(log_dir: Path, skip_first: int) -> dict[str, float]:
    """Median time of each traced step after the hand-off, over the transfers after the first ``skip_first``."""
    trace = read_trace(sorted(log_dir.glob("*.log")))
    ordered = sorted(trace.values(), key=lambda steps: steps[0][0])[skip_first:]
    by_step: dict[str, list[float]] = {}
    for steps in ordered:
        start = next((t for t, name in steps if name == "handoff"), steps[0][0])
        for t, name in steps:
            by_step.setdefault(name, []).append(1000 * (t - start))
    return {name: round(statistics.median(v), 3) for name, v in sorted(by_step.items(), key=lambda kv: statistics.median(kv[1]))}


def probe_model(model: str, devices: list[str], tokens: int, repeats: int, switch_intervals_s: list[float],
                kv_layouts: list[str]) -> dict[str, Any]:
    """The ceiling, then one deployment per KV pool layout and GIL switch interval of the workers."""
    cfg = PRESETS[model]
    gpu = devices[0] != "cpu"
    import torch

    dtype = torch.bfloat16 if gpu else torch.float32
    layout = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 16, dtype)
    result: dict[str, Any] = {"ceiling": measure_ceiling(layout, tokens, devices, repeats=5), "settings": {}}
    print(f"{model}: ceiling {json.dumps(result['ceiling'])}", flush=True)
    for kv_layout, interval_s in ((k, i) for k in kv_layouts for i in switch_intervals_s):
        os.environ["MINIDISAGG_SWITCH_INTERVAL_S"] = str(interval_s)
        llm = LLM(model, device="cuda" if gpu else "cpu", mode="disagg", transport="dist", random_weights=True,
                  kv_overlap=False, max_num_seqs=8, max_num_batched_tokens=max(2048, tokens), kv_layout=kv_layout,
                  request_timeout_s=120.0, prefill_devices=[devices[0]], decode_devices=[devices[1]])
        try:
            warm = greedy_prompts(cfg.vocab_size, 2, 0)
            greedy_tokens(llm.engine, warm, 2)  # the first NCCL transfer sets up the link
            probe = probe_transfer(llm.engine, tokens, repeats)
            steps = step_medians_ms(llm.engine.log_dir, skip_first=len(warm))
        finally:
            llm.shutdown()
        setting = f"{kv_layout}, switch {interval_s * 1e3:g} ms"
        result["settings"][setting] = {"probe": probe, "steps_ms": steps}
        ceiling_s = result["ceiling"].get("one_message_s")
        ratio = probe["achieved_GBps"] / result["ceiling"]["one_message_GBps"] if ceiling_s and "achieved_GBps" in probe \
            else None
        print(f"{model}, {setting}: {json.dumps(probe)}\n  of one-message ceiling: {ratio}\n"
              f"  steps (ms after hand-off): {json.dumps(steps)}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, probe every model, write ``probe-kv-link.json`` under ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="llama-8b,llama-1b")
    parser.add_argument("--devices", default="cuda:0,cuda:1")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--switch-intervals-ms", default="0.5", help="the workers' GIL switch intervals to try")
    parser.add_argument("--kv-layouts", default="block_major,layer_major", help="KV pool layouts to compare")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    devices = args.devices.split(",")
    intervals_s = [float(x) / 1e3 for x in args.switch_intervals_ms.split(",")]
    layouts = args.kv_layouts.split(",")
    results = {m: probe_model(m, devices, args.tokens, args.repeats, intervals_s, layouts) for m in args.models.split(",")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "probe-kv-link.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
