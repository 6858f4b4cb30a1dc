"""The ``minidisagg`` command line: demo, generate, fetch, doctor, bench."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import Optional, Sequence

from rich.console import Console
from rich.table import Table

console = Console()


def cmd_generate(args: argparse.Namespace) -> int:
    """Stream one completion to stdout as tokens are produced."""
    from minidisagg.engine.llm_engine import LLMEngine
    from minidisagg.engine.sampling import SamplingParams
    from minidisagg.llm import LLM
    from minidisagg.models.tokenizer import IncrementalDetokenizer

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed)
    llm = LLM(args.model, device=args.device, dtype=args.dtype)
    tok = llm.get_tokenizer()
    if args.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
        prompt: object = {"prompt_token_ids": ids}
    else:
        prompt = args.prompt
    engine: LLMEngine = llm.engine
    rid = engine.add_request(prompt, params)  # type: ignore[arg-type]
    detok = IncrementalDetokenizer(tok, skip_special_tokens=True)
    seen = 0
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id != rid:
                continue
            for token in out.token_ids[seen:]:
                sys.stdout.write(detok.push(token))
            seen = len(out.token_ids)
            sys.stdout.flush()
            if out.finished:
                final = out
    sys.stdout.write(detok.flush() + "\n")
    if final is not None and final.metrics is not None and not args.quiet:
        m = final.metrics
        console.print(f"[dim]{m.num_output_tokens} tokens, finish={final.finish_reason}, TTFT {1e3 * m.ttft_s:.0f} ms, "
                      f"TPOT {1e3 * m.tpot_s:.1f} ms[/]", highlight=False)
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    """Download and verify a model's weights into the cache."""
    from minidisagg.models.fetch import SMOLLM2_GGUF, fetch
    from minidisagg.models.registry import RANDOM_MODELS, known_models

    if args.model in RANDOM_MODELS:
        console.print(f"{args.model} uses random weights; nothing to fetch (its tokenizer comes from smollm2-135m)")
        return 0
    if args.model != "smollm2-135m":
        console.print(f"[red]unknown model {args.model!r}[/]; known: {', '.join(known_models())}")
        return 2
    path = fetch(SMOLLM2_GGUF)
    console.print(f"{args.model}: {path} ({path.stat().st_size / 2**20:.1f} MiB, sha256 verified)")
    return 0


def triton_status() -> str:
    """Whether Triton kernels can run here, and how (GPU, or the CPU interpreter)."""
    try:
        import triton
    except ImportError:
        return "not installed (torch kernels are used)"
    import torch

    if torch.cuda.is_available():
        return f"{triton.__version__}, GPU kernels available"
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    return f"{triton.__version__}, no GPU: " + ("interpreter on (TRITON_INTERPRET=1)" if interp else "torch kernels are used")


def cmd_doctor(args: argparse.Namespace) -> int:
    """Print versions, the device, Triton's state and the model cache."""
    import torch

    from minidisagg import __version__
    from minidisagg.models.fetch import SMOLLM2_GGUF, cache_dir, cached_path

    table = Table(title="minidisagg doctor", show_header=False)
    table.add_column("item")
    table.add_column("value")
    table.add_row("minidisagg", __version__)
    table.add_row("python", platform.python_version())
    table.add_row("torch", torch.__version__)
    if torch.cuda.is_available():
        table.add_row("device", f"cuda: {torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})")
    else:
        table.add_row("device", f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    table.add_row("triton", triton_status())
    table.add_row("cache", str(cache_dir()))
    gguf_path = cached_path(SMOLLM2_GGUF)
    table.add_row("smollm2-135m", f"cached ({gguf_path.stat().st_size / 2**20:.1f} MiB)" if gguf_path.exists()
                  else "not cached: run `minidisagg fetch smollm2-135m`")
    console.print(table)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The interference demo."""
    from minidisagg.demo import run_demo

    run_demo(model=args.model, device=args.device, out_dir=args.out, console=console)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmarks: ``cpu`` compares decode throughput with HF transformers."""
    if args.suite == "cpu":
        from minidisagg.bench_cpu import main as bench_cpu_main

        return bench_cpu_main(args.rest) or 0
    console.print(f"[red]unknown benchmark {args.suite!r}[/]")
    return 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="minidisagg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="stream a completion for one prompt")
    gen.add_argument("--model", default="smollm2-135m")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default="auto")
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--quiet", action="store_true", help="no timing line after the text")
    gen.set_defaults(func=cmd_generate)

    fetch = sub.add_parser("fetch", help="download and verify a model's weights")
    fetch.add_argument("model", nargs="?", default="smollm2-135m")
    fetch.set_defaults(func=cmd_fetch)

    doctor = sub.add_parser("doctor", help="show versions, device, Triton and cache state")
    doctor.set_defaults(func=cmd_doctor)

    demo = sub.add_parser("demo", help="prefill/decode interference on the colocated engine")
    demo.add_argument("--model", default="smollm2-135m")
    demo.add_argument("--device", default="auto")
    demo.add_argument("--out", default=".", help="folder for the PNG timeline")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="benchmarks (cpu)")
    bench.add_argument("suite", choices=["cpu"])
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``minidisagg`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ValueError as exc:  # bad input: one clear line, no traceback
        console.print(f"[red]error:[/] {exc}", highlight=False)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
