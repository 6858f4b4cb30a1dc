"""Fuzz inputs at the message level: REQUEST fields, KV-link transfers, other routers' ids, router client lines.

Each builder draws one input from the rng (``fuzz.generate_inputs`` calls them in turn); the
wire-level ones (prefixes, headers, order, stalls, floods, handshakes) are in ``fuzz``.
"""

from __future__ import annotations

import json
import math
import random
from typing import Any

from minidisagg.disagg.fuzz_frames import (
    BAD_NUMBERS,
    BAD_STRINGS,
    BAD_TOKENS,
    GREEDY,
    NESTED_DEPTH,
    FuzzInput,
    FuzzTarget,
    drain,
    sequence_state,
    set_path,
    submission,
)
from minidisagg.kv.pages import KVLayout
from minidisagg.transport.framing import FrameKind


def request_input(rng: random.Random, i: int) -> FuzzInput:
    """A REQUEST to the prefill worker with one field wrong (or well-formed and unusual), sent as a router that
    registered its owner token with the decode worker first; when it leaves, what it started must end."""
    rid, owner = f"fz-{i}", "%032x" % rng.getrandbits(128)
    paths = {"request_id": BAD_STRINGS, "submission.request_id": ["someone-else", 5, None],
             "submission.prompt_token_ids": [[], "1 2", [1] * 100_000, None] + [[5, t, 6] for t in BAD_TOKENS],
             "submission.arrival_s": BAD_NUMBERS, "submission.params.max_tokens": BAD_NUMBERS + [0],
             "submission.params.temperature": BAD_NUMBERS, "submission.params.top_p": BAD_NUMBERS + [1.5],
             "submission.params.top_k": BAD_NUMBERS, "submission.params.seed": [2**70, -(2**70), 1.5, True],
             "submission.params.stop": [[["x"]], ["x"] * 1000, 7], "submission.params.frobnicate": [1],
             "submission.params.stop_token_ids": BAD_TOKENS, "submission.decode_target": BAD_STRINGS + ["d9"],
             "submission.owner": BAD_STRINGS[2:], "submission.extra": [1], "extra": [{"deep": [[[]]]}],
             "submission": ["x", None, [], 5]}
    path = rng.choice(sorted(paths))
    value = rng.choice(paths[path])
    prompt = [rng.randrange(1, 500) for _ in range(rng.randint(2, 9))]
    if rng.random() < 0.2:  # well-formed and unusual: it must run, and end once its router leaves
        path, value = "submission.params", rng.choice([
            {"temperature": 0.7, "seed": rng.getrandbits(63), "max_tokens": 4}, {"max_tokens": 1},
            {"temperature": 1.0, "top_k": 3, "top_p": 0.5, "max_tokens": 3}, {"stop": ["a", "b"], "max_tokens": 4},
            {"max_tokens": 6, "stop_token_ids": [0, 1, 2], "ignore_eos": True},
            {"max_tokens": 10**30, "ignore_eos": True}, {"max_tokens": 2000, "ignore_eos": True}])
        prompt = [rng.randrange(1, 500) for _ in range(rng.randint(1, 400))]
    header = submission(rid, prompt)
    header["submission"]["owner"] = owner
    header = set_path(header, path, value)

    def act(t: FuzzTarget) -> None:
        registered = t.peer("decode", "router")  # as a router does before it submits anything
        registered.send(FrameKind.REQUEST, {"owner": owner})
        peer = t.peer("prefill", "router")
        peer.send(FrameKind.REQUEST, header)
        drain(peer, 0.5)

    return FuzzInput("request", f"prefill REQUEST {path}={value!r}"[:160], act)


def kv_input(rng: random.Random, i: int) -> FuzzInput:
    """A KV link to the decode worker misused: bad RESERVE fields, pages of the wrong shape or dtype, NaN pages, ..."""
    what = rng.choice(["reserve fields", "wrong page shape", "wrong page dtype", "bad layer index", "nan pages",
                       "reserve then vanish", "duplicate reserve", "done with bad state", "huge reserve",
                       "payload size mismatch", "odd layer options", "unhashable id after a reserve"])
    tid, rid = f"fz-t{i}", f"fz-r{i}"
    unhashable = rng.choice([(FrameKind.CANCEL, {"transfer_id": [tid]}), (FrameKind.CANCEL, {"transfer_id": {"t": 1}}),
                             (FrameKind.LAYER, {"transfer_id": [tid], "layer": 0, "via": "dist"}),
                             (FrameKind.DONE, {"transfer_id": {"t": tid}, "state": {}}),
                             (FrameKind.PING, {"renew": [[tid], {"t": 1}]})])
    odd_options = rng.choice([{"via": "dist", "src_rank": 0}, {"via": "dist", "src_rank": [1]}, {"via": 5},
                              {"order": "blocks"}, {"order": ["x"]}, {"pieces": 3}, {"announced": True},
                              {"num_layers": 0}, {"num_layers": 10**6}, {"num_layers": "2"}])
    num_tokens = rng.randint(2, 40)
    bad_reserve = rng.choice([{"num_tokens": v} for v in BAD_NUMBERS + [0, 10**9]]
                             + [{"transfer_id": v} for v in BAD_STRINGS])
    huge = rng.choice([1000, 4000, 10**6])
    shape_delta, bad_dtype = rng.choice([-1, 1, 7]), rng.choice(["int8", "float64", "bfloat16x", ""])
    bad_layer, size_delta = rng.choice([-1, 10**9, 1.5, True, "0", None]), rng.choice([-4, 4, 1])
    bad_field, bad_value = rng.choice(["prompt_token_ids", "output_token_ids", "params", "timeline", "owner"]), \
        rng.choice(BAD_NUMBERS)
    prompt_seed = rng.getrandbits(32)

    def act(t: FuzzTarget) -> None:
        layout = t.layout
        num_blocks = -(-num_tokens // layout.block_size)
        peer = t.peer("decode", "prefill")
        if what == "reserve fields":
            peer.send(FrameKind.RESERVE, {"transfer_id": tid, "num_tokens": 5, **bad_reserve})
            drain(peer)
            return
        if what == "huge reserve":
            peer.send(FrameKind.RESERVE, {"transfer_id": tid, "num_tokens": huge})
            drain(peer)
            return
        peer.send(FrameKind.RESERVE, {"transfer_id": tid, "num_tokens": num_tokens})
        drain(peer, 0.2)
        if what == "reserve then vanish":
            return  # closing the link must give the blocks back
        if what == "unhashable id after a reserve":
            peer.send(*unhashable)
            drain(peer)
            return
        if what == "duplicate reserve":
            peer.send(FrameKind.RESERVE, {"transfer_id": tid, "num_tokens": num_tokens})
            drain(peer)
            return
        shape = list(layout.layer_shape(num_blocks))
        dtype, layer, nbytes = layout.dtype_name, 0, 4 * math.prod(shape)
        if what == "wrong page shape":
            shape = [*shape[:-1], shape[-1] + shape_delta]
        elif what == "wrong page dtype":
            dtype = bad_dtype
        elif what == "bad layer index":
            layer = layout.num_layers if bad_layer is None else bad_layer
        elif what == "payload size mismatch":
            nbytes += size_delta
        header = {"transfer_id": tid, "layer": layer, "shape": shape, "dtype": dtype,
                  **(odd_options if what == "odd layer options" else {})}
        if what == "nan pages":
            header = {"transfer_id": tid, "layer": 0, "shape": [layout.num_layers, *shape], "dtype": dtype,
                      "num_layers": layout.num_layers}
            nbytes *= layout.num_layers
        fill = b"\x00\x00\xc0\x7f" if what == "nan pages" else b"\xff\xff\xff\xff"  # float32 NaN, or garbage
        peer.send(FrameKind.LAYER, header, (fill * (nbytes // 4 + 1))[:max(0, nbytes)])
        prompt_rng = random.Random(prompt_seed)
        state = sequence_state(rid, [prompt_rng.randrange(1, t.vocab_size) for _ in range(num_tokens)], 1)
        if what == "done with bad state":
            set_path(state, bad_field, bad_value)
        peer.send(FrameKind.DONE, {"transfer_id": tid, "state": state, "num_bytes": nbytes})
        drain(peer, 0.5)

    detail = {"odd layer options": f" {odd_options}",
              "unhashable id after a reserve": f" {unhashable[0].name} {unhashable[1]}"}.get(what, "")
    return FuzzInput("kv", f"KV link to decode: {what}{detail}", act)


def ids_input(rng: random.Random, i: int) -> FuzzInput:
    """Another router's request id aborted, resubmitted or adopted again (``victim``), an unknown one aborted,
    or another KV link's transfer id cancelled, renewed, committed and written to."""
    what = rng.choice(["abort a foreign request", "abort an unknown id", "resubmit a foreign id to prefill",
                       "adopt a foreign id on decode", "abort a foreign request with a guessed owner",
                       "use another link's transfer id"])
    on_decode = rng.random() < 0.7
    guessed_owner = "%032x" % rng.getrandbits(128)
    prompt = [rng.randrange(1, 500) for _ in range(4)]

    def act(t: FuzzTarget) -> None:
        if what == "abort an unknown id":  # both workers take aborts, best effort: no answer, nothing dropped
            peer = t.peer("decode" if on_decode else "prefill", "router")
            peer.send(FrameKind.REQUEST, {"abort": f"fz-unknown-{i}"})
            drain(peer)
            return
        if what == "use another link's transfer id":
            _foreign_transfer(t, f"fz-foreign-{i}")
            return
        victim = t.victim(on_decode)
        if what.startswith("abort a foreign request"):  # to the worker that holds it (prefill: it may have left)
            peer = t.peer("decode" if on_decode else "prefill", "router")
            if what.endswith("guessed owner"):
                peer.send(FrameKind.REQUEST, {"owner": guessed_owner})
            peer.send(FrameKind.REQUEST, {"abort": victim})
            errors = [r for r in drain(peer, 0.5) if r[0] == FrameKind.ERROR]
            if on_decode and not any(victim in str(h.get("message")) for _, h in errors):
                t.note(f"a foreign abort of {victim} got no ERROR naming it: {errors}")
        elif what == "resubmit a foreign id to prefill":
            peer = t.peer("prefill", "router")
            peer.send(FrameKind.REQUEST, submission(victim, prompt))
            drain(peer, 1.0)
        else:
            peer = t.peer("decode", "prefill")
            tid = f"fz-dup-{i}"
            peer.send(FrameKind.RESERVE, {"transfer_id": tid, "num_tokens": 4})
            for kind, header, payload in _pages_and_done(t.layout, tid, victim):
                peer.send(kind, header, payload)
            drain(peer, 0.5)

    where = "" if what == "use another link's transfer id" else \
        (" (to decode)" if on_decode else " (to prefill)") if what == "abort an unknown id" else \
        " (on decode)" if on_decode else " (while it may still be prefilling)"
    return FuzzInput("ids", f"{what}{where}", act)


def _pages_and_done(layout: KVLayout, tid: str, rid: str) -> list[tuple[FrameKind, dict[str, Any], bytes]]:
    """The LAYER (zero pages, every layer of one block) and DONE frames that complete a 4-token transfer."""
    shape = [layout.num_layers, *layout.layer_shape(1)]
    return [(FrameKind.LAYER, {"transfer_id": tid, "layer": 0, "shape": shape, "dtype": layout.dtype_name,
                               "num_layers": layout.num_layers}, bytes(4 * math.prod(shape))),
            (FrameKind.DONE, {"transfer_id": tid, "state": sequence_state(rid, [5, 6, 7, 8], 9), "num_bytes": 0}, b"")]


def _foreign_transfer(t: FuzzTarget, tid: str) -> None:
    """One link reserves ``tid``; another cancels, renews, commits and writes to it; the first still completes it."""
    owner, other = t.peer("decode", "prefill"), t.peer("decode", "prefill")
    owner.send(FrameKind.RESERVE, {"transfer_id": tid, "num_tokens": 4})
    drain(owner, 0.3)
    for kind, header, payload in [(FrameKind.CANCEL, {"transfer_id": tid}, b""),
                                  (FrameKind.PING, {"transfer_id": None, "renew": [tid]}, b""),
                                  *_pages_and_done(t.layout, tid, f"{tid}-stolen")[::-1]]:  # DONE, then LAYER
        other.send(kind, header, payload)
    drain(other, 0.5)
    for kind, header, payload in _pages_and_done(t.layout, tid, f"{tid}-own"):
        owner.send(kind, header, payload)
    acks = [h for k, h in drain(owner, 2.0) if k == FrameKind.ACK]
    if not any(h.get("transfer_id") == tid and h.get("ok") is True for h in acks):
        t.note(f"another link's frames for transfer {tid} kept its own link from completing it: {acks}")


def router_input(rng: random.Random, i: int) -> FuzzInput:
    """One bad (or abandoned) JSON line on the router's client port."""
    lines = {"not JSON": b"{prompt_token_ids: [1]}", "not UTF-8": b'{"prompt_token_ids": [1], "id": "\xff"}',
             "NaN": b'{"prompt_token_ids": [1], "temperature": NaN}', "deeply nested": b"[" * NESTED_DEPTH + b"]" * NESTED_DEPTH,
             "over 1 MiB": b'{"prompt": "' + b"x" * ((1 << 20) + 10) + b'"}',
             "out-of-vocab id": json.dumps({"prompt_token_ids": [1, 10**9]}).encode(),
             "negative id": json.dumps({"prompt_token_ids": [-5, 2]}).encode(),
             "bool for int": json.dumps({"prompt_token_ids": [1, 2], "max_tokens": True}).encode(),
             "huge max_tokens": json.dumps({"prompt_token_ids": [1, 2], "max_tokens": 10**18}).encode(),
             "unknown field": json.dumps({"prompt_token_ids": [1, 2], "maxtokens": 3}).encode(),
             "two prompts": json.dumps({"prompt_token_ids": [1], "prompt": "x"}).encode(),
             "a JSON list": b"[1, 2, 3]", "empty prompt": json.dumps({"prompt_token_ids": []}).encode(),
             "duplicate ids": b"\n".join(json.dumps({"id": "same", "prompt_token_ids": [3, 4], **GREEDY}).encode()
                                         for _ in range(3)),
             "valid, then gone": json.dumps({"prompt_token_ids": [7, 8, 9], "temperature": 0, "max_tokens": 40,
                                             "ignore_eos": True}).encode()}
    what = rng.choice(sorted(lines))

    def act(t: FuzzTarget) -> None:
        peer = t.raw("router")
        peer.send_raw(lines[what] + b"\n")
        if what != "valid, then gone":  # that one leaves at once: its request must be aborted
            drain(peer, 0.5)

    return FuzzInput("router", f"router client line: {what}", act, authenticated=False)
