"""Worker processes live as long as the process that launched them, not the thread.

``PR_SET_PDEATHSIG`` fires when the thread that forked a child ends; the launcher forks every
worker from one long-lived thread, so an ``LLM`` made on a short-lived thread keeps its
workers, while killing the parent process still takes them down.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from minidisagg import LLM, SamplingParams

REPO = Path(__file__).resolve().parent.parent
PROMPT = [5, 17, 230, 9]
GREEDY = {"temperature": 0, "max_tokens": 6, "ignore_eos": True}
PARENT = """
import json, sys, threading, time
from minidisagg import LLM, SamplingParams

made = {}
thread = threading.Thread(target=lambda: made.update(llm=LLM("tiny", device="cpu", batch_invariant=True,
                                                             mode="disagg", transport="socket")))
thread.start()
thread.join()
time.sleep(1.0)  # the thread that started the workers is gone
llm = made["llm"]
out = llm.generate({"prompt_token_ids": %s}, SamplingParams(**%s), use_tqdm=False)[0]
print(json.dumps({"pids": [p.proc.pid for p in llm.engine.processes], "tokens": out.token_ids}), flush=True)
time.sleep(600)
"""


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_workers_outlive_the_thread_that_made_them_and_die_with_the_process():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
    parent = subprocess.Popen([sys.executable, "-c", PARENT % (PROMPT, GREEDY)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO, env=env)
    pids: list[int] = []
    try:
        line = parent.stdout.readline()
        assert line, f"the parent exited with {parent.wait(30)} before answering"
        report = json.loads(line)
        pids = report["pids"]
        want = LLM("tiny", device="cpu", batch_invariant=True).generate(
            {"prompt_token_ids": PROMPT}, SamplingParams(**GREEDY), use_tqdm=False)[0].token_ids
        assert report["tokens"] == want, "workers made on a thread that ended did not serve"
        assert len(pids) == 2 and not any(gone(pid) for pid in pids)
        parent.send_signal(signal.SIGKILL)  # no cleanup code runs: only the kernel's death signal
        parent.wait(30)
        deadline = time.monotonic() + 30
        while not all(gone(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(gone(pid) for pid in pids), f"workers {pids} outlived their killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in pids:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_picked_ports_are_distinct_bindable_and_outside_the_ephemeral_range():
    """Outgoing connections (gloo, the rendezvous store) draw ephemeral ports: a picked port must not be one."""
    import socket

    from minidisagg.disagg.launch import ephemeral_port_range, free_ports

    ports = free_ports("127.0.0.1", 8)
    assert len(set(ports)) == 8
    span = ephemeral_port_range()
    if span is not None:
        assert all(p < span[0] for p in ports), (ports, span)
    for port in ports:
        socket.create_server(("127.0.0.1", port)).close()
