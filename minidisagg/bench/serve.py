"""``minidisagg bench serve``: an async load generator for any OpenAI-compatible server.

Requests leave on a Poisson schedule (or all at once), each one streamed; the client records when
each chunk of text arrives. TTFT is request sent -> first text, ITL the gaps between text chunks,
TPOT (E2E - TTFT) / (output tokens - 1), E2E request sent -> stream end. The JSON result uses the
field names of ``vllm bench serve`` where it has them (``request_throughput``, ``p99_ttft_ms``, ...).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

import httpx
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from minidisagg.bench.args import serve_parser
from minidisagg.bench.serve_data import BenchRequest, from_file, poisson_gaps_s, synthetic

PERCENTILES = (50, 90, 99)
METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass
class RequestResult:
    """What the client saw of one request."""

    prompt_len: Optional[int] = None
    output_len: int = 0
    ttft_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    latency_s: float = 0.0
    start_s: float = 0.0
    text: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        """Whether it streamed to the end without an error."""
        return not self.error

    @property
    def tpot_s(self) -> Optional[float]:
        """Time per output token after the first (None for one-token outputs)."""
        return (self.latency_s - self.ttft_s) / (self.output_len - 1) if self.output_len > 1 else None


def _text_of(chunk: dict[str, Any], chat: bool) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if chat:
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


async def send_one(http: httpx.AsyncClient, url: str, model: str, req: BenchRequest, chat: bool, ignore_eos: bool,
                   headers: dict[str, str]) -> RequestResult:
    """Stream one request and time its chunks."""
    body: dict[str, Any] = {"model": model, "max_tokens": req.max_tokens, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}
    body.update({"messages": [{"role": "user", "content": req.prompt}]} if chat else {"prompt": req.prompt})
    if ignore_eos:
        body["ignore_eos"] = True
    result = RequestResult()
    chunks = 0
    start = last = time.perf_counter()
    result.start_s = start
    try:
        async with http.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:300]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message", chunk["error"]))
                    break
                now = time.perf_counter()
                if text := _text_of(chunk, chat):
                    if chunks == 0:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    chunks += 1
                    last = now
                    result.text += text
                if usage := chunk.get("usage"):
                    result.prompt_len = usage.get("prompt_tokens")
                    result.output_len = usage.get("completion_tokens") or 0
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.latency_s = time.perf_counter() - start
    if not result.error and chunks == 0:
        result.error = "the stream ended without any text"
    result.output_len = result.output_len or chunks
    return result


def _stats_ms(prefix: str, values_s: Sequence[float]) -> dict[str, float]:
    values = sorted(v * 1000 for v in values_s)
    out = {f"mean_{prefix}_ms": statistics.fmean(values) if values else 0.0,
           f"median_{prefix}_ms": statistics.median(values) if values else 0.0,
           f"std_{prefix}_ms": statistics.pstdev(values) if values else 0.0}
    for p in PERCENTILES:
        out[f"p{p}_{prefix}_ms"] = _percentile(values, p)
    return out


def _percentile(sorted_values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), of already sorted values."""
    if not sorted_values:
        return 0.0
    rank = (len(sorted_values) - 1) * p / 100
    lo = int(rank)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (rank - lo)


def summarize(results: list[RequestResult], duration_s: float, slo_ttft_ms: Optional[float],
              slo_tpot_ms: Optional[float]) -> dict[str, Any]:
    """The run's figures, under ``vllm bench serve``'s field names where it has them."""
    done = [r for r in results if r.ok]
    total_in = sum(r.prompt_len or 0 for r in done)
    total_out = sum(r.output_len for r in done)
    slo = slo_ttft_ms is not None or slo_tpot_ms is not None

    def good(r: RequestResult) -> bool:
        tpot_ok = slo_tpot_ms is None or r.tpot_s is None or r.tpot_s * 1000 <= slo_tpot_ms
        return (slo_ttft_ms is None or r.ttft_s * 1000 <= slo_ttft_ms) and tpot_ok

    out: dict[str, Any] = {
        "duration": duration_s, "completed": len(done), "failed": len(results) - len(done),
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(done) / duration_s,
        "request_goodput": sum(good(r) for r in done) / duration_s if slo else None,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
        "goodput_slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms},
    }
    series = {"ttft": [r.ttft_s for r in done], "tpot": [r.tpot_s for r in done if r.tpot_s is not None],
              "itl": [gap for r in done for gap in r.itl_s], "e2el": [r.latency_s for r in done]}
    for name in METRICS:
        out.update(_stats_ms(name, series[name]))
    out.update({"input_lens": [r.prompt_len for r in results], "output_lens": [r.output_len for r in results],
                "ttfts": [r.ttft_s for r in results], "itls": [r.itl_s for r in results],
                "start_times": [r.start_s for r in results], "generated_texts": [r.text for r in results],
                "errors": [r.error for r in results]})
    return out


async def run_load(url: str, model: str, requests: list[BenchRequest], rate: float, chat: bool, ignore_eos: bool,
                   headers: dict[str, str], timeout_s: float, max_concurrency: Optional[int], seed: int,
                   progress: Optional[Progress] = None) -> tuple[list[RequestResult], float]:
    """Send every request on a Poisson schedule; returns their results (in request order) and the run's seconds."""
    endpoint = url.rstrip("/") + ("/v1/chat/completions" if chat else "/v1/completions")
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    task_id = progress.add_task("requests", total=len(requests)) if progress else None
    limits = httpx.Limits(max_connections=max_concurrency or len(requests) + 1, max_keepalive_connections=None)

    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as http:
        async def one(req: BenchRequest) -> RequestResult:
            if limit is not None:
                async with limit:
                    result = await send_one(http, endpoint, model, req, chat, ignore_eos, headers)
            else:
                result = await send_one(http, endpoint, model, req, chat, ignore_eos, headers)
            if progress is not None and task_id is not None:
                progress.advance(task_id)
            return result

        tasks = []
        gaps = poisson_gaps_s(rate, seed)
        start = time.perf_counter()
        for req in requests:
            tasks.append(asyncio.create_task(one(req)))
            gap = next(gaps)
            if gap:
                await asyncio.sleep(gap)
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


def first_model(url: str, headers: dict[str, str], timeout_s: float) -> str:
    """The first model the server lists."""
    response = httpx.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=timeout_s)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def print_summary(console: Console, out: dict[str, Any]) -> None:
    """The figures as one table."""
    table = Table(title="serving benchmark", show_header=False)
    for label, key, fmt in (("successful requests", "completed", "{}"), ("failed requests", "failed", "{}"),
                            ("duration (s)", "duration", "{:.2f}"),
                            ("request throughput (req/s)", "request_throughput", "{:.2f}"),
                            ("request goodput (req/s)", "request_goodput", "{:.2f}"),
                            ("output token throughput (tok/s)", "output_throughput", "{:.1f}"),
                            ("total token throughput (tok/s)", "total_token_throughput", "{:.1f}")):
        table.add_row(label, "-" if out[key] is None else fmt.format(out[key]))
    for name in METRICS:
        table.add_row(f"{name.upper()} p50 / p90 / p99 (ms)",
                      " / ".join(f"{out[f'p{p}_{name}_ms']:.1f}" for p in PERCENTILES))
    console.print(table)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``minidisagg bench serve``; 1 when any request failed."""
    args = serve_parser().parse_args(argv)
    if args.num_prompts < 1:
        raise SystemExit("--num-prompts must be at least 1")
    console = Console()
    key = args.api_key or os.environ.get("OPENAI_API_KEY", "")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    model = args.model or first_model(args.url, headers, args.timeout_s)
    if args.dataset == "synthetic":
        requests = synthetic(args.num_prompts, args.input_len, args.output_len, args.seed)
    else:
        requests = from_file(Path(args.dataset), args.num_prompts, args.output_len, args.seed)
    columns = (TextColumn("bench serve"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=args.no_progress, transient=True) as progress:
        results, duration_s = asyncio.run(run_load(args.url, model, requests, args.rate, args.endpoint == "chat",
                                                   args.ignore_eos, headers, args.timeout_s, args.max_concurrency,
                                                   args.seed, progress))
    out = {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": "openai-chat" if args.endpoint == "chat"
           else "openai", "base_url": args.url, "model_id": model, "dataset": args.dataset,
           "num_prompts": args.num_prompts, "request_rate": "inf" if args.rate == float("inf") else args.rate,
           "max_concurrency": args.max_concurrency, "seed": args.seed,
           **summarize(results, duration_s, args.slo_ttft_ms, args.slo_tpot_ms)}
    print_summary(console, out)
    for error in sorted({r.error for r in results if r.error})[:5]:
        console.print(f"[red]error:[/] {escape(error)}", highlight=False)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")
        console.print(f"wrote {args.out}", highlight=False)
    return 1 if out["failed"] else 0
