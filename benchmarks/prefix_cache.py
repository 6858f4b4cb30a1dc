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
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import statistics
import threading
from typing import Any

from minidisagg.bench.common import machine_info, write_result_files
from minidisagg.config import CacheConfig, EngineConfig
from minidisagg.engine.llm_engine import LLMEngine, RequestOutput
from minidisagg.engine.sampling import SamplingParams
from minidisagg.models.registry import LoadedModel, load_model

FIRST_TOKEN_ONLY = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


def serve_one(engine: LLMEngine, prompt: list[int]) -> RequestOutput:
    """Run one request alone to its first token (the engine stepped on a thread of its own)."""
    found: dict[str, RequestOutput] = {}

    def run() -> None:
        rid = engine.add_request({"prompt_token_ids": prompt}, FIRST_TOKEN_ONLY)
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished and out.request_id == rid:
                    found["out"] = out
        engine.release(rid)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    if "out" not in found:
        raise RuntimeError("the request did not finish (see the traceback above)")
    return found["out"]


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
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--stem", default=None, help="file name stem (default prefix-cache-<device>-<date>)")
    args = ap.parse_args()
    loaded = load_model(args.model, device=args.device, dtype="float32")
    info = machine_info()
    rng = random.Random(args.seed)
    vocab = loaded.config.vocab_size
    prefix = [rng.randrange(3, vocab) for _ in range(args.prefix_tokens)]
    prompts = tuple(prefix + [rng.randrange(3, vocab) for _ in range(args.tail_tokens)] for _ in range(2))
    serve_one(LLMEngine(loaded, EngineConfig()), prompts[0])  # warm-up: first-call costs stay out of the figures
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
    result = {"benchmark": "prefix_cache", "model": args.model, "device": args.device, "args": vars(args),
              "machine": info, "loadavg_end": list(os.getloadavg()), "rows": rows, "summary": summary}
    date = datetime.date.today().isoformat()
    stem = args.stem or f"prefix-cache-{args.device}-{date}"
    md = markdown(result, date)
    print(md)
    json_path, md_path = write_result_files(result, stem, md, args.out_dir)
    print(f"wrote {json_path} and {md_path}")


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
