"""Cache-aware routing against round robin: prefix hit rate and TTFT with 2 prefill workers and a few system prompts.

A chat workload: ``--systems`` system prompts of ``--system-tokens`` random tokens, each followed by
``--turns`` user turns of a few random tokens (under one block, so a turn adds no block of its own),
shuffled. Each repeat serves the same requests, one at a time, through two fresh in-process
2P1D clusters with prefix caching on: one routing ``round_robin``, one ``cache_aware``, taking
turns request by request so host load hits both alike. Every worker's pool has ``--num-kv-blocks``
blocks: by default two system prompts fit beside a request's own blocks, three do not, so where a
system prompt goes decides whether its blocks are still there next time. The realised hit rate is
the prompt tokens taken from a prefix cache over all prompt tokens (``DisaggCluster.prefix_hit_rate``).

    python benchmarks/cache_aware_routing.py --model smollm2-135m --repeats 2 [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import statistics
import time
from typing import Any

from minidisagg.bench.common import machine_info, write_result_files
from minidisagg.config import CacheConfig, EngineConfig
from minidisagg.disagg.cluster import DisaggCluster
from minidisagg.engine.llm_engine import RequestOutput
from minidisagg.engine.sampling import SamplingParams
from minidisagg.models.registry import LoadedModel, load_model

FIRST_TOKEN_ONLY = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
POLICIES = ("round_robin", "cache_aware")
TIMEOUT_S = 600.0


def workload(rng: random.Random, vocab: int, systems: int, system_tokens: int, turns: int,
             block_size: int) -> list[list[int]]:
    """Every system prompt with each of its user turns (1 to block_size - 1 tokens), in a random order."""
    heads = [[rng.randrange(3, vocab) for _ in range(system_tokens)] for _ in range(systems)]
    prompts = [h + [rng.randrange(3, vocab) for _ in range(rng.randint(1, block_size - 1))]
               for h in heads for _ in range(turns)]
    rng.shuffle(prompts)
    return prompts


def serve_one(cluster: DisaggCluster, prompt: list[int]) -> RequestOutput:
    """One request to its first token, alone in the cluster."""
    rid = cluster.add_request({"prompt_token_ids": prompt}, FIRST_TOKEN_ONLY)
    deadline = time.monotonic() + TIMEOUT_S
    while cluster.has_unfinished():
        if time.monotonic() > deadline:
            raise TimeoutError(f"request {rid} did not finish within {TIMEOUT_S} s")
        for out in cluster.step():
            if out.finished and out.request_id == rid:
                if out.error:
                    raise RuntimeError(f"request {rid} failed: {out.error}")
                return out
    raise RuntimeError(f"request {rid} left the cluster without an output")


def one_repeat(loaded: LoadedModel, prompts: list[list[int]], block_size: int, num_blocks: int) -> dict[str, Any]:
    """The workload through a round-robin cluster and a cache-aware one, alternating request by request."""
    config = EngineConfig(cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=True))
    clusters = {p: DisaggCluster(loaded, config, num_prefill=2, num_decode=1, routing=p) for p in POLICIES}
    outs: dict[str, list[RequestOutput]] = {p: [] for p in POLICIES}
    try:
        for prompt in prompts:
            for policy, cluster in clusters.items():
                outs[policy].append(serve_one(cluster, prompt))
    finally:
        for cluster in clusters.values():
            cluster.shutdown()
    row: dict[str, Any] = {}
    for policy, cluster in clusters.items():
        ttfts = [o.metrics.ttft_s for o in outs[policy]]
        row[policy] = {"hit_rate": cluster.prefix_hit_rate, "predicted_hit_rate": cluster.router.predicted_hit_rate,
                       "mean_ttft_s": statistics.fmean(ttfts), "median_ttft_s": statistics.median(ttfts),
                       "prompt_tokens_computed": sum(len(o.prompt_token_ids) - o.num_cached_tokens
                                                     for o in outs[policy]),
                       "first_tokens": [o.token_ids[0] for o in outs[policy]]}
    row["same_first_tokens"] = row["round_robin"]["first_tokens"] == row["cache_aware"]["first_tokens"]
    return row


def main() -> None:
    """Measure, print, and write ``cache-aware-routing-<device>-<date>.{json,md}``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--systems", type=int, default=4)
    ap.add_argument("--system-tokens", type=int, default=128)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-kv-blocks", type=int, default=20, help="per worker (default: 2 system prompts fit, 3 not)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--stem", default=None, help="file name stem (default cache-aware-routing-<device>-<date>)")
    args = ap.parse_args()
    loaded = load_model(args.model, device=args.device, dtype="float32")
    info = machine_info()
    rows = []
    warm = workload(random.Random(-1), loaded.config.vocab_size, 1, args.system_tokens, 1, args.block_size)
    one_repeat(loaded, warm, args.block_size, args.num_kv_blocks)  # warm-up: first-call costs stay out
    for r in range(args.repeats):
        prompts = workload(random.Random(args.seed + r), loaded.config.vocab_size, args.systems, args.system_tokens,
                           args.turns, args.block_size)
        rows.append(one_repeat(loaded, prompts, args.block_size, args.num_kv_blocks))
        print(f"repeat {r}: " + "; ".join(
            f"{p} hit rate {rows[-1][p]['hit_rate']:.3f}, mean TTFT {rows[-1][p]['mean_ttft_s'] * 1e3:.1f} ms"
            for p in POLICIES))
    summary = {p: {k: statistics.fmean(row[p][k] for row in rows)
                   for k in ("hit_rate", "mean_ttft_s", "median_ttft_s", "prompt_tokens_computed")}
               for p in POLICIES}
    summary["cache_aware"]["predicted_hit_rate"] = statistics.fmean(r["cache_aware"]["predicted_hit_rate"]
                                                                    for r in rows)
    summary["ttft_ratio_cache_aware_over_round_robin"] = statistics.fmean(
        row["cache_aware"]["mean_ttft_s"] / row["round_robin"]["mean_ttft_s"] for row in rows)
    summary["same_first_tokens"] = all(row["same_first_tokens"] for row in rows)
    result = {"benchmark": "cache_aware_routing", "model": args.model, "device": args.device, "args": vars(args),
              "machine": info, "loadavg_end": list(os.getloadavg()), "rows": rows, "summary": summary}
    date = datetime.date.today().isoformat()
    stem = args.stem or f"cache-aware-routing-{args.device}-{date}"
    md = markdown(result, date)
    print(md)
    json_path, md_path = write_result_files(result, stem, md, args.out_dir)
    print(f"wrote {json_path} and {md_path}")


def markdown(result: dict[str, Any], date: str) -> str:
    """The result as a Markdown table with its machine and workload."""
    s, m, a = result["summary"], result["machine"], result["args"]
    n = a["systems"] * a["turns"]
    lines = [
        f"# Cache-aware routing against round robin, 2 prefill workers ({date})",
        "",
        f"{result['model']} on {result['device']} ({m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
        f"load average {m['loadavg_start'][0]:.1f} at start, {result['loadavg_end'][0]:.1f} at the end); "
        f"{a['systems']} system prompts of {a['system_tokens']} tokens x {a['turns']} user turns = {n} requests, "
        f"one at a time, first token only; block size {a['block_size']}, {a['num_kv_blocks']} KV blocks a worker; "
        f"{a['repeats']} repeats (workloads of seeds {a['seed']}..{a['seed'] + a['repeats'] - 1}), means.",
        "",
        "| routing | realised hit rate | router's predicted hit rate | prompt tokens computed | mean TTFT "
        "| median TTFT |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for p in POLICIES:
        predicted = s[p].get("predicted_hit_rate")
        lines.append(f"| {p} | {s[p]['hit_rate']:.3f} | {'-' if predicted is None else f'{predicted:.3f}'} "
                     f"| {s[p]['prompt_tokens_computed']:.0f} | {s[p]['mean_ttft_s'] * 1e3:.1f} ms "
                     f"| {s[p]['median_ttft_s'] * 1e3:.1f} ms |")
    lines += ["", f"Mean TTFT, cache_aware / round_robin (mean over repeats): "
                  f"{s['ttft_ratio_cache_aware_over_round_robin']:.3f}x; the same first tokens under both: "
                  f"{s['same_first_tokens']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
