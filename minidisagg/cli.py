"""The ``minidisagg`` command line: demo, generate, fetch, doctor, serve, bench, course, lab, slides, sim."""

from __future__ import annotations

# Only the standard library at the top: ``minidisagg --help`` must not wait for torch. Each command
# imports what it needs when it runs.
import argparse
import os
import platform
import sys
from typing import Any, Optional, Sequence

from minidisagg.disagg.serve_command import add_serve_parser


class _LazyConsole:
    """Stands for a rich ``Console`` made on first use, so that parsing arguments does not import rich."""

    _console: Any = None

    def real(self) -> Any:
        """The rich ``Console`` itself, made now if need be (for code that needs a true Console)."""
        if _LazyConsole._console is None:
            from rich.console import Console

            _LazyConsole._console = Console()
        return _LazyConsole._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real(), name)


console = _LazyConsole()
MODEL_HELP = ("smollm2-135m (real weights, fetched once), tiny, llama-1b or llama-8b (random weights of that shape), "
              "an HF-format Llama folder, or a .gguf file (default: %(default)s)")
DEVICE_HELP = "auto (CUDA when present, else the CPU), cpu, cuda or cuda:N (default: %(default)s)"
DTYPE_HELP = "auto (bfloat16 on CUDA, float32 on the CPU), float32, bfloat16 or float16 (default: %(default)s)"


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
    if args.model.endswith(".gguf"):
        if not os.path.isfile(os.path.expanduser(args.model)):
            raise ValueError(f"file not found: {args.model}")
        console.print(f"{args.model} is a local file; nothing to fetch")
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


def compile_cpu_status() -> str:
    """Whether ``compile_cpu=True`` can run here, and whether its bf16 products get the native GEMV."""
    from minidisagg.engine.compiled import cxx_compiler
    from minidisagg.kernels.cpu_native import cpu_has_avx512_bf16

    compiler = cxx_compiler()
    if compiler is None:
        return "no C++ compiler: compile_cpu=True stays eager"
    gemv = "native bf16 GEMV (AVX512-BF16)" if cpu_has_avx512_bf16() else "no AVX512-BF16: bf16 products on torch's mv"
    return f"available ({compiler}); {gemv}"


def native_kernels_status() -> str:
    """Whether the model's CPU dispatch points run their native C++ ops here (this builds them, once per machine)."""
    from minidisagg.engine.compiled import cxx_compiler
    from minidisagg.kernels import cpu_native

    if os.environ.get(cpu_native.DISABLE_ENV, "1") == "0":
        return f"off ({cpu_native.DISABLE_ENV}=0): the CPU runs torch's reference kernels"
    if cxx_compiler() is None:
        return "no C++ compiler: the CPU runs torch's reference kernels"
    if cpu_native.load_cpu_ops():
        return "built: the model's CPU kernels run as native ops (native_cpu_decode=True can add the C++ step)"
    return "the build failed (the warning above says why): the CPU runs torch's reference kernels"


def cmd_doctor(args: argparse.Namespace) -> int:
    """Print versions, the device, Triton's state, the native CPU kernels, whether ``compile_cpu`` can run, the model cache."""
    import torch
    from rich.table import Table

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
    table.add_row("native CPU kernels", native_kernels_status())
    table.add_row("compile_cpu", compile_cpu_status())
    table.add_row("cache", str(cache_dir()))
    gguf_path = cached_path(SMOLLM2_GGUF)
    table.add_row("smollm2-135m", f"cached ({gguf_path.stat().st_size / 2**20:.1f} MiB)" if gguf_path.exists()
                  else "not cached: run `minidisagg fetch smollm2-135m`")
    console.print(table)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The interference demo."""
    from minidisagg.demo import run_demo

    run_demo(model=args.model, device=args.device, out_dir=args.out, console=console.real(), disagg=not args.colocated_only,
             wall=not args.calibrated_only)
    return 0


# subcommand suites -> the module whose ``main(argv)`` runs them (imported only when used)
BENCH_SUITES = {
    "cpu": "minidisagg.bench.cpu",
    "transport": "minidisagg.bench.transport",
    "gpu": "minidisagg.bench.gpu",
    "disagg": "minidisagg.bench.disagg",
    "fuzz": "minidisagg.bench.fuzz",
    "serve": "minidisagg.bench.serve",
}
COURSE_ACTIONS = {"build": "minidisagg.course.build", "verify": "minidisagg.course.verify",
                  "grade": "minidisagg.course.grade", "leaderboard": "minidisagg.course.leaderboard_cli"}
SLIDES_ACTIONS = {"build": "minidisagg.course.slides"}
SIM_ACTIONS = ("calibrate", "plan")


def _run_module_main(module_name: str, rest: Sequence[str]) -> int:
    """Import ``module_name`` and call its ``main(rest)``."""
    import importlib

    return importlib.import_module(module_name).main(list(rest)) or 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmarks: cpu (decode vs HF), transport (KV transfer), gpu (rooflines), disagg (goodput), fuzz (hostile peers),
    serve (an HTTP server under load)."""
    from minidisagg.bench.args import SUITE_PARSERS

    SUITE_PARSERS[args.suite]().parse_args(args.rest)  # --help and bad flags answered before torch loads
    return _run_module_main(BENCH_SUITES[args.suite], args.rest)


def cmd_course(args: argparse.Namespace) -> int:
    """Course tooling: ``build`` writes labs/ from solutions/; ``verify`` executes them and checks their claims."""
    return _run_module_main(COURSE_ACTIONS[args.action], args.rest)


def cmd_lab(args: argparse.Namespace) -> int:
    """Start JupyterLab on the labs (``--allow-root`` added when run as root)."""
    return _run_module_main("minidisagg.course.jupyter", args.rest)


def cmd_slides(args: argparse.Namespace) -> int:
    """Slides: ``build`` renders slides/*.ipynb to self-contained reveal.js HTML."""
    return _run_module_main(SLIDES_ACTIONS[args.action], args.rest)


def cmd_sim(args: argparse.Namespace) -> int:
    """The fleet simulator: ``calibrate`` a step-cost model on this device, ``plan`` fleet splits with it."""
    return _run_module_main("minidisagg.sim.command", [args.action, *args.rest])


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="minidisagg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="stream a completion for one prompt")
    gen.add_argument("--model", default="smollm2-135m", help=MODEL_HELP)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default="auto", help=DEVICE_HELP)
    gen.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    gen.add_argument("--quiet", action="store_true", help="no timing line after the text")
    gen.set_defaults(func=cmd_generate)

    fetch = sub.add_parser("fetch", help="download and verify a model's weights")
    fetch.add_argument("model", nargs="?", default="smollm2-135m", help="smollm2-135m (default); the random-weight "
                       "shapes and local files have nothing to fetch")
    fetch.set_defaults(func=cmd_fetch)

    doctor = sub.add_parser("doctor", help="show versions, device, Triton and cache state")
    doctor.set_defaults(func=cmd_doctor)

    demo = sub.add_parser("demo", help="interference: colocated engine vs disaggregated workers")
    demo.add_argument("--model", default="smollm2-135m", help=MODEL_HELP)
    demo.add_argument("--device", default="auto", help=DEVICE_HELP)
    demo.add_argument("--out", default=".", help="folder for the PNG timeline")
    demo.add_argument("--colocated-only", action="store_true", help="skip the disaggregated run")
    demo.add_argument("--calibrated-only", action="store_true",
                      help="only the calibrated replays: skip every wall-clock run (the disaggregated one too)")
    demo.set_defaults(func=cmd_demo)

    add_serve_parser(sub, MODEL_HELP, DEVICE_HELP, DTYPE_HELP)

    bench = sub.add_parser("bench", help="benchmarks (" + ", ".join(BENCH_SUITES) + ")")
    bench.add_argument("suite", choices=list(BENCH_SUITES))
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)

    course = sub.add_parser("course", help="course tooling (build labs/ from solutions/; verify their claims; grade a student's lab)")
    course.add_argument("action", choices=list(COURSE_ACTIONS))
    course.add_argument("rest", nargs=argparse.REMAINDER)
    course.set_defaults(func=cmd_course)

    lab = sub.add_parser("lab", help="start JupyterLab on the labs: minidisagg lab [DIR] [options] (as root: --allow-root)",
                         prefix_chars="+")  # every option goes on to JupyterLab
    lab.add_argument("rest", nargs=argparse.REMAINDER)
    lab.set_defaults(func=cmd_lab)

    slides = sub.add_parser("slides", help="lecture decks (build reveal.js HTML)")
    slides.add_argument("action", choices=list(SLIDES_ACTIONS))
    slides.add_argument("rest", nargs=argparse.REMAINDER)
    slides.set_defaults(func=cmd_slides)

    sim = sub.add_parser("sim", help="fleet simulator on the engine's scheduler (calibrate, plan)")
    sim.add_argument("action", choices=list(SIM_ACTIONS))
    sim.add_argument("rest", nargs=argparse.REMAINDER)
    sim.set_defaults(func=cmd_sim)
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
