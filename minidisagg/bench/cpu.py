"""CPU decode throughput: minidisagg against HF transformers ``generate`` and a bare-matmul ceiling.

Every configuration generates from the same prompt token ids (SmolLM2-135M's chat template),
greedily, ignoring EOS, with ``batch`` copies of the prompt. Its decode throughput is

    tokens_per_s = batch * (N - 1) / (T(N) - T(1))

where T(k) is the wall time of one generate call producing k new tokens per sequence
(prefill included in both, so the difference is N - 1 decode steps). The ceiling is the same
number of steps of a bare chain of the model's matmuls (through the engine's own ``linear``
dispatch over the real weight shapes, so the fastest matmul kernel the engine has, no attention,
norms or sampling): what the engine can approach on this machine. One-row products in the chain go
through the native GEMV wherever the model's do (``kernels/cpu_native.py``), so the ceiling stays
above every configuration.
Configurations are interleaved inside every repetition and the median over repetitions is kept.
``minidisagg fp32`` and ``minidisagg bf16`` are the default engine: every step runs the model's own
code (``models/llama.py``), whose CPU dispatch points call native ops. With ``--accel`` the run adds
``minidisagg fp32 accel`` and ``minidisagg bf16 accel`` (``native_cpu_decode=True``: the opt-in
accelerator, decode steps as one C++ op copied from the stock model). With ``--compiled`` it adds
``minidisagg fp32 compiled`` and ``minidisagg bf16 compiled`` (``compile_cpu=True``: batch-1 decode
through one torch.compile graph of the model; batches of several sequences run the model eagerly, so
their batch-8 rows measure the default engine again).
"""

from __future__ import annotations

import datetime as dt
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from rich.console import Console
from rich.table import Table

from minidisagg.bench.args import cpu_parser
from minidisagg.bench.common import machine_info, progress_bar, write_result_files
from minidisagg.engine.sampling import SamplingParams
from minidisagg.kernels import cpu_native
from minidisagg.kernels.linear import linear
from minidisagg.llm import LLM

PROMPT = "Write a short story about a robot who learns to paint."
HF_FP32 = "HF transformers fp32"
FP32_COMPILED = "minidisagg fp32 compiled"
BF16_COMPILED = "minidisagg bf16 compiled"
FP32_ACCEL = "minidisagg fp32 accel"
BF16_ACCEL = "minidisagg bf16 accel"
GENERATORS = (HF_FP32, "minidisagg fp32", "minidisagg bf16", FP32_COMPILED, BF16_COMPILED, FP32_ACCEL, BF16_ACCEL)
CEILINGS = {"float32": "matmul ceiling fp32", "bfloat16": "matmul ceiling bf16"}
DTYPE_OF = {HF_FP32: "float32", "minidisagg fp32": "float32", "minidisagg bf16": "bfloat16", FP32_COMPILED: "float32",
            BF16_COMPILED: "bfloat16", FP32_ACCEL: "float32", BF16_ACCEL: "bfloat16",
            **{name: d for d, name in CEILINGS.items()}}
WARMUP_TOKENS = 4
# (configuration, batch size) -> the least "vs HF fp32" ratio it should reach on this 2-core CPU
GOALS = {**{("minidisagg fp32", b): f for b, f in ((1, 1.0), (8, 1.3))},
         **{("minidisagg bf16", b): f for b, f in ((1, 1.2), (8, 2.0))},
         **{(FP32_ACCEL, b): 1.4 for b in (1, 8)}, **{(BF16_ACCEL, b): 2.3 for b in (1, 8)},
         **{(FP32_COMPILED, 1): 1.2, (BF16_COMPILED, 1): 2.0}}


class Generator:
    """One configuration that can generate ``n`` tokens for ``batch`` prompt copies; ``run`` times it."""

    def __init__(self, name: str, generate: Callable[[int, int], list[int]]) -> None:
        self.name = name
        self._generate = generate

    def run(self, batch: int, n: int) -> tuple[float, list[int]]:
        """Seconds for one generate call, and the first sequence's new tokens."""
        t0 = time.perf_counter()
        tokens = self._generate(batch, n)
        return time.perf_counter() - t0, tokens


def hf_generator(prompt_ids: list[int]) -> Generator:
    """HF transformers ``generate`` (greedy, ``min_new_tokens`` forcing N tokens) on the same GGUF."""
    import transformers
    from transformers import AutoModelForCausalLM

    from minidisagg.models.fetch import SMOLLM2_GGUF, fetch

    transformers.logging.set_verbosity_error()
    path = fetch(SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()

    def generate(batch: int, n: int) -> list[int]:
        ids = torch.tensor([prompt_ids] * batch)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, temperature=None, top_p=None, top_k=None,
                                 pad_token_id=model.config.eos_token_id)
        return out[0, len(prompt_ids):].tolist()

    return Generator(HF_FP32, generate)


def minidisagg_generator(name: str, llm: LLM, prompt_ids: list[int]) -> Generator:
    """An ``LLM`` generating greedily with ``ignore_eos`` (``LLM.generate``, progress bar off)."""
    def generate(batch: int, n: int) -> list[int]:
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": prompt_ids}] * batch, params, use_tqdm=False)
        return outs[0].token_ids

    return Generator(name, generate)


def matmul_chain_weights(dtype: torch.dtype, seed: int = 0) -> list[list[torch.Tensor]]:
    """Distinct random weights with SmolLM2-135M's shapes: per layer qkv, o, gate_up, down; then lm_head."""
    from minidisagg.config import PRESETS

    cfg = PRESETS["smollm2-135m"]
    h, f = cfg.hidden_size, cfg.intermediate_size
    gen = torch.Generator().manual_seed(seed)
    shapes = [(cfg.q_size + 2 * cfg.kv_size, h), (h, cfg.q_size), (2 * f, h), (h, f)]

    def w(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=gen) * cols**-0.5).to(dtype)

    layers = [[w(*s) for s in shapes] for _ in range(cfg.num_layers)]
    return layers + [[w(cfg.vocab_size, h)]]


def matmul_chain_step(x: torch.Tensor, weights: list[list[torch.Tensor]],
                      matmul: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """One decode step's matmuls (``matmul``, default the engine's ``linear``): each output sliced to the next's input."""
    matmul = matmul or linear
    for qkv, o, gate_up, down in weights[:-1]:
        a = matmul(x, qkv)[:, : o.shape[1]].contiguous()
        b = matmul(a, o)
        c = matmul(b, gate_up)[:, : down.shape[1]].contiguous()
        x = matmul(c, down)
    return matmul(x, weights[-1][0])


def ceiling_generator(name: str, dtype: torch.dtype) -> Generator:
    """The matmul chain, timed like a generator: ``n`` tokens = ``n`` steps (the first stands in for prefill).

    Its products are the engine's own ``linear``, so one row takes the native GEMV wherever the model's do.
    """
    weights = matmul_chain_weights(dtype)
    hidden = weights[0][1].shape[0]

    def generate(batch: int, n: int) -> list[int]:
        x = torch.randn(batch, hidden).to(dtype)
        with torch.inference_mode():
            for _ in range(n):
                logits = matmul_chain_step(x, weights)
        return logits[0, :1].int().tolist()

    return Generator(name, generate)


def run_cpu_decode_bench(
    batch_sizes: Sequence[int] = (1, 8), new_tokens: int = 64, repeats: int = 3, progress: bool = True,
    threads: Optional[int] = None, compiled: bool = False, accel: bool = False,
) -> dict[str, Any]:
    """Measure decode tokens/s of every configuration at every batch size; returns the result dict.

    ``threads`` sets ``torch.set_num_threads`` first (default: leave torch's choice, one per core).
    ``compiled`` adds the fp32 and bf16 engines with ``compile_cpu=True`` (compiled during the warm-up);
    ``accel`` the fp32 and bf16 engines with ``native_cpu_decode=True`` (the opt-in C++ decode step).
    """
    if new_tokens < 2 or repeats < 1:
        raise ValueError("new_tokens must be >= 2 and repeats >= 1")
    if threads is not None:
        torch.set_num_threads(threads)
    console = Console(stderr=True, quiet=not progress)
    info = machine_info()
    with console.status("loading models"):
        engines = {"minidisagg fp32": LLM("smollm2-135m", device="cpu", dtype="float32"),
                   "minidisagg bf16": LLM("smollm2-135m", device="cpu", dtype="bfloat16")}
        if compiled:
            engines[FP32_COMPILED] = LLM("smollm2-135m", device="cpu", dtype="float32", compile_cpu=True)
            engines[BF16_COMPILED] = LLM("smollm2-135m", device="cpu", dtype="bfloat16", compile_cpu=True)
        if accel:
            engines[FP32_ACCEL] = LLM("smollm2-135m", device="cpu", dtype="float32", native_cpu_decode=True)
            engines[BF16_ACCEL] = LLM("smollm2-135m", device="cpu", dtype="bfloat16", native_cpu_decode=True)
        chat = [{"role": "user", "content": PROMPT}]
        prompt_ids = engines["minidisagg fp32"].get_tokenizer().apply_chat_template(chat, add_generation_prompt=True)
        gens = [hf_generator(prompt_ids)] + [minidisagg_generator(n, llm, prompt_ids) for n, llm in engines.items()]
        info["native_gemv"] = {d: cpu_native.gemv_available(getattr(torch, d)) for d in CEILINGS}
        gens += [ceiling_generator(name, getattr(torch, d)) for d, name in CEILINGS.items()]
    decode_s: dict[tuple[str, int], list[float]] = {(g.name, b): [] for g in gens for b in batch_sizes}
    stage_s: dict[tuple[str, int], list[float]] = {k: [] for k in decode_s}
    tokens: dict[tuple[str, int], list[int]] = {}
    with progress_bar(console, progress) as bar:
        warm = bar.add_task("warm-up", total=len(gens) * len(batch_sizes))
        for g in gens:
            for b in batch_sizes:
                g.run(b, WARMUP_TOKENS)
                bar.advance(warm)
        task = bar.add_task("timed runs", total=repeats * len(gens) * len(batch_sizes))
        for r in range(repeats):
            order = gens[r % len(gens):] + gens[: r % len(gens)]  # rotate who goes first
            for b in batch_sizes:
                for g in order:
                    bar.update(task, description=f"rep {r + 1}/{repeats}  batch {b}  {g.name}")
                    t_one, _ = g.run(b, 1)
                    llm = engines.get(g.name)
                    mark = len(llm.engine.stats.steps) if llm else 0
                    t_n, toks = g.run(b, new_tokens)
                    decode_s[(g.name, b)].append(t_n - t_one)
                    tokens[(g.name, b)] = toks
                    if llm:
                        steps = [s for s in llm.engine.stats.steps[mark:] if s.stage == "decode"]
                        stage_s[(g.name, b)].append(sum(s.elapsed_s for s in steps))
                    bar.advance(task)
    info["loadavg_end"] = list(os.getloadavg())
    rows = _summarize(decode_s, stage_s, tokens, batch_sizes, new_tokens)
    by = {(r["name"], r["batch"]): r for r in rows}
    goals, goals_best = {}, {}
    for (name, b), factor in GOALS.items():
        if (name, b) not in by:
            continue
        goal = f"{name} >= {factor:g}x HF fp32 at batch {b}"
        goals[goal] = by[(name, b)]["vs_hf_fp32"] >= factor
        goals_best[goal] = by[(name, b)]["tokens_per_s_best"] >= factor * by[(HF_FP32, b)]["tokens_per_s_best"]
    return {
        "benchmark": "cpu-decode", "date": dt.datetime.now().isoformat(timespec="seconds"), "machine": info,
        "settings": {"model": "smollm2-135m (SmolLM2-135M-Instruct Q4_1 GGUF, dequantized)", "prompt": PROMPT,
                     "prompt_tokens": len(prompt_ids), "new_tokens": new_tokens, "repeats": repeats,
                     "batch_sizes": list(batch_sizes), "greedy": True, "ignore_eos": True,
                     "definition": "tokens_per_s = batch * (N - 1) / median(T(N) - T(1)); T(k) = wall time of "
                                   "one generate call making k new tokens per sequence"},
        "rows": rows, "goals": goals, "goals_on_best": goals_best,
    }


def _summarize(
    decode_s: dict[tuple[str, int], list[float]],
    stage_s: dict[tuple[str, int], list[float]],
    tokens: dict[tuple[str, int], list[int]],
    batch_sizes: Sequence[int],
    new_tokens: int,
) -> list[dict[str, Any]]:
    """One row per (configuration, batch): median and best tokens/s and the ratios."""
    rows = []
    names = list(dict.fromkeys(name for name, _ in decode_s))
    for b in batch_sizes:
        work = b * (new_tokens - 1)
        rate = {n: work / statistics.median(decode_s[(n, b)]) for n in names}
        for n in names:
            row: dict[str, Any] = {
                "name": n, "batch": b, "dtype": DTYPE_OF[n],
                "tokens_per_s": round(rate[n], 2),
                "vs_hf_fp32": round(rate[n] / rate[HF_FP32], 3),
                "fraction_of_matmul_ceiling": round(rate[n] / rate[CEILINGS[DTYPE_OF[n]]], 3),
                "tokens_per_s_best": round(work / min(decode_s[(n, b)]), 2),
                "decode_s_per_repeat": [round(t, 4) for t in decode_s[(n, b)]],
            }
            if stage_s[(n, b)]:
                row["decode_stage_tokens_per_s"] = round(work / statistics.median(stage_s[(n, b)]), 2)
            if n in GENERATORS:
                ref, mine = tokens[(HF_FP32, b)], tokens[(n, b)]
                row["greedy_prefix_match_hf"] = next((i for i, (x, y) in enumerate(zip(ref, mine)) if x != y), len(ref))
            rows.append(row)
    return rows


def render_table(result: dict[str, Any]) -> Table:
    """The rows as a rich table."""
    table = Table(title=f"CPU decode throughput, {result['machine']['cpu']} ({result['machine']['cores']} cores)")
    for col in ("config", "batch", "tokens/s", "best", "vs HF fp32", "of matmul ceiling", "greedy = HF"):
        table.add_column(col, justify="left" if col == "config" else "right")
    for r in result["rows"]:
        match = r.get("greedy_prefix_match_hf")
        table.add_row(r["name"], str(r["batch"]), f"{r['tokens_per_s']:.1f}", f"{r['tokens_per_s_best']:.1f}",
                      f"{r['vs_hf_fp32']:.2f}x",
                      f"{r['fraction_of_matmul_ceiling']:.2f}", "" if match is None else f"{match}/{result['settings']['new_tokens']}")
    return table


def to_markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown report: machine, definition, table and goals."""
    m, s = result["machine"], result["settings"]
    lines = [f"# CPU decode throughput ({result['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, avx512_bf16 {m['avx512_bf16']}, "
             f"amx_bf16 {m['amx_bf16']}, native GEMV {m.get('native_gemv', {})}; torch {m['torch']}, transformers {m['transformers']}; "
             f"minidisagg at commit {(m.get('minidisagg_commit') or 'unknown')[:10]}; "
             f"load average {m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end.", "",
             f"Model {s['model']}; prompt of {s['prompt_tokens']} tokens; N = {s['new_tokens']} new tokens, greedy, "
             f"EOS ignored; median of {s['repeats']} interleaved repetitions. {s['definition']}.", "",
             "| config | batch | decode tokens/s (median) | best | vs HF fp32 | fraction of matmul ceiling | greedy tokens = HF fp32 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        match = r.get("greedy_prefix_match_hf")
        shown = "" if match is None else f"{match}/{s['new_tokens']}"
        lines.append(f"| {r['name']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s_best']:.1f} | {r['vs_hf_fp32']:.2f}x | "
                     f"{r['fraction_of_matmul_ceiling']:.2f} | {shown} |")
    best = result.get("goals_on_best", {})
    lines += ["", "Goals (on the medians; in brackets, on the best repetitions):", ""]
    lines += [f"- {'met' if ok else 'MISSED'} ({'met' if best.get(goal) else 'missed'}): {goal}"
              for goal, ok in result["goals"].items()]
    return "\n".join(lines) + "\n"


def write_results(result: dict[str, Any], out_dir: Optional[Path] = None) -> tuple[Path, Path]:
    """Write ``cpu-decode-<date>.json`` and ``.md``; returns their paths."""
    return write_result_files(result, f"cpu-decode-{result['date'][:10]}", to_markdown(result), out_dir)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m minidisagg.bench.cpu [--batch-sizes 1 8] [--new-tokens 64] [--repeats 3]``."""
    args = cpu_parser().parse_args(argv)
    result = run_cpu_decode_bench(args.batch_sizes, args.new_tokens, args.repeats, not args.no_progress, args.threads,
                                  args.compiled, args.accel)
    console = Console()
    console.print(render_table(result))
    for goal, ok in result["goals"].items():
        on_best = "met" if result["goals_on_best"][goal] else "missed"
        console.print(f"[{'green' if ok else 'red'}]{'met' if ok else 'MISSED'}[/] (on best: {on_best}): {goal}")
    json_path, md_path = write_results(result, args.out_dir)
    console.print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
