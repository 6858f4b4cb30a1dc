"""The steppable colocated engine: requests in, one scheduled step at a time, outputs out."""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from minidisagg.config import EngineConfig
from minidisagg.engine.clock import Clock, WallClock
from minidisagg.engine.step_cost import StepShape
from minidisagg.engine.runner import ModelRunner
from minidisagg.engine.sampling import SamplingParams, make_generator
from minidisagg.engine.scheduler import Policy, Scheduler, StepBudget, StopRules
from minidisagg.engine.sequence import Sequence, SequenceState
from minidisagg.engine.text_decoder import TextDecoder
from minidisagg.kv.block_manager import BlockManager
from minidisagg.kv.cache import PagedKVCache
from minidisagg.metrics import RequestMetrics, RequestTimeline
from minidisagg.models.registry import LoadedModel
from minidisagg.stages.async_decode import AsyncDecodeStage
from minidisagg.stages.base import Stage, StageResult, planned_runs
from minidisagg.stages.decode import DecodeStage
from minidisagg.stages.prefill import PrefillStage

CPU_KV_BUDGET_BYTES = 512 * 2**20
CUDA_KV_FRACTION_OF_FREE = 0.6

PromptInput = str | list[int] | dict[str, Any]


@dataclass
class RequestOutput:
    """A request's result so far (vLLM-shaped). ``metrics`` is set once it has finished."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: Optional[str]
    metrics: Optional[RequestMetrics]
    timeline: RequestTimeline
    num_preemptions: int = 0
    error: Optional[str] = None  # why a request failed (finish_reason "error")
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache, not computed


@dataclass(frozen=True)
class StepRecord:
    """One stage run inside one engine step: what ran, for how long, when it ended (engine clock)."""

    stage: str
    num_seqs: int
    num_tokens: int
    elapsed_s: float  # what the engine clock charged (a calibrated cost on a SimulatedClock with a cost model)
    end_s: float
    measured_s: float = float("nan")  # the run's own wall time


@dataclass
class EngineStats:
    """Counters the labs read: steps, stage time, preemptions, KV pool occupancy."""

    steps: list[StepRecord] = field(default_factory=list)
    num_preemptions: int = 0


def validate_prompt(prompt: PromptInput, tokenizer: Callable[[], Any], vocab_size: int,
                    max_model_len: int) -> tuple[Optional[str], list[int]]:
    """Turn a string or ``{"prompt_token_ids": [...]}`` into (text, ids); ValueError says what is wrong.

    Token ids must be Python ints (not bools) in ``[0, vocab_size)``.
    """
    if isinstance(prompt, str):
        text, raw = prompt, tokenizer().encode(prompt)
    elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
        text, raw = prompt.get("prompt"), prompt["prompt_token_ids"]
        if text is not None and not isinstance(text, str):
            raise ValueError(f"a prompt's 'prompt' text must be a string or None, got {type(text).__name__}")
    elif isinstance(prompt, (list, tuple)):
        text, raw = None, prompt
    else:
        raise ValueError(f"a prompt must be a string, a list of token ids or {{'prompt_token_ids': [...]}}, "
                         f"got {type(prompt).__name__}")
    if not isinstance(raw, (list, tuple)):
        raise ValueError(f"prompt_token_ids must be a list of integers, got {type(raw).__name__}")
    ids = list(raw)
    if not ids:
        raise ValueError("the prompt is empty: it needs at least one token")
    bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt_token_ids: token ids must be integers (not bools) in [0, {vocab_size}); got {bad[:5]!r}")
    if len(ids) >= max_model_len:
        raise ValueError(
            f"the prompt has {len(ids)} tokens; this engine's context is {max_model_len} tokens "
            f"(prompt plus at least one generated token)"
        )
    return text, ids


def default_num_blocks(loaded: LoadedModel, config: EngineConfig) -> int:
    """Pool size: the configured count or budget, else 512 MiB on CPU or 60% of free GPU memory."""
    dtype_bytes = torch.tensor([], dtype=loaded.model.dtype).element_size()
    if loaded.model.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(loaded.model.device)
        default_budget = int(free * CUDA_KV_FRACTION_OF_FREE)
    else:
        default_budget = CPU_KV_BUDGET_BYTES
    return config.cache.resolve_num_blocks(loaded.config, dtype_bytes, default_budget)


class LLMEngine:
    """Continuous-batching engine over one model and one KV pool.

    ``add_request`` queues work (optionally arriving later on the engine clock); each
    ``step`` admits arrivals, asks the scheduler for a plan and runs the prefill and decode
    stages. Pass ``prefill_stage`` / ``decode_stage`` (a ``Stage`` subclass) to replace a phase.
    With asynchronous scheduling the stock ``DecodeStage`` becomes an ``AsyncDecodeStage``.

    The scheduler owns the queues and the stopping rules: the engine runs what it plans and
    hands it the sampled tokens (``Scheduler.update_from_output``).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig = EngineConfig(),
        clock: Optional[Clock] = None,
        policy: Policy | str | None = None,
        prefill_stage: type[Stage] = PrefillStage,
        decode_stage: type[Stage] = DecodeStage,
    ) -> None:
        self.loaded = loaded
        self.model_config = loaded.config
        self.config = config
        self.clock: Clock = clock or WallClock()
        self.max_model_len = min(config.max_model_len or loaded.config.max_position, loaded.config.max_position)
        num_blocks = default_num_blocks(loaded, config)
        self.kv_cache = PagedKVCache(loaded.config, num_blocks, config.cache.block_size, loaded.model.dtype,
                                     loaded.model.device, config.cache.layout)
        self.blocks = BlockManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.runner = ModelRunner(loaded.model, self.kv_cache, config.batch_invariant, cuda_graphs=config.cuda_graphs,
                                  max_model_len=self.max_model_len, max_num_seqs=config.max_num_seqs,
                                  async_scheduling=config.async_scheduling, compile_cpu=config.compile_cpu,
                                  native_cpu_decode=config.native_cpu_decode)
        if config.prefill_cuda_graphs and config.cuda_graphs and self.runner.decode_graphs is not None:
            self.runner.enable_prefill_graphs()
        if self.runner.async_scheduling and decode_stage is DecodeStage:
            decode_stage = AsyncDecodeStage
        self.prefill_stage: Stage = prefill_stage(self.runner)
        self.decode_stage: Stage = decode_stage(self.runner)
        budget = StepBudget(config.max_num_seqs, config.max_num_batched_tokens)
        stop = StopRules(frozenset(loaded.config.eos_token_ids), self.max_model_len, self._stop_string_hit)
        self.scheduler = Scheduler(policy or config.policy, budget, self.blocks, stop=stop,
                                   lookahead_tokens=1 if isinstance(self.decode_stage, AsyncDecodeStage) else 0)
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._pending: list[tuple[float, int, Sequence]] = []
        self._seqs: dict[str, Sequence] = {}
        # Disaggregation hook: when set, a sequence whose prefill completed (and that is not
        # finished) is handed to this callback with its blocks still owned, instead of decoding here.
        self.handoff: Optional[Callable[[Sequence], None]] = None

    # ---- requests -------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptInput) -> tuple[Optional[str], list[int]]:
        """Turn a string or ``{"prompt_token_ids": [...]}`` into (text, ids), validating it."""
        text, ids = validate_prompt(prompt, lambda: self.loaded.tokenizer, self.model_config.vocab_size,
                                    self.max_model_len)
        if len(ids) + 1 > self.blocks.capacity_tokens:
            raise ValueError(
                f"the prompt has {len(ids)} tokens but the KV pool holds only {self.blocks.capacity_tokens}; "
                f"raise CacheConfig(num_blocks=...) or memory_budget_bytes"
            )
        return text, ids

    def add_request(
        self,
        prompt: PromptInput,
        params: Optional[SamplingParams] = None,
        arrival_time: Optional[float] = None,
        request_id: Optional[str] = None,
    ) -> str:
        """Queue a request; with ``arrival_time`` (engine clock seconds) it becomes visible only then."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.verify()  # its fields may have changed since construction; a bad seed would fail in torch below
        text, ids = self.tokenize_prompt(prompt)
        seq_id = next(self._ids)
        request_id = request_id if request_id is not None else str(seq_id)
        if request_id in self._seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        arrival = self.clock.now() if arrival_time is None else float(arrival_time)
        if not math.isfinite(arrival):  # the step loop waits until the earliest arrival: NaN or inf would wedge it
            raise ValueError(f"arrival_time must be a finite number of seconds, got {arrival_time!r}")
        seq = Sequence(seq_id, request_id, ids, params, RequestTimeline(arrival_s=arrival), prompt=text,
                       blocks=self.blocks, generator=make_generator(params, self.loaded.model.device))
        self._seqs[request_id] = seq
        heapq.heappush(self._pending, (arrival, seq_id, seq))
        return request_id

    def sequence(self, request_id: str) -> Sequence:
        """The live sequence of a request (KeyError if unknown or released)."""
        return self._seqs[request_id]

    def abort(self, request_id: str) -> None:
        """Stop a request now; its blocks return to the pool."""
        seq = self._seqs.get(request_id)
        if seq is None or seq.is_finished:
            return
        self._pending = [p for p in self._pending if p[2] is not seq]
        heapq.heapify(self._pending)
        self.scheduler.finish(seq, "abort")
        seq.timeline.finish_s = self.clock.now()

    def capture_cuda_graphs(self) -> int:
        """Capture every decode (and prefill, if enabled) CUDA graph bucket now; returns how many (0 without graphs).

        Graphs are otherwise captured the first time a batch size needs one, which stalls that
        step for a while; servers capture them all at start, so no request pays for a capture.
        """
        graphs = self.runner.decode_graphs
        if graphs is None:
            return 0
        graphs.capture_all()
        prefill = self.runner.prefill_graphs
        if prefill is not None:
            prefill.capture_all()
        return len(graphs.captured_batch_sizes) + (len(prefill.captured_buckets) if prefill is not None else 0)

    def request_ids(self) -> list[str]:
        """Ids of every request this engine holds (pending, waiting, running, or finished and not released)."""
        return list(self._seqs)

    def has_unfinished(self) -> bool:
        """Whether any request is pending, waiting or running."""
        return bool(self._pending) or self.scheduler.has_work()

    def live_request_ids(self) -> list[str]:
        """Requests the engine still holds: queued, running, or finished and not yet released."""
        return list(self._seqs)

    # ---- the step loop ----------------------------------------------------------------------
    def _admit_arrivals(self) -> None:
        now = self.clock.now()
        while self._pending and self._pending[0][0] <= now:
            _, _, seq = heapq.heappop(self._pending)
            if not seq.is_finished:
                self.scheduler.add(seq)

    def step(self) -> list[RequestOutput]:
        """Run one scheduling iteration; returns outputs of requests that got a token or finished."""
        self._admit_arrivals()
        if not self.scheduler.has_work():
            if not self._pending:
                return []
            self.clock.wait_until(self._pending[0][0])
            self._admit_arrivals()
        plan = self.scheduler.schedule()
        touched: dict[int, Sequence] = {}
        for stage, work in planned_runs(plan, self.prefill_stage, self.decode_stage, self.clock.now()):
            if work:
                shape = StepShape.of_work(stage.name, work)
                result = stage.run(work)
                charged_s = self.clock.charge(shape, result.elapsed_s)
                self._apply(stage, result, touched, charged_s)
        for seq in self.scheduler.drain_finished():
            seq.timeline.finish_s = self.clock.now() if seq.timeline.finish_s is None else seq.timeline.finish_s
            touched[seq.seq_id] = seq
        self.stats.num_preemptions = self.scheduler.num_preemptions
        return [self.output_of(s) for s in touched.values()]

    def _apply(self, stage: Stage, result: StageResult, touched: dict[int, Sequence], charged_s: float) -> None:
        t = self.clock.now()
        self.stats.steps.append(StepRecord(stage.name, len(result.seqs), result.num_tokens, charged_s, t,
                                           result.elapsed_s))
        update = self.scheduler.update_from_output(result.seqs, result.new_token_ids, t,
                                                   hand_off=self.handoff is not None)
        for seq in update.touched:
            touched[seq.seq_id] = seq
        for seq in update.handed_off:
            self.handoff(seq)

    def _stop_string_hit(self, seq: Sequence) -> bool:
        """Whether the sequence's text now holds one of its stop strings (the scheduler's stopping rules ask)."""
        return self._stop_string_at(seq) is not None

    def _text_of(self, seq: Sequence) -> str:
        """The sequence's output text (special tokens skipped), decoding only what is new since last time."""
        if seq.text_decoder is None:
            seq.text_decoder = TextDecoder(self.loaded.tokenizer)
        return seq.text_decoder.text(seq.output_token_ids)

    def _stop_string_at(self, seq: Sequence) -> Optional[int]:
        text = self._text_of(seq)
        hits = [text.find(s) for s in seq.params.stop or [] if s in text]
        return min(hits) if hits else None

    def output_of(self, seq: Sequence) -> RequestOutput:
        """The request's current ``RequestOutput``."""
        text = ""
        if self.loaded.has_tokenizer_loaded:
            text = self._text_of(seq)
            cut = self._stop_string_at(seq) if seq.params.stop else None
            text = text if cut is None else text[:cut]
        metrics = None
        if seq.is_finished and seq.output_token_ids:
            metrics = RequestMetrics.from_timeline(seq.timeline)
        return RequestOutput(seq.request_id, seq.prompt, list(seq.prompt_token_ids), text, list(seq.output_token_ids),
                             seq.is_finished, seq.finish_reason, metrics, seq.timeline, seq.num_preemptions,
                             num_cached_tokens=seq.num_cached_tokens or 0)

    def release(self, request_id: str) -> None:
        """Forget a finished request (the LLM front end calls this after returning its output)."""
        seq = self._seqs.get(request_id)
        if seq is not None and seq.is_finished:
            del self._seqs[request_id]

    # ---- disaggregation: hand a prefilled sequence over, or take one in ------------------------
    def release_handed_off(self, seq: Sequence) -> None:
        """The decode side holds this sequence now: free its blocks here and forget it."""
        self.scheduler.release_handed_off(seq)
        self._seqs.pop(seq.request_id, None)

    def reserve(self, key: str, num_tokens: int, cached_blocks: tuple[int, ...] = ()) -> Optional[list[int]]:
        """Reserve blocks for ``num_tokens`` incoming tokens under ``key``; None when the pool is too full.

        ``cached_blocks``: prefix-cached blocks holding the leading tokens' KV, shared at its head.
        """
        if num_tokens + 1 > self.blocks.capacity_tokens:
            raise ValueError(f"{num_tokens} tokens can never fit this KV pool ({self.blocks.capacity_tokens} slots)")
        # Leave a block of headroom per running sequence, so incoming KV does not starve their growth.
        headroom = self.scheduler.num_running
        needed = self.blocks.blocks_needed(num_tokens) - len(cached_blocks)
        if self.blocks.block_table(key) or needed + headroom > self.blocks.num_free_blocks:
            return None
        # A decode step queued ahead may still write KV into blocks freed since (by a sequence that
        # stopped): let it finish before another writer, on another stream, receives into them.
        self.decode_stage.settle()
        if cached_blocks:
            table = self.blocks.share_prefix(key, cached_blocks, num_tokens, spare_blocks=headroom)
            return None if table is None else list(table)
        return list(self.blocks.grow(key, num_tokens))

    def cancel_reservation(self, key: str) -> int:
        """Return a reservation's blocks to the pool; returns how many."""
        return self.blocks.free(key)

    def adopt(self, state: SequenceState, key: str) -> Sequence:
        """Continue a sequence prefilled elsewhere whose KV now sits in the blocks reserved under ``key``.

        ValueError, before anything changes, when the state cannot be continued here: a token id
        outside the vocabulary, no first token, more tokens than the context, a reservation too
        small for the KV of every token but the last, or malformed sampling/timeline/generator state.
        """
        rid = state.request_id
        if not isinstance(rid, str) or not rid:
            raise ValueError(f"a handed-off sequence needs a non-empty string request id, got {rid!r}")
        if rid in self._seqs:
            raise ValueError(f"request id {rid!r} is already in use")
        vocab_size = self.model_config.vocab_size
        for name, ids in (("prompt_token_ids", state.prompt_token_ids), ("output_token_ids", state.output_token_ids)):
            if not isinstance(ids, list) or any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size
                                                for t in ids):
                raise ValueError(f"request {rid}: {name} must be a list of token ids in [0, {vocab_size})")
        if not state.prompt_token_ids:
            raise ValueError(f"request {rid}: the prompt is empty")
        if not state.output_token_ids:
            raise ValueError(f"request {rid}: a handed-off sequence must carry its first token")
        num_tokens = len(state.prompt_token_ids) + len(state.output_token_ids)
        if num_tokens >= self.max_model_len:
            raise ValueError(f"request {rid}: {num_tokens} tokens do not leave room to decode in this engine's "
                             f"context of {self.max_model_len} tokens")
        num_computed_tokens = num_tokens - 1  # every token's KV but the newest one's
        if self.blocks.blocks_needed(num_computed_tokens) > len(self.blocks.block_table(key)):
            raise ValueError(f"request {rid}: reservation {key!r} is too small for its KV")
        if not self.blocks.holds_prefix_of(key, state.prompt_token_ids):  # the blocks shared from the prefix cache
            raise ValueError(f"request {rid}: the cached blocks its reservation shares hold another prompt's KV")
        try:
            params, timeline = state.sampling_params(), state.restore_timeline()
        except (TypeError, ValueError) as exc:  # unknown fields, bad values
            raise ValueError(f"request {rid}: malformed sequence state: {exc}") from None
        try:
            generator = state.restore_generator(self.loaded.model.device)
        except (TypeError, ValueError, RuntimeError) as exc:  # not base64, or not a state of this device's generator
            raise ValueError(f"request {rid}: generator_state_b64 cannot be restored here: {exc}") from None
        seq = Sequence(next(self._ids), rid, list(state.prompt_token_ids), params, timeline, prompt=state.prompt,
                       output_token_ids=list(state.output_token_ids), num_computed_tokens=num_computed_tokens,
                       blocks=self.blocks, generator=generator, num_cached_tokens=state.num_cached_tokens)
        self.blocks.rename(key, seq.seq_id)
        self.scheduler.adopt(seq)
        self._seqs[seq.request_id] = seq
        return seq
