"""Lab 4 helpers: a prefill engine and a decode worker joined by a KV transport, stepped by hand.

A ``DisaggPair`` is the smallest disaggregated deployment: one ``LLMEngine`` that only
prefills (its ``handoff`` hook catches each prefilled sequence), one ``DecodeWorker`` (the
engine's receiving end of every transport) and a ``KVSender`` between them: the in-process
one, or a real TCP link to a decode-side server on a thread of this process. Nothing runs
in the background except that server thread, so a lab can step both sides itself.
"""

from __future__ import annotations

import math
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from minidisagg.config import CacheConfig, EngineConfig
from minidisagg.disagg.decode_worker import DecodeWorker
from minidisagg.engine.clock import WallClock
from minidisagg.engine.llm_engine import LLMEngine, RequestOutput
from minidisagg.engine.sampling import SamplingParams
from minidisagg.engine.sequence import Sequence, SequenceState
from minidisagg.kv.block_manager import BlockManager
from minidisagg.kv.cache import PagedKVCache
from minidisagg.kv.pages import KVLayout, gather_layer
from minidisagg.models.registry import LoadedModel
from minidisagg.transport.base import KVReceiver, KVSender, TransferError
from minidisagg.transport.framing import FrameError
from minidisagg.transport.handshake import server_handshake
from minidisagg.transport.inproc import InprocSender
from minidisagg.transport.kv_link import serve_kv_link
from minidisagg.transport.listener import accept_loop, listen
from minidisagg.transport.socket import SocketSender, make_hello

TRANSPORTS = ("inproc", "socket")
TRANSFER_TIMEOUT_S = 30.0
HandOff = Callable[[Sequence, PagedKVCache, KVSender, str], int]


class LoopbackKVLink:
    """A decode-side KV server on a thread of this process and a ``SocketSender`` connected to it over TCP.

    The pages really cross a socket (framing, handshake, copies), without starting a process.
    """

    def __init__(self, receiver: KVReceiver, layout: KVLayout, fingerprint: str) -> None:
        self._stop = threading.Event()
        self._server = listen("127.0.0.1", 0)
        port = self._server.getsockname()[1]
        server_hello = make_hello("decode", fingerprint, layout)

        def handle(sock: socket.socket, peer: str) -> None:
            try:
                server_handshake(sock, server_hello, TRANSFER_TIMEOUT_S, {"prefill"})
                serve_kv_link(sock, receiver, layout, self._stop, peer)
            except (ConnectionError, FrameError, OSError):
                sock.close()

        self._thread = threading.Thread(target=accept_loop, args=(self._server, handle, self._stop, "lab-kv"),
                                        daemon=True)
        self._thread.start()
        self.sender = SocketSender("127.0.0.1", port, make_hello("prefill", fingerprint, layout))

    def close(self) -> None:
        """Say BYE, stop the server thread and close the listener."""
        self.sender.close()
        self._stop.set()
        self._server.close()
        self._thread.join(2.0)


@dataclass
class DisaggPair:
    """A prefill engine and a decode worker in one process, joined by ``sender``; ``outputs`` is the decode side's."""

    prefill: LLMEngine
    decode: DecodeWorker
    sender: KVSender
    outputs: list[RequestOutput] = field(default_factory=list)
    link: Optional[LoopbackKVLink] = None

    @property
    def layout(self) -> KVLayout:
        """The KV layout both pools share."""
        return KVLayout.of(self.prefill.kv_cache)

    def close(self) -> None:
        """Close the transport (and the loopback server of a socket pair)."""
        if self.link is not None:
            self.link.close()
        else:
            self.sender.close()

    def __enter__(self) -> "DisaggPair":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_pair(loaded: LoadedModel, transport: str = "inproc", *, batch_invariant: bool = True,
              block_size: int = 16, num_blocks: int = 128) -> DisaggPair:
    """Two engines over ``loaded`` with pools of ``num_blocks`` blocks each, joined by ``transport``."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {list(TRANSPORTS)}, got {transport!r}")
    config = EngineConfig(batch_invariant=batch_invariant, cache=CacheConfig(block_size=block_size, num_blocks=num_blocks))
    clock = WallClock()
    prefill = LLMEngine(loaded, config, clock=clock, policy="prefill_first")
    outputs: list[RequestOutput] = []
    decode = DecodeWorker("d0", loaded, config, clock, outputs.append)
    if transport == "inproc":
        return DisaggPair(prefill, decode, InprocSender(decode), outputs)
    link = LoopbackKVLink(decode, decode.layout, loaded.config.fingerprint())
    return DisaggPair(prefill, decode, link.sender, outputs, link)


def scramble_free_blocks(blocks: BlockManager, rng: random.Random) -> None:
    """Shuffle the order in which an empty pool hands out blocks, so block tables are neither 0, 1, 2 ... nor alike."""
    if blocks.num_free_blocks != blocks.num_blocks:
        raise ValueError("scramble an empty pool only")
    keys = [("scramble", i) for i in range(blocks.num_blocks)]
    for key in keys:
        blocks.grow(key, 1)
    rng.shuffle(keys)
    for key in keys:
        blocks.free(key)


def fill_random(cache: PagedKVCache, seed: int) -> None:
    """Overwrite every page of a pool with seeded noise (stale contents a hand-off must overwrite)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(cache.kv.shape, generator=gen, dtype=torch.float32)
    cache.kv.copy_(noise.to(device=cache.device, dtype=cache.dtype))


def hand_off_kv_reference(seq: Sequence, prefill_cache: PagedKVCache, sender: KVSender, transfer_id: str) -> int:
    """The engine's hand-off of one prefilled sequence: reserve, every layer's pages, commit; returns bytes sent."""
    if not sender.reserve(transfer_id, seq.num_computed_tokens, TRANSFER_TIMEOUT_S):
        raise TransferError(f"the decode side has no room for request {seq.request_id} now")
    num_bytes = 0
    try:
        for layer in range(prefill_cache.model.num_layers):
            pages = gather_layer(prefill_cache, layer, seq.block_table)
            sender.send_layer(transfer_id, layer, pages)
            num_bytes += pages.numel() * pages.element_size()
        sender.commit(transfer_id, SequenceState.of(seq), num_bytes, TRANSFER_TIMEOUT_S)
    except BaseException:
        sender.cancel(transfer_id)
        raise
    return num_bytes


def serve_prompts_reference(pair: DisaggPair, prompts: list[list[int]], params: SamplingParams,
                            hand_off: HandOff = hand_off_kv_reference) -> list[list[int]]:
    """Serve ``prompts`` through ``pair`` (prefill, hand-off, decode), stepping both sides; tokens in prompt order."""
    handed: list[Sequence] = []
    pair.prefill.handoff = handed.append
    ids = [pair.prefill.add_request({"prompt_token_ids": p}, params) for p in prompts]
    done: dict[str, list[int]] = {}
    while any(rid not in done for rid in ids):
        for out in pair.prefill.step():
            if out.finished:
                done[out.request_id] = out.token_ids
                pair.prefill.release(out.request_id)
        for seq in handed:
            hand_off(seq, pair.prefill.kv_cache, pair.sender, f"kv-{seq.request_id}")
            pair.prefill.release_handed_off(seq)
        handed.clear()
        pair.decode.step()
        done.update({o.request_id: o.token_ids for o in pair.outputs if o.finished})
    return [done[rid] for rid in ids]


@dataclass(frozen=True)
class HandoffCost:
    """One prompt's prefill time next to the time its KV pages took to reach the decode pool."""

    prompt_len: int
    kv_bytes: int
    prefill_s: float
    handoff_s: dict[str, float]


def measure_handoff(loaded: LoadedModel, prompt_len: int, hand_off: HandOff = hand_off_kv_reference,
                    transports: tuple[str, ...] = TRANSPORTS, seed: int = 0, repeats: int = 1) -> HandoffCost:
    """Prefill one random prompt of ``prompt_len`` tokens, then time its hand-off over each transport.

    With ``repeats`` > 1 each time is the fastest of that many runs (other programs only ever add time).
    """
    rng = random.Random(seed)
    prompt = [rng.randrange(100, min(49152, loaded.config.vocab_size)) for _ in range(prompt_len)]
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    block_size = 16
    num_blocks = -(-(prompt_len + 2) // block_size) + 2
    times: dict[str, float] = {}
    prefill_s, kv_bytes = math.inf, 0
    for transport in transports:
        with make_pair(loaded, transport, batch_invariant=False, block_size=block_size, num_blocks=num_blocks) as pair:
            for rep in range(repeats):
                handed: list[Sequence] = []
                pair.prefill.handoff = handed.append
                pair.prefill.add_request({"prompt_token_ids": prompt}, params)
                t0 = time.perf_counter()
                while not handed:
                    pair.prefill.step()
                prefill_s = min(prefill_s, time.perf_counter() - t0)
                t0 = time.perf_counter()
                kv_bytes = hand_off(handed[0], pair.prefill.kv_cache, pair.sender, f"measure-{rep}")
                times[transport] = min(times.get(transport, math.inf), time.perf_counter() - t0)
                pair.prefill.release_handed_off(handed[0])
                drain_decode(pair)
    return HandoffCost(prompt_len, kv_bytes, prefill_s, times)


def drain_decode(pair: DisaggPair) -> None:
    """Step the decode side until every adopted request has finished, freeing its blocks."""
    while pair.decode.engine.has_unfinished():
        pair.decode.step()
