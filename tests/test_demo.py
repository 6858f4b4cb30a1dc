"""The headline demo runs end to end (tiny sizes) and reports what it promises."""

from __future__ import annotations

from rich.console import Console

from minidisagg.demo import DemoSettings, run_demo


def test_demo_runs_colocated_and_disaggregated(tmp_path):
    settings = DemoSettings(num_decodes=2, decode_prompt_len=8, decode_output_len=12, num_long=2, long_prompt_len=96,
                            long_every_s=0.3, start_long_s=0.1, chunk_budget_tokens=32)
    console = Console(record=True, width=200)
    runs = run_demo(model="tiny", device="cpu", out_dir=tmp_path, settings=settings, console=console)
    assert list(runs) == ["colocated, prefill_first", "colocated, chunked", "disagg 1P1D, socket"]
    for run in runs.values():
        assert [len(o.token_ids) for o in run.decodes] == [12, 12]
        assert [len(o.token_ids) for o in run.longs] == [8, 8]
    assert all(o.metrics.kv_transfer_bytes > 0 and o.metrics.kv_send_s > 0 for o in runs["disagg 1P1D, socket"].decodes)
    text = console.export_text()
    assert "ITL p99 ms" in text and "KV GB/s" in text and "pinned to one core" in text
    png = tmp_path / "minidisagg-demo-itl.png"
    assert png.exists() and png.stat().st_size > 10_000
