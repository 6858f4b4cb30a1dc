"""A decode worker's token stream (``disagg.token_stream``): whole outputs first and last, one frame of deltas per step.

Random interleavings of requests and steps go through the framer and the router's receiver; the
router must see every output of every request, token by token, and each step's deltas must leave
as one frame per destination.
"""

from __future__ import annotations

import random

import pytest

from minidisagg.disagg.serve import output_to_dict
from minidisagg.disagg.token_stream import DeltaFramer, DeltaReceiver, check_deltas
from minidisagg.disagg.validate import InvalidMessage, check_output
from minidisagg.engine.llm_engine import RequestOutput
from minidisagg.metrics import RequestTimeline

VOCAB = 1000


def output(rid: str, token_ids: list[int], finished: bool) -> RequestOutput:
    times_s = [0.01 * (i + 1) for i in range(len(token_ids))]
    timeline = RequestTimeline(arrival_s=0.0, token_times_s=times_s, finish_s=times_s[-1] if finished else None)
    return RequestOutput(rid, None, [1, 2, 3], "", list(token_ids), finished, "length" if finished else None, None,
                         timeline)


def test_the_router_sees_every_token_of_every_request_with_one_delta_frame_per_step(seed):
    rng = random.Random(seed)
    frames: list[tuple[str, dict]] = []
    framer = DeltaFramer(output_to_dict, lambda dest, header: frames.append((dest, header)))
    receivers = {dest: DeltaReceiver() for dest in ("a", "b")}
    tokens = {f"r{i}": [] for i in range(rng.randrange(3, 8))}
    lengths = {rid: rng.randrange(1, 30) for rid in tokens}
    dest = {rid: rng.choice(["a", "b"]) for rid in tokens}
    seen: dict[str, list[list[int]]] = {rid: [] for rid in tokens}
    steps = 0
    while any(len(tokens[rid]) < lengths[rid] for rid in tokens):
        advancing = [rid for rid in tokens if len(tokens[rid]) < lengths[rid] and rng.random() < 0.7]
        for rid in advancing:
            tokens[rid].append(rng.randrange(VOCAB))
            framer.add(dest[rid], output(rid, tokens[rid], len(tokens[rid]) == lengths[rid]))
        before = len(frames)
        framer.flush()
        steps += 1
        new = frames[before:]
        delta_frames = [(d, h) for d, h in new if "deltas" in h]
        assert len(delta_frames) <= 2 and len({d for d, _ in delta_frames}) == len(delta_frames), \
            f"seed {seed}: more than one delta frame per destination in a step: {new}"
        for d, header in new:
            if "deltas" in header:
                outs = [receivers[d].apply(delta) for delta in check_deltas(header, VOCAB)]
            else:
                outs = [receivers[d].whole(check_output(header, VOCAB))]
            for out in outs:
                assert out is not None and dest[out.request_id] == d
                seen[out.request_id].append(out.token_ids)
    for rid, outs in seen.items():
        assert outs == [tokens[rid][:k] for k in range(1, lengths[rid] + 1)], f"seed {seed}: {rid}"
    assert framer.num_streaming == 0


def test_an_overtaken_output_is_not_sent_and_a_gap_is_refused():
    frames: list[dict] = []
    framer = DeltaFramer(output_to_dict, lambda dest, header: frames.append(header))
    framer.add(None, output("x", [5, 6], False))
    framer.add(None, output("x", [5], False))  # an earlier output arriving late: nothing new in it
    framer.flush()
    assert len(frames) == 1 and frames[0]["token_ids"] == [5, 6]
    receiver = DeltaReceiver()
    receiver.whole(check_output(frames[0], VOCAB))
    with pytest.raises(InvalidMessage, match="from index 3"):
        receiver.apply(("x", 3, [7]))
    assert receiver.apply(("x", 2, [7])) is None, "after a refused delta the request no longer streams"
    assert receiver.apply(("unknown", 1, [7])) is None
    for bad in ({"deltas": [["x", 0, [1]]]}, {"deltas": [["x", 1, []]]}, {"deltas": [["x", 1, [VOCAB]]]},
                {"deltas": "x"}, {"deltas": [["x", 1]]}, {"deltas": [], "more": 1}):
        with pytest.raises(InvalidMessage):
            check_deltas(bad, VOCAB)
