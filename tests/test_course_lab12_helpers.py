"""Helpers behind labs 1 and 2 and their decks: counted work, robust timings, committed GPU rows read right."""

from __future__ import annotations

import random

import pytest
import torch

from minidisagg.config import PRESETS
from minidisagg.course.gemm_lab import (decode_attention_counts, fastest_ceilings, gpu_run_figure, gpu_run_fractions,
                                        largest_cache_bytes, min_time_s)
from minidisagg.course.kv_lab import decode_loop_counts, weight_gemms_s
from minidisagg.models.registry import load_model


@pytest.mark.parametrize("name", ["smollm2-135m", "llama-1b", "llama-8b"])
def test_decode_attention_intensity_is_the_gqa_group_size_whatever_the_batch(name):
    cfg = PRESETS[name]
    rng = random.Random()
    for _ in range(5):
        batch, context = rng.randint(1, 256), rng.randint(1, 32768)
        flops, kv_bytes = decode_attention_counts(cfg, batch, context, torch.bfloat16)
        assert flops / kv_bytes == pytest.approx(cfg.num_heads / cfg.num_kv_heads)
        flops32, kv32 = decode_attention_counts(cfg, batch, context, torch.float32)
        assert flops32 == flops and kv32 == 2 * kv_bytes
    assert cfg.num_heads // cfg.num_kv_heads == {"smollm2-135m": 3, "llama-1b": 4, "llama-8b": 4}[name]


def test_decode_loop_counts_of_the_two_loops():
    cfg = PRESETS["tiny"]
    prompt, new = random.randint(1, 300), random.randint(1, 40)
    recompute = decode_loop_counts(cfg, prompt, new, cached=False)
    cached = decode_loop_counts(cfg, prompt, new, cached=True)
    assert cached.token_rows == prompt + new - 1
    assert recompute.token_rows == sum(prompt + i for i in range(new))
    assert recompute.lm_head_flops == cached.lm_head_flops == 2 * new * cfg.vocab_size * cfg.hidden_size
    assert recompute.weight_bytes == cached.weight_bytes
    assert recompute.layer_flops * cached.token_rows == cached.layer_flops * recompute.token_rows


def test_min_time_is_the_fastest_call():
    delays = iter([0.0, 0.0, 0.02, 0.0, 0.01])
    import time

    best = min_time_s(lambda: time.sleep(next(delays)), torch.device("cpu"), warmup=1, iters=4)
    assert best < 0.005


def test_cpu_ceilings_and_bare_products_are_positive():
    ceilings = fastest_ceilings("cpu", torch.float32, iters=2)
    assert ceilings.copy_bytes_per_s > 1e8 and ceilings.matmul_flops_per_s > 1e8
    model = load_model("tiny", device="cpu", dtype=torch.float32, random_weights=True).model
    assert weight_gemms_s(model, 2, passes=1) > 0
    cache = largest_cache_bytes()
    assert cache is None or cache >= 1 << 10


def _fake_run() -> dict:
    rows = []
    for model in ("smollm2-135m", "llama-1b", "llama-8b"):
        for name in (f"decode {model} bs1", f"decode {model} bs128", f"prefill {model} 2048"):
            rows.append({"name": name, "value": 1.0, "unit": "ms", "limit": 0.5, "fraction_of_limit": random.random()})
    rows.append({"name": "attention decode paged bs32 ctx8192", "value": 1.0, "unit": "us", "limit": 1.0,
                 "fraction_of_limit": 1.0})
    return {"card": "NVIDIA Test", "rows": rows, "_file": "gpu-test.json"}


def test_gpu_run_fractions_and_figure_fit_a_slide():
    run = _fake_run()
    fractions = gpu_run_fractions(run)
    by_name = {r["name"]: r["fraction_of_limit"] for r in run["rows"]}
    assert fractions["llama-8b"]["decode B=1"] == by_name["decode llama-8b bs1"]
    assert fractions["smollm2-135m"]["prefill 2048"] == by_name["prefill smollm2-135m 2048"]
    fig = gpu_run_figure(run)
    width, height = fig.get_size_inches() * 80  # the decks draw at 80 dpi on 960x700 slides
    assert width <= 960 and height <= 700
    heights = sorted(round(p.get_height(), 6) for p in fig.axes[0].patches)
    assert heights == sorted(round(v, 6) for f in fractions.values() for v in f.values())
