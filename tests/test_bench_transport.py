"""The transport benchmark in miniature: result structure, and every transfer delivers the bytes it was given."""

from __future__ import annotations

import json

import pytest
import torch

from minidisagg.bench import transport_names as names
from minidisagg.bench.transport import main, run_transport_bench
from minidisagg.bench.transport_bandwidth import make_case, transfer
from minidisagg.bench.transport_link import PagedReceiver, RemoteReceivers, digest
from minidisagg.bench.transport_prefill import project_llama8b
from minidisagg.bench.transport_report import render_tables, write_results
from minidisagg.config import PRESETS
from minidisagg.transport.inproc import InprocSender

SIZES = (64 * names.KiB, 128 * names.KiB)


@pytest.fixture(scope="module")
def result():
    """One tiny run of the whole benchmark (two small sizes, one repetition, the ``tiny`` model)."""
    return run_transport_bench(sizes=SIZES, repeats=1, transfer_bytes=256 * names.KiB, sample_bytes=512 * names.KiB,
                               model="tiny", prompt_lens=(16, 40), prefill_repeats=1, progress=False)


def test_inproc_transfer_lands_in_the_receivers_cache():
    case = make_case(128 * names.KiB, transfer_bytes=384 * names.KiB, sample_bytes=384 * names.KiB, seed=3)
    receiver = PagedReceiver(names.BENCH_LAYOUT, {case.num_blocks + 1: case.num_layers})
    transfer(InprocSender(receiver), "a", case)
    assert case.num_layers == 3 and torch.equal(receiver.received(case.num_layers), case.source)
    assert receiver.counters == {"commits": 1, "layers": 3, "bytes": 3 * 128 * names.KiB}


def test_socket_transfer_lands_in_the_remote_receivers_cache():
    case = make_case(64 * names.KiB, transfer_bytes=256 * names.KiB, sample_bytes=256 * names.KiB, seed=4)
    remote = RemoteReceivers(names.BENCH_LAYOUT, {case.num_blocks: case.num_layers})
    try:
        for tid in ("first", "second"):  # new pages each time: the receiver must hold the latest ones
            transfer(remote.senders[names.SOCKET], tid, case)
            assert remote.digest(names.SOCKET, case.num_layers) == digest(case.source)
            sent = case.message_bytes * case.num_layers * (tid == "first" or 2)
            assert remote.counters(names.SOCKET)["bytes"] == sent
            case.source.add_(1)
    finally:
        remote.close()


def test_bandwidth_rows_cover_every_method_and_size_and_all_bytes_arrived(result):
    methods = {r["transport"] for r in result["rows"]}
    expected = {names.TCP, names.TCP_POOL, names.SOCKET, names.COPY, names.INPROC}
    expected |= {names.GLOO, names.DIST} if result["dist"] == "measured" else set()
    assert methods == expected
    assert sorted((r["transport"], r["message_bytes"]) for r in result["rows"]) == sorted(
        (m, s) for m in expected for s in SIZES)
    for row in result["rows"]:
        assert row["GBps"] > 0 and len(row["seconds_per_repeat"]) == 1
        if row["transport"] in names.CEILING_OF:
            assert row["ceiling"] == names.CEILING_OF[row["transport"]]
            assert row["fraction_of_ceiling"] == pytest.approx(row["GBps"] / row["ceiling_GBps"], rel=0.01)
        else:
            assert row["ceiling"] is None and row["fraction_of_ceiling"] is None
        assert ("fraction_of_pool_destination_ceiling" in row) == (row["transport"] == names.SOCKET)
    transports = expected & set(names.CEILING_OF)
    assert result["verified"] == {f"{t} {s}": True for t in transports for s in SIZES}
    assert result["goals"] == {}  # the goal is about 16 MiB messages, not measured here


def test_kv_vs_prefill_rows(result):
    tiny = PRESETS["tiny"]
    rows = result["kv_vs_prefill"]
    assert [r["prompt_tokens"] for r in rows] == [16, 40]
    for row in rows:
        blocks = -(-row["prompt_tokens"] // 16)
        assert row["kv_bytes"] == blocks * 16 * tiny.kv_bytes_per_token(4)  # float32 pages, whole blocks
        assert row["prefill_s"] > 0 and row["transfer_s"] > 0
        assert row["transfer_over_prefill"] == pytest.approx(row["transfer_s"] / row["prefill_s"], rel=0.01)


def test_llama8b_projection_is_bytes_over_link_speed():
    rows = project_llama8b({64 * names.KiB: 0.5, names.MiB: 1.0, 16 * names.MiB: 2.0}, prompt_lens=(128, 2048))
    assert len(rows) == 6 and all("projection" in r["model"] for r in rows)
    for row in rows:
        assert row["kv_bytes"] == row["prompt_tokens"] * 2 * 32 * 8 * 128 * 2
        assert row["transfer_s"] == pytest.approx(row["kv_bytes"] / (row["link_GBps"] * 1e9), rel=1e-3)
    loopback = [r for r in rows if r["link"].startswith("loopback")]
    assert [r["link_GBps"] for r in loopback] == [1.0, 2.0]  # one layer: 512 KiB -> 1 MiB, 8 MiB -> 16 MiB
    assert loopback[1]["prefill_estimate_s"] > loopback[0]["prefill_estimate_s"]


def test_results_files(result, tmp_path):
    paths = write_results(result, tmp_path)
    assert [p.suffix for p in paths] == [".json", ".md", ".png"] and all(p.stat().st_size > 0 for p in paths)
    data = json.loads(paths[0].read_text())
    assert data["machine"]["cpu"] and data["machine"]["cores"] >= 1 and data["machine"]["torch"] == torch.__version__
    assert {"transport", "message_bytes", "GBps", "ceiling_GBps", "fraction_of_ceiling"} <= set(data["rows"][0])
    assert data["kv_vs_prefill"] and data["projection_llama8b"]
    markdown = paths[1].read_text()
    assert "| transport | message | GB/s |" in markdown and "PROJECTION" in markdown
    assert main is not None and all(t.row_count for t in render_tables(result))
