"""The router's client protocol: JSON lines over TCP (the server itself is ``router_server``).

Clients send one JSON object per line (UTF-8, at most 1 MiB, ending in a newline)::

    {"id": "a", "prompt": "Hello", "max_tokens": 8, "temperature": 0}
    {"prompt_token_ids": [1, 2, 3]}          {"messages": [{"role": "user", "content": "Hi"}]}

Exactly one of ``prompt``, ``prompt_token_ids``, ``messages`` (chat template applied); optional
``id`` (a string; default ``"#N"``, N the line's number on the connection) and the sampling
fields ``max_tokens temperature top_p top_k seed stop stop_token_ids ignore_eos`` with
``SamplingParams``' defaults (temperature 1.0, max_tokens 16). Unknown fields are errors.
The router answers with lines carrying the request's ``id``::

    {"id": "a", "token_ids": [new ids], "text": "new text", "finished": false}      (as tokens come)
    {"id": "a", "finished": true, "finish_reason": "length", "token_ids": [all], "text": "all",
     "metrics": {"ttft_s", "tpot_s", "e2e_s", "num_output_tokens", "prefill_s", "decode_s",
                 "kv_transfer_bytes", "kv_transfer_s"}}
    {"id": "a", "finished": true, "finish_reason": "error", "error": "why"}         (bad line or failure)

Many requests may be in flight on one connection (give them ids); a bad line gets an error line
and the connection stays open. Input EOF (half-close) is fine: the connection closes once its
requests finish. A client that goes away, reads nothing for 30 s, or falls more lines behind than
its queue holds (``subscriber_queue_size``) is dropped and has its requests aborted. A line must
end within ``frame_deadline_s`` of its first byte (``read_lines``): a client that sends half a
line and stalls gets an error line and is dropped. Past ``max_connections`` clients at once, a
new one gets an error line naming the limit and is closed.
``ttft_s``/``tpot_s``/``e2e_s`` are measured by the router; ``kv_transfer_s`` is null unless
every process got the same ``--clock-origin`` (workers' clocks are compared only then).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any, Iterator, Optional

from minidisagg.engine.llm_engine import RequestOutput
from minidisagg.engine.sampling import SamplingParams
from minidisagg.models.tokenizer import IncrementalDetokenizer, Tokenizer
from minidisagg.transport.socket import wait_readable

MAX_LINE_BYTES = 1 << 20
IDLE_WAIT_S = 0.2
SAMPLING_TYPES: dict[str, Any] = {"max_tokens": int, "temperature": (int, float), "top_p": (int, float), "top_k": int,
                                  "seed": int, "stop": (str, list), "stop_token_ids": list, "ignore_eos": bool}
PROMPT_FIELDS = ("prompt", "prompt_token_ids", "messages")
REQUEST_FIELDS = ("id", *PROMPT_FIELDS, *SAMPLING_TYPES)


class BadRequest(ValueError):
    """A client line the router cannot serve; ``request_id`` is the id to answer with."""

    def __init__(self, request_id: str, message: str) -> None:
        super().__init__(message)
        self.request_id = request_id


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def parse_request(line: bytes, default_id: str,
                  tokenizer: Optional[Tokenizer]) -> tuple[str, dict[str, Any], SamplingParams]:
    """One client line -> (id, engine prompt ``{"prompt_token_ids", "prompt"}``, params); BadRequest says why not."""
    try:
        obj = json.loads(line, parse_constant=_reject_constant)
    except ValueError as exc:  # also UnicodeDecodeError
        raise BadRequest(default_id, f"not a JSON line: {exc}") from None
    except RecursionError:
        raise BadRequest(default_id, "not a JSON line: nested too deeply") from None
    if not isinstance(obj, dict):
        raise BadRequest(default_id, f"a request is a JSON object, got {type(obj).__name__}")
    rid = obj.get("id", default_id)
    if not isinstance(rid, str) or not rid:
        raise BadRequest(default_id, f"id must be a non-empty string, got {rid!r}")
    unknown = sorted(set(obj) - set(REQUEST_FIELDS))
    if unknown:
        raise BadRequest(rid, f"unknown field(s) {unknown}; known: {list(REQUEST_FIELDS)}")
    kwargs = {}
    for name, kinds in SAMPLING_TYPES.items():
        value = obj.get(name)
        if value is not None and (not isinstance(value, kinds) or (isinstance(value, bool) and kinds is not bool)):
            raise BadRequest(rid, f"{name} has the wrong type: {value!r}")
        if value is not None:
            kwargs[name] = value
    try:
        params = SamplingParams(**kwargs)
    except (ValueError, TypeError) as exc:
        raise BadRequest(rid, str(exc)) from None
    given = [f for f in PROMPT_FIELDS if f in obj]
    if len(given) != 1:
        raise BadRequest(rid, f"give exactly one of {list(PROMPT_FIELDS)}, got {given}")
    value = obj[given[0]]
    if given[0] == "prompt_token_ids":
        if not isinstance(value, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in value):
            raise BadRequest(rid, "prompt_token_ids must be a list of integers")
        return rid, {"prompt_token_ids": value, "prompt": None}, params
    if tokenizer is None:
        raise BadRequest(rid, "this router has no tokenizer: send prompt_token_ids")
    try:
        if given[0] == "prompt":
            if not isinstance(value, str):
                raise ValueError("prompt must be a string")
            return rid, {"prompt_token_ids": tokenizer.encode(value), "prompt": value}, params
        if not isinstance(value, list) or not value or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in value):
            raise ValueError("messages must be a non-empty list of {'role': str, 'content': str}")
        text = tokenizer.apply_chat_template(value, tokenize=False)
        return rid, {"prompt_token_ids": tokenizer.encode(str(text)), "prompt": text}, params
    except ValueError as exc:  # TokenizerError is a ValueError
        raise BadRequest(rid, str(exc)) from None


def read_lines(sock: socket.socket, closed: threading.Event,
               line_deadline_s: Optional[float] = None) -> Iterator[Optional[bytes]]:
    """A client's lines until EOF or ``closed``; None stands for a line over MAX_LINE_BYTES (then skipped).

    With ``line_deadline_s``, a line whose first byte came must end within that many seconds:
    TimeoutError otherwise (a client that sends half a line and stalls holds a thread no longer).
    """
    buf, skipping = bytearray(), False
    line_started_s: Optional[float] = None
    while not closed.is_set():
        if line_started_s is not None and line_deadline_s is not None and \
                time.monotonic() - line_started_s > line_deadline_s:
            raise TimeoutError(f"a line was still incomplete {line_deadline_s:g} s after its first byte "
                               f"({len(buf)} bytes without a newline; the limit is --frame-deadline-s)")
        wait_s = IDLE_WAIT_S if line_started_s is None or line_deadline_s is None else \
            max(0.0, min(IDLE_WAIT_S, line_started_s + line_deadline_s - time.monotonic()) + 0.001)
        if not wait_readable(sock, closed, wait_s, once=True):
            continue
        chunk = sock.recv(1 << 16)
        if not chunk:
            return
        if line_started_s is None:
            line_started_s = time.monotonic()
        buf += chunk
        while (nl := buf.find(b"\n")) >= 0:
            line, was_skipping, skipping = bytes(buf[:nl]), skipping, False
            del buf[:nl + 1]
            line_started_s = time.monotonic() if buf else None  # the rest started a new line just now
            if not was_skipping:
                yield line if len(line) <= MAX_LINE_BYTES else None
        if len(buf) > MAX_LINE_BYTES:
            if not skipping:
                yield None
            skipping = True
            buf.clear()


def error_line(request_id: Optional[str], message: str) -> dict[str, Any]:
    """The final line of a request that failed (or a line that was not a request)."""
    return {"id": request_id, "finished": True, "finish_reason": "error", "error": message}


class ReplyStream:
    """One request's reply lines: ids and text sent so far, token arrival times at the router."""

    def __init__(self, client_id: str, prompt_ids: list[int], params: SamplingParams,
                 tokenizer: Optional[Tokenizer], shared_clock: bool) -> None:
        self.client_id, self.params, self.shared_clock = client_id, params, shared_clock
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids) if tokenizer is not None else None
        self.arrival_s = time.perf_counter()
        self.token_ids: list[int] = []
        self.token_times_s: list[float] = []
        self.raw_text = ""
        self.sent_text = ""

    def _visible_text(self, finished: bool) -> str:
        text = self.raw_text
        hits = [text.find(s) for s in self.params.stop or [] if s in text]
        if hits:
            return text[:min(hits)]
        hold = 0 if finished else max((len(s) - 1 for s in self.params.stop or []), default=0)
        return text[:len(text) - hold]  # a stop string may be forming in the last chars: hold them back

    def update(self, out: RequestOutput, now_s: float) -> list[dict[str, Any]]:
        """The lines an output means for the client: new tokens and text, then the final line if finished."""
        if out.error is not None:
            return [error_line(self.client_id, out.error)]
        new = out.token_ids[len(self.token_ids):]
        self.token_ids += new
        self.token_times_s += [now_s] * len(new)
        if self.detok is not None:
            self.raw_text += "".join(self.detok.push(t) for t in new) + (self.detok.flush() if out.finished else "")
        text = self._visible_text(out.finished)
        delta, self.sent_text = text[len(self.sent_text):], text
        lines = []
        if new or delta:
            lines.append({"id": self.client_id, "token_ids": new, "text": delta if self.detok else None,
                          "finished": False})
        if out.finished:
            lines.append({"id": self.client_id, "finished": True, "finish_reason": out.finish_reason,
                          "token_ids": list(self.token_ids), "text": text if self.detok else None,
                          "metrics": self._metrics(out, now_s)})
        return lines

    def _metrics(self, out: RequestOutput, now_s: float) -> dict[str, Any]:
        times, tl = self.token_times_s, out.timeline

        def span(start: Optional[float], end: Optional[float]) -> Optional[float]:
            return None if start is None or end is None else end - start

        return {"ttft_s": times[0] - self.arrival_s if times else None,
                "tpot_s": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0,
                "e2e_s": now_s - self.arrival_s, "num_output_tokens": len(times),
                "prefill_s": span(tl.prefill_start_s, tl.prefill_end_s),
                "decode_s": span(tl.decode_start_s, tl.finish_s),
                "kv_transfer_bytes": tl.kv_transfer_bytes,
                "kv_transfer_s": span(tl.transfer_start_s, tl.transfer_end_s) if self.shared_clock else None}


def stream_request(host: str, port: int, request: dict[str, Any], timeout_s: float = 60.0) -> Iterator[dict[str, Any]]:
    """Send one request to a router and yield its reply lines, the final one (``finished``) last."""
    deadline = time.monotonic() + timeout_s
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.sendall(json.dumps(request).encode() + b"\n")
        reader = sock.makefile("rb")
        while True:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                line = reader.readline()
            except socket.timeout:
                raise TimeoutError(f"no final reply from the router at {host}:{port} within {timeout_s} s") from None
            if not line:
                raise ConnectionError(f"the router at {host}:{port} closed the connection before the final reply")
            message = json.loads(line)
            yield message
            if message.get("finished"):
                return
