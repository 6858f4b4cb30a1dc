"""``minidisagg bench serve`` against ``minidisagg serve`` started as a real process; the summary's arithmetic."""

from __future__ import annotations

import json
import signal

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from minidisagg.bench.serve import RequestResult, main, summarize  # noqa: E402
from serve_process import STOP_TIMEOUT_S, serve_process  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``minidisagg serve tiny --mode colocated`` in a subprocess on a free port; SIGTERM at the end."""
    ready = tmp_path_factory.mktemp("serve") / "port"
    yield from serve_process(["tiny", "--mode", "colocated", "--device", "cpu", "--dtype", "float32",
                              "--num-kv-blocks", "256"], ready)


def check_result(result: dict, num_prompts: int) -> None:
    assert result["completed"] == num_prompts and result["failed"] == 0, result["errors"]
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert 0 < result[f"p50_{name}_ms"] <= result[f"p90_{name}_ms"] <= result[f"p99_{name}_ms"], name
        assert result[f"mean_{name}_ms"] > 0 and f"median_{name}_ms" in result and f"std_{name}_ms" in result
    assert result["request_goodput"] is not None and 0 <= result["request_goodput"] <= result["request_throughput"]
    assert result["output_throughput"] > 0 and result["total_token_throughput"] > result["output_throughput"]
    assert result["total_output_tokens"] == sum(result["output_lens"]) and len(result["ttfts"]) == num_prompts
    assert result["p50_e2el_ms"] >= result["p50_ttft_ms"]


def test_bench_serve_writes_well_formed_json(server, tmp_path):
    url, _ = server
    out = tmp_path / "bench.json"
    rc = main(["--url", url, "--dataset", "synthetic", "--num-prompts", "8", "--rate", "20", "--input-len", "12",
               "--output-len", "8", "--ignore-eos", "--slo-ttft-ms", "2000", "--slo-tpot-ms", "500", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    result = json.loads(out.read_text())
    check_result(result, 8)
    assert result["model_id"] == "tiny" and result["request_rate"] == 20
    assert result["output_lens"] == [8] * 8  # ignore_eos: exactly max_tokens each


def test_bench_serve_reads_a_sharegpt_file_over_chat(server, tmp_path):
    url, _ = server
    data = tmp_path / "convs.jsonl"
    data.write_text("\n".join(json.dumps({"conversations": [{"from": "human", "value": f"Tell me about topic {i}"},
                                                            {"from": "gpt", "value": "word " * (3 + i)}]})
                              for i in range(4)) + "\n")
    out = tmp_path / "bench.json"
    rc = main(["--url", url, "--dataset", str(data), "--endpoint", "chat", "--num-prompts", "4", "--rate", "inf",
               "--ignore-eos", "--slo-ttft-ms", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    result = json.loads(out.read_text())
    check_result(result, 4)
    assert sorted(result["output_lens"]) == [4, 5, 7, 8]  # round(words * 4/3) of each reply
    assert result["request_goodput"] < result["request_throughput"]  # no CPU prefill meets a 1 ms TTFT


def test_sigterm_ends_streams_with_an_error_event_and_the_server_exits_cleanly(server):
    url, proc = server
    body = {"model": "tiny", "prompt": "A long story", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=STOP_TIMEOUT_S) as http:
        with http.stream("POST", url + "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))  # it is decoding
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data:")]
    assert rest[-1] == "data: [DONE]" and '"error"' in rest[-2] and "shutting down" in rest[-2], rest[-3:]
    assert proc.wait(STOP_TIMEOUT_S) == 0


def test_goodput_counts_only_requests_within_both_slos():
    def r(ttft_s: float, latency_s: float, tokens: int) -> RequestResult:
        return RequestResult(prompt_len=4, output_len=tokens, ttft_s=ttft_s, latency_s=latency_s, itl_s=[0.01])

    results = [r(0.1, 1.1, 11), r(0.3, 1.3, 11), r(0.1, 3.1, 11), RequestResult(error="HTTP 500")]
    out = summarize(results, 2.0, slo_ttft_ms=200, slo_tpot_ms=150)
    assert out["completed"] == 3 and out["failed"] == 1
    assert out["request_throughput"] == 1.5 and out["request_goodput"] == 0.5  # only the first meets both
    assert out["p50_ttft_ms"] == pytest.approx(100) and out["p99_ttft_ms"] == pytest.approx(296)
    assert summarize(results, 2.0, None, None)["request_goodput"] is None
