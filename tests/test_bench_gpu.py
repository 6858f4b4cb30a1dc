"""`bench gpu` pieces that run without a GPU: floors, goal verdicts, the result files, and the CPU refusal."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from minidisagg.bench.gpu import GOALS, card_slug, evaluate_goals, main, to_markdown, write_results
from minidisagg.bench.gpu_rows import prefill_flops, with_floor
from minidisagg.config import PRESETS
from minidisagg.roofline import gemm_flops

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_prefill_flops_counts_every_gemm_and_causal_attention():
    cfg = PRESETS["llama-8b"]
    n = random.randint(1, 4096)
    h, q, kv, f = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    layer = gemm_flops(n, q + 2 * kv, h) + gemm_flops(n, h, q) + gemm_flops(n, 2 * f, h) + gemm_flops(n, h, f)
    attention = 2 * 2 * cfg.num_heads * cfg.head_dim * sum(range(1, n + 1))  # each query sees keys 0..itself
    want = cfg.num_layers * (layer + attention) + gemm_flops(1, cfg.vocab_size, h)
    assert prefill_flops(cfg, n) == pytest.approx(want, rel=1e-12)


def test_fraction_is_floor_over_measured():
    row = with_floor("decode x bs1", 8.0, 6.0)
    assert row.fraction_of_limit == 0.75 and row.limit == 6.0 and row.unit == "ms"


def test_goal_verdicts_follow_the_rows():
    rows = [{"name": "decode llama-8b bs1", "value": 6.5, "fraction_of_limit": 0.83},
            {"name": "decode llama-1b bs1", "value": 1.5, "fraction_of_limit": 0.56},
            {"name": "decode smollm2-135m bs1", "value": 0.9, "fraction_of_limit": 0.1, "speedup_vs_hf": 31.0}]
    verdicts = evaluate_goals(rows)
    assert set(verdicts) == set(GOALS)
    assert verdicts["decode llama-8b bs1"].startswith("met")
    assert verdicts["decode llama-1b bs1"].startswith("missed")
    assert verdicts["decode smollm2-135m bs1"].startswith("met")
    assert verdicts["prefill llama-8b 2048"] == "not measured"


def test_committed_gpu_result_has_the_schema_and_round_trips(tmp_path):
    path = sorted(RESULTS.glob("gpu-*-20*.json"))[-1]
    result = json.loads(path.read_text())
    for key in ("card", "torch", "copy_GBps", "mm_TFLOPs", "rows"):
        assert key in result
    names = {r["name"] for r in result["rows"]}
    assert set(GOALS) <= names
    for r in result["rows"]:
        if "limit" in r:
            assert r["fraction_of_limit"] == pytest.approx(r["limit"] / r["value"], abs=2e-3)
    json_path, md_path = write_results(result, tmp_path)
    assert json_path.name == f"gpu-{card_slug(result['card'])}-{result['date'][:10]}.json"
    assert json.loads(json_path.read_text()) == result
    assert md_path.read_text() == to_markdown(result) and "decode llama-8b bs1" in md_path.read_text()


def test_card_slug():
    assert card_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_refuses_without_cuda(tmp_path):
    with pytest.raises(ValueError, match="CUDA"):
        main(["--out-dir", str(tmp_path), "--no-hf"])
