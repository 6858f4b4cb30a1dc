"""``minidisagg serve``: the OpenAI-compatible HTTP front (``--mode``), or one prefill, decode or router process
(``--role``), its flags and its run loop.

Only the standard library is imported here at load time, so ``minidisagg --help`` stays fast; the
engine, torch and the transports load when the command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional, Protocol

WORKER_HEALTH_POLL_S = 0.2  # how often ``serve`` checks that its worker's engine loop is alive
WORKER_SWITCH_INTERVAL_S = float(os.environ.get("MINIDISAGG_SWITCH_INTERVAL_S", "0.0005"))  # see cmd_serve


class WorkerRendezvous(Protocol):
    """How a worker started by an outside launcher (``torchrun``: ``disagg.torchrun``) joins its group and finds peers."""

    def join(self, secret: Optional[bytes]) -> Any:
        """The group's store, joined and this rank's membership proved (``init_dist``'s ``store``)."""

    def decode_peers(self) -> str:
        """Prefill: the decode workers as ``name=host:port@rank,...``, once all of them listen."""

    def listening(self, port: int) -> None:
        """This worker listens on ``port``: tell the others."""


def add_serve_parser(sub: Any, model_help: str, device_help: str, dtype_help: str) -> None:
    """Add the ``serve`` subcommand and its flags to ``sub`` (the CLI's subparsers)."""
    from minidisagg.config import KV_WIRE_DTYPES, LinkConfig  # dataclasses only: no torch
    from minidisagg.disagg.router import ROUTING_POLICIES  # hashlib and dataclasses only: no torch

    serve = sub.add_parser("serve", help="serve the OpenAI API over HTTP (--mode), or run one prefill, decode or "
                                         "router process (--role)")
    serve.add_argument("model_arg", nargs="?", metavar="MODEL", default=None, help="the model (same as --model)")
    serve.add_argument("--mode", choices=["colocated", "disagg"], default=None,
                       help="HTTP front over one colocated engine, or over prefill and decode worker processes "
                            "(the default without --role: colocated)")
    serve.add_argument("--role", choices=["prefill", "decode", "router"], default=None,
                       help="run one worker process instead (multi-host setups)")
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=None, help="HTTP front: default 8000; --role: default 0, a "
                                                              "free port; 0 picks a free port")
    serve.add_argument("--api-key", default="", help="HTTP front: require 'Authorization: Bearer KEY' on /v1/ "
                                                     "(default: $MINIDISAGG_API_KEY; none: no check)")
    serve.add_argument("--served-model-name", default="", help="HTTP front: the model's name in the API "
                                                               "(default: MODEL)")
    serve.add_argument("--num-prefill", type=int, default=1, help="--mode disagg: prefill worker processes")
    serve.add_argument("--num-decode", type=int, default=1, help="--mode disagg: decode worker processes")
    serve.add_argument("--transport", choices=["socket", "dist"], default="socket",
                       help="--mode disagg: how KV pages move between the workers")
    serve.add_argument("--max-pending", type=int, default=256,
                       help="HTTP front: requests held at once (queued or running); more get 503")
    serve.add_argument("--policy", default="prefill_first", help="HTTP front: the scheduling policy "
                                                                 "(prefill_first, decode_first, chunked)")
    serve.add_argument("--peers", default="", help="prefill: decode workers as NAME=host:port,...; "
                                                  "router, and HTTP front over running workers: "
                                                  "prefill=NAME@host:port,...;decode=NAME@host:port,...")
    serve.add_argument("--model", default="smollm2-135m", help=model_help)
    serve.add_argument("--device", default="auto", help=device_help)
    serve.add_argument("--dtype", default="auto", help=dtype_help)
    serve.add_argument("--random-weights", action="store_true")
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--max-num-seqs", type=int, default=64)
    serve.add_argument("--max-num-batched-tokens", type=int, default=2048)
    serve.add_argument("--block-size", type=int, default=16)
    serve.add_argument("--num-kv-blocks", type=int, default=None)
    serve.add_argument("--batch-invariant", action="store_true")
    serve.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    serve.add_argument("--kv-memory-budget-bytes", type=int, default=None, help="KV pool size (default: the engine's)")
    serve.add_argument("--kv-layout", choices=("layer_major", "block_major"), default=None,
                       help="KV pool memory layout (default: block_major on CUDA, layer_major on a CPU)")
    serve.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly on CUDA")
    serve.add_argument("--enable-prefix-caching", action="store_true",
                       help="reuse the KV of full blocks across requests that share a prefix")
    serve.add_argument("--async-scheduling", choices=("auto", "on", "off"), default="auto",
                       help="queue decode step n+1 before step n's tokens reach the host (auto: with CUDA graphs)")
    serve.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=False,
                       help="send KV layer by layer during the prefill (default: after it, the faster choice here)")
    serve.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    serve.add_argument("--cpu-cores", default="", help="pin this process to these cores, e.g. 0 or 0,1")
    serve.add_argument("--clock-origin", type=float, default=None, help="shared perf_counter origin")
    serve.add_argument("--ready-file", default="", help="write the bound port here once listening")
    serve.add_argument("--routing", choices=list(ROUTING_POLICIES), default="round_robin",
                       help="router: how requests are spread over workers (cache_aware needs --enable-prefix-caching)")
    serve.add_argument("--routing-load-weight", type=float, default=1.0,
                       help="router, --routing cache_aware: weight of a worker's queue against its cached prefix "
                            "(score = cached blocks - weight x queued tokens / block size; 0 ignores load)")
    serve.add_argument("--kv-failure-policy", choices=["fail", "recompute"], default="fail",
                       help="router: what happens to requests of a worker that dies")
    serve.add_argument("--request-timeout-s", type=float, default=600.0, help="router: deadline of every request")
    serve.add_argument("--kv-lease-s", type=float, default=LinkConfig.kv_lease_s,
                       help="decode: a KV reservation with no progress for this long is freed")
    serve.add_argument("--max-reserved-share-per-peer", type=float, default=LinkConfig.max_reserved_share_per_peer,
                       help="decode: the share of the KV pool one prefill link may hold in reservations (0 < x <= 1)")
    serve.add_argument("--reconnect-deadline-s", type=float, default=LinkConfig.reconnect_deadline_s,
                       help="prefill: how long a broken KV link is re-established for (0: never)")
    serve.add_argument("--subscriber-queue-size", type=int, default=LinkConfig.subscriber_queue_size,
                       help="outputs queued per router (or client) before that slow reader is dropped")
    serve.add_argument("--frame-deadline-s", type=float, default=LinkConfig.frame_deadline_s,
                       help="a frame from a router (or a router client's JSON line) must arrive whole within this "
                            "many seconds of its first byte, else the connection is dropped")
    serve.add_argument("--max-connections", type=int, default=LinkConfig.max_connections,
                       help="connections served at once per listening port (one thread each); more are refused "
                            "with a message saying so")
    serve.add_argument("--kv-wire-dtype", choices=list(KV_WIRE_DTYPES), default=LinkConfig.kv_wire_dtype,
                       help="prefill and decode (the same on both): how KV pages travel, auto (the pool's dtype) or "
                            "quantised per block and KV head to int8 or fp8_e4m3, dequantised on arrival")
    serve.add_argument("--dist-init", default="", help="dist transport: rendezvous, e.g. tcp://127.0.0.1:29500; "
                                                      "prefill --peers then read name=host:port@rank")
    serve.add_argument("--dist-rank", type=int, default=None, help="this worker's rank (decodes first by convention)")
    serve.add_argument("--dist-world", type=int, default=None, help="number of workers in the process group")
    serve.add_argument("--dist-backend", choices=["gloo", "nccl"], default=None,
                       help="default: nccl on a CUDA device, else gloo")
    serve.add_argument("--secret-file", default="",
                       help="the deployment's shared secret (at least 32 bytes of text, used as is; chmod 600); "
                            "default: the MINIDISAGG_SECRET environment variable. Every process needs the same one")
    serve.add_argument("--insecure-no-auth", action="store_true",
                       help="prefill/decode: listen beyond loopback without a secret (anyone who reaches the port "
                            "may submit, read and abort requests); only on a network you trust")
    serve.add_argument("--tls-cert", default="", help="TLS: this process's certificate (PEM); workers serve TLS with it")
    serve.add_argument("--tls-key", default="", help="TLS: the private key of --tls-cert (PEM)")
    serve.add_argument("--tls-ca", default="", help="TLS: CA bundle that signed the peers' certificates; checks "
                                                   "the servers this process dials, and makes servers ask clients "
                                                   "for a certificate (mutual TLS)")
    serve.set_defaults(func=cmd_serve)



def parse_peers(text: str) -> dict[str, tuple[str, int]]:
    """``d0=127.0.0.1:7001,d1=host:7002`` -> {"d0": ("127.0.0.1", 7001), ...}."""
    from minidisagg.transport.socket import parse_host_port

    peers: dict[str, tuple[str, int]] = {}
    for item in filter(None, text.split(",")):
        name, _, address = item.partition("=")
        try:
            peers[name] = parse_host_port(address)
        except ValueError:
            raise ValueError(f"--peers entries look like name=host:port, got {item!r}") from None
        if not name:
            raise ValueError(f"--peers entries look like name=host:port, got {item!r}")
    return peers


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the HTTP front (``--mode``), or run one worker or router process (``--role``) until terminated."""
    if args.model_arg is not None:
        args.model = args.model_arg
    if args.role is not None and args.mode is not None:
        raise ValueError("--role runs one worker process and --mode the HTTP front; give one of them")
    if args.role is None:
        from minidisagg.server.launch import serve_http

        if args.peers and args.mode == "colocated":
            raise ValueError("--peers names running worker processes: it goes with --mode disagg")
        args.mode = args.mode or ("disagg" if args.peers else "colocated")
        return serve_http(args)
    args.port = 0 if args.port is None else args.port
    return serve_worker(args)


def serve_worker(args: argparse.Namespace, rendezvous: Optional[WorkerRendezvous] = None) -> int:
    """Run one worker process (prefill or decode) or a router until terminated.

    ``rendezvous`` (with ``--dist-init``): the group's store and the peers' addresses come from
    it instead of ``--dist-init`` and ``--peers``.
    """
    import signal
    import threading
    from pathlib import Path

    import torch
    from rich.console import Console

    from minidisagg.config import CacheConfig, EngineConfig, LinkConfig
    from minidisagg.disagg.serve import DecodeServer, PrefillServer
    from minidisagg.engine.clock import WallClock
    from minidisagg.models.registry import load_model
    from minidisagg.transport.auth import SECRET_ENV, link_security

    # The secret first, before anything could start a subprocess that inherits it; then out of the environment.
    security = link_security(args.secret_file or None, args.tls_cert or None, args.tls_key or None,
                             args.tls_ca or None, args.insecure_no_auth)
    os.environ.pop(SECRET_ENV, None)
    if args.role != "router" and (refusal := security.listen_refusal(args.host)) is not None:
        raise ValueError(refusal)  # before the model loads: seconds, not minutes, to learn what to fix
    if args.cpu_cores:
        os.sched_setaffinity(0, {int(c) for c in args.cpu_cores.split(",")})
    if args.threads:
        torch.set_num_threads(args.threads)
    # A worker's engine loop shares the GIL with its link threads (KV frames, reservations, outputs). By
    # default a waiting thread gets the GIL only after 5 ms, so each KV frame could wait that long behind
    # a busy step loop; a shorter interval bounds that wait at a small cost in extra switches.
    sys.setswitchinterval(WORKER_SWITCH_INTERVAL_S)
    link = LinkConfig(kv_lease_s=args.kv_lease_s, max_reserved_share_per_peer=args.max_reserved_share_per_peer,
                      reconnect_deadline_s=args.reconnect_deadline_s, subscriber_queue_size=args.subscriber_queue_size,
                      frame_deadline_s=args.frame_deadline_s, max_connections=args.max_connections,
                      kv_wire_dtype=args.kv_wire_dtype)
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          batch_invariant=args.batch_invariant, max_model_len=args.max_model_len,
                          cuda_graphs=not args.no_cuda_graphs, link=link,
                          async_scheduling={"auto": None, "on": True, "off": False}[args.async_scheduling],
                          cache=CacheConfig(block_size=args.block_size, num_blocks=args.num_kv_blocks,
                                            memory_budget_bytes=args.kv_memory_budget_bytes, layout=args.kv_layout,
                                            enable_prefix_caching=args.enable_prefix_caching))
    if args.role == "router":
        from minidisagg.disagg.router_server import serve_router

        return serve_router(args, config, security)
    decode_ranks = None
    if args.dist_init:  # join the deployment's torch.distributed group first: under NCCL it picks the GPU
        from minidisagg.transport.dist import init_dist, parse_peer_ranks

        store = rendezvous.join(security.secret) if rendezvous is not None else None
        args.device = init_dist(args.dist_init, args.dist_rank, args.dist_world, args.dist_backend, args.device,
                                secret=security.secret, store=store)
        if args.role == "prefill":
            if rendezvous is not None:
                args.peers = rendezvous.decode_peers()
            args.peers, decode_ranks = parse_peer_ranks(args.peers or "")
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, seed=args.seed,
                        random_weights=args.random_weights)
    clock = WallClock(args.clock_origin)
    if args.role == "decode":
        server = DecodeServer(loaded, config, args.host, args.port, clock=clock, security=security)
    else:
        server = PrefillServer(loaded, config, parse_peers(args.peers or ""), args.host, args.port,
                               overlap=args.overlap, clock=clock, decode_ranks=decode_ranks, security=security)
    console = Console()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    threading.Thread(target=server.serve_forever, args=(Path(args.ready_file) if args.ready_file else None,),
                     daemon=True).start()
    console.print(f"{args.role} worker listening on {args.host}:{server.port}", highlight=False)
    if rendezvous is not None:
        rendezvous.listening(server.port)
    while not done.wait(WORKER_HEALTH_POLL_S) and not server.failed:
        pass
    if server.failed:  # its engine loop died: the routers were told; a port that looks alive would mislead
        console.print(f"[red]error:[/] {server.failure}", highlight=False)
    server.stop()
    if args.dist_init:
        from minidisagg.transport.dist import shutdown_dist

        shutdown_dist()
    return 1 if server.failed else 0


