"""The ``minidisagg`` command line: demo, generate, fetch, doctor, serve, bench, course, lab, slides."""

from __future__ import annotations

# Only the standard library at the top: ``minidisagg --help`` must not wait for torch. Each command
# imports what it needs when it runs.
import argparse
import os
import platform
import sys
from typing import Any, Optional, Sequence


class _LazyConsole:
    """Stands for a rich ``Console`` made on first use, so that parsing arguments does not import rich."""

    _console: Any = None

    def __getattr__(self, name: str) -> Any:
        if _LazyConsole._console is None:
            from rich.console import Console

            _LazyConsole._console = Console()
        return getattr(_LazyConsole._console, name)


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

    run_demo(model=args.model, device=args.device, out_dir=args.out, console=console, disagg=not args.colocated_only,
             wall=not args.calibrated_only)
    return 0


# subcommand suites -> the module whose ``main(argv)`` runs them (imported only when used)
BENCH_SUITES = {
    "cpu": "minidisagg.bench.cpu",
    "transport": "minidisagg.bench.transport",
    "gpu": "minidisagg.bench.gpu",
    "disagg": "minidisagg.bench.disagg",
}
COURSE_ACTIONS = {"build": "minidisagg.course.build", "verify": "minidisagg.course.verify"}
WORKER_HEALTH_POLL_S = 0.2  # how often ``serve`` checks that its worker's engine loop is alive
WORKER_SWITCH_INTERVAL_S = float(os.environ.get("MINIDISAGG_SWITCH_INTERVAL_S", "0.0005"))  # see cmd_serve
SLIDES_ACTIONS = {"build": "minidisagg.course.slides"}


def _run_module_main(module_name: str, rest: Sequence[str]) -> int:
    """Import ``module_name`` and call its ``main(rest)``."""
    import importlib

    return importlib.import_module(module_name).main(list(rest)) or 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmarks: cpu (decode vs HF), transport (KV transfer), gpu (rooflines), disagg (goodput)."""
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


def parse_peers(text: str) -> dict[str, tuple[str, int]]:
    """``d0=127.0.0.1:7001,d1=host:7002`` -> {"d0": ("127.0.0.1", 7001), ...}."""
    from minidisagg.transport.socket import parse_host_port

    peers: dict[str, tuple[str, int]] = {}
    for item in filter(None, text.split(",")):
        name, _, address = item.partition("=")
        try:
            peers[name] = parse_host_port(address)
        except ValueError:
            raise ValueError(f"--peers entries look like name=host:port, got {item!r}") from None
        if not name:
            raise ValueError(f"--peers entries look like name=host:port, got {item!r}")
    return peers


def cmd_serve(args: argparse.Namespace) -> int:
    """Run one worker process (prefill or decode) until terminated."""
    import signal
    import threading
    from pathlib import Path

    import torch

    from minidisagg.config import CacheConfig, EngineConfig
    from minidisagg.disagg.serve import DecodeServer, PrefillServer
    from minidisagg.engine.clock import WallClock
    from minidisagg.models.registry import load_model
    from minidisagg.transport.auth import SECRET_ENV, link_security

    # The secret first, before anything could start a subprocess that inherits it; then out of the environment.
    security = link_security(args.secret_file or None, args.tls_cert or None, args.tls_key or None,
                             args.tls_ca or None, args.insecure_no_auth)
    os.environ.pop(SECRET_ENV, None)
    if args.role != "router" and (refusal := security.listen_refusal(args.host)) is not None:
        raise ValueError(refusal)  # before the model loads: seconds, not minutes, to learn what to fix
    if args.cpu_cores:
        os.sched_setaffinity(0, {int(c) for c in args.cpu_cores.split(",")})
    if args.threads:
        torch.set_num_threads(args.threads)
    # A worker's engine loop shares the GIL with its link threads (KV frames, reservations, outputs). By
    # default a waiting thread gets the GIL only after 5 ms, so each KV frame could wait that long behind
    # a busy step loop; a shorter interval bounds that wait at a small cost in extra switches.
    sys.setswitchinterval(WORKER_SWITCH_INTERVAL_S)
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          batch_invariant=args.batch_invariant, max_model_len=args.max_model_len,
                          cuda_graphs=not args.no_cuda_graphs,
                          async_scheduling={"auto": None, "on": True, "off": False}[args.async_scheduling],
                          cache=CacheConfig(block_size=args.block_size, num_blocks=args.num_kv_blocks,
                                            memory_budget_bytes=args.kv_memory_budget_bytes, layout=args.kv_layout))
    if args.role == "router":
        from minidisagg.disagg.router_server import serve_router

        return serve_router(args, config, security)
    decode_ranks = None
    if args.dist_init:  # join the deployment's torch.distributed group first: under NCCL it picks the GPU
        from minidisagg.transport.dist import init_dist, parse_peer_ranks

        args.device = init_dist(args.dist_init, args.dist_rank, args.dist_world, args.dist_backend, args.device,
                                secret=security.secret)
        if args.role == "prefill":
            args.peers, decode_ranks = parse_peer_ranks(args.peers or "")
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, seed=args.seed,
                        random_weights=args.random_weights)
    clock = WallClock(args.clock_origin)
    if args.role == "decode":
        server = DecodeServer(loaded, config, args.host, args.port, clock=clock, security=security)
    else:
        server = PrefillServer(loaded, config, parse_peers(args.peers or ""), args.host, args.port,
                               overlap=args.overlap, clock=clock, decode_ranks=decode_ranks, security=security)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    threading.Thread(target=server.serve_forever, args=(Path(args.ready_file) if args.ready_file else None,),
                     daemon=True).start()
    console.print(f"{args.role} worker listening on {args.host}:{server.port}", highlight=False)
    while not done.wait(WORKER_HEALTH_POLL_S) and not server.failed:
        pass
    if server.failed:  # its engine loop died: the routers were told; a port that looks alive would mislead
        console.print(f"[red]error:[/] {server.failure}", highlight=False)
    server.stop()
    if args.dist_init:
        from minidisagg.transport.dist import shutdown_dist

        shutdown_dist()
    return 1 if server.failed else 0


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

    serve = sub.add_parser("serve", help="run a prefill, decode or router process")
    serve.add_argument("--role", choices=["prefill", "decode", "router"], required=True)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=0, help="0 picks a free port")
    serve.add_argument("--peers", default="", help="prefill: decode workers as NAME=host:port,...; "
                                                  "router: prefill=NAME@host:port,...;decode=NAME@host:port,...")
    serve.add_argument("--model", default="smollm2-135m", help=MODEL_HELP)
    serve.add_argument("--device", default="auto", help=DEVICE_HELP)
    serve.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    serve.add_argument("--random-weights", action="store_true")
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--max-num-seqs", type=int, default=64)
    serve.add_argument("--max-num-batched-tokens", type=int, default=2048)
    serve.add_argument("--block-size", type=int, default=16)
    serve.add_argument("--num-kv-blocks", type=int, default=None)
    serve.add_argument("--batch-invariant", action="store_true")
    serve.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    serve.add_argument("--kv-memory-budget-bytes", type=int, default=None, help="KV pool size (default: the engine's)")
    serve.add_argument("--kv-layout", choices=("layer_major", "block_major"), default=None,
                       help="KV pool memory layout (default: block_major on CUDA, layer_major on a CPU)")
    serve.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly on CUDA")
    serve.add_argument("--async-scheduling", choices=("auto", "on", "off"), default="auto",
                       help="queue decode step n+1 before step n's tokens reach the host (auto: with CUDA graphs)")
    serve.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=False,
                       help="send KV layer by layer during the prefill (default: after it, the faster choice here)")
    serve.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    serve.add_argument("--cpu-cores", default="", help="pin this process to these cores, e.g. 0 or 0,1")
    serve.add_argument("--clock-origin", type=float, default=None, help="shared perf_counter origin")
    serve.add_argument("--ready-file", default="", help="write the bound port here once listening")
    serve.add_argument("--routing", choices=["round_robin", "least_loaded"], default="round_robin",
                       help="router: how requests are spread over workers")
    serve.add_argument("--kv-failure-policy", choices=["fail", "recompute"], default="fail",
                       help="router: what happens to requests of a worker that dies")
    serve.add_argument("--request-timeout-s", type=float, default=600.0, help="router: deadline of every request")
    serve.add_argument("--dist-init", default="", help="dist transport: rendezvous, e.g. tcp://127.0.0.1:29500; "
                                                      "prefill --peers then read name=host:port@rank")
    serve.add_argument("--dist-rank", type=int, default=None, help="this worker's rank (decodes first by convention)")
    serve.add_argument("--dist-world", type=int, default=None, help="number of workers in the process group")
    serve.add_argument("--dist-backend", choices=["gloo", "nccl"], default=None,
                       help="default: nccl on a CUDA device, else gloo")
    serve.add_argument("--secret-file", default="",
                       help="the deployment's shared secret (at least 32 bytes of text, used as is; chmod 600); "
                            "default: the MINIDISAGG_SECRET environment variable. Every process needs the same one")
    serve.add_argument("--insecure-no-auth", action="store_true",
                       help="prefill/decode: listen beyond loopback without a secret (anyone who reaches the port "
                            "may submit, read and abort requests); only on a network you trust")
    serve.add_argument("--tls-cert", default="", help="TLS: this process's certificate (PEM); workers serve TLS with it")
    serve.add_argument("--tls-key", default="", help="TLS: the private key of --tls-cert (PEM)")
    serve.add_argument("--tls-ca", default="", help="TLS: CA bundle that signed the peers' certificates; checks "
                                                   "the servers this process dials, and makes servers ask clients "
                                                   "for a certificate (mutual TLS)")
    serve.set_defaults(func=cmd_serve)

    bench = sub.add_parser("bench", help="benchmarks (" + ", ".join(BENCH_SUITES) + ")")
    bench.add_argument("suite", choices=list(BENCH_SUITES))
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)

    course = sub.add_parser("course", help="course tooling (build labs/ from solutions/; verify their claims)")
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
