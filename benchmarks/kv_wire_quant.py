"""What does quantising KV pages for the wire save, cost and change? (``kv_wire_dtype``, ``kv/wire_quant.py``.)

One run, side by side, on one machine:

1. bytes: a real prefill's pages (smollm2-135m, block_size 16, head_dim 64) as they cross the
   wire, int8 and fp8_e4m3 against the same pages in float32 and in bfloat16, with the
   arithmetic they should match: (1 + (4 + head_dim + block_size) / (block_size * head_dim)) / itemsize
   (a float32 scale per block-head, a uint8 code per channel and one per token); and ``kv_transfer_bytes``
   of a real disaggregated run per wire dtype;
2. time: quantise (``WireMessage.encode``) and dequantise (``decode``, with its checks) per MB of
   pool-dtype pages, next to a plain ``clone`` of the same pages (the copy a gather costs anyway);
3. output: greedy tokens when the prompts' pages made the trip (int8, fp8_e4m3, and, as the
   reference point of any lossy wire, a plain cast to bfloat16) against the uncompressed pages, over
   the first ``--tokens`` tokens of ``--prompts`` prompts (all decoded in the same batches every time,
   so the runs differ only in the pages); and the largest logit error of the first decode step,
   the step that first reads the transferred pages.

    python benchmarks/kv_wire_quant.py [--device cpu|cuda] [--dtype float32|bfloat16] [--out-stem PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from minidisagg import LLM, SamplingParams
from minidisagg.bench.common import machine_info
from minidisagg.bench.wire_quality import engine_round_trips, greedy_runs, prefill_pages
from minidisagg.kv.pages import gather_pages
from minidisagg.kv.wire_quant import WireMessage, wire_nbytes
from minidisagg.models.registry import load_model

WIRE_DTYPES = ("int8", "fp8_e4m3")
REFERENCE_WIRES = ("bfloat16",)  # float32 pages simply cast to bfloat16 for the trip: what a lossy wire costs at least
QUESTIONS = [
    "What is the capital of France?", "Explain photosynthesis in two sentences.", "Write a haiku about the sea.",
    "How do vaccines work?", "Give three tips for learning a new language.", "What causes the seasons on Earth?",
    "Summarise the plot of Romeo and Juliet.", "What is a prime number? Give examples.",
    "How does a refrigerator keep food cold?", "Describe the water cycle.", "Why is the sky blue?",
    "What are the benefits of regular exercise?", "Explain what a computer program is to a child.",
    "List the planets of the solar system in order.", "How do bees make honey?",
    "What is the difference between weather and climate?", "Write a short thank-you note to a teacher.",
    "How does a bicycle stay upright?", "What is machine learning?", "Suggest a healthy breakfast and say why.",
]


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (timings on CUDA), nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_s(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bytes_and_time(loaded: Any, prompt_ids: list[int], block_size: int, repeats: int) -> dict[str, Any]:
    """Wire bytes and quantise / dequantise time of a real prefill's pages, in float32 and bfloat16 pools."""
    runner, table, _ = prefill_pages(loaded, prompt_ids, block_size)
    pages = gather_pages(runner.kv_cache, table)
    device, cfg = pages.device, loaded.config
    out: dict[str, Any] = {"pages_shape": list(pages.shape), "num_blocks": len(table)}
    for pool_dtype in (torch.float32, torch.bfloat16):
        name = str(pool_dtype).removeprefix("torch.")
        source = pages.to(pool_dtype).contiguous()
        mb = source.numel() * source.element_size() / 1e6
        row: dict[str, Any] = {"page_bytes": source.numel() * source.element_size(), "page_mb": mb,
                               "clone_ms_per_mb": median_s(source.clone, device, repeats) * 1e3 / mb}
        for wire in WIRE_DTYPES:
            message = WireMessage.encode(source, wire)
            assert message.nbytes == wire_nbytes(source.shape, wire, pool_dtype)
            formula = (1 + (4 + cfg.head_dim + block_size) / (block_size * cfg.head_dim)) / source.element_size()
            row[wire] = {
                "wire_bytes": message.nbytes, "ratio": message.nbytes / row["page_bytes"], "ratio_formula": formula,
                "encode_ms_per_mb": median_s(lambda: WireMessage.encode(source, wire), device, repeats) * 1e3 / mb,
                "decode_ms_per_mb": median_s(lambda: message.decode(pool_dtype), device, repeats) * 1e3 / mb,
            }
        out[name] = row
    return out


def engine_bytes(args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, Any]:
    """``kv_transfer_bytes`` of a real disaggregated run per wire dtype (2 tokens each), and its ratio to ``auto``."""
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    out: dict[str, Any] = {}
    for wire in ("auto", *WIRE_DTYPES):
        with LLM(args.model, device=args.device, dtype=args.dtype, mode="disagg", transport=args.transport,
                 kv_wire_dtype=wire, request_timeout_s=600) as llm:
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        errors = [o.error for o in outs if o.finish_reason == "error"]
        if errors:
            raise RuntimeError(f"{wire}: {errors[:3]}")
        out[wire] = {"kv_transfer_bytes": sum(o.metrics.kv_transfer_bytes for o in outs)}
        out[wire]["bytes_ratio"] = out[wire]["kv_transfer_bytes"] / out["auto"]["kv_transfer_bytes"]
    return out


def markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown report."""
    m, b, g = result["machine"], result["bytes_time"], result["greedy"]
    lines = [f"# KV pages quantised for the wire ({result['model']}, {result['device']}, {result['date']})", "",
             f"Machine: {m.get('cpu')} ({m.get('cores')} cores, torch {m.get('torch')}); model dtype "
             f"{result['model_dtype']}, block_size {result['block_size']}, transport {result['transport']}.", "",
             f"## Bytes and time ({b['num_blocks']} blocks of a {result['bytes_prompt_tokens']}-token prompt, "
             f"pages {b['pages_shape']})", "",
             "| pool dtype | wire | bytes ratio | formula | quantise ms/MB | dequantise ms/MB | clone ms/MB |",
             "|---|---|---|---|---|---|---|"]
    for pool in ("float32", "bfloat16"):
        row = b[pool]
        for wire in WIRE_DTYPES:
            w = row[wire]
            lines.append(f"| {pool} | {wire} | {w['ratio']:.4f} | {w['ratio_formula']:.4f} | "
                         f"{w['encode_ms_per_mb']:.3f} | {w['decode_ms_per_mb']:.3f} | {row['clone_ms_per_mb']:.3f} |")
    lines += ["", "kv_transfer_bytes of a disaggregated run, against auto: " + ", ".join(
        f"{w} {result['engine_bytes'][w]['bytes_ratio']:.4f}" for w in WIRE_DTYPES) + ".",
              "", f"## Output ({result['num_prompts']} prompts, first {result['tokens']} greedy tokens, "
                  f"against the uncompressed pages)", "",
              "| wire | token agreement | mean prefix before first difference | identical outputs | "
              "first-step max logit error | / logit range | first-step top-1 flips |",
              "|---|---|---|---|---|---|---|"]
    for wire in (*REFERENCE_WIRES, *WIRE_DTYPES):
        r = g[wire]
        lines.append(f"| {wire} | {r['token_agreement']:.3f} | {r['mean_prefix_fraction']:.3f} | "
                     f"{r['identical_outputs']}/{result['num_prompts']} | {r['first_step_max_abs']:.4f} | "
                     f"{r['first_step_max_rel_to_range']:.2e} | {r['first_step_top1_flips']} |")
    goals = result["goals"]
    lines += ["", "Goals: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in goals.items()), ""]
    return "\n".join(lines)


def main() -> None:
    """Run the three measurements and write JSON and Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="the model's (and so the pool's) dtype")
    parser.add_argument("--transport", default="inproc", help="inproc, socket or dist for the kv_transfer_bytes runs")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--bytes-prompt-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out-stem", default="", help="write PATH.json and PATH.md (default: benchmarks/results/"
                                                       "kv-wire-quant-<device>-<date>)")
    args = parser.parse_args()
    date = time.strftime("%Y-%m-%d")
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    tokenizer = loaded.tokenizer
    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": q}]))
               for q in (QUESTIONS * (1 + args.prompts // len(QUESTIONS)))[:args.prompts]]
    long_prompt = (sum(prompts, []) * (1 + args.bytes_prompt_tokens // 100))[:args.bytes_prompt_tokens]
    with torch.inference_mode():
        bytes_time = bytes_and_time(loaded, long_prompt, args.block_size, args.repeats)
        greedy = greedy_runs(loaded, prompts, args.block_size, args.tokens,
                             engine_round_trips((*REFERENCE_WIRES, *WIRE_DTYPES)))
    engine = engine_bytes(args, prompts)
    result = {"model": args.model, "device": args.device, "model_dtype": args.dtype, "date": date,
              "block_size": args.block_size, "transport": args.transport, "num_prompts": args.prompts,
              "tokens": args.tokens, "bytes_prompt_tokens": args.bytes_prompt_tokens, "machine": machine_info(),
              "bytes_time": bytes_time, "engine_bytes": engine, "greedy": greedy}
    result["goals"] = {
        "int8 <= 0.30x float32 pages": bytes_time["float32"]["int8"]["ratio"] <= 0.30,
        "int8 <= 0.55x bfloat16 pages": bytes_time["bfloat16"]["int8"]["ratio"] <= 0.55,
        "int8 greedy agreement >= 0.90": greedy["int8"]["token_agreement"] >= 0.90,
    }
    stem = Path(args.out_stem or f"benchmarks/results/kv-wire-quant-{args.device}-{date}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
