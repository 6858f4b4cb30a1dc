"""The bench suites' command-line flags, in a module that loads nothing heavy.

``minidisagg bench SUITE --help`` and a bad flag are answered from here before the suite's module,
and torch with it, is imported; each suite's ``main`` parses its arguments with the same parser.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

OUT_HELP = "default: benchmarks/results"


def cpu_parser() -> argparse.ArgumentParser:
    """Flags of ``minidisagg bench cpu``."""
    parser = argparse.ArgumentParser(prog="minidisagg bench cpu", description="CPU decode throughput: minidisagg "
                                     "against HF transformers ``generate`` and a bare-matmul ceiling.")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=None, help=OUT_HELP)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--compiled", action="store_true",
                        help="add 'minidisagg fp32 compiled' and 'minidisagg bf16 compiled' (compile_cpu=True; "
                             "needs a C++ compiler)")
    parser.add_argument("--accel", action="store_true",
                        help="add 'minidisagg fp32 accel' and 'minidisagg bf16 accel' (native_cpu_decode=True: "
                             "the opt-in accelerator, decode steps as one C++ op; needs a C++ compiler)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def transport_parser() -> argparse.ArgumentParser:
    """Flags of ``minidisagg bench transport``."""
    parser = argparse.ArgumentParser(prog="minidisagg bench transport", description="KV transfer bandwidth by "
                                     "transport and message size, each against its plain ceiling; KV transfer vs "
                                     "prefill.")
    parser.add_argument("--quick", action="store_true", help="two small sizes, 2 repeats, one short prompt")
    parser.add_argument("--repeats", type=int, default=None, help="default 9 (quick: 2)")
    parser.add_argument("--model", default="smollm2-135m", help="model of the KV-vs-prefill part (random weights)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in each process (default 1: a core each for sender and receiver; "
                             "0: torch's choice)")
    parser.add_argument("--out-dir", type=Path, default=None, help=OUT_HELP)
    parser.add_argument("--no-progress", action="store_true")
    return parser


def gpu_parser() -> argparse.ArgumentParser:
    """Flags of ``minidisagg bench gpu``."""
    parser = argparse.ArgumentParser(prog="minidisagg bench gpu", description="The card's ceilings, then decode, "
                                     "prefill and every kernel against them, beside HF.")
    parser.add_argument("--models", default="smollm2-135m,llama-1b,llama-8b",
                        help="comma-separated model names (random weights of their shapes)")
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--prefill", default="128,512,2048,8192")
    parser.add_argument("--parts", default="kernels,decode,prefill",
                        help="which parts to run: kernels (attention and elementwise), decode, prefill")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    parser.add_argument("--hf-compiled", default="smollm2-135m,llama-1b,llama-8b",
                        help="models to time with HF's static cache (compiles; slow)")
    parser.add_argument("--out-dir", type=Path, default=None, help=OUT_HELP)
    return parser


def disagg_parser() -> argparse.ArgumentParser:
    """Flags of ``minidisagg bench disagg``."""
    parser = argparse.ArgumentParser(prog="minidisagg bench disagg", description="Disaggregated 1P1D against two "
                                     "colocated replicas on the same two GPUs.")
    parser.add_argument("--models", default="llama-1b,llama-8b", help="comma-separated (default: %(default)s)")
    parser.add_argument("--devices", default="cuda:0,cuda:1", help="GPU for replica 0 / prefill, replica 1 / decode")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: benchmarks/results)")
    parser.add_argument("--time-budget-s", type=float, default=None, help="sweeps are trimmed to fit (default 480)")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny model, gloo, few requests")
    parser.add_argument("--rates", default="", help="explicit total request rates, e.g. 2,4,8 (default: calibrated)")
    parser.add_argument("--window-s", type=float, default=None, help="arrival window per rate (default 4)")
    parser.add_argument("--ttft-slo-scale", type=float, default=None, help="TTFT SLO / unloaded TTFT (default 5)")
    parser.add_argument("--tpot-slo-scale", type=float, default=None, help="TPOT SLO / unloaded TPOT (default 1.5)")
    parser.add_argument("--kv-layout", choices=("layer_major", "block_major"), default=None,
                        help="KV pool layout of every engine (default: block_major on CUDA)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def fuzz_parser() -> argparse.ArgumentParser:
    """Flags of ``minidisagg bench fuzz``."""
    parser = argparse.ArgumentParser(prog="minidisagg bench fuzz", description="Malformed and adversarial frames, "
                                     "control messages and connections against live prefill, decode and router "
                                     "processes; after each input: every process alive, both KV pools whole, a "
                                     "greedy request equal to the colocated engine's.")
    parser.add_argument("--inputs", type=int, default=300, help="number of inputs (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="the generator's seed (default: %(default)s)")
    parser.add_argument("--sigstop-s", type=float, default=0.0,
                        help="then stop the decode worker (SIGSTOP) this many seconds while it holds requests, and "
                             "report what happened (0: skip; must exceed --deadline-s)")
    parser.add_argument("--deadline-s", type=float, default=12.0, help="request deadline in the SIGSTOP run")
    parser.add_argument("--policy", choices=("fail", "recompute"), default="fail",
                        help="kv_failure_policy of the router in the SIGSTOP run")
    parser.add_argument("--out-dir", type=Path, default=None, help=OUT_HELP)
    return parser


def rate_arg(text: str) -> float:
    """A request rate in requests per second, or ``inf`` (every request at once)."""
    rate = float(text)
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"the rate must be > 0 requests/s or inf, got {text!r}")
    return rate


def serve_parser() -> argparse.ArgumentParser:
    """Flags of ``minidisagg bench serve``."""
    parser = argparse.ArgumentParser(prog="minidisagg bench serve", description="Load an OpenAI-compatible server "
                                     "with timed, streamed requests (Poisson arrivals) and report TTFT, ITL, TPOT, "
                                     "E2E, throughput and goodput under an SLO.")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL (default: %(default)s)")
    parser.add_argument("--model", default="", help="the model to ask for (default: the first /v1/models lists)")
    parser.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                        help="/v1/completions or /v1/chat/completions (default: %(default)s)")
    parser.add_argument("--dataset", default="synthetic",
                        help="'synthetic' (random words), or a JSON / JSONL file: ShareGPT-style conversations or "
                             "{prompt, output_len} records")
    parser.add_argument("--input-len", type=int, default=128, help="synthetic: words per prompt (about a token each)")
    parser.add_argument("--output-len", type=int, default=64,
                        help="max_tokens of each request (a file's own output_len wins)")
    parser.add_argument("--rate", type=rate_arg, default=float("inf"),
                        help="mean request rate in requests/s (Poisson arrivals), or inf (default: all at once)")
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: "
                                                                          "no limit)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the dataset and the arrivals")
    parser.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: a request's TTFT must be within this")
    parser.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: a request's TPOT must be within this")
    parser.add_argument("--ignore-eos", action="store_true", help="ask for exactly max_tokens tokens (an extension "
                                                                  "minidisagg and vLLM accept)")
    parser.add_argument("--api-key", default="", help="sent as 'Authorization: Bearer KEY' (default: "
                                                      "$OPENAI_API_KEY, if set)")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="each request's deadline")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    parser.add_argument("--no-progress", action="store_true")
    return parser


SUITE_PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "cpu": cpu_parser, "transport": transport_parser, "gpu": gpu_parser, "disagg": disagg_parser, "fuzz": fuzz_parser,
    "serve": serve_parser}
