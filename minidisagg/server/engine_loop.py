"""``EngineLoop``: one thread that steps the engine continuously while HTTP handlers add and abort requests.

Only the loop's thread touches the engine's queues: handlers hand it submissions and aborts through a
thread-safe queue and wake it. Requests that arrive while others decode join the running batch at the
next step (continuous batching across HTTP requests). Each request's tokens go back through its
``sink``, a callable the handler supplies (it moves them onto its event loop).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from minidisagg.engine.llm_engine import RequestOutput
from minidisagg.engine.sampling import SamplingParams
from minidisagg.engine.steppable import Steppable
from minidisagg.engine.text_decoder import REPLACEMENT_CHAR, TextDecoder
from minidisagg.server.metrics import ServerMetrics

IDLE_WAIT_S = 0.05  # an idle loop sleeps this long at most between checks (a submission wakes it at once)
KVBlocks = Callable[[], dict[str, tuple[int, int]]]  # worker -> (free blocks, total blocks)


class QueueFullError(RuntimeError):
    """The server holds as many requests as it accepts; try again later."""


@dataclass
class TokenEvent:
    """What a request's sink receives: new text and tokens, and at the end why it finished."""

    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class _Live:
    """A request the loop serves: where its output goes and how much of it has gone."""

    sink: Callable[[TokenEvent], None]
    received_s: float
    deadline_s: float
    holdback_chars: int  # text held back while a stop string may still be forming
    stop: list[str]
    decoder: Optional[TextDecoder] = None
    prompt_tokens: int = 0
    sent_chars: int = 0
    sent_tokens: int = 0
    last_token_s: Optional[float] = None
    itls_s: list[float] = field(default_factory=list)


class EngineLoop:
    """Steps a ``Steppable`` engine in a background thread; ``submit`` and ``abort`` are safe from any thread."""

    def __init__(self, engine: Steppable, metrics: ServerMetrics, kv_blocks: Optional[KVBlocks] = None,
                 max_pending: int = 256, request_timeout_s: float = 600.0, tokenizer: Any = None) -> None:
        """``tokenizer``: decode the text here from the token ids (workers in other processes send ids only)."""
        self.engine = engine
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.kv_blocks = kv_blocks
        self.max_pending = max_pending
        self.request_timeout_s = request_timeout_s
        self._control: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._accepted = 0  # requests submitted and not yet ended (counted under the lock)
        self._live: dict[str, _Live] = {}
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.failure: Optional[str] = None  # the last step failure, for /health
        self._update_gauges()

    # ---- any thread -------------------------------------------------------------------------
    def start(self) -> None:
        """Start stepping."""
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the loop to stop (returns at once; safe in a signal handler): live requests get an error event."""
        self._stop.set()
        self._wake.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the loop and wait for its thread; requests still live get an error event."""
        self.request_stop()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        """Whether the loop's thread is running."""
        return self._thread.is_alive()

    @property
    def num_accepted(self) -> int:
        """Requests submitted and not yet ended."""
        return self._accepted

    def submit(self, request_id: str, prompt: dict[str, Any], params: SamplingParams,
               sink: Callable[[TokenEvent], None]) -> None:
        """Queue a request (``prompt`` as ``{"prompt_token_ids", "prompt"}``); QueueFullError when full."""
        with self._lock:
            if self._accepted >= self.max_pending:
                raise QueueFullError(f"the server holds {self._accepted} requests, its limit (--max-pending); "
                                     f"retry later")
            self._accepted += 1
        self._control.put(("add", (request_id, prompt, params, sink, time.perf_counter())))
        self._wake_up()

    def abort(self, request_id: str) -> None:
        """Stop a request (its client went away); its KV blocks return to the pool."""
        self._control.put(("abort", request_id))
        self._wake_up()

    def _wake_up(self) -> None:
        """Wake the loop: from its idle wait, and from an engine ``step`` that waits on other processes (``wake``)."""
        self._wake.set()
        wake = getattr(self.engine, "wake", None)
        if wake is not None:
            wake()

    # ---- the loop's thread ------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            self._drain_control()
            if not self.engine.has_unfinished():
                self._update_gauges()
                self._wake.wait(IDLE_WAIT_S)
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - any step failure ends the requests in it, never the server
                self.failure = f"engine step failed: {type(exc).__name__}: {exc}"
                self._fail_all(self.failure)
                continue
            for out in outputs:
                self._deliver(out)
            self._expire()
            self._update_gauges()
        self._drain_control()
        self._fail_all("the server is shutting down")

    def _drain_control(self) -> None:
        while True:
            try:
                kind, payload = self._control.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._add(*payload)
            else:
                self._end(payload, "abort", None, engine_abort=True)

    def _add(self, request_id: str, prompt: dict[str, Any], params: SamplingParams,
             sink: Callable[[TokenEvent], None], received_s: float) -> None:
        holdback = max((len(s) for s in params.stop or []), default=1) - 1
        live = _Live(sink, received_s, received_s + self.request_timeout_s, holdback, list(params.stop or []),
                     TextDecoder(self.tokenizer) if self.tokenizer is not None else None,
                     prompt_tokens=len(prompt["prompt_token_ids"]))
        self._live[request_id] = live
        try:
            self.engine.add_request(prompt, params, request_id=request_id)
        except Exception as exc:  # noqa: BLE001 - a request the engine refuses fails alone
            self._end(request_id, "error", f"{type(exc).__name__}: {exc}", engine_abort=False)
            return
        self.metrics.prompt_tokens.inc(live.prompt_tokens)

    def _deliver(self, out: RequestOutput) -> None:
        live = self._live.get(out.request_id)
        if live is None:
            return
        now = time.perf_counter()
        new_tokens = out.token_ids[live.sent_tokens:]
        for _ in new_tokens:
            if live.last_token_s is None:
                self.metrics.ttft_s.observe(now - live.received_s)
            else:
                self.metrics.itl_s.observe(now - live.last_token_s)
            live.last_token_s = now
        if new_tokens:
            self.metrics.generation_tokens.inc(len(new_tokens))
        live.sent_tokens = len(out.token_ids)
        full = self._text(live, out)
        if out.finished:
            visible = len(full)
        else:  # hold back what a stop string or an unfinished character may still change
            visible = max(live.sent_chars, len(full.rstrip(REPLACEMENT_CHAR)) - live.holdback_chars)
        text = full[live.sent_chars:visible]
        live.sent_chars = max(live.sent_chars, visible)
        if out.finished:
            if out.metrics is not None and out.metrics.kv_transfer_bytes:
                self.metrics.kv_transfer_bytes.inc(out.metrics.kv_transfer_bytes)
            if out.num_cached_tokens:
                self.metrics.prefix_cache_hit_tokens.inc(out.num_cached_tokens)
            if out.metrics is not None and out.metrics.kv_reused_tokens:
                self.metrics.decode_kv_reused_tokens.inc(out.metrics.kv_reused_tokens)
            if out.finish_reason == "error" or out.error:
                self._end(out.request_id, "error", out.error or "the request failed", engine_abort=False,
                          text=text, token_ids=new_tokens)
            else:
                self.metrics.e2e_s.observe(now - live.received_s)
                self._end(out.request_id, out.finish_reason or "stop", None, engine_abort=False, text=text,
                          token_ids=new_tokens)
        elif text or new_tokens:
            live.sink(TokenEvent(text, new_tokens, prompt_tokens=live.prompt_tokens,
                                 completion_tokens=live.sent_tokens))

    @staticmethod
    def _text(live: _Live, out: RequestOutput) -> str:
        """The output's text: the engine's, or decoded here from its token ids and cut at the first stop string."""
        if live.decoder is None:
            return out.text
        text = live.decoder.text(out.token_ids)
        hits = [text.find(s) for s in live.stop if s in text]
        return text[:min(hits)] if hits else text

    def _end(self, request_id: str, reason: str, error: Optional[str], engine_abort: bool, text: str = "",
             token_ids: Optional[list[int]] = None) -> None:
        live = self._live.pop(request_id, None)
        if live is None:
            return
        if engine_abort:
            self.engine.abort(request_id)
        self.engine.release(request_id)
        with self._lock:
            self._accepted -= 1
        self.metrics.requests_finished.labels(reason).inc()
        live.sink(TokenEvent(text, token_ids or [], True, reason, error, live.prompt_tokens, live.sent_tokens))

    def _fail_all(self, error: str) -> None:
        for request_id in list(self._live):
            try:
                self.engine.abort(request_id)
            except Exception:  # noqa: BLE001 - the engine may be what broke; the request ends anyway
                pass
            self._end(request_id, "error", error, engine_abort=False)

    def _expire(self) -> None:
        now = time.perf_counter()
        for request_id in [rid for rid, live in self._live.items() if now > live.deadline_s]:
            self.engine.abort(request_id)
            self._end(request_id, "timeout", f"the request ran past its deadline of {self.request_timeout_s:g} s",
                      engine_abort=False)

    def _update_gauges(self) -> None:
        scheduler = getattr(self.engine, "scheduler", None)
        running = scheduler.num_running if scheduler is not None else len(self._live)
        self.metrics.running.set(running)
        self.metrics.waiting.set(max(0, self._accepted - running))
        router = getattr(self.engine, "router", None)
        predicted = getattr(router, "predicted_hit_rate", None)
        if predicted is not None:
            self.metrics.router_predicted_hit_rate.set(predicted)
        predicted_decode = getattr(router, "predicted_decode_reuse_rate", None)
        if predicted_decode is not None:
            self.metrics.router_predicted_decode_reuse_rate.set(predicted_decode)
        if self.kv_blocks is not None:
            for worker, (free, total) in self.kv_blocks().items():
                self.metrics.kv_free_blocks.labels(worker).set(free)
                self.metrics.kv_total_blocks.labels(worker).set(total)
