"""A seeded generator of malformed and adversarial inputs for live workers and their router.

Each ``FuzzInput`` is one hostile act against a running deployment (``fuzz_checks`` starts it
and checks it after every act): frames with a bad prefix or header, REQUEST fields of the wrong
type or range, KV-link frames out of order or with pages of the wrong shape, aborts and
duplicates of another router's request ids, connections that stall half-way through a frame or
a JSON line, connect-and-close floods, and handshakes that prove nothing. Most come from a peer
that proved the deployment's secret (the worst a bad peer inside the deployment can do); the
flood, handshake and some prefix inputs come from peers that never authenticate.

An act talks to the deployment only through its ``FuzzTarget`` (``fuzz_checks.FuzzContext``):
authenticated peers, raw sockets, a victim request of a well-behaved router, and ``note`` for an
answer that broke a promise (a stalled peer not dropped, a foreign abort not refused). The same
seed and count give the same inputs. The wire-level categories are built here, the
message-level ones (REQUEST fields, KV transfers, ids, router lines) in ``fuzz_messages``, from
the pieces in ``fuzz_frames``.
"""

from __future__ import annotations

import json
import random
from typing import Callable

from minidisagg.disagg.fuzz_frames import (
    FuzzInput,
    FuzzTarget,
    Peer,
    drain,
    frame_bytes,
    nested_header,
    submission,
)
from minidisagg.disagg.fuzz_messages import ids_input, kv_input, request_input, router_input
from minidisagg.transport.framing import PREFIX, FrameKind

__all__ = ["CATEGORIES", "FuzzInput", "FuzzTarget", "Peer", "frame_bytes", "generate_inputs"]
CATEGORIES = ("prefix", "header", "request", "kv", "order", "ids", "slowloris", "flood", "handshake", "router")
PING_FLOOD = 20_000  # PINGs sent at once: more HEALTH answers than a router's output queue holds
PING_FLOOD_WAIT_S = 30.0  # how long a router that never reads may keep sending PINGs before it must be dropped


def _prefix(rng: random.Random, i: int) -> FuzzInput:
    """A frame whose 20-byte prefix is wrong (magic, version, kind, flags, lengths) or cut short."""
    target = rng.choice(["decode", "prefill"])
    kind = int(rng.choice([FrameKind.REQUEST, FrameKind.RESERVE, FrameKind.PING]))
    variants = {
        "bad magic": dict(magic=rng.choice([b"XXXX", b"MDKW", b"\0\0\0\0", b"GET "])),
        "bad version": dict(version=rng.choice([0, 1, 3, 255])),
        "unknown kind": dict(kind=rng.choice([0, 17, 99, 255])),
        "nonzero flags": dict(flags=rng.choice([1, 0x8000, 0xFFFF])),
        "oversized header_len": dict(header_len=rng.choice([(1 << 20) + 1, 1 << 31, (1 << 32) - 1])),
        "oversized payload_len": dict(payload_len=rng.choice([1 << 33, (1 << 64) - 1])),
        "truncated prefix": dict(cut=rng.randrange(1, PREFIX.size)),
        "truncated header": dict(header_len=200),
    }
    what = rng.choice(sorted(variants))
    options = dict(variants[what])
    authenticated = rng.random() < 0.7
    role = "prefill" if target == "decode" and rng.random() < 0.5 else "router"
    cut = options.pop("cut", None)
    kind = options.pop("kind", kind)
    data = frame_bytes(kind, {"request_id": f"fz-{i}"}, **options)
    if cut is not None:
        data = data[:cut]

    def act(t: FuzzTarget) -> None:
        peer = t.peer(target, role) if authenticated else t.raw(target)
        peer.send_raw(data)
        drain(peer)

    who = f"authenticated {role}" if authenticated else "unauthenticated peer"
    return FuzzInput("prefix", f"{what} to {target} from an {who}", act, authenticated)


def _header(rng: random.Random, i: int) -> FuzzInput:
    """A frame whose JSON header is not UTF-8, not JSON, not an object, nested too deep, huge or cut short."""
    bodies = {"not UTF-8": b'{"request_id": "\xff\xfe"}', "not JSON": b"{request_id: x",
              "a JSON array": b"[1, 2, 3]", "a JSON string": b'"hello"', "deeply nested": nested_header(),
              "NaN literal": b'{"request_id": NaN}', "empty": b"", "huge string": json.dumps(
                  {"request_id": "h", "x": "y" * (900 << 10)}).encode(),
              "truncated JSON": b'{"request_id": "t", "submission": {'}
    what = rng.choice(sorted(bodies))
    target = rng.choice(["decode", "prefill"])
    role = "prefill" if target == "decode" and rng.random() < 0.5 else "router"
    kind = int(FrameKind.RESERVE if role == "prefill" else FrameKind.REQUEST)
    data = frame_bytes(kind, bodies[what])

    def act(t: FuzzTarget) -> None:
        peer = t.peer(target, role)
        peer.send_raw(data)
        drain(peer)

    return FuzzInput("header", f"{FrameKind(kind).name} header {what} to {target} as {role}", act)


def _order(rng: random.Random, i: int) -> FuzzInput:
    """A frame of a kind that has no place there: out of order, the wrong direction, or the wrong role's."""
    tid = f"fz-o{i}"
    cases = [("decode", "prefill", FrameKind.LAYER, {"transfer_id": tid, "layer": 0, "shape": [1], "dtype": "float32"}),
             ("decode", "prefill", FrameKind.DONE, {"transfer_id": tid, "state": {}, "num_bytes": 0}),
             ("decode", "prefill", FrameKind.CANCEL, {"transfer_id": tid}),
             ("decode", "prefill", FrameKind.CANCEL, {"transfer_id": [tid]}),
             ("decode", "prefill", FrameKind.CANCEL, {"transfer_id": {"a": 1}}),
             ("decode", "prefill", FrameKind.DONE, {"transfer_id": [tid], "state": []}),
             ("decode", "prefill", FrameKind.LAYER, {"transfer_id": {"x": 1}, "layer": 0}),
             ("decode", "prefill", FrameKind.BYE, {"transfer_id": 5}),
             ("decode", "prefill", FrameKind.REQUEST, {"abort": "x"}),
             ("decode", "prefill", FrameKind.PING, {"renew": [tid, 5, None, [1]] * 50}),
             ("decode", "router", FrameKind.RESERVE, {"transfer_id": tid, "num_tokens": 4}),
             ("decode", "router", FrameKind.LAYER, {"transfer_id": tid}),
             ("prefill", "router", FrameKind.DONE, {"transfer_id": tid}),
             ("prefill", "router", FrameKind.CANCEL, {"transfer_id": tid})]
    cases += [(target, "router", kind, {"x": 1}) for target in ("decode", "prefill")
              for kind in (FrameKind.GRANT, FrameKind.ACK, FrameKind.TOKENS, FrameKind.HEALTH, FrameKind.HELLO,
                           FrameKind.HELLO_OK, FrameKind.AUTH_CHALLENGE, FrameKind.AUTH_RESPONSE, FrameKind.ERROR)]
    target, role, kind, header = rng.choice(cases)

    def act(t: FuzzTarget) -> None:
        peer = t.peer(target, role)
        peer.send(kind, header)
        drain(peer)

    return FuzzInput("order", f"{kind.name} {header} out of order to {target} as {role}"[:160], act)


def _slowloris(rng: random.Random, i: int) -> FuzzInput:
    """Part of a frame (or of a JSON line), then silence: dropped after the deadline while others are served."""
    target = rng.choice(["decode", "prefill", "router"])
    if target == "router":
        data = rng.choice([b'{"prompt_token_ids": [1, 2', b'{"id": "half"', b"{"])
        what = "half a JSON line"
    else:
        whole = frame_bytes(FrameKind.REQUEST, {"abort": f"fz-{i}"} if target == "decode" else submission(f"fz-{i}", [1]))
        cut = rng.randrange(1, len(whole))
        data, what = whole[:cut], f"{cut} of {len(whole)} bytes of a REQUEST frame"

    def act(t: FuzzTarget) -> None:
        peer = t.raw("router") if target == "router" else t.peer(target, "router")
        peer.send_raw(data)
        t.serve_one()  # others are served while it stalls
        if not peer.wait_closed(t.frame_deadline_s + 5.0):
            t.note(f"a peer that sent {what} and stalled was not dropped within frame_deadline_s="
                   f"{t.frame_deadline_s:g} s")

    return FuzzInput("slowloris", f"{what} to {target}, then stall", act)


def _flood(rng: random.Random, i: int) -> FuzzInput:
    """Many connections that close at once or send garbage, more idle ones than the cap allows, or a router
    that asks for HEALTH thousands of times and never reads the answers."""
    how = rng.choice(["connect and close", "connect and send garbage", "hold idle connections over the cap",
                      "PINGs it never reads"])
    target = rng.choice(["decode", "prefill"] + ([] if how == "PINGs it never reads" else ["router"]))
    count = {"hold idle connections over the cap": "cap + 8", "PINGs it never reads": PING_FLOOD}.get(
        how, rng.randint(20, 60))
    garbage = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200)))

    def act(t: FuzzTarget) -> None:
        if how == "hold idle connections over the cap":
            early = t.raw("router") if target == "router" else None  # a client that came before the flood
            held = [t.raw(target) for _ in range(t.max_connections + 8)]
            t.serve_one(via=early)  # connections made before the flood still serve
            refused = sum(1 for peer in held[-8:] if peer.wait_closed(2.0))
            if refused < 8:
                t.note(f"only {refused} of 8 connections over max_connections={t.max_connections} were refused")
            return
        if how == "PINGs it never reads":  # its answers pile up: its queue overflows and it is dropped
            deaf = t.peer(target, "router", deaf=True)
            flood = frame_bytes(FrameKind.PING, {}) * PING_FLOOD
            deaf.send_raw(flood)
            t.serve_one()  # others are served while its answers pile up
            # more PINGs, never reading (as a stuck router would), until the worker hangs up: how many answers
            # the kernel's buffers absorb differs between machines, so no fixed count is sure to overflow
            if not deaf.send_until_dropped(flood, PING_FLOOD_WAIT_S):
                t.note(f"a router that sent PINGs for {PING_FLOOD_WAIT_S:g} s and never read the HEALTH answers "
                       "was not dropped")
            return
        for _ in range(int(count)):
            peer = t.raw(target)
            if how == "connect and send garbage":
                peer.send_raw(garbage)
            peer.wait_closed(0.0)

    return FuzzInput("flood", f"{how} ({count}) to {target}", act, authenticated=how == "PINGs it never reads")


def _handshake(rng: random.Random, i: int) -> FuzzInput:
    """A peer without the secret answering the challenge wrongly (or not at all): refused and closed."""
    target = rng.choice(["decode", "prefill"])
    what = rng.choice(["hello before proof", "wrong mac", "short nonce", "bad role", "mac not a string",
                       "answer with a payload", "garbage", "challenge reflected", "close after challenge"])
    nonce = "%064x" % rng.getrandbits(256)
    garbage = bytes(rng.getrandbits(8) for _ in range(512))
    answers = {"hello before proof": (FrameKind.HELLO, {"role": "router"}, b""),
               "wrong mac": (FrameKind.AUTH_RESPONSE, {"role": "router", "nonce": nonce, "mac": "0" * 64}, b""),
               "short nonce": (FrameKind.AUTH_RESPONSE, {"role": "router", "nonce": "ab", "mac": "0" * 64}, b""),
               "bad role": (FrameKind.AUTH_RESPONSE, {"role": "Router!" * 9, "nonce": nonce, "mac": "0" * 64}, b""),
               "mac not a string": (FrameKind.AUTH_RESPONSE, {"role": "router", "nonce": nonce, "mac": [1]}, b""),
               "answer with a payload": (FrameKind.AUTH_RESPONSE, {"role": "router"}, b"x" * 4096),
               "challenge reflected": (FrameKind.AUTH_CHALLENGE, {"scheme": "hmac-sha256", "nonce": nonce}, b"")}

    def act(t: FuzzTarget) -> None:
        peer = t.raw(target)
        drain(peer, 0.2)  # the challenge
        if what == "close after challenge":
            return  # the worker sees the peer go mid-handshake
        if what == "garbage":
            peer.send_raw(garbage)
        elif what in answers:
            kind, header, payload = answers[what]
            peer.send(kind, header, payload)
        if not peer.wait_closed(5.0):
            t.note(f"a peer that failed the handshake ({what}) kept its connection")

    return FuzzInput("handshake", f"{what} to {target}", act, authenticated=False)


BUILDERS: dict[str, Callable[[random.Random, int], FuzzInput]] = {
    "prefix": _prefix, "header": _header, "request": request_input, "kv": kv_input, "order": _order, "ids": ids_input,
    "slowloris": _slowloris, "flood": _flood, "handshake": _handshake, "router": router_input}


def generate_inputs(seed: int, count: int, categories: tuple[str, ...] = CATEGORIES) -> list[FuzzInput]:
    """``count`` inputs from ``seed``: the categories in turn (shuffled once), each input drawn from the rng."""
    unknown = sorted(set(categories) - set(BUILDERS))
    if unknown:
        raise ValueError(f"unknown fuzz categories {unknown}; known: {list(CATEGORIES)}")
    rng = random.Random(seed)
    order = list(categories)
    rng.shuffle(order)
    return [BUILDERS[order[i % len(order)]](rng, i) for i in range(count)]
