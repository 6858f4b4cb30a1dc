"""KV transfer tracing: off by default, one line per step when on, and the lines of two workers merge."""

from __future__ import annotations

import os
import subprocess
import sys

from minidisagg.transport.trace import read_trace

SCRIPT = "from minidisagg.transport.trace import kv_trace\nkv_trace('send-0', 't1')\nkv_trace('sent-0', 't1')\n"


def _worker_log(tmp_path, name: str, trace: str) -> str:
    env = dict(os.environ, MINIDISAGG_KV_TRACE=trace)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    (tmp_path / f"{name}.log").write_text("worker started\n" + out.stderr + "garbage kv-trace line\n")
    return out.stderr


def test_trace_is_off_by_default_and_merges_both_workers_in_time_order(tmp_path):
    assert "kv-trace" not in _worker_log(tmp_path, "off", "")
    (tmp_path / "off.log").unlink()
    _worker_log(tmp_path, "p0", "1")
    _worker_log(tmp_path, "d0", "1")
    merged = read_trace(sorted(tmp_path.glob("*.log")))
    assert list(merged) == ["t1"]
    steps = merged["t1"]
    assert [name for _, name in steps].count("send-0") == 2 and len(steps) == 4
    assert [t for t, _ in steps] == sorted(t for t, _ in steps)
