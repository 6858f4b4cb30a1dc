"""plain_dict: the same dict as dataclasses.asdict for what crosses the wire, with containers of its own."""

from __future__ import annotations

import dataclasses
import random

from minidisagg.engine.sampling import SamplingParams
from minidisagg.engine.sequence import SequenceState
from minidisagg.metrics import RequestTimeline
from minidisagg.plain import plain_dict


def test_plain_dict_equals_asdict_and_owns_its_containers():
    seed = random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    timeline = RequestTimeline(arrival_s=rng.random(), token_times_s=[rng.random() for _ in range(rng.randint(0, 50))])
    params = SamplingParams(temperature=rng.random(), max_tokens=rng.randint(1, 99), stop=["\n", "END"],
                            stop_token_ids=[rng.randrange(100) for _ in range(3)])
    state = SequenceState("r", [rng.randrange(49152) for _ in range(rng.randint(1, 3000))], [rng.randrange(9)],
                          plain_dict(params), plain_dict(timeline))
    for obj in (timeline, params, state):
        assert plain_dict(obj) == dataclasses.asdict(obj), f"seed {seed}: {type(obj).__name__}"
    d = plain_dict(state)
    state.prompt_token_ids.append(7)
    state.params["max_tokens"] = -1
    assert len(d["prompt_token_ids"]) == len(state.prompt_token_ids) - 1, f"seed {seed}: the list is shared"
    assert d["params"]["max_tokens"] != -1, f"seed {seed}: the dict shares a container with the object"
    assert SequenceState.from_dict(plain_dict(SequenceState.from_dict(d))) == SequenceState.from_dict(d)
