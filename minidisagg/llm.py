"""``LLM``: the vLLM-shaped front door: load a model, generate from prompts or chats."""

from __future__ import annotations

import os
import sys
from typing import Any, Optional, Sequence as Seq

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from minidisagg.config import CacheConfig, EngineConfig, LinkConfig
from minidisagg.disagg.cluster import DisaggCluster
from minidisagg.engine.clock import Clock
from minidisagg.engine.llm_engine import LLMEngine, PromptInput, RequestOutput
from minidisagg.engine.sampling import SamplingParams
from minidisagg.engine.scheduler import Policy
from minidisagg.models.registry import load_model
from minidisagg.models.tokenizer import Tokenizer, TokenizerError, check_messages
from minidisagg.stages.base import Stage
from minidisagg.stages.decode import DecodeStage
from minidisagg.stages.prefill import PrefillStage
from minidisagg.transport.auth import LinkSecurity

PROGRESS_MIN_REQUESTS = 8
Message = dict[str, str]


def _show_progress() -> bool:
    return sys.stderr.isatty() or "JPY_PARENT_PID" in os.environ or "ipykernel" in sys.modules


def _prompt_list(prompts: object) -> list[PromptInput]:
    """One prompt (a string, a list of token ids, a dict) or a list of them, as a list of prompts."""
    if isinstance(prompts, (str, dict)):
        return [prompts]  # type: ignore[list-item]
    if isinstance(prompts, (list, tuple)):
        if prompts and isinstance(prompts[0], int):  # bools too: the prompt check then names them
            return [list(prompts)]
        return list(prompts)
    raise ValueError(f"prompts must be a string, a list of token ids, a {{'prompt_token_ids': [...]}} dict, or a "
                     f"list of these; got {type(prompts).__name__}")


def _params_for(n: int, sp: object) -> list[SamplingParams]:
    """One checked ``SamplingParams`` per prompt: none (the defaults), one for all, or a list of ``n``."""
    if sp is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(sp, SamplingParams):
        sp.verify()  # its fields may have been changed since construction
        return [sp] * n
    if not isinstance(sp, (list, tuple)):
        raise ValueError(f"sampling_params must be a SamplingParams or a list of them (one per prompt), "
                         f"got {type(sp).__name__}")
    if len(sp) != n:
        raise ValueError(f"sampling_params has {len(sp)} entries for {n} prompts; give one per prompt, or one "
                         f"SamplingParams for all")
    for i, p in enumerate(sp):
        if not isinstance(p, SamplingParams):
            raise ValueError(f"sampling_params[{i}] must be a SamplingParams, got {type(p).__name__}")
        try:
            p.verify()
        except ValueError as exc:
            raise ValueError(f"sampling_params[{i}]: {exc}") from exc
    return list(sp)


class LLM:
    """Load a model and serve requests, colocated (one engine) or disaggregated (prefill and decode workers).

    Disaggregated worker processes (``transport="socket"`` or ``"dist"``) can be pinned, one
    device per worker: ``prefill_devices=["cuda:0"], decode_devices=["cuda:1"]``. ``worker_threads`` sets
    their torch CPU threads (0: torch's default). ``async_scheduling`` queues each decode step
    on the device before the previous step's tokens reach the host (None: where decode runs by CUDA
    graphs). ``compile_cpu=True`` runs batch-1 decode of a float32 or bfloat16 CPU model through one
    ``torch.compile`` graph traced from the model's code (a C++ compiler is needed; without one it stays
    eager). ``native_cpu_decode=True`` turns on an opt-in accelerator: CPU decode steps through one C++
    op, a copy of the stock model's step (``minidisagg/accel``), which refuses to run, saying why, for a
    model whose code was changed. ``kv_layout``
    picks how the KV pool sits in memory (``PagedKVCache``: ``"layer_major"``, the CPU default, or
    ``"block_major"``, the CUDA default, whose request pages cross a ``dist`` link without a copy).
    ``enable_prefix_caching=True`` keeps full KV blocks after their request ends and reuses them for
    later prompts that start with the same tokens (``RequestOutput.num_cached_tokens`` says how many).
    ``routing`` (``mode="disagg"``) spreads requests over the workers: ``"round_robin"``,
    ``"least_loaded"``, or ``"cache_aware"`` (with prefix caching on: each prompt goes to the prefill
    worker likely to hold its longest prefix, balanced against load; ``disagg/prefix_index.py``).
    ``routing_load_weight`` sets that balance: ``0`` follows the cache alone, ``1`` (the default) counts a
    block of queued tokens as much as a block found cached.
    ``kv_overlap=True`` sends each layer's KV while later layers are still computing; it is off by
    default because sending after the prefill gave as much goodput or more in this engine's two-GPU
    runs (``benchmarks/NOTES.md``; lab 5 shows when overlap would win: a slow link, a long prefill).
    ``workers`` (``mode="disagg"``) connects to worker processes already running, on this host or
    others (``prefill=p0@HOST:PORT,...;decode=d0@HOST:PORT,...``, the router's ``--peers``), proving
    ``worker_security`` (their secret) to them, instead of launching its own. ``kv_wire_dtype``
    (``mode="disagg"``) is how KV pages travel from prefill to decode: ``"auto"`` in the pool's
    dtype, ``"int8"`` or ``"fp8_e4m3"`` quantised with a scale per block, KV head, channel and token (``kv/wire_quant.py``);
    the pools stay in the model's dtype.

    >>> llm = LLM("smollm2-135m")
    >>> llm.chat([{"role": "user", "content": "What is the capital of France?"}],
    ...          SamplingParams(temperature=0, max_tokens=16))[0].text
    'The capital of France is Paris.'
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        device: str = "auto",
        dtype: str | torch.dtype = "auto",
        *,
        policy: Policy | str = "prefill_first",
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_model_len: Optional[int] = None,
        block_size: int = 16,
        num_kv_blocks: Optional[int] = None,
        kv_memory_budget_bytes: Optional[int] = None,
        kv_layout: Optional[str] = None,
        enable_prefix_caching: bool = False,
        batch_invariant: bool = False,
        cuda_graphs: bool = True,
        prefill_cuda_graphs: bool = False,
        async_scheduling: Optional[bool] = None,
        compile_cpu: bool = False,
        native_cpu_decode: bool = False,
        random_weights: bool = False,
        seed: int = 0,
        clock: Optional[Clock] = None,
        prefill_stage: type[Stage] = PrefillStage,
        decode_stage: type[Stage] = DecodeStage,
        mode: str = "colocated",
        transport: str = "inproc",
        num_prefill: int = 1,
        num_decode: int = 1,
        routing: str = "round_robin",
        routing_load_weight: float = 1.0,
        kv_overlap: bool = False,
        kv_failure_policy: str = "fail",
        request_timeout_s: float = 600.0,
        prefill_devices: Optional[Seq[str]] = None,
        decode_devices: Optional[Seq[str]] = None,
        worker_threads: int = 0,
        workers: Optional[str] = None,
        worker_security: Optional[LinkSecurity] = None,
        kv_wire_dtype: str = "auto",
    ) -> None:
        cache = CacheConfig(block_size=block_size, num_blocks=num_kv_blocks, memory_budget_bytes=kv_memory_budget_bytes,
                            layout=kv_layout, enable_prefix_caching=enable_prefix_caching)
        self.config = EngineConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            policy=policy if isinstance(policy, str) else getattr(policy, "__name__", "custom"),
            batch_invariant=batch_invariant,
            max_model_len=max_model_len,
            cache=cache,
            cuda_graphs=cuda_graphs,
            prefill_cuda_graphs=prefill_cuda_graphs,
            async_scheduling=async_scheduling,
            compile_cpu=compile_cpu,
            native_cpu_decode=native_cpu_decode,
            link=LinkConfig(kv_wire_dtype=kv_wire_dtype),
        )
        if mode not in ("colocated", "disagg"):
            raise ValueError(f"mode must be 'colocated' or 'disagg', got {mode!r}")
        if kv_wire_dtype != "auto" and (mode != "disagg" or workers is not None):
            raise ValueError("kv_wire_dtype applies to the KV links of mode='disagg' workers this LLM starts; "
                             "workers already running take it from their own --kv-wire-dtype")
        self.mode = mode
        if workers is not None and mode != "disagg":
            raise ValueError("workers= names disaggregated worker processes: give mode='disagg' with it")
        remote = mode == "disagg" and (transport != "inproc" or workers is not None)  # workers load the weights
        self.loaded = load_model(model, device=device, dtype=dtype, seed=seed, random_weights=random_weights,
                                 weights=not remote)
        self.engine: LLMEngine | DisaggCluster
        if workers is not None:
            from minidisagg.disagg.router_server import RemoteCluster, parse_router_peers

            self.engine = RemoteCluster(self.loaded, self.config, *parse_router_peers(workers), routing=routing,
                                        routing_load_weight=routing_load_weight,
                                        kv_failure_policy=kv_failure_policy, request_timeout_s=request_timeout_s,
                                        security=worker_security)
        elif mode == "colocated":
            self.engine = LLMEngine(self.loaded, self.config, clock=clock, policy=policy,
                                    prefill_stage=prefill_stage, decode_stage=decode_stage)
        else:
            self.engine = DisaggCluster(self.loaded, self.config, transport=transport, num_prefill=num_prefill,
                                        num_decode=num_decode, routing=routing, overlap=kv_overlap,
                                        routing_load_weight=routing_load_weight,
                                        kv_failure_policy=kv_failure_policy, request_timeout_s=request_timeout_s,
                                        model_ref=model, prefill_devices=prefill_devices,
                                        decode_devices=decode_devices, worker_threads=worker_threads)

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self.loaded.device

    def get_tokenizer(self) -> Tokenizer:
        """The model's tokenizer (``encode``, ``decode``, ``apply_chat_template``)."""
        return self.loaded.tokenizer

    def generate(
        self,
        prompts: PromptInput | Seq[PromptInput],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order.

        Every prompt and every ``SamplingParams`` is checked before anything is queued: a bad one
        raises ``ValueError`` naming it, and the engine is left as it was (no request queued, no KV
        block taken). Should queueing still fail midway, the requests already queued are aborted.
        """
        batch = _prompt_list(prompts)
        params = _params_for(len(batch), sampling_params)
        vocab_size = self.loaded.config.vocab_size
        for i, sp in enumerate(params):
            if sp.stop_token_ids and max(sp.stop_token_ids) >= vocab_size:
                raise ValueError(f"sampling_params[{i}].stop_token_ids must be token ids below the vocabulary size "
                                 f"{vocab_size}, got {sp.stop_token_ids!r:.80}")
        checked = [self._checked_prompt(i, p) for i, p in enumerate(batch)]
        return self._run(self._queue(checked, params), use_tqdm)

    def chat(
        self,
        messages: Seq[Message] | Seq[Seq[Message]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Apply the chat template to one conversation or a list of them, then generate.

        Each message must be ``{"role": str, "content": str}``; a bad one raises ``ValueError``
        naming it, before anything is queued.
        """
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError(f"chat() needs a conversation (a list of {{'role': ..., 'content': ...}} dicts) or a "
                             f"list of conversations, got {messages!r:.80}")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        for i, conv in enumerate(conversations):  # all checked before the tokenizer is even loaded
            try:
                check_messages(conv)
            except TokenizerError as exc:
                raise ValueError(f"conversation {i}: {exc}" if len(conversations) > 1 else str(exc)) from exc
        tok = self.get_tokenizer()
        prompts: list[dict[str, Any]] = []
        for i, conv in enumerate(conversations):
            try:
                ids = tok.apply_chat_template(list(conv), add_generation_prompt=True)  # type: ignore[arg-type]
                text = tok.apply_chat_template(list(conv), tokenize=False)  # type: ignore[arg-type]
            except TokenizerError as exc:
                raise ValueError(f"conversation {i}: {exc}") from exc
            prompts.append({"prompt_token_ids": ids, "prompt": text})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _checked_prompt(self, index: int, prompt: PromptInput) -> dict[str, Any]:
        """The prompt validated and tokenized once, in the form ``add_request`` takes without redoing it."""
        try:
            text, ids = self.engine.tokenize_prompt(prompt)
        except ValueError as exc:
            raise ValueError(f"prompt {index}: {exc}") from exc
        return {"prompt_token_ids": ids, "prompt": text}

    def _queue(self, prompts: list[dict[str, Any]], params: list[SamplingParams]) -> list[str]:
        """Queue every request, or none: a failure midway aborts and forgets those already queued."""
        queued: list[str] = []
        try:
            for prompt, sp in zip(prompts, params):
                queued.append(self.engine.add_request(prompt, sp))
        except BaseException:
            self._drop(queued)
            raise
        return queued

    def _drop(self, request_ids: Seq[str]) -> None:
        for rid in request_ids:
            self.engine.abort(rid)
            self.engine.release(rid)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        wanted = set(request_ids)
        show = use_tqdm and len(request_ids) >= PROGRESS_MIN_REQUESTS and _show_progress()
        columns = (TextColumn("generate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, disable=not show, transient=True) as progress:
            task = progress.add_task("generate", total=len(request_ids))
            try:
                while len(done) < len(wanted):
                    for out in self.engine.step():
                        if out.finished and out.request_id in wanted:
                            done[out.request_id] = out
                            self.engine.release(out.request_id)
                            progress.advance(task)
            except BaseException:
                self._drop([rid for rid in request_ids if rid not in done])
                raise
        return [done[r] for r in request_ids]

    def shutdown(self) -> None:
        """Stop every worker this LLM started (disaggregated mode); safe to call twice."""
        if isinstance(getattr(self, "engine", None), DisaggCluster):
            self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
