"""Prefill and decode workers started by ``torchrun``, on one host or several (the ``dist`` transport).

``torchrun`` runs the rendezvous and starts the processes; ``python -m minidisagg.serve_worker``
(``main`` here) turns each into one ``minidisagg serve --role ...`` worker::

    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint NODE0:29400 \\
        -m minidisagg.serve_worker MODEL --num-prefill 2 --num-decode 2 --host 0.0.0.0 \\
        --secret-file secret.txt --peers-file peers.txt

Ranks come from torchrun's environment (``TorchrunEnv``): ranks ``0..D-1`` are the decode
workers ``d0..``, ranks ``D..D+P-1`` the prefill workers ``p0..``, as ``launch_local`` assigns
them. Every worker joins torchrun's store (``join_torchrun_store``), listens on a port of its own
choosing (``--port P``: local rank ``i`` takes ``P + i``) and writes ``name=host:port`` there; a prefill worker reads the decode workers'
addresses from the store, so no port is picked in advance. On each node, local rank 0 then
waits for every worker's address and writes the router's ``--peers`` line to ``--peers-file``:
the front (``minidisagg serve --role router --peers "$(cat peers.txt)"``) runs beside it.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

from minidisagg.disagg.serve_command import add_serve_parser, serve_worker

log = logging.getLogger(__name__)
ADDRESS_KEY = "minidisagg/address"
WILDCARD_HOSTS = ("", "0.0.0.0", "::")
DEFAULT_RENDEZVOUS_TIMEOUT_S = 600.0  # a prefill waits this long for the decode workers to load and listen


def worker_role(rank: int, num_prefill: int, num_decode: int) -> tuple[str, str]:
    """(role, name) of ``rank``: decodes first (``d0..``), then prefills (``p0..``)."""
    if not 0 <= rank < num_prefill + num_decode:
        raise ValueError(f"rank {rank} is outside the {num_prefill} prefill + {num_decode} decode workers")
    return ("decode", f"d{rank}") if rank < num_decode else ("prefill", f"p{rank - num_decode}")


def advertised_host(host: str, toward: str) -> str:
    """The address peers should dial: ``host``, or for a wildcard the local address that routes ``toward`` the store."""
    if host not in WILDCARD_HOSTS:
        return host
    family = socket.AF_INET6 if ":" in toward else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:  # connecting a UDP socket sends nothing
        probe.connect((toward, 9))
        return probe.getsockname()[0]


def worker_port(base_port: Optional[int], local_rank: int) -> int:
    """The port a worker listens on: ``base_port + local_rank`` (the workers of a node never collide), else 0 (any)."""
    if not base_port:
        return 0
    port = base_port + local_rank
    if port > 65535:
        raise SystemExit(f"--port {base_port} + LOCAL_RANK {local_rank} = {port} is past 65535; pick a lower --port")
    return port


def router_peers(addresses: Sequence[str], num_decode: int) -> str:
    """The router's ``--peers`` (``prefill=p0@h:p,...;decode=d0@h:p,...``) from every rank's ``name=host:port``."""
    entries = [a.replace("=", "@", 1) for a in addresses]
    return f"prefill={','.join(entries[num_decode:])};decode={','.join(entries[:num_decode])}"


class TorchrunRendezvous:
    """A worker's side of a torchrun launch: the group's store, and every worker's address through it."""

    def __init__(self, env: Any, args: argparse.Namespace, timeout_s: float) -> None:
        """``env``: a ``TorchrunEnv``; ``args``: the worker's parsed flags (role, name and host set)."""
        self.env = env
        self.args = args
        self.timeout_s = timeout_s
        self.store: Any = None

    def join(self, secret: Optional[bytes]) -> Any:
        """Join torchrun's store, proving ``secret`` to every other rank."""
        from minidisagg.transport.rendezvous import join_torchrun_store

        self.store = join_torchrun_store(self.env, self.timeout_s, secret)
        return self.store

    def address(self, rank: int) -> str:
        """``name=host:port`` of ``rank``'s worker, waiting (up to the store's timeout) until it listens."""
        return self.store.get(f"{ADDRESS_KEY}/{rank}").decode()

    def decode_peers(self) -> str:
        """The decode workers as ``name=host:port@rank,...`` (prefill ``--peers`` under ``--dist-init``)."""
        return ",".join(f"{self.address(rank)}@{rank}" for rank in range(self.args.num_decode))

    def listening(self, port: int) -> None:
        """Publish this worker's address; on a node's local rank 0, write the router's peers once all are known."""
        host = advertised_host(self.args.host, self.env.master_addr)
        shown = f"[{host}]" if ":" in host else host
        self.store.set(f"{ADDRESS_KEY}/{self.env.rank}", f"{self.args.worker_name}={shown}:{port}")
        if self.env.local_rank == 0 and self.args.peers_file:
            threading.Thread(target=self.write_peers_file, name="peers-file", daemon=True).start()

    def write_peers_file(self) -> None:
        """Write the router's ``--peers`` to ``--peers-file`` (atomically) once every worker listens."""
        try:
            text = router_peers([self.address(r) for r in range(self.env.world_size)], self.args.num_decode)
        except Exception as exc:  # noqa: BLE001 - the store times out or goes away: say so, keep serving
            log.error("could not learn every worker's address for %s: %s", self.args.peers_file, exc)
            return
        path = Path(self.args.peers_file)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(text + "\n")
        os.replace(partial, path)
        log.info("router peers written to %s: %s", path, text)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """``minidisagg serve``'s flags, plus ``--peers-file`` and ``--rendezvous-timeout-s``."""
    parser = argparse.ArgumentParser(prog="python -m minidisagg.serve_worker")
    sub = parser.add_subparsers(dest="command")
    add_serve_parser(sub, "the model (as for minidisagg serve)", "auto, cpu, cuda (each rank takes "
                     "cuda:LOCAL_RANK) or cuda:N", "auto, float32, bfloat16 or float16")
    serve = sub.choices["serve"]
    serve.prog = parser.prog
    serve.add_argument("--peers-file", default="", help="local rank 0 writes the router's --peers here once "
                                                        "every worker listens")
    serve.add_argument("--rendezvous-timeout-s", type=float, default=DEFAULT_RENDEZVOUS_TIMEOUT_S,
                       help="how long to wait for the other ranks (their proofs, the decode workers' addresses)")
    args = parser.parse_args(["serve", *(argv if argv is not None else sys.argv[1:])])
    if args.role is not None or args.mode is not None or args.dist_init or args.peers:
        parser.error("torchrun assigns roles, ranks and peers: leave out --role, --mode, --dist-init and --peers")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run this process's worker (``python -m minidisagg.serve_worker`` under torchrun) until terminated."""
    from minidisagg.transport.rendezvous import TorchrunEnv

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    if args.model_arg is not None:
        args.model = args.model_arg
    env = TorchrunEnv.from_environ()
    if env.world_size != args.num_prefill + args.num_decode:
        raise SystemExit(f"torchrun started {env.world_size} processes in all, but --num-prefill "
                         f"{args.num_prefill} + --num-decode {args.num_decode} = {args.num_prefill + args.num_decode}")
    args.role, args.worker_name = worker_role(env.rank, args.num_prefill, args.num_decode)
    args.port = worker_port(args.port, env.local_rank)
    args.dist_rank, args.dist_world = env.rank, env.world_size
    args.dist_init = f"tcp://{env.master_addr}:{env.master_port}"  # names the store in errors; torchrun's is used
    if args.device == "cuda":  # one GPU per process of a node, as torchrun's examples do
        args.device = f"cuda:{env.local_rank}"
    return serve_worker(args, TorchrunRendezvous(env, args, args.rendezvous_timeout_s))
