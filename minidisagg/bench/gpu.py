"""`minidisagg bench gpu`: the card's ceilings, then decode, prefill and every kernel against them, beside HF.

One run on one CUDA card measures, in this order:

- the card's ceilings: device-to-device copy bandwidth (bytes read + written) and a bf16 matmul rate;
- each Triton kernel against the torch reference (max error) and its roofline;
- engine decode ms/token (one whole engine step) at several batch sizes with CUDA graphs and
  asynchronous scheduling, and at batch 1 without asynchronous scheduling (`` sync``) and without
  graphs (`` eager``), against weight + KV bytes over the copy bandwidth;
- engine prefill time against FLOPs over the matmul rate;
- HF transformers ``generate`` on the same card, eager and with its static (compiled) cache.

Models use random weights of their real shapes (speed does not depend on the values). Results go to
``benchmarks/results/gpu-<card>-<date>.json`` and a Markdown table beside it.

    python -m minidisagg.cli bench gpu [--models smollm2-135m,llama-1b,llama-8b] [--out-dir DIR]
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from rich.console import Console
from rich.progress import Progress

from minidisagg.bench.args import gpu_parser
from minidisagg.bench.common import default_out_dir, git_commit, write_result_files
from minidisagg.bench.gpu_rows import Row, decode_row, engine_llm, prefill_row
from minidisagg.engine.prefill_graphs import PREFILL_BUCKETS
from minidisagg.roofline import measure_copy_bandwidth, measure_matmul_rate, measure_read_bandwidth

GOALS: dict[str, tuple[str, Callable[[dict[str, Any]], bool]]] = {
    "decode llama-8b bs1": (">= 0.80 of the bandwidth floor", lambda r: r["fraction_of_limit"] >= 0.80),
    "decode llama-1b bs1": (">= 0.60 of the bandwidth floor", lambda r: r["fraction_of_limit"] >= 0.60),
    "decode smollm2-135m bs1": ("<= 1.0 ms/token and >= 30x HF eager",
                                lambda r: r["value"] <= 1.0 and r.get("speedup_vs_hf", 0) >= 30),
    "prefill llama-8b 2048": (">= 0.65 of the matmul rate", lambda r: r["fraction_of_limit"] >= 0.65),
    "attention decode paged bs32 ctx8192": (">= 0.75 of the copy bandwidth", lambda r: r["fraction_of_limit"] >= 0.75),
}


def card_slug(name: str) -> str:
    """A file-name-safe card name: 'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")


def run_gpu_bench(models: Sequence[str], batches: Sequence[int], prefill_lengths: Sequence[int],
                  hf_eager: bool, hf_compiled: Sequence[str], prompt_len: int, new_tokens: int,
                  console: Console, rows_log: Optional[Path] = None,
                  parts: Sequence[str] = ("kernels", "decode", "prefill")) -> dict[str, Any]:
    """Measure ``parts`` on ``cuda:0``; returns the JSON-ready result (rows also appended to ``rows_log``)."""
    from minidisagg.bench.gpu_kernels import (PREFILL_ATTENTION_CASES, decode_attention_row, elementwise_rows,
                                              prefill_attention_rows)

    unknown = set(parts) - {"kernels", "decode", "prefill"}
    if unknown:
        raise ValueError(f"unknown --parts {sorted(unknown)}; choose from kernels, decode, prefill")

    if not torch.cuda.is_available():
        raise ValueError("bench gpu needs a CUDA device; torch sees none")
    torch.manual_seed(0)
    card = torch.cuda.get_device_name(0)
    copy_bw = measure_copy_bandwidth("cuda")
    mm_rate = measure_matmul_rate("cuda", torch.bfloat16)
    read_bw = measure_read_bandwidth("cuda")
    console.print(f"{card}: copy {copy_bw / 1e9:.0f} GB/s, read {read_bw / 1e9:.0f} GB/s, "
                  f"bf16 matmul {mm_rate / 1e12:.0f} TFLOP/s")
    rows: list[Row] = []
    checks: dict[str, Any] = {}
    steps = (len(models) * (len(batches) + 2 + 2 * len(prefill_lengths) + int(hf_eager)) + len(hf_compiled)
             + 6 + len(PREFILL_ATTENTION_CASES))
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("bench gpu", total=steps)

        def done(row: Row) -> None:
            rows.append(row)
            if rows_log is not None:  # so a run cut short still leaves what it measured
                with rows_log.open("a") as f:
                    f.write(json.dumps(row.as_dict()) + "\n")
            console.print(f"  {row.name}: {row.value} {row.unit}"
                          + (f" ({row.fraction_of_limit:.2f} of limit)" if row.fraction_of_limit else ""))
            progress.advance(task)

        if "kernels" in parts:
            done(decode_attention_row(32, 8192, copy_bw))
            done(decode_attention_row(1, 8192, copy_bw))
            for row in prefill_attention_rows(mm_rate):
                done(row)
            for row in elementwise_rows(16384, copy_bw):
                done(row)
        for model in models:
            if "decode" in parts:
                _decode_rows(model, batches, prompt_len, new_tokens, copy_bw, checks, done)
            if "prefill" in parts:
                llm = engine_llm(model, max_num_seqs=1, max_model_len=max(prefill_lengths) + 16, cuda_graphs=False)
                try:
                    for n in prefill_lengths:
                        done(prefill_row(model, n, mm_rate, llm))
                    graphed = [n for n in prefill_lengths if n <= max(PREFILL_BUCKETS)]
                    llm.engine.runner.enable_prefill_graphs(sorted(set(graphed)))  # type: ignore[union-attr]
                    for n in graphed:
                        done(prefill_row(model, n, mm_rate, llm, suffix=" graphs"))
                finally:
                    llm.shutdown()
                    del llm
                    torch.cuda.empty_cache()
            if "decode" in parts:
                _attach_hf(rows, model, prompt_len, hf_eager, model in hf_compiled, console, progress, task)
    return {
        "card": card, "torch": torch.__version__, "triton": _triton_version(), "cuda": torch.version.cuda,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "minidisagg_commit": git_commit(),
        "copy_GBps": round(copy_bw / 1e9, 1), "mm_TFLOPs": round(mm_rate / 1e12, 1),
        "read_GBps": round(read_bw / 1e9, 1), "prompt_len": prompt_len, "new_tokens": new_tokens,
        "rows": [r.as_dict() for r in rows], "checks": checks, "goals": evaluate_goals([r.as_dict() for r in rows]),
    }


def _decode_rows(model: str, batches: Sequence[int], prompt_len: int, new_tokens: int, copy_bw: float,
                 checks: dict[str, Any], done: Callable[[Row], None]) -> None:
    """Decode rows of ``model`` (graphs at each batch, then sync and eager at the first) and their equality checks."""
    graph_tokens: list[list[int]] = []
    for batch in batches:
        row, tokens = decode_row(model, batch, prompt_len, new_tokens, copy_bw)
        graph_tokens = tokens if batch == batches[0] else graph_tokens
        done(row)
    row, sync_tokens = decode_row(model, batches[0], prompt_len, new_tokens, copy_bw, async_scheduling=False)
    done(row)
    row, eager_tokens = decode_row(model, batches[0], prompt_len, new_tokens, copy_bw, cuda_graphs=False)
    done(row)
    same = sum(a == b for a, b in zip(graph_tokens, eager_tokens))
    checks[f"{model} greedy tokens, CUDA graphs == eager (bs{batches[0]})"] = f"{same}/{len(eager_tokens)} sequences"
    same = sum(a == b for a, b in zip(graph_tokens, sync_tokens))
    checks[f"{model} greedy tokens, async == sync scheduling (bs{batches[0]})"] = f"{same}/{len(sync_tokens)} sequences"


def _attach_hf(rows: list[Row], model: str, prompt_len: int, eager: bool, compiled: bool, console: Console,
               progress: Progress, task: Any) -> None:
    """Measure HF generate at batch 1 and attach it to this model's ``decode <model> bs1`` row."""
    from minidisagg.bench.gpu_hf import hf_decode_ms

    row = next((r for r in rows if r.name == f"decode {model} bs1"), None)
    if row is None:
        return
    if eager:
        row.hf_value = round(hf_decode_ms(model, 1, prompt_len, static=False), 3)
        row.speedup_vs_hf = round(row.hf_value / row.value, 1)
        console.print(f"  HF eager {model} bs1: {row.hf_value} ms/token")
        progress.advance(task)
    if compiled:
        try:
            row.hf_compiled_value = round(hf_decode_ms(model, 1, prompt_len, static=True), 3)
            row.speedup_vs_hf_compiled = round(row.hf_compiled_value / row.value, 2)
            console.print(f"  HF static cache (compiled) {model} bs1: {row.hf_compiled_value} ms/token")
        except Exception as exc:  # a compile failure is reported, not fatal to the other rows
            row.note = f"HF static-cache run failed: {type(exc).__name__}: {exc}"[:300]
        progress.advance(task)


def _triton_version() -> Optional[str]:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def evaluate_goals(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Each goal row: 'met' / 'missed' with its target, or 'not measured'."""
    by_name = {r["name"]: r for r in rows}
    verdicts = {}
    for name, (target, ok) in GOALS.items():
        row = by_name.get(name)
        verdicts[name] = "not measured" if row is None else f"{'met' if ok(row) else 'missed'} ({target})"
    return verdicts


def to_markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown page: ceilings, goals, then every row."""
    lines = [f"# GPU benchmark: {result['card']}", "",
             f"{result['date']}, torch {result['torch']}, triton {result['triton']}, commit {result['minidisagg_commit']}.",
             f"Measured ceilings: copy {result['copy_GBps']} GB/s (read + write), bf16 matmul {result['mm_TFLOPs']} TFLOP/s"
             + (f"; a torch.sum over 1 GiB, which only reads, {result['read_GBps']} GB/s." if "read_GBps" in result
                else "."),
             "A kernel that only reads (decode attention) can pass the copy bandwidth a little: the copy "
             "mixes reads and writes.",
             "Kernel rows are device time (calls replayed from a CUDA graph, timed by CUDA events); decode "
             "and prefill rows are the engine's wall time.",
             f"Decode: prompts of {result['prompt_len']} random tokens, {result['new_tokens']} new tokens, median step.", "",
             "## Goals", "", "| row | verdict |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in result["goals"].items()]
    lines += ["", "## Rows", "", "| row | value | floor | fraction of floor | HF eager | x HF | HF compiled | x HF compiled | note |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['value']} {r['unit']} | {r.get('limit', '')} | {r.get('fraction_of_limit', '')} "
                     f"| {r.get('hf_value', '')} | {r.get('speedup_vs_hf', '')} | {r.get('hf_compiled_value', '')} "
                     f"| {r.get('speedup_vs_hf_compiled', '')} | {r.get('note', '')} |")
    lines += ["", "## Checks", ""] + [f"- {k}: {v}" for k, v in result["checks"].items()]
    return "\n".join(lines) + "\n"


def write_results(result: dict[str, Any], out_dir: Optional[Path] = None) -> tuple[Path, Path]:
    """Write ``gpu-<card>-<date>.json`` and ``.md``; returns their paths."""
    stem = f"gpu-{card_slug(result['card'])}-{result['date'][:10]}"
    return write_result_files(result, stem, to_markdown(result), out_dir)


def _csv(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``minidisagg bench gpu``."""
    args = gpu_parser().parse_args(argv)
    console = Console()
    t0 = time.perf_counter()
    out_dir = Path(args.out_dir) if args.out_dir is not None else default_out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    result = run_gpu_bench(_csv(args.models), [int(b) for b in _csv(args.batches)], [int(n) for n in _csv(args.prefill)],
                           not args.no_hf, [] if args.no_hf else _csv(args.hf_compiled), args.prompt_len,
                           args.new_tokens, console, rows_log=out_dir / "gpu-rows-in-progress.jsonl",
                           parts=_csv(args.parts))
    (out_dir / "gpu-rows-in-progress.jsonl").unlink(missing_ok=True)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    for name, verdict in result["goals"].items():
        console.print(f"[{'green' if verdict.startswith('met') else 'red'}]{name}: {verdict}[/]")
    json_path, md_path = write_results(result, out_dir)
    console.print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
