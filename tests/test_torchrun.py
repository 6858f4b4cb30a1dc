"""Workers started by torchrun as two "nodes" on this machine (CPU, gloo): they serve like colocated, then all exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import token_prompts
from minidisagg import LLM, SamplingParams
from minidisagg.disagg.launch import free_ports
from minidisagg.disagg.router_server import parse_router_peers
from minidisagg.disagg.torchrun import advertised_host, router_peers, worker_port, worker_role
from minidisagg.transport.auth import SECRET_ENV, LinkSecurity, new_secret
from serve_process import serve_process

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
GREEDY = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}
READY_TIMEOUT_S = 120.0
EXIT_TIMEOUT_S = 30.0
NUM_BLOCKS = 64


def test_roles_and_router_peers_follow_the_launchers_convention():
    assert [worker_role(r, 2, 1) for r in range(3)] == [("decode", "d0"), ("prefill", "p0"), ("prefill", "p1")]
    with pytest.raises(ValueError, match="outside"):
        worker_role(3, 2, 1)
    text = router_peers(["d0=10.0.0.1:7001", "p0=10.0.0.2:7002", "p1=10.0.0.2:7003"], num_decode=1)
    assert parse_router_peers(text) == ({"p0": ("10.0.0.2", 7002), "p1": ("10.0.0.2", 7003)},
                                        {"d0": ("10.0.0.1", 7001)})
    assert advertised_host("10.0.0.3", HOST) == "10.0.0.3"
    assert advertised_host("0.0.0.0", HOST) == HOST  # a wildcard: the interface toward the store
    with pytest.raises(ValueError, match="mode='disagg'"):
        LLM("tiny", device="cpu", workers=text)


def start_node(node_rank: int, rdzv_port: int, seed: int, log_dir: Path, secret: bytes) -> subprocess.Popen:
    """One torchrun agent (a "node") with one worker process; its own session, so its processes can be found."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--node-rank", str(node_rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{HOST}:{rdzv_port}",
           "--max-restarts", "0", "-m", "minidisagg.serve_worker", "tiny", "--device", "cpu", "--dtype", "float32",
           "--random-weights", "--seed", str(seed), "--batch-invariant", "--num-kv-blocks", str(NUM_BLOCKS),
           "--num-prefill", "1", "--num-decode", "1", "--dist-backend", "gloo",
           "--peers-file", str(log_dir / f"peers{node_rank}.txt")]
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", **{SECRET_ENV: secret.decode()})
    with open(log_dir / f"node{node_rank}.log", "wb") as log:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def logs(log_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-20:])
                     for p in sorted(log_dir.glob("node*.log")))


def wait_for_peers(path: Path, nodes: list[subprocess.Popen], log_dir: Path) -> str:
    """The router's peers, once a node wrote them; fails (with the logs) if a node exits or time runs out."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not path.exists():
        exited = [n.returncode for n in nodes if n.poll() is not None]
        assert not exited, f"a torchrun node exited with {exited} before its workers listened:\n{logs(log_dir)}"
        assert time.monotonic() < deadline, f"no {path.name} after {READY_TIMEOUT_S} s:\n{logs(log_dir)}"
        time.sleep(0.2)
    return path.read_text().strip()


def session_alive(session_id: int) -> bool:
    try:
        os.killpg(session_id, 0)
    except ProcessLookupError:
        return False
    return True


def stop_nodes(nodes: list[subprocess.Popen]) -> None:
    """SIGTERM each torchrun agent (it stops its worker), SIGKILL what outlives the timeout; reap the agents."""
    for node in nodes:
        if node.poll() is None:
            node.terminate()
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    for node in nodes:
        try:
            node.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait(5)


def test_the_workers_of_one_node_listen_on_ports_of_their_own():
    base = 20000 + os.getpid() % 20000
    ports = [worker_port(base, local_rank) for local_rank in range(4)]  # --port given: base + LOCAL_RANK
    assert ports == [base, base + 1, base + 2, base + 3]
    assert [worker_port(None, r) for r in range(3)] == [0, 0, 0]  # none given: each picks a free one
    with pytest.raises(SystemExit, match="65535"):
        worker_port(65534, 2)


def test_two_torchrun_nodes_serve_like_colocated_and_leave_no_process(tmp_path, module_seed, monkeypatch):
    """Python (``LLM(workers=...)``) and the HTTP front (``serve --peers``) both reach the workers torchrun started."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    seed = module_seed
    secret = new_secret()
    monkeypatch.setenv(SECRET_ENV, secret.decode())  # the HTTP front's process inherits it
    (rdzv_port,) = free_ports(HOST, 1)
    nodes = [start_node(rank, rdzv_port, seed, tmp_path, secret) for rank in (0, 1)]
    try:
        peers = wait_for_peers(tmp_path / "peers0.txt", nodes, tmp_path)
        assert [list(a) for a in parse_router_peers(peers)] == [["p0"], ["d0"]]
        model = {"device": "cpu", "dtype": "float32", "batch_invariant": True, "seed": seed,
                 "num_kv_blocks": NUM_BLOCKS}
        prompts = token_prompts(seed, 3)
        reference = LLM("tiny", **model)
        want = reference.generate(prompts, SamplingParams(**GREEDY), use_tqdm=False)
        llm = LLM("tiny", **model, mode="disagg", workers=peers, worker_security=LinkSecurity(secret=secret),
                  request_timeout_s=60)
        try:
            got = llm.generate(prompts, SamplingParams(**GREEDY), use_tqdm=False)
        finally:
            llm.shutdown()
        assert [o.token_ids for o in got] == [o.token_ids for o in want], \
            f"seed {seed}: torchrun workers differ from colocated\n{logs(tmp_path)}"
        assert all(o.metrics.kv_transfer_bytes > 0 for o in got)
        front = ["tiny", "--peers", peers, "--device", "cpu", "--dtype", "float32", "--random-weights", "--seed",
                 str(seed), "--batch-invariant", "--num-kv-blocks", str(NUM_BLOCKS)]
        for url, _ in serve_process(front, tmp_path / "front.port"):
            body = {"model": "tiny", "prompt": prompts[0]["prompt_token_ids"], **GREEDY}
            reply = httpx.post(url + "/v1/completions", json=body, timeout=READY_TIMEOUT_S)
            assert reply.status_code == 200, reply.text
            text = reference.get_tokenizer().decode(want[0].token_ids, skip_special_tokens=True)
            assert reply.json()["choices"][0]["text"] == text, f"seed {seed}: the HTTP front differs"
    finally:
        stop_nodes(nodes)
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    while any(session_alive(n.pid) for n in nodes) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [n.pid for n in nodes if session_alive(n.pid)]
    for session_id in left:
        os.killpg(session_id, signal.SIGKILL)
    assert not left, f"processes of torchrun sessions {left} outlived it:\n{logs(tmp_path)}"
