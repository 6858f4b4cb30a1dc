"""A decode worker's outputs on the wire, token by token: a whole output first and last, deltas between.

Sending each request's whole output with every token would cost the decode loop O(n^2) encoding
per request. Instead (``DeltaFramer``, on the decode server) a request's first output (it carries
the prompt and the timeline) and its last (finished: every token, the final timeline) travel as
whole TOKENS frames (``serve.output_to_dict``), and the tokens between as deltas: each decode
step's new token ids, for every request that advanced, in one TOKENS frame
``{"deltas": [[request_id, first_index, [token ids]], ...]}`` per router. ``first_index`` is how
many tokens the request had before: the router (``DeltaReceiver``) appends the ids to what it holds
and hands on a ``RequestOutput`` per request and step, so an HTTP client gets one chunk per token.
An output that would not extend what was sent (one overtaken by a later step's) is not sent.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, Hashable, Optional

from minidisagg.disagg.validate import InvalidMessage, require_dict, require_int, require_str, require_token_ids
from minidisagg.engine.llm_engine import RequestOutput

Delta = tuple[str, int, list[int]]  # request id, index of its first new token, the new token ids
MAX_DELTAS_PER_FRAME = 1 << 16


class DeltaFramer:
    """Collects a decode worker's outputs per destination and sends each batch as few frames as it can (thread-safe).

    ``whole(out)`` makes the header of a whole output; ``send(destination, header)`` sends one TOKENS frame.
    """

    def __init__(self, whole: Callable[[RequestOutput], dict[str, Any]],
                 send: Callable[[Hashable, dict[str, Any]], None]) -> None:
        self.whole, self.send = whole, send
        self._sent: dict[str, int] = {}  # request id -> tokens sent so far (requests not finished yet)
        self._batch: list[tuple[Hashable, Optional[dict[str, Any]], Optional[list[Any]]]] = []
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one flush at a time: batches leave in the order they were taken

    def add(self, destination: Hashable, out: RequestOutput) -> None:
        """Queue ``out`` for ``destination`` until ``flush``: whole if it is the request's first or last, else a delta."""
        with self._lock:
            sent = self._sent.get(out.request_id)
            if out.finished:
                self._sent.pop(out.request_id, None)
            elif sent is not None:
                if len(out.token_ids) <= sent:
                    return  # overtaken by a later step's output, sent already
                self._sent[out.request_id] = len(out.token_ids)
                self._batch.append((destination, None, [out.request_id, sent, out.token_ids[sent:]]))
                return
            else:
                self._sent[out.request_id] = len(out.token_ids)
            self._batch.append((destination, self.whole(out), None))  # under the lock: before its deltas

    @property
    def num_streaming(self) -> int:
        """Requests whose first output was sent and whose last was not."""
        return len(self._sent)

    def forget(self, request_ids: Callable[[str], bool]) -> None:
        """Drop the counts of requests for which ``request_ids(id)`` is true (they ended without a last output)."""
        with self._lock:
            for rid in [rid for rid in self._sent if request_ids(rid)]:
                del self._sent[rid]

    def flush(self) -> None:
        """Send what was queued: per destination, the whole outputs in order, then every delta in one frame.

        A request's whole first output was queued before its deltas, so it still arrives first; a delta
        queued before its request's whole last output arrives after it, and the router drops it (the last
        output holds every token). ``send`` must not block for long (``outbox.Subscribers`` only queues).
        """
        with self._flush_lock:
            with self._lock:
                batch, self._batch = self._batch, []
            runs: dict[Hashable, list[Any]] = {}
            for destination, header, delta in batch:
                if header is not None:
                    self.send(destination, header)
                else:
                    runs.setdefault(destination, []).append(delta)
            for destination, deltas in runs.items():
                self.send(destination, {"deltas": deltas})


def check_deltas(header: object, vocab_size: Optional[int] = None) -> list[Delta]:
    """A TOKENS frame ``{"deltas": [[request_id, first_index, [token ids]], ...]}`` -> its deltas."""
    d = require_dict(header, "TOKENS", ("deltas",), ("deltas",))
    deltas = d["deltas"]
    if not isinstance(deltas, list) or len(deltas) > MAX_DELTAS_PER_FRAME:
        raise InvalidMessage("deltas", f"must be a list of at most {MAX_DELTAS_PER_FRAME} [request_id, first_index, "
                                       f"token_ids] entries")
    vocab = vocab_size if vocab_size is not None else 2**63
    checked: list[Delta] = []
    for i, entry in enumerate(deltas):
        if not isinstance(entry, list) or len(entry) != 3:
            raise InvalidMessage(f"deltas[{i}]", "must be [request_id, first_index, token_ids]")
        rid = require_str(entry[0], f"deltas[{i}][0]")
        assert rid is not None
        checked.append((rid, require_int(entry[1], f"deltas[{i}][1]", 1),
                        require_token_ids(entry[2], f"deltas[{i}][2]", vocab, 1)))
    return checked


class DeltaReceiver:
    """The router's side: the latest output of each request still streaming, extended by each delta (one reader thread)."""

    def __init__(self) -> None:
        self._latest: dict[str, RequestOutput] = {}

    def whole(self, out: RequestOutput) -> RequestOutput:
        """A whole output arrived: remember it while its request streams on."""
        if out.finished:
            self._latest.pop(out.request_id, None)
        else:
            self._latest[out.request_id] = out
        return out

    def apply(self, delta: Delta) -> Optional[RequestOutput]:
        """The request's output with the delta's tokens appended; None for a request not streaming here (aborted).

        InvalidMessage (naming the request) when the delta does not start where the tokens held end.
        """
        rid, first, token_ids = delta
        latest = self._latest.get(rid)
        if latest is None:
            return None
        if first != len(latest.token_ids):
            self._latest.pop(rid)
            raise InvalidMessage("deltas", f"request {rid}: tokens from index {first}, but {len(latest.token_ids)} "
                                           f"arrived before", rid)
        out = dataclasses.replace(latest, token_ids=latest.token_ids + token_ids)
        self._latest[rid] = out
        return out

    def forget(self, request_id: str) -> None:
        """The request was given up (aborted): its later deltas are ignored."""
        self._latest.pop(request_id, None)

    def clear(self) -> None:
        """The connection was lost: nothing streams through it any more."""
        self._latest.clear()
