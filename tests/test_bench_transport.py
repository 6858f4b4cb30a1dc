"""The transport benchmark in miniature: result structure, and every transfer delivers the bytes it was given."""

from __future__ import annotations

import json

import pytest
import torch

from minidisagg.bench import transport as bt
from minidisagg.config import PRESETS
from minidisagg.transport.inproc import InprocSender

SIZES = (64 * bt.KiB, 128 * bt.KiB)


@pytest.fixture(scope="module")
def result():
    """One tiny run of the whole benchmark (two small sizes, one repetition, the ``tiny`` model)."""
    return bt.run_transport_bench(sizes=SIZES, repeats=1, transfer_bytes=256 * bt.KiB, sample_bytes=512 * bt.KiB,
                                  model="tiny", prompt_lens=(16, 40), prefill_repeats=1, progress=False)


def test_inproc_transfer_lands_in_the_receivers_cache():
    case = bt.make_case(128 * bt.KiB, transfer_bytes=384 * bt.KiB, sample_bytes=384 * bt.KiB, seed=3)
    receiver = bt.PagedReceiver(bt.BENCH_LAYOUT, {case.num_blocks + 1: case.num_layers})
    bt.transfer(InprocSender(receiver), "a", case)
    assert case.num_layers == 3 and torch.equal(receiver.received(case.num_layers), case.source)
    assert receiver.counters == {"commits": 1, "layers": 3, "bytes": 3 * 128 * bt.KiB}


def test_socket_transfer_lands_in_the_remote_receivers_cache():
    case = bt.make_case(64 * bt.KiB, transfer_bytes=256 * bt.KiB, sample_bytes=256 * bt.KiB, seed=4)
    remote = bt.RemoteReceivers(bt.BENCH_LAYOUT, {case.num_blocks: case.num_layers})
    try:
        for tid in ("first", "second"):  # new pages each time: the receiver must hold the latest ones
            bt.transfer(remote.senders[bt.SOCKET], tid, case)
            assert remote.digest(bt.SOCKET, case.num_layers) == bt.digest(case.source)
            assert remote.counters(bt.SOCKET)["bytes"] == case.message_bytes * case.num_layers * (tid == "first" or 2)
            case.source.add_(1)
    finally:
        remote.close()


def test_bandwidth_rows_cover_every_method_and_size_and_all_bytes_arrived(result):
    methods = {r["transport"] for r in result["rows"]}
    expected = {bt.TCP, bt.TCP_POOL, bt.SOCKET, bt.COPY, bt.INPROC}
    expected |= {bt.GLOO, bt.DIST} if result["dist"] == "measured" else set()
    assert methods == expected
    assert sorted((r["transport"], r["message_bytes"]) for r in result["rows"]) == sorted(
        (m, s) for m in expected for s in SIZES)
    for row in result["rows"]:
        assert row["GBps"] > 0 and len(row["seconds_per_repeat"]) == 1
        if row["transport"] in bt.CEILING_OF:
            assert row["ceiling"] == bt.CEILING_OF[row["transport"]]
            assert row["fraction_of_ceiling"] == pytest.approx(row["GBps"] / row["ceiling_GBps"], rel=0.01)
        else:
            assert row["ceiling"] is None and row["fraction_of_ceiling"] is None
        assert ("fraction_of_pool_destination_ceiling" in row) == (row["transport"] == bt.SOCKET)
    transports = expected & set(bt.CEILING_OF)
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
    rows = bt.project_llama8b({64 * bt.KiB: 0.5, bt.MiB: 1.0, 16 * bt.MiB: 2.0}, prompt_lens=(128, 2048))
    assert len(rows) == 6 and all("projection" in r["model"] for r in rows)
    for row in rows:
        assert row["kv_bytes"] == row["prompt_tokens"] * 2 * 32 * 8 * 128 * 2
        assert row["transfer_s"] == pytest.approx(row["kv_bytes"] / (row["link_GBps"] * 1e9), rel=1e-3)
    loopback = [r for r in rows if r["link"].startswith("loopback")]
    assert [r["link_GBps"] for r in loopback] == [1.0, 2.0]  # one layer: 512 KiB -> 1 MiB, 8 MiB -> 16 MiB
    assert loopback[1]["prefill_estimate_s"] > loopback[0]["prefill_estimate_s"]


def test_results_files(result, tmp_path):
    paths = bt.write_results(result, tmp_path)
    assert [p.suffix for p in paths] == [".json", ".md", ".png"] and all(p.stat().st_size > 0 for p in paths)
    data = json.loads(paths[0].read_text())
    assert data["machine"]["cpu"] and data["machine"]["cores"] >= 1 and data["machine"]["torch"] == torch.__version__
    assert {"transport", "message_bytes", "GBps", "ceiling_GBps", "fraction_of_ceiling"} <= set(data["rows"][0])
    assert data["kv_vs_prefill"] and data["projection_llama8b"]
    markdown = paths[1].read_text()
    assert "| transport | message | GB/s |" in markdown and "PROJECTION" in markdown
    assert bt.main is not None and all(t.row_count for t in bt.render_tables(result))
