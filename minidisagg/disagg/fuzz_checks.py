"""Fuzz a live deployment: run each ``fuzz`` input against real worker processes, then check that nothing broke.

``FuzzDeployment`` starts a decode worker, a prefill worker and a router, each a ``minidisagg
serve`` process holding one fresh secret, with short frame deadlines and a small connection
cap so the inputs meet them. Beside them run, in this process: the colocated engine on the
same weights (the oracle), a well-behaved router of our own (``RemoteCluster``, for the
victims of id attacks) and one authenticated bystander connection per worker (for HEALTH).

After every input (``run_input``) the checks are:

- every process is alive;
- both KV pools are whole again (``num_free_blocks == num_blocks`` in a HEALTH answer, waiting
  a few seconds for links to hand blocks back);
- a greedy request through the router's client port returns the colocated engine's tokens,
  and so does every victim request the input attacked; each that does not counts as lost;
- the promises the input tested held (``note``: a stalled peer dropped after the deadline, a
  connection over the cap refused, a failed handshake closed).
"""

from __future__ import annotations

import json
import logging
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from minidisagg.disagg.fuzz import FuzzInput
from minidisagg.disagg.fuzz_frames import SocketPeer
from minidisagg.disagg.launch import WorkerProcess, spawn_worker, stop_processes
from minidisagg.kv.pages import KVLayout
from minidisagg.transport.auth import new_secret
from minidisagg.transport.framing import FrameError, FrameKind, recv_frame
from minidisagg.transport.handshake import client_handshake

log = logging.getLogger(__name__)
HOST = "127.0.0.1"
PROMPTS = [[11, 12, 13, 14, 15], [3, 1, 4, 1, 5, 9, 2, 6], [42] * 12, [300, 301, 302], [7] * 3 + [8] * 4, [1, 100, 1000]]
CHECK_PARAMS = {"temperature": 0, "max_tokens": 5, "ignore_eos": True}
VICTIM_PARAMS = {"temperature": 0, "max_tokens": 48, "ignore_eos": True}
CAP_RELEASE_S = 3.0  # how long a connection closed by an input may still count against the router's cap


@dataclass(frozen=True)
class FuzzSettings:
    """The deployment under fuzz: model, pool size, and the limits the inputs meet."""

    model: str = "tiny"
    num_kv_blocks: int = 128
    frame_deadline_s: float = 1.5
    max_connections: int = 24
    request_timeout_s: float = 30.0
    check_timeout_s: float = 30.0
    pool_wait_s: float = 10.0
    victim_policy: str = "recompute"  # the kv_failure_policy of our own router, whose requests inputs attack
    subscriber_queue_size: int = 256  # small, so a router that reads nothing overflows it soon

    def serve_args(self) -> list[str]:
        """The ``minidisagg serve`` flags every process of the deployment gets."""
        return ["--model", self.model, "--device", "cpu", "--dtype", "float32", "--random-weights", "--batch-invariant",
                "--num-kv-blocks", str(self.num_kv_blocks), "--frame-deadline-s", repr(self.frame_deadline_s),
                "--max-connections", str(self.max_connections), "--request-timeout-s", repr(self.request_timeout_s),
                "--subscriber-queue-size", str(self.subscriber_queue_size)]


class FuzzDeployment:
    """Decode, prefill and router processes with one secret, and what the checks need beside them (module docstring)."""

    def __init__(self, settings: FuzzSettings = FuzzSettings(), log_dir: Optional[Path] = None) -> None:
        from minidisagg import LLM
        from minidisagg.config import CacheConfig, EngineConfig
        from minidisagg.disagg.router_server import RemoteCluster
        from minidisagg.models.registry import load_model
        from minidisagg.transport.auth import LinkSecurity

        self.settings = settings
        self.secret = new_secret()
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="minidisagg-fuzz-"))
        self.processes: dict[str, WorkerProcess] = {}
        self.bystanders: dict[str, SocketPeer] = {}
        self.cluster: Any = None
        args = settings.serve_args()
        try:
            decode = spawn_worker("decode", "d0", args, self.log_dir, secret=self.secret)
            self.processes["decode"] = decode
            prefill = spawn_worker("prefill", "p0", [*args, "--peers", f"d0={HOST}:{decode.port}"], self.log_dir,
                                   secret=self.secret)
            self.processes["prefill"] = prefill
            peers = f"prefill=p0@{HOST}:{prefill.port};decode=d0@{HOST}:{decode.port}"
            self.processes["router"] = spawn_worker("router", "r0", [*args, "--peers", peers], self.log_dir,
                                                    secret=self.secret)
            self.loaded = load_model(settings.model, device="cpu", dtype="float32", random_weights=True)
            cfg = self.loaded.config
            self.layout = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 16, self.loaded.dtype)
            config = EngineConfig(batch_invariant=True, cache=CacheConfig(num_blocks=settings.num_kv_blocks))
            self.cluster = RemoteCluster(self.loaded, config, {"p0": (HOST, prefill.port)}, {"d0": (HOST, decode.port)},
                                         request_timeout_s=settings.request_timeout_s,
                                         kv_failure_policy=settings.victim_policy,
                                         security=LinkSecurity(secret=self.secret))
            self.bystanders = {role: self.connect(role, "router") for role in ("decode", "prefill")}
            self.reference = LLM(settings.model, device="cpu", batch_invariant=True)
            self._expected: dict[tuple[int, int], list[int]] = {}
        except BaseException:
            self.stop()
            raise

    def expected(self, key: tuple[int, int]) -> list[int]:
        """The colocated engine's greedy tokens for ``PROMPTS[key[0]]`` and ``key[1]`` new tokens (computed once)."""
        from minidisagg import SamplingParams

        if key not in self._expected:
            params = SamplingParams(temperature=0, max_tokens=key[1], ignore_eos=True)
            self._expected[key] = self.reference.generate({"prompt_token_ids": PROMPTS[key[0]]}, params,
                                                          use_tqdm=False)[0].token_ids
        return self._expected[key]

    def port(self, target: str) -> int:
        """The listening port of ``decode``, ``prefill`` or ``router``."""
        return self.processes[target].port

    def connect(self, target: str, role: str, timeout_s: float = 10.0, deaf: bool = False) -> SocketPeer:
        """A connection to a worker that proved the secret and said HELLO as ``role`` (``deaf``: a tiny receive buffer)."""
        from minidisagg.transport.socket import make_hello

        sock = socket.socket()
        try:
            if deaf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(timeout_s)
            sock.connect((HOST, self.port(target)))
            client_handshake(sock, make_hello(role, self.loaded.config.fingerprint(), self.layout), timeout_s,
                             secret=self.secret)
        except BaseException:
            sock.close()
            raise
        return SocketPeer(sock)

    def alive(self) -> dict[str, bool]:
        """Whether each process is still running."""
        return {name: proc.proc.poll() is None for name, proc in self.processes.items()}

    def pools(self) -> dict[str, Optional[tuple[int, int]]]:
        """(free, total) KV blocks of each worker once whole, or as last seen after ``pool_wait_s`` (None: no answer)."""
        seen: dict[str, Optional[tuple[int, int]]] = {}
        for role in ("decode", "prefill"):
            deadline = time.monotonic() + self.settings.pool_wait_s
            seen[role] = None
            while True:
                health = self._health(role)
                if health is not None:
                    seen[role] = (health["num_free_blocks"], health["num_blocks"])
                    if health["num_free_blocks"] == health["num_blocks"]:
                        break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        return seen

    def _health(self, role: str) -> Optional[dict[str, Any]]:
        """PING -> HEALTH over the bystander connection (reconnecting once if it was dropped)."""
        for _ in range(2):
            peer = self.bystanders[role]
            peer.send(FrameKind.PING, {})
            health = self._until_health(peer)
            if health is not None:
                return health
            peer.close()
            try:
                self.bystanders[role] = self.connect(role, "router")
            except (OSError, FrameError) as exc:
                log.warning("bystander cannot reach %s: %s", role, exc)
                return None
        return None

    @staticmethod
    def _until_health(peer: SocketPeer, timeout_s: float = 5.0) -> Optional[dict[str, Any]]:
        """The next HEALTH header on ``peer`` (outputs broadcast to every router are skipped), or None."""
        deadline = time.monotonic() + timeout_s
        while (remaining_s := deadline - time.monotonic()) > 0:
            try:
                frame = recv_frame(peer.sock, remaining_s, max_payload_bytes=0)
            except (OSError, FrameError):
                return None
            if frame.kind == FrameKind.HEALTH:
                return frame.header
        return None

    def good_request(self, index: int, via: Optional[SocketPeer] = None) -> Optional[str]:
        """One greedy request through the router's client port (on ``via`` if given): None when it matches
        colocated, else what went wrong."""
        from minidisagg.disagg.router_protocol import stream_request

        key = (index % len(PROMPTS), CHECK_PARAMS["max_tokens"])
        request = {"id": "good", "prompt_token_ids": PROMPTS[key[0]], **CHECK_PARAMS}
        try:
            if via is None:
                final = list(stream_request(HOST, self.port("router"), request, self.settings.check_timeout_s))[-1]
                retry_until_s = time.monotonic() + CAP_RELEASE_S
                while "connections" in str(final.get("error")) and time.monotonic() < retry_until_s:
                    time.sleep(0.1)  # an input's connections were just closed: the router lets them go within moments
                    final = list(stream_request(HOST, self.port("router"), request, self.settings.check_timeout_s))[-1]
            else:
                via.send_raw(json.dumps(request).encode() + b"\n")
                lines = via.replies(self.settings.check_timeout_s, until=lambda line: line.get("finished") is True)
                final = lines[-1] if lines else {"error": "no final line"}
        except (OSError, ValueError) as exc:
            return f"good request {key}: {type(exc).__name__}: {exc}"
        if final.get("error") is not None or final.get("token_ids") != self.expected(key):
            return f"good request {key}: {final.get('error') or final.get('token_ids')} != {self.expected(key)}"
        return None

    def stop(self) -> None:
        """Stop every process and close every connection (safe to call twice)."""
        for peer in self.bystanders.values():
            peer.close()
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None
        router = [p for name, p in self.processes.items() if name == "router"]
        stop_processes(router, timeout_s=20)  # the router first: it is the workers' client
        stop_processes([p for name, p in self.processes.items() if name != "router"], timeout_s=20)


@dataclass
class InputResult:
    """What one input did: processes alive, pools whole, requests lost, promises broken."""

    index: int
    category: str
    name: str
    alive: bool
    pools_whole: bool
    requests: int
    lost: int
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


class FuzzContext:
    """What one input may use (``fuzz.FuzzTarget``); it closes what the input opened and checks its victims."""

    def __init__(self, deployment: FuzzDeployment, index: int) -> None:
        self.deployment, self.index = deployment, index
        self.layout = deployment.layout
        self.vocab_size = deployment.loaded.config.vocab_size
        self.frame_deadline_s = deployment.settings.frame_deadline_s
        self.max_connections = deployment.settings.max_connections
        self.peers: list[SocketPeer] = []
        self.victims: dict[str, tuple[str, tuple[int, int]]] = {}  # cluster id -> (wire id, expected key)
        self.notes: list[str] = []
        self.requests = 0
        self.lost: list[str] = []

    def peer(self, target: str, role: str, deaf: bool = False) -> SocketPeer:
        """An authenticated connection (``fuzz.FuzzTarget.peer``)."""
        self.peers.append(self.deployment.connect(target, role, deaf=deaf))
        return self.peers[-1]

    def raw(self, target: str) -> SocketPeer:
        """A bare TCP connection (``fuzz.FuzzTarget.raw``)."""
        sock = socket.create_connection((HOST, self.deployment.port(target)), timeout=10.0)
        self.peers.append(SocketPeer(sock, lines=target == "router"))
        return self.peers[-1]

    def victim(self, on_decode: bool) -> str:
        """A request of our own router, already decoding when ``on_decode`` (``fuzz.FuzzTarget.victim``)."""
        from minidisagg import SamplingParams

        cluster = self.deployment.cluster
        key = (self.index % len(PROMPTS), VICTIM_PARAMS["max_tokens"])
        rid = cluster.add_request({"prompt_token_ids": PROMPTS[key[0]]}, SamplingParams(**VICTIM_PARAMS))
        self.victims[rid] = (cluster.wire_id(rid, 1), key)
        self.requests += 1
        deadline = time.monotonic() + self.deployment.settings.check_timeout_s
        while on_decode and time.monotonic() < deadline:
            if any(out.request_id == rid and out.token_ids for out in self._step()):
                break
        return self.victims[rid][0]

    def _step(self) -> list[Any]:
        outputs = self.deployment.cluster.step()
        for out in outputs:
            if out.finished and out.request_id in self.victims:
                self._judge_victim(out)
        return outputs

    def _judge_victim(self, out: Any) -> None:
        _, key = self.victims.pop(out.request_id)
        if out.error is not None or out.token_ids != self.deployment.expected(key):
            self.lost.append(f"victim {out.request_id}: {out.error or out.token_ids}")

    def serve_one(self, via: Optional[Any] = None) -> None:
        """A good request through the router now (``fuzz.FuzzTarget.serve_one``)."""
        self.requests += 1
        problem = self.deployment.good_request(self.index + 1, via)
        if problem is not None:
            self.lost.append(problem)

    def note(self, problem: str) -> None:
        """A broken promise (``fuzz.FuzzTarget.note``)."""
        self.notes.append(problem)

    def finish(self) -> None:
        """Close the input's connections and run its victims to their end."""
        for peer in self.peers:
            peer.close()
        deadline = time.monotonic() + self.deployment.settings.check_timeout_s
        while self.victims and time.monotonic() < deadline:
            self._step()
        for rid in list(self.victims):
            self.lost.append(f"victim {rid}: no result within {self.deployment.settings.check_timeout_s} s")
            self.deployment.cluster.abort(rid)
            self.victims.pop(rid)


def run_input(deployment: FuzzDeployment, index: int, inp: FuzzInput) -> InputResult:
    """Run one input, then check the deployment (module docstring)."""
    started_s = time.monotonic()
    ctx = FuzzContext(deployment, index)
    try:
        inp.act(ctx)
    except (OSError, FrameError) as exc:  # the deployment hanging up on a hostile peer is what should happen
        log.debug("input %d (%s): the peer saw %s", index, inp.name, exc)
    finally:
        ctx.finish()
    ctx.serve_one()
    pools = deployment.pools()
    alive = deployment.alive()
    whole = all(p is not None and p[0] == p[1] for p in pools.values())
    notes = ctx.notes + ctx.lost
    if not all(alive.values()):
        notes.append(f"processes not alive: {alive}")
    if not whole:
        notes.append(f"KV pools (free, total): {pools}")
    return InputResult(index, inp.category, inp.name, all(alive.values()), whole, ctx.requests, len(ctx.lost), notes,
                       time.monotonic() - started_s)


def run_fuzz(deployment: FuzzDeployment, inputs: list[FuzzInput],
             on_result: Callable[[InputResult], None] = lambda result: None) -> list[InputResult]:
    """Run every input in turn (stopping early if a process died: later checks would only repeat it)."""
    results = []
    for index, inp in enumerate(inputs):
        results.append(run_input(deployment, index, inp))
        on_result(results[-1])
        if not results[-1].alive:
            break
    return results
