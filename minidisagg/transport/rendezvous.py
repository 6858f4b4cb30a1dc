"""The torch.distributed rendezvous of a deployment: a TCPStore bound to one address, joined only with the secret.

``init_process_group(init_method="tcp://HOST:PORT")`` makes rank 0's TCPStore listen on every
interface whatever HOST says. Here rank 0 binds the listening socket to HOST itself and hands
it to the store (``master_listen_fd``), so ``tcp://127.0.0.1:...`` (what ``launch_local`` uses)
is reachable from this machine only.

The store has no authentication of its own, so with a secret every rank proves it through the
store before the process group (and its gloo/NCCL connections) is built: rank 0 writes a fresh
nonce, each rank writes ``HMAC(secret, rank, world size, nonce)`` (``auth.member_proof``), and
each rank checks every other rank's proof. A process started without the secret then makes the
group fail at start, naming its rank, instead of taking part. What this cannot do: stop a host
that reaches the store from rewriting its keys (a denial of service), or protect the pages on
the gloo/NCCL connections, which are neither authenticated nor encrypted: keep ``--dist-init``
and the ranks on a trusted network.
"""

from __future__ import annotations

import datetime
import hmac
import os
import secrets
import socket
from dataclasses import dataclass
from typing import Mapping, Optional
from urllib.parse import urlsplit

import torch.distributed as dist

from minidisagg.transport.auth import NONCE_BYTES, SECRET_ENV, member_proof

NONCE_KEY = "minidisagg/auth/nonce"
PROOF_KEY = "minidisagg/auth/proof"


class MembershipError(RuntimeError):
    """A rank of the process group did not prove the deployment's secret."""


def store_address(init_method: str) -> Optional[tuple[str, int]]:
    """(host, port) of a ``tcp://HOST:PORT`` rendezvous; None for other schemes (env://, file://)."""
    parts = urlsplit(init_method)
    if parts.scheme != "tcp":
        return None
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise ValueError(f"--dist-init must look like tcp://HOST:PORT, got {init_method!r}")
    return parts.hostname, port


def bound_listener(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` only (not every interface), for rank 0's store."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


def prove_membership(store: dist.Store, secret: bytes, rank: int, world_size: int) -> None:
    """Write this rank's proof of ``secret`` to the store and check every other rank's (MembershipError if one fails)."""
    if rank == 0:
        nonce = secrets.token_bytes(NONCE_BYTES)
        store.set(NONCE_KEY, nonce.hex())
    else:
        try:
            nonce = bytes.fromhex(store.get(NONCE_KEY).decode())
        except ValueError:
            raise MembershipError("the rendezvous store holds a malformed nonce: something other than rank 0 "
                                  "wrote it") from None
    store.set(f"{PROOF_KEY}/{rank}", member_proof(secret, rank, world_size, nonce))
    for other in range(world_size):
        if other == rank:
            continue
        given = store.get(f"{PROOF_KEY}/{other}").decode(errors="replace")  # waits (up to the store's timeout)
        if not hmac.compare_digest(given, member_proof(secret, other, world_size, nonce)):
            raise MembershipError(f"rank {other} of the process group did not prove the deployment's secret: it was "
                                  f"started with another secret (or none), or is not one of this deployment's "
                                  f"workers; give every worker the same --secret-file or {SECRET_ENV}")


def check_init_method(init_method: str, secret: Optional[bytes]) -> None:
    """ValueError for a malformed ``tcp://`` address, or for another scheme when a secret must be proved."""
    if store_address(init_method) is None and secret is not None:
        raise ValueError(f"with a secret, --dist-init must be tcp://HOST:PORT (got {init_method!r}): the ranks "
                         f"prove the secret through that store")


def join_store(init_method: str, rank: int, world_size: int, timeout_s: float,
               secret: Optional[bytes] = None) -> Optional[dist.TCPStore]:
    """The rendezvous store of a ``tcp://`` init method, rank 0's bound to its host, every rank's membership proved.

    None for other init methods (torch's own rendezvous then runs, without a proof; with a
    secret that is refused).
    """
    check_init_method(init_method, secret)
    address = store_address(init_method)
    if address is None:
        return None
    host, port = address
    timeout = datetime.timedelta(seconds=timeout_s)
    if rank == 0:
        listener = bound_listener(host, port)
        store = dist.TCPStore(host, port, world_size, True, timeout, master_listen_fd=listener.detach())
    else:
        store = dist.TCPStore(host, port, world_size, False, timeout)
    if secret is not None:
        prove_membership(store, secret, rank, world_size)
    return store


TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class TorchrunEnv:
    """What ``torchrun`` tells each process it starts: its ranks, the group's size and the store's address."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    restart_count: int = 0
    use_agent_store: bool = False

    @classmethod
    def from_environ(cls, environ: Optional[Mapping[str, str]] = None) -> "TorchrunEnv":
        """Read the variables torchrun sets; ValueError naming the missing ones (not started by torchrun)."""
        env = os.environ if environ is None else environ
        missing = [name for name in TORCHRUN_VARIABLES if not env.get(name)]
        if missing:
            raise ValueError(f"not started by torchrun: {', '.join(missing)} not set")
        return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), env["MASTER_ADDR"],
                   int(env["MASTER_PORT"]), int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
                   env.get("TORCHELASTIC_USE_AGENT_STORE") == "True")


def join_torchrun_store(env: TorchrunEnv, timeout_s: float, secret: Optional[bytes] = None) -> dist.Store:
    """The store of a torchrun launch, its membership proved, under a prefix of its own for this restart.

    torchrun's agent on the first node may host the store already (``use_agent_store``): then
    every rank is a client, as in torch's own ``env://`` rendezvous; otherwise rank 0 hosts it.
    The prefix keeps one restart's keys (nonce, proofs, addresses) from the next's.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    is_master = env.rank == 0 and not env.use_agent_store
    store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master, timeout)
    store = dist.PrefixStore(f"minidisagg/restart{env.restart_count}", store)
    if secret is not None:
        prove_membership(store, secret, env.rank, env.world_size)
    return store
