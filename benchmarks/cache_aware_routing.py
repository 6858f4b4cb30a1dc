"""Cache-aware routing against round robin: prefix hits with 2 prefill workers (2P1D) and with 2 decode workers (1P2D).

A chat workload: ``--systems`` system prompts of ``--system-tokens`` random tokens, each followed by
``--turns`` user turns of a few random tokens (under one block, so a turn adds no block of its own),
shuffled. Each repeat serves the same requests, one at a time, through two fresh in-process
2P1D clusters with prefix caching on: one routing ``round_robin``, one ``cache_aware``, taking
turns request by request so host load hits both alike. Every worker's pool has ``--num-kv-blocks``
blocks: by default two system prompts fit beside a request's own blocks, three do not, so where a
system prompt goes decides whether its blocks are still there next time. The realised hit rate is
the prompt tokens taken from a prefix cache over all prompt tokens (``DisaggCluster.prefix_hit_rate``).

The decode-side case serves the same workload through 1P2D clusters: there the choice of the decode
worker decides whether its prefix cache holds the prompt's leading blocks, whose pages then do not
travel. It reports the realised decode reuse (``DisaggCluster.decode_reuse_rate``, from the outputs'
``kv_reused_tokens``), the router's predicted one, and the KV bytes moved per request.

    python benchmarks/cache_aware_routing.py --model smollm2-135m --repeats 2 [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import random
import statistics
from typing import Any

from minidisagg.bench.common import add_output_args, finish_run, machine_info
from minidisagg.config import CacheConfig, EngineConfig
from minidisagg.disagg.cluster import DisaggCluster
from minidisagg.engine.llm_engine import RequestOutput
from minidisagg.engine.sampling import SamplingParams
from minidisagg.engine.steppable import run_one
from minidisagg.models.registry import LoadedModel, load_model

FIRST_TOKEN_ONLY = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
TWO_TOKENS = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)  # a one-token request never leaves prefill
POLICIES = ("round_robin", "cache_aware")
CASES = {"prefill": (2, 1), "decode": (1, 2)}  # side whose choice is measured -> (prefill workers, decode workers)
TIMEOUT_S = 600.0


def workload(rng: random.Random, vocab: int, systems: int, system_tokens: int, turns: int,
             block_size: int) -> list[list[int]]:
    """Every system prompt with each of its user turns (1 to block_size - 1 tokens), in a random order."""
    heads = [[rng.randrange(3, vocab) for _ in range(system_tokens)] for _ in range(systems)]
    prompts = [h + [rng.randrange(3, vocab) for _ in range(rng.randint(1, block_size - 1))]
               for h in heads for _ in range(turns)]
    rng.shuffle(prompts)
    return prompts


def serve_one(cluster: DisaggCluster, prompt: list[int], params: SamplingParams = FIRST_TOKEN_ONLY) -> RequestOutput:
    """One request to its end, alone in the cluster (``TimeoutError`` past ``TIMEOUT_S``)."""
    return run_one(cluster, {"prompt_token_ids": prompt}, params, timeout_s=TIMEOUT_S, raise_on_error=True)


def one_repeat(loaded: LoadedModel, prompts: list[list[int]], block_size: int, num_blocks: int,
               case: str = "prefill") -> dict[str, Any]:
    """The workload through a round-robin cluster and a cache-aware one (``CASES[case]``), alternating requests."""
    config = EngineConfig(cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=True))
    num_prefill, num_decode = CASES[case]
    clusters = {p: DisaggCluster(loaded, config, num_prefill=num_prefill, num_decode=num_decode, routing=p)
                for p in POLICIES}
    outs: dict[str, list[RequestOutput]] = {p: [] for p in POLICIES}
    try:
        for prompt in prompts:
            for policy, cluster in clusters.items():
                outs[policy].append(serve_one(cluster, prompt, FIRST_TOKEN_ONLY if case == "prefill" else TWO_TOKENS))
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
                       "decode_reuse_rate": cluster.decode_reuse_rate,
                       "predicted_decode_reuse_rate": cluster.router.predicted_decode_reuse_rate,
                       "kv_bytes_per_request": statistics.fmean(o.metrics.kv_transfer_bytes for o in outs[policy]),
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
    add_output_args(ap, "cache-aware-routing")
    args = ap.parse_args()
    loaded = load_model(args.model, device=args.device, dtype="float32")
    info = machine_info()
    warm = workload(random.Random(-1), loaded.config.vocab_size, 1, args.system_tokens, 1, args.block_size)
    one_repeat(loaded, warm, args.block_size, args.num_kv_blocks)  # warm-up: first-call costs stay out
    rows: list[dict[str, Any]] = []
    for r in range(args.repeats):
        prompts = workload(random.Random(args.seed + r), loaded.config.vocab_size, args.systems, args.system_tokens,
                           args.turns, args.block_size)
        for case in CASES:
            rows.append({"case": case, **one_repeat(loaded, prompts, args.block_size, args.num_kv_blocks, case)})
            print(f"repeat {r}, {case} side: " + "; ".join(
                f"{p} hit rate {rows[-1][p]['hit_rate']:.3f}, decode reuse {rows[-1][p]['decode_reuse_rate']:.3f}, "
                f"{rows[-1][p]['kv_bytes_per_request'] / 1e6:.2f} MB/request, "
                f"mean TTFT {rows[-1][p]['mean_ttft_s'] * 1e3:.1f} ms" for p in POLICIES))
    summary = {case: summarise([row for row in rows if row["case"] == case]) for case in CASES}
    finish_run("cache_aware_routing", args, info, rows, summary, "cache-aware-routing", markdown)


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over repeats of one case's figures, per policy, and the ratios of cache_aware to round_robin."""
    keys = ("hit_rate", "mean_ttft_s", "median_ttft_s", "prompt_tokens_computed", "decode_reuse_rate",
            "kv_bytes_per_request")
    summary: dict[str, Any] = {p: {k: statistics.fmean(row[p][k] for row in rows) for k in keys} for p in POLICIES}
    for k in ("predicted_hit_rate", "predicted_decode_reuse_rate"):
        summary["cache_aware"][k] = statistics.fmean(row["cache_aware"][k] for row in rows)
    for k in ("mean_ttft_s", "kv_bytes_per_request"):  # None where nothing moved (first token only: no KV moves)
        summary[f"{k}_ratio_cache_aware_over_round_robin"] = statistics.fmean(
            row["cache_aware"][k] / row["round_robin"][k] for row in rows) if all(
            row["round_robin"][k] for row in rows) else None
    summary["same_first_tokens"] = all(row["same_first_tokens"] for row in rows)
    return summary


def markdown(result: dict[str, Any], date: str) -> str:
    """The result as Markdown tables, one per case, with the machine and the workload."""
    m, a = result["machine"], result["args"]
    n = a["systems"] * a["turns"]
    lines = [
        f"# Cache-aware routing against round robin, 2 prefill workers and 2 decode workers ({date})",
        "",
        f"{result['model']} on {result['device']} ({m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
        f"load average {m['loadavg_start'][0]:.1f} at start, {result['loadavg_end'][0]:.1f} at the end); "
        f"{a['systems']} system prompts of {a['system_tokens']} tokens x {a['turns']} user turns = {n} requests, "
        f"one at a time, first token only (1P2D: two tokens, so the KV moves); block size {a['block_size']}, "
        f"{a['num_kv_blocks']} KV blocks a worker; "
        f"{a['repeats']} repeats (workloads of seeds {a['seed']}..{a['seed'] + a['repeats'] - 1}), means.",
    ]
    for case, (num_p, num_d) in CASES.items():
        s = result["summary"][case]
        lines += ["", f"## {num_p}P{num_d}D: the {case} worker's choice", "",
                  "| routing | prefill hit rate (predicted) | decode reuse (predicted) | KV bytes / request "
                  "| prompt tokens computed | mean TTFT | median TTFT |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for p in POLICIES:
            def rate(key: str) -> str:
                predicted = s[p].get(f"predicted_{key}")
                return f"{s[p][key]:.3f}" + ("" if predicted is None else f" ({predicted:.3f})")
            reuse = rate("decode_reuse_rate") if s[p]["kv_bytes_per_request"] else "- (no KV moved)"
            lines.append(f"| {p} | {rate('hit_rate')} | {reuse} "
                         f"| {s[p]['kv_bytes_per_request'] / 1e3:.0f} kB | {s[p]['prompt_tokens_computed']:.0f} "
                         f"| {s[p]['mean_ttft_s'] * 1e3:.1f} ms | {s[p]['median_ttft_s'] * 1e3:.1f} ms |")
        kv_ratio = s["kv_bytes_per_request_ratio_cache_aware_over_round_robin"]
        lines += ["", f"cache_aware / round_robin (mean over repeats): mean TTFT "
                      f"{s['mean_ttft_s_ratio_cache_aware_over_round_robin']:.3f}x, KV bytes per request "
                      f"{'- (none moved)' if kv_ratio is None else f'{kv_ratio:.3f}x'}; the same first tokens "
                      f"under both: {s['same_first_tokens']}."]
    return "\n".join(lines + [""])


if __name__ == "__main__":
    main()
