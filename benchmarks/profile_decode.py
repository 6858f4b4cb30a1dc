"""Where does a minidisagg CPU decode step spend its time? (A diagnostic, not a benchmark of record.)

Wraps the engine's dispatch points (linear, attention, norm, RoPE, KV write, SwiGLU, the runner's
input preparation, the LM head, sampling, scheduling, output building) in exclusive wall-time
timers, without editing engine code, runs ``--steps`` decode steps of ``LLM.engine.step()``
and prints milliseconds per step per part, next to the bare matmul chain of the same shapes.
Then a torch.profiler table of the aten ops of a few steps.

    python benchmarks/profile_decode.py --dtype float32 --batch 1 [--threads 2]
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import statistics
import time
from typing import Any, Callable

import torch

import minidisagg.engine.llm_engine as llm_engine
import minidisagg.engine.runner as runner
import minidisagg.models.llama as llama
import minidisagg.stages.base as stage_base
from minidisagg import LLM, SamplingParams
from minidisagg.bench.cpu import PROMPT, matmul_chain_step, matmul_chain_weights

TOTALS: dict[str, float] = collections.defaultdict(float)
CALLS: dict[str, int] = collections.defaultdict(int)
_STACK: list[list[float]] = []  # per active timer: [start, time spent in nested timers]


def timed(part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` wrapped so its exclusive wall time (minus nested timed calls) adds to TOTALS[part]."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        frame = [time.perf_counter(), 0.0]
        _STACK.append(frame)
        try:
            return fn(*args, **kwargs)
        finally:
            _STACK.pop()
            spent = time.perf_counter() - frame[0]
            TOTALS[part] += spent - frame[1]
            CALLS[part] += 1
            if _STACK:
                _STACK[-1][1] += spent

    return wrapper


def instrument(llm: LLM) -> None:
    """Patch the module-level names the engine calls through (the engine's code is untouched)."""
    for name, part in [("linear", "matmul (F.linear, incl. lm_head)"), ("paged_attention", "attention"), ("rms_norm", "rms_norm"),
                       ("rope_and_write_kv", "rope + kv write"), ("silu_and_mul", "silu_and_mul")]:
        setattr(llama, name, timed(part, getattr(llama, name)))
    llama.LlamaLayer.forward = timed("layer glue (split/view/reshape, module call)", llama.LlamaLayer.forward)
    llama.LlamaModel.forward = timed("model glue (embed, layer loop)", llama.LlamaModel.forward)
    llama.LlamaModel.compute_logits = timed("compute_logits glue (.float())", llama.LlamaModel.compute_logits)
    runner.ModelRunner._prepare = timed("runner._prepare (metadata tensors)", runner.ModelRunner._prepare)
    runner.ModelRunner.execute = timed("runner.execute glue", runner.ModelRunner.execute)
    stage_base.sample = timed("sampling (argmax, tolist)", stage_base.sample)
    sched = llm.engine.scheduler
    sched.schedule = timed("scheduler.schedule", sched.schedule)
    llm.engine._apply = timed("engine._apply (append, stop check)", llm.engine._apply)
    llm.engine.output_of = timed("engine.output_of (detokenize, RequestOutput)", llm.engine.output_of)
    llm.engine.step = timed("engine.step glue", llm.engine.step)


def matmul_ceiling_ms(dtype: torch.dtype, batch: int, steps: int) -> float:
    """Milliseconds per step of the bare matmul chain (same shapes)."""
    weights = matmul_chain_weights(dtype)
    x = torch.randn(batch, 576).to(dtype)
    with torch.inference_mode():
        for _ in range(3):
            matmul_chain_step(x, weights)
        t0 = time.perf_counter()
        for _ in range(steps):
            matmul_chain_step(x, weights)
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    """Profile decode steps and print the breakdown."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--torch-profile", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM("smollm2-135m", device="cpu", dtype=args.dtype)
    ids = llm.get_tokenizer().apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    llm.generate([{"prompt_token_ids": ids}] * args.batch, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    params = SamplingParams(temperature=0, max_tokens=args.steps * 3, ignore_eos=True)
    for _ in range(args.batch):
        llm.engine.add_request({"prompt_token_ids": ids}, params)
    llm.engine.step()  # prefill
    for _ in range(5):
        llm.engine.step()  # warm decode
    plain = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        llm.engine.step()
        plain.append(time.perf_counter() - t0)
    instrument(llm)
    per_step: dict[str, list[float]] = collections.defaultdict(list)
    walls = []
    for _ in range(args.steps):
        before = dict(TOTALS)
        t0 = time.perf_counter()
        llm.engine.step()
        walls.append((time.perf_counter() - t0) * 1e3)
        for part, total in TOTALS.items():
            per_step[part].append((total - before.get(part, 0.0)) * 1e3)
    wall = statistics.median(walls)
    ceiling = matmul_ceiling_ms(getattr(torch, args.dtype), args.batch, args.steps)
    plain_ms = statistics.median(plain) * 1e3
    print(f"dtype {args.dtype}  batch {args.batch}  threads {torch.get_num_threads()}  (medians over {args.steps} steps)")
    print(f"decode step: {plain_ms:.2f} ms uninstrumented (min {min(plain) * 1e3:.2f}), {wall:.2f} ms instrumented; "
          f"bare matmul chain {ceiling:.2f} ms  ({args.batch / plain_ms * 1e3:.1f} vs {args.batch / ceiling * 1e3:.1f} tok/s)")
    rows = sorted(((p, statistics.median(v)) for p, v in per_step.items()), key=lambda kv: -kv[1])
    for part, ms in rows:
        print(f"  {part:48s} {ms:8.2f} ms/step  {100 * ms / wall:5.1f}%  calls/step {CALLS[part] / args.steps:6.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dtype": args.dtype, "batch": args.batch, "threads": torch.get_num_threads(),
                       "step_ms": plain_ms, "instrumented_step_ms": wall, "matmul_chain_ms": ceiling,
                       "parts_ms_per_step_median": dict(rows)}, f, indent=2)
    if args.torch_profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                llm.engine.step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        events = [e for e in prof.events() if e.name.startswith("aten::")]
        print(f"aten op calls per step (incl. nested): {len(events) / 5:.0f}")


if __name__ == "__main__":
    main()
