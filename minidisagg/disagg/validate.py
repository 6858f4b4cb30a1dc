"""Checks on what peers send, made before any engine sees it.

A worker or the router trusts nothing a socket hands it. Each ``check_*`` function takes a
decoded JSON value and returns a typed object (``Submission``, ``SequenceState``,
``RequestOutput``) or raises ``InvalidMessage`` naming the field (``submission.arrival_s``)
and what is wrong with it. The caller answers the sender alone with an ERROR carrying that
text, and the request id where the message had a usable one.

The rules: bools are not ints; numbers are finite; token ids lie in the vocabulary; a request
fits the context; no unknown fields. Times lie in a window: an arrival may be at most
``MAX_ARRIVAL_AHEAD_S`` after the receiver's now (a prefill worker sleeps until it), a decode
worker takes only arrivals and token times no later than its own now (it records the next
token then). Other timestamps only have to lie in ``[0, MAX_CLOCK_S]``: workers started
without a shared ``--clock-origin`` do not share a "now", so nothing tighter holds for them.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Collection, Optional

from minidisagg.disagg.prefill_requests import Submission
from minidisagg.engine.llm_engine import RequestOutput
from minidisagg.engine.sampling import SamplingParams
from minidisagg.engine.sequence import SequenceState
from minidisagg.metrics import RequestMetrics, RequestTimeline

MAX_ARRIVAL_AHEAD_S = 60.0
MAX_CLOCK_S = 1e9  # about 31 years of a clock's seconds: anything later is garbage
MAX_ID_CHARS = 256
MAX_BYTES = 1 << 62
MAX_STOP_STRINGS = 64
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))
SUBMISSION_FIELDS = tuple(f.name for f in dataclasses.fields(Submission))
STATE_FIELDS = tuple(f.name for f in dataclasses.fields(SequenceState))
OUTPUT_FIELDS = tuple(f.name for f in dataclasses.fields(RequestOutput) if f.name != "metrics")


class InvalidMessage(ValueError):
    """A message field a peer got wrong: ``field`` names it, ``request_id`` is the request's id if it had one."""

    def __init__(self, field: str, problem: str, request_id: Optional[str] = None) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.request_id = request_id


@dataclass(frozen=True)
class MessageLimits:
    """What a message must fit: the model's vocabulary and the engine's context length."""

    vocab_size: int
    max_model_len: int
    max_arrival_ahead_s: float = MAX_ARRIVAL_AHEAD_S


def is_int(value: object) -> bool:
    """Whether ``value`` is an int and not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def require_str(value: object, field: str, optional: bool = False, max_chars: int = MAX_ID_CHARS) -> Optional[str]:
    """A non-empty string of at most ``max_chars`` (or None where ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidMessage(field, f"must be a non-empty string, got {_show(value)}")
    if len(value) > max_chars:
        raise InvalidMessage(field, f"is {len(value)} characters long; at most {max_chars}")
    return value


def require_int(value: object, field: str, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """An int (not a bool) in ``[lo, hi]``."""
    if not is_int(value):
        raise InvalidMessage(field, f"must be an integer, got {_show(value)}")
    assert isinstance(value, int)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InvalidMessage(field, f"{value} is outside [{lo}, {hi}]")
    return value


def require_number(value: object, field: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    """A finite int or float (not a bool) in ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidMessage(field, f"must be a finite number, got {_show(value)}")
    if not lo <= value <= hi:
        raise InvalidMessage(field, f"{value} is outside [{lo}, {hi}]")
    return float(value)


def require_token_ids(value: object, field: str, vocab_size: int, min_len: int = 0,
                      max_len: Optional[int] = None) -> list[int]:
    """A list of token ids in ``[0, vocab_size)`` of a length in ``[min_len, max_len]``."""
    if not isinstance(value, list):
        raise InvalidMessage(field, f"must be a list of token ids, got {_show(value)}")
    if len(value) < min_len or (max_len is not None and len(value) > max_len):
        raise InvalidMessage(field, f"has {len(value)} tokens; expected {min_len} to {max_len}")
    for i, token in enumerate(value):
        if not is_int(token) or not 0 <= token < vocab_size:
            raise InvalidMessage(f"{field}[{i}]", f"must be a token id in [0, {vocab_size}), got {_show(token)}")
    return list(value)


def require_dict(value: object, field: str, allowed: Collection[str], required: Collection[str] = ()) -> dict[str, Any]:
    """A JSON object with only ``allowed`` keys and every ``required`` one."""
    if not isinstance(value, dict):
        raise InvalidMessage(field, f"must be an object, got {_show(value)}")
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        raise InvalidMessage(f"{field}.{unknown[0]}", f"is not a known field (known: {sorted(allowed)})")
    missing = [k for k in required if k not in value]
    if missing:
        raise InvalidMessage(f"{field}.{missing[0]}", "is missing")
    return value


def request_id_in(header: object) -> Optional[str]:
    """The message's top-level ``request_id`` if it is a usable one (to address an ERROR), else None."""
    rid = header.get("request_id") if isinstance(header, dict) else None
    return rid if isinstance(rid, str) and 0 < len(rid) <= MAX_ID_CHARS else None


def check_sampling_params(value: object, field: str = "params") -> SamplingParams:
    """Sampling parameters as a JSON object -> ``SamplingParams``."""
    d = require_dict(value, field, SAMPLING_FIELDS)
    if "temperature" in d:
        require_number(d["temperature"], f"{field}.temperature", 0.0)
    if "top_p" in d:
        require_number(d["top_p"], f"{field}.top_p", 0.0, 1.0)
    if "top_k" in d:
        require_int(d["top_k"], f"{field}.top_k", -1)
    if "max_tokens" in d:
        require_int(d["max_tokens"], f"{field}.max_tokens", 1)
    if d.get("seed") is not None:
        require_int(d["seed"], f"{field}.seed", *SEED_RANGE)
    stop = d.get("stop")
    if stop is not None and not isinstance(stop, str):
        if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS:
            raise InvalidMessage(f"{field}.stop", f"must be a string or a list of strings, got {_show(stop)}")
        for i, s in enumerate(stop):
            require_str(s, f"{field}.stop[{i}]", max_chars=1 << 12)
    if d.get("stop_token_ids") is not None:
        if not isinstance(d["stop_token_ids"], list):
            raise InvalidMessage(f"{field}.stop_token_ids", f"must be a list, got {_show(d['stop_token_ids'])}")
        for i, t in enumerate(d["stop_token_ids"]):
            require_int(t, f"{field}.stop_token_ids[{i}]", 0, 2**63)
    if "ignore_eos" in d and not isinstance(d["ignore_eos"], bool):
        raise InvalidMessage(f"{field}.ignore_eos", f"must be true or false, got {_show(d['ignore_eos'])}")
    try:
        return SamplingParams(**d)
    except (TypeError, ValueError) as exc:
        raise InvalidMessage(field, str(exc)) from None


def check_timeline(value: object, field: str, now_s: Optional[float] = None) -> dict[str, Any]:
    """A ``RequestTimeline`` as a JSON object, every time in ``[0, MAX_CLOCK_S]``.

    With ``now_s`` (the receiver's clock, shared with the sender's) the arrival and the token
    times must also be no later than now, in order.
    """
    names = [f.name for f in dataclasses.fields(RequestTimeline)]
    d = require_dict(value, field, names, ("arrival_s",))
    for f in dataclasses.fields(RequestTimeline):
        if f.name not in d:
            continue
        where, v, kind = f"{field}.{f.name}", d[f.name], str(f.type).replace(" ", "")
        if kind == "list[float]":
            if not isinstance(v, list):
                raise InvalidMessage(where, f"must be a list of times, got {_show(v)}")
            for i, t in enumerate(v):
                require_number(t, f"{where}[{i}]", 0.0, MAX_CLOCK_S)
        elif kind == "int":
            require_int(v, where, 0, MAX_BYTES)
        elif kind in ("float", "float|None", "Optional[float]"):
            if v is not None or "None" not in kind:
                require_number(v, where, 0.0, MAX_CLOCK_S)
        elif v is not None and not isinstance(v, (str, bool, int, float)):
            raise InvalidMessage(where, f"must be a plain value, got {_show(v)}")
    if now_s is not None:
        arrival_s = d["arrival_s"]
        if arrival_s > now_s:
            raise InvalidMessage(f"{field}.arrival_s", f"{arrival_s} is later than this worker's now ({now_s:.3f} s)")
        last_s = arrival_s
        for i, t in enumerate(d.get("token_times_s", [])):
            if not last_s <= t <= now_s:
                raise InvalidMessage(f"{field}.token_times_s[{i}]",
                                     f"{t} must lie between the previous time {last_s} and now ({now_s:.3f} s)")
            last_s = t
    return d


def check_sequence_state(state: SequenceState, limits: MessageLimits, now_s: float) -> SequenceState:
    """A prefilled request handed to a decode worker (the ``state`` of a DONE frame)."""
    rid = require_str(state.request_id, "state.request_id")
    try:
        prompt = require_token_ids(state.prompt_token_ids, "state.prompt_token_ids", limits.vocab_size, 1,
                                   limits.max_model_len - 2)
        output = require_token_ids(state.output_token_ids, "state.output_token_ids", limits.vocab_size, 1)
        if len(prompt) + len(output) >= limits.max_model_len:
            raise InvalidMessage("state.output_token_ids", f"prompt plus output is {len(prompt) + len(output)} tokens; "
                                 f"a request still decoding has fewer than max_model_len={limits.max_model_len}")
        check_sampling_params(state.params, "state.params")
        require_str(state.prompt, "state.prompt", optional=True, max_chars=1 << 22)
        check_timeline(state.timeline, "state.timeline", now_s)
        require_str(state.owner, "state.owner", optional=True)
        require_int(state.num_cached_tokens, "state.num_cached_tokens", 0, len(prompt) - 1)
        gen = require_str(state.generator_state_b64, "state.generator_state_b64", optional=True, max_chars=1 << 16)
        if gen is not None:
            try:
                base64.b64decode(gen, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidMessage("state.generator_state_b64", "is not base64") from None
    except InvalidMessage as exc:
        exc.request_id = rid
        raise
    return state


def check_submission(header: object, limits: MessageLimits, now_s: float, decode_targets: Collection[str]) -> Submission:
    """A REQUEST frame for a prefill worker: ``{"request_id", "submission": {...}}`` -> ``Submission``."""
    d = require_dict(header, "REQUEST", ("request_id", "submission"), ("request_id", "submission"))
    rid = require_str(d["request_id"], "request_id")
    assert rid is not None
    try:
        s = require_dict(d["submission"], "submission", SUBMISSION_FIELDS,
                         ("request_id", "prompt_token_ids", "params", "arrival_s", "decode_target"))
        if s["request_id"] != rid:
            raise InvalidMessage("submission.request_id", f"{_show(s['request_id'])} differs from request_id {rid!r}")
        ids = require_token_ids(s["prompt_token_ids"], "submission.prompt_token_ids", limits.vocab_size, 1,
                                limits.max_model_len - 1)
        params = check_sampling_params(s["params"], "submission.params")
        arrival_s = require_number(s["arrival_s"], "submission.arrival_s", 0.0, now_s + limits.max_arrival_ahead_s)
        target = require_str(s["decode_target"], "submission.decode_target")
        if target not in decode_targets:
            raise InvalidMessage("submission.decode_target", f"unknown decode worker {target!r}; "
                                 f"known: {sorted(decode_targets)}")
        prompt = require_str(s.get("prompt"), "submission.prompt", optional=True, max_chars=1 << 22)
        owner = require_str(s.get("owner"), "submission.owner", optional=True)
    except InvalidMessage as exc:
        exc.request_id = rid
        raise
    assert target is not None
    return Submission(rid, ids, params, arrival_s, target, prompt, owner)


DECODE_REQUESTS = ("abort", "owner")


def check_decode_request(header: object) -> tuple[str, str]:
    """A control REQUEST frame for a worker -> ``(what, value)``: ``("abort", request_id)`` or ``("owner", token)``.

    A decode worker takes only these; a prefill worker takes them beside submissions.

    ``{"abort": request_id}`` drops a request; ``{"owner": token}`` tells the worker which router
    this connection belongs to (the token its requests carry as ``SequenceState.owner``).
    """
    d = require_dict(header, "REQUEST", DECODE_REQUESTS)
    if not d:
        raise InvalidMessage("REQUEST.abort", "is missing (a REQUEST to a decode worker is {\"abort\": request_id} "
                                              "or {\"owner\": token})")
    if len(d) > 1:
        raise InvalidMessage("REQUEST.owner", "goes in a REQUEST of its own, not beside abort")
    (what, value), = d.items()
    checked = require_str(value, what)
    assert checked is not None
    return what, checked


def check_abort(header: object) -> str:
    """A REQUEST frame ``{"abort": request_id}`` for a decode worker -> the id."""
    what, value = check_decode_request(header)
    if what != "abort":
        raise InvalidMessage("REQUEST.abort", "is missing")
    return value


def check_output(header: object, vocab_size: Optional[int] = None) -> RequestOutput:
    """A TOKENS frame a worker sent the router -> ``RequestOutput`` (metrics recomputed from the timeline)."""
    d = require_dict(header, "TOKENS", OUTPUT_FIELDS, ("request_id", "token_ids", "finished", "timeline"))
    rid = require_str(d["request_id"], "request_id")
    try:
        vocab = vocab_size if vocab_size is not None else 2**63
        prompt_ids = require_token_ids(d.get("prompt_token_ids", []), "prompt_token_ids", vocab)
        token_ids = require_token_ids(d["token_ids"], "token_ids", vocab)
        if not isinstance(d["finished"], bool):
            raise InvalidMessage("finished", f"must be true or false, got {_show(d['finished'])}")
        for name in ("prompt", "text", "finish_reason", "error"):
            if d.get(name) is not None and not isinstance(d[name], str):
                raise InvalidMessage(name, f"must be a string or null, got {_show(d[name])}")
        num_preemptions = require_int(d.get("num_preemptions", 0), "num_preemptions", 0)
        num_cached_tokens = require_int(d.get("num_cached_tokens", 0), "num_cached_tokens", 0, max(0, len(prompt_ids) - 1))
        timeline = RequestTimeline(**check_timeline(d["timeline"], "timeline"))
        metrics = None
        if d["finished"] and token_ids:
            try:
                metrics = RequestMetrics.from_timeline(timeline)
            except (ValueError, TypeError, ArithmeticError, IndexError) as exc:
                raise InvalidMessage("timeline", f"has no consistent metrics: {exc}") from None
    except InvalidMessage as exc:
        exc.request_id = rid
        raise
    assert rid is not None
    return RequestOutput(rid, d.get("prompt"), prompt_ids, d.get("text") or "", token_ids, d["finished"],
                         d.get("finish_reason"), metrics, timeline, num_preemptions, d.get("error"), num_cached_tokens)


def _show(value: object, max_chars: int = 60) -> str:
    """A short repr of a peer's value for an error message (type and a cut-off repr)."""
    text = repr(value)
    text = text if len(text) <= max_chars else text[:max_chars] + "..."
    return f"{text} ({type(value).__name__})"
