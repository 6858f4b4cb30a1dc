"""Prefix caching: how much sooner does a second request that shares a long prefix get its first token?

Each repeat makes two fresh engines over the same loaded model, one with ``enable_prefix_caching``
and one without, and sends each the same two requests, one after the other: a shared prefix of
``--prefix-tokens`` tokens plus a short tail of its own. The first request of the caching engine
computes everything and leaves the prefix's blocks cached; the second finds them and prefills only
its tail. The engine without the cache is the control: there the second request costs what the
first did. Both engines run in the same process, alternately, so host load hits both alike; the
figures are medians over the repeats. Steps run on a thread of their own (on the 2-core CPU host
stepping from the main thread ran several times slower; ``benchmarks/NOTES.md``).

    python benchmarks/prefix_cache.py --model smollm2-135m --prefix-tokens 512 --repeats 5 [--out-dir DIR]

With ``--disagg`` the same two requests go through a disaggregated 1P1D deployment instead (in
process: inproc workers, and socket servers joined by real TCP), once with prefix caching on both
workers and once without: the figure is the KV bytes each request moved from the prefill worker
to the decode worker, counted by the link itself (``KVSender.stats.bytes_sent``). With caching the
decode worker already holds the prefix's blocks after the first request, so the second moves only
its tail's blocks.

    python benchmarks/prefix_cache.py --disagg --model smollm2-135m --prefix-tokens 512 --repeats 2
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
from typing import Any, Callable

from minidisagg.bench.common import add_output_args, finish_run, machine_info
from minidisagg.config import CacheConfig, EngineConfig
from minidisagg.disagg.cluster import DisaggCluster
from minidisagg.disagg.router_server import RemoteCluster
from minidisagg.disagg.serve import DecodeServer, PrefillServer
from minidisagg.engine.llm_engine import LLMEngine, RequestOutput
from minidisagg.engine.sampling import SamplingParams
from minidisagg.engine.steppable import run_one_on_thread
from minidisagg.models.registry import LoadedModel, load_model

TIMEOUT_S = 600.0  # one request, alone, on a loaded 2-core host: minutes at most
FIRST_TOKEN_ONLY = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
FOUR_TOKENS = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)  # the first from prefill, 3 decoded


def serve_one(engine: Any, prompt: list[int], params: SamplingParams = FIRST_TOKEN_ONLY) -> RequestOutput:
    """Run one request alone to its end (an engine, or a deployment's router, stepped on a thread of its own)."""
    return run_one_on_thread(engine, {"prompt_token_ids": prompt}, params, timeout_s=TIMEOUT_S)


def one_repeat(loaded: LoadedModel, prompts: tuple[list[int], list[int]], block_size: int) -> dict[str, Any]:
    """Both requests through a caching engine and a plain one, alternating; TTFTs and cached tokens."""
    engines = {on: LLMEngine(loaded, EngineConfig(cache=CacheConfig(block_size=block_size, num_blocks=256,
                                                                      enable_prefix_caching=on)))
               for on in (True, False)}
    row: dict[str, Any] = {}
    for i, prompt in enumerate(prompts):
        for on, engine in engines.items():
            out = serve_one(engine, prompt)
            name = f"{'cached' if on else 'plain'}_{'first' if i == 0 else 'second'}"
            row[f"{name}_ttft_s"] = out.metrics.ttft_s
            row[f"{name}_num_cached_tokens"] = out.num_cached_tokens
            row[f"{name}_token"] = out.token_ids[0]
    return row


def disagg_deployment(loaded: LoadedModel, config: EngineConfig, transport: str) -> tuple[Any, Callable[[], Any]]:
    """A 1P1D deployment in this process (router, its stop); inproc threads, or socket servers over loopback TCP."""
    if transport == "inproc":
        cluster = DisaggCluster(loaded, config)
        return cluster, cluster.shutdown
    decode = DecodeServer(loaded, config)
    threading.Thread(target=decode.serve_forever, daemon=True).start()
    prefill = PrefillServer(loaded, config, {"d0": ("127.0.0.1", decode.port)})
    threading.Thread(target=prefill.serve_forever, daemon=True).start()
    router = RemoteCluster(loaded, config, {"p0": ("127.0.0.1", prefill.port)}, {"d0": ("127.0.0.1", decode.port)})
    router.link_sender = lambda: prefill.worker.senders.get("d0")  # type: ignore[attr-defined]

    def stop() -> None:
        router.shutdown()
        prefill.stop()
        decode.stop()

    return router, stop


def disagg_repeat(loaded: LoadedModel, prompts: tuple[list[int], list[int]], block_size: int,
                  transport: str) -> dict[str, Any]:
    """Both requests through a 1P1D deployment with prefix caching and one without, alternating: bytes moved, TTFT."""
    deployments = {on: disagg_deployment(loaded, EngineConfig(cache=CacheConfig(
        block_size=block_size, num_blocks=256, enable_prefix_caching=on)), transport) for on in (True, False)}
    row: dict[str, Any] = {"transport": transport}
    try:
        for i, prompt in enumerate(prompts):
            for on, (router, _) in deployments.items():
                sender = router.prefill_workers[0].senders["d0"] if transport == "inproc" else router.link_sender()
                before = sender.stats.bytes_sent if sender is not None else 0
                out = serve_one(router, prompt, FOUR_TOKENS)  # one token would stop on the prefill worker
                sender = router.prefill_workers[0].senders["d0"] if transport == "inproc" else router.link_sender()
                name = f"{'cached' if on else 'plain'}_{'first' if i == 0 else 'second'}"
                row[f"{name}_link_bytes"] = sender.stats.bytes_sent - before
                row[f"{name}_kv_transfer_bytes"] = out.metrics.kv_transfer_bytes
                row[f"{name}_kv_reused_tokens"] = out.metrics.kv_reused_tokens
                row[f"{name}_ttft_s"] = out.metrics.ttft_s
                row[f"{name}_token_ids"] = out.token_ids  # decoded over the shared blocks, with caching
    finally:
        for _, stop in deployments.values():
            stop()
    return row


def disagg_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per transport: bytes of each request (the same every repeat), the ratio, median TTFTs."""
    summary: dict[str, Any] = {}
    for transport in sorted({row["transport"] for row in rows}):
        mine = [row for row in rows if row["transport"] == transport]
        byte_keys = [k for k in mine[0] if k.endswith("_bytes") or k.endswith("_kv_reused_tokens")]
        summary[transport] = {
            **{k: sorted({row[k] for row in mine}) for k in byte_keys},
            "second_over_first_bytes_cached": mine[0]["cached_second_link_bytes"] / mine[0]["cached_first_link_bytes"],
            "second_over_first_bytes_plain": mine[0]["plain_second_link_bytes"] / mine[0]["plain_first_link_bytes"],
            "median_ttft_s": {k: statistics.median(row[k] for row in mine) for k in mine[0] if k.endswith("_ttft_s")},
            "same_tokens": all(row[f"cached_{i}_token_ids"] == row[f"plain_{i}_token_ids"]
                               for row in mine for i in ("first", "second"))}
    return summary


def disagg_markdown(result: dict[str, Any], date: str) -> str:
    """The disaggregated result as a Markdown table: bytes per request over each transport, with and without caching."""
    s, m, a = result["summary"], result["machine"], result["args"]
    lines = [
        f"# Decode-side prefix reuse: KV bytes moved by a request sharing a {a['prefix_tokens']}-token prefix ({date})",
        "",
        f"{result['model']} on {result['device']} ({m['cpu']}, {m['cores']} cores, torch {m['torch']}, load average "
        f"{m['loadavg_start'][0]:.1f} at start, {result['loadavg_end'][0]:.1f} at the end); 1P1D in one process, "
        f"block size {a['block_size']}, tails of {a['tail_tokens']} tokens, {a['repeats']} repeats (bytes are the "
        f"same in every repeat; TTFTs are medians). Bytes as counted by the link (``KVSender.stats.bytes_sent``).",
        "",
        "| transport | prefix caching | first request bytes | second request bytes | second / first "
        "| second's reused tokens | first TTFT | second TTFT |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for transport, t in s.items():
        for on in ("cached", "plain"):
            ttft = t["median_ttft_s"]
            lines.append(
                f"| {transport} | {'on' if on == 'cached' else 'off'} | {t[f'{on}_first_link_bytes'][0]:,} "
                f"| {t[f'{on}_second_link_bytes'][0]:,} | {t[f'second_over_first_bytes_{on}']:.3f}x "
                f"| {t[f'{on}_second_kv_reused_tokens'][0]} | {ttft[f'{on}_first_ttft_s'] * 1e3:.0f} ms "
                f"| {ttft[f'{on}_second_ttft_s'] * 1e3:.0f} ms |")
    same = all(t["same_tokens"] for t in s.values())
    lines += ["", f"Greedy tokens ({FOUR_TOKENS.max_tokens} a request) the same with and without caching, on every "
              f"transport: {same}.", ""]
    return "\n".join(lines)


def main() -> None:
    """Measure, print, and write ``prefix-cache-<device>-<date>.{json,md}``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prefix-tokens", type=int, default=512)
    ap.add_argument("--tail-tokens", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    add_output_args(ap, "prefix-cache[-disagg]")
    ap.add_argument("--disagg", action="store_true", help="through 1P1D deployments: KV bytes moved per request")
    ap.add_argument("--transports", default="inproc,socket", help="with --disagg: comma-separated")
    args = ap.parse_args()
    loaded = load_model(args.model, device=args.device, dtype="float32")
    info = machine_info()
    rng = random.Random(args.seed)
    vocab = loaded.config.vocab_size
    prefix = [rng.randrange(3, vocab) for _ in range(args.prefix_tokens)]
    prompts = tuple(prefix + [rng.randrange(3, vocab) for _ in range(args.tail_tokens)] for _ in range(2))
    serve_one(LLMEngine(loaded, EngineConfig()), prompts[0])  # warm-up: first-call costs stay out of the figures
    if args.disagg:
        main_disagg(args, loaded, prompts, info)  # type: ignore[arg-type]
        return
    rows = []
    for r in range(args.repeats):
        rows.append(one_repeat(loaded, prompts, args.block_size))  # type: ignore[arg-type]
        print(f"repeat {r}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in rows[-1].items()))
    med = {k: statistics.median(row[k] for row in rows) for k in rows[0] if k.endswith("_ttft_s")}
    ratio_cached = [row["cached_second_ttft_s"] / row["cached_first_ttft_s"] for row in rows]
    ratio_plain = [row["plain_second_ttft_s"] / row["plain_first_ttft_s"] for row in rows]
    same_token = all(row["cached_second_token"] == row["plain_second_token"] for row in rows)
    summary = {"median_ttft_s": med, "median_second_over_first_cached": statistics.median(ratio_cached),
               "median_second_over_first_plain": statistics.median(ratio_plain),
               "second_num_cached_tokens": sorted({row["cached_second_num_cached_tokens"] for row in rows}),
               "first_token_same_with_and_without_cache": same_token}
    finish_run("prefix_cache", args, info, rows, summary, "prefix-cache", markdown)


def main_disagg(args: argparse.Namespace, loaded: LoadedModel, prompts: tuple[list[int], list[int]],
                info: dict[str, Any]) -> None:
    """``--disagg``: measure every transport ``repeats`` times, print, write ``prefix-cache-disagg-<device>-<date>``."""
    rows = []
    for r in range(args.repeats):
        for transport in args.transports.split(","):
            rows.append(disagg_repeat(loaded, prompts, args.block_size, transport))
            print(f"repeat {r}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in rows[-1].items()))
    finish_run("prefix_cache_disagg", args, info, rows, disagg_summary(rows), "prefix-cache-disagg", disagg_markdown)


def markdown(result: dict[str, Any], date: str) -> str:
    """The result as a Markdown table with its machine and the two ratios."""
    s, m, a = result["summary"], result["machine"], result["args"]
    med = s["median_ttft_s"]
    lines = [
        f"# Prefix caching: TTFT of a request sharing a {a['prefix_tokens']}-token prefix ({date})",
        "",
        f"{result['model']} on {result['device']} ({m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
        f"load average {m['loadavg_start'][0]:.1f} at start, {result['loadavg_end'][0]:.1f} at the end); "
        f"block size {a['block_size']}, tails of {a['tail_tokens']} tokens, {a['repeats']} repeats, medians.",
        "",
        "| engine | first request TTFT | second request TTFT | second / first (median of ratios) |",
        "|---|---:|---:|---:|",
        f"| prefix caching | {med['cached_first_ttft_s'] * 1e3:.1f} ms | {med['cached_second_ttft_s'] * 1e3:.1f} ms "
        f"| {s['median_second_over_first_cached']:.3f}x |",
        f"| no cache (control) | {med['plain_first_ttft_s'] * 1e3:.1f} ms | {med['plain_second_ttft_s'] * 1e3:.1f} ms "
        f"| {s['median_second_over_first_plain']:.3f}x |",
        "",
        f"num_cached_tokens of the second request: {s['second_num_cached_tokens']}; its first token is the same "
        f"with and without the cache: {s['first_token_same_with_and_without_cache']}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
