"""``LLM``: the vLLM-shaped front door: load a model, generate from prompts or chats."""

from __future__ import annotations

import os
import sys
from typing import Any, Optional, Sequence as Seq

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from minidisagg.config import CacheConfig, EngineConfig
from minidisagg.disagg.cluster import DisaggCluster
from minidisagg.engine.clock import Clock
from minidisagg.engine.llm_engine import LLMEngine, PromptInput, RequestOutput
from minidisagg.engine.sampling import SamplingParams
from minidisagg.engine.scheduler import Policy
from minidisagg.models.registry import load_model
from minidisagg.models.tokenizer import Tokenizer
from minidisagg.stages.base import Stage
from minidisagg.stages.decode import DecodeStage
from minidisagg.stages.prefill import PrefillStage

PROGRESS_MIN_REQUESTS = 8
Message = dict[str, str]


def _show_progress() -> bool:
    return sys.stderr.isatty() or "JPY_PARENT_PID" in os.environ or "ipykernel" in sys.modules


class LLM:
    """Load a model and serve requests, colocated (one engine) or disaggregated (prefill and decode workers).

    Disaggregated worker processes (``transport="socket"`` or ``"dist"``) can be pinned, one
    device per worker: ``prefill_devices=["cuda:0"], decode_devices=["cuda:1"]``. ``worker_threads`` sets
    their torch CPU threads (0: torch's default). ``async_scheduling`` queues each decode step
    on the device before the previous step's tokens reach the host (None: where decode runs by CUDA
    graphs). ``compile_cpu=True`` runs batch-1 decode of a float32 or bfloat16 CPU model through one
    ``torch.compile`` graph (a C++ compiler is needed; without one it stays eager). ``native_cpu_decode``
    (on by default) runs the same batch-1 CPU steps through one C++ op, the eager engine's ops with no
    Python between them (built once with the C++ compiler; without one the engine stays in Python). ``kv_layout``
    picks how the KV pool sits in memory (``PagedKVCache``: ``"layer_major"``, the CPU default, or
    ``"block_major"``, the CUDA default, whose request pages cross a ``dist`` link without a copy).
    ``kv_overlap=True`` sends each layer's KV while later layers are still computing; it is off by
    default because sending after the prefill gave as much goodput or more in this engine's two-GPU
    runs (``benchmarks/NOTES.md``; lab 5 shows when overlap would win: a slow link, a long prefill).

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
        batch_invariant: bool = False,
        cuda_graphs: bool = True,
        async_scheduling: Optional[bool] = None,
        compile_cpu: bool = False,
        native_cpu_decode: bool = True,
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
        kv_overlap: bool = False,
        kv_failure_policy: str = "fail",
        request_timeout_s: float = 600.0,
        prefill_devices: Optional[Seq[str]] = None,
        decode_devices: Optional[Seq[str]] = None,
        worker_threads: int = 0,
    ) -> None:
        cache = CacheConfig(block_size=block_size, num_blocks=num_kv_blocks, memory_budget_bytes=kv_memory_budget_bytes,
                            layout=kv_layout)
        self.config = EngineConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            policy=policy if isinstance(policy, str) else getattr(policy, "__name__", "custom"),
            batch_invariant=batch_invariant,
            max_model_len=max_model_len,
            cache=cache,
            cuda_graphs=cuda_graphs,
            async_scheduling=async_scheduling,
            compile_cpu=compile_cpu,
            native_cpu_decode=native_cpu_decode,
        )
        if mode not in ("colocated", "disagg"):
            raise ValueError(f"mode must be 'colocated' or 'disagg', got {mode!r}")
        self.mode = mode
        remote = mode == "disagg" and transport != "inproc"  # workers load the weights themselves
        self.loaded = load_model(model, device=device, dtype=dtype, seed=seed, random_weights=random_weights,
                                 weights=not remote)
        self.engine: LLMEngine | DisaggCluster
        if mode == "colocated":
            self.engine = LLMEngine(self.loaded, self.config, clock=clock, policy=policy,
                                    prefill_stage=prefill_stage, decode_stage=decode_stage)
        else:
            self.engine = DisaggCluster(self.loaded, self.config, transport=transport, num_prefill=num_prefill,
                                        num_decode=num_decode, routing=routing, overlap=kv_overlap,
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

        A bad prompt raises ``ValueError`` before anything is queued, so no other request is lost.
        """
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        params = self._params_for(len(prompts), sampling_params)
        for p in prompts:
            self.engine.tokenize_prompt(p)  # validate all before queueing any
        ids = [self.engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: Seq[Message] | Seq[Seq[Message]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Apply the chat template to one conversation or a list of them, then generate."""
        if not messages:
            raise ValueError("chat() needs at least one message")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)  # type: ignore[list-item]
        tok = self.get_tokenizer()
        prompts: list[dict[str, Any]] = []
        for conv in conversations:
            for m in conv:  # type: ignore[union-attr]
                if not isinstance(m, dict) or "role" not in m or "content" not in m:
                    raise ValueError(f"each chat message must be a dict with 'role' and 'content', got {m!r}")
            ids = tok.apply_chat_template(list(conv), add_generation_prompt=True)  # type: ignore[arg-type]
            prompts.append({"prompt_token_ids": ids, "prompt": tok.apply_chat_template(list(conv), tokenize=False)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _params_for(self, n: int, sp: SamplingParams | Seq[SamplingParams] | None) -> list[SamplingParams]:
        if sp is None:
            return [SamplingParams() for _ in range(n)]
        if isinstance(sp, SamplingParams):
            return [sp] * n
        sp = list(sp)
        if len(sp) != n:
            raise ValueError(f"got {len(sp)} SamplingParams for {n} prompts")
        return sp

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
                for rid in wanted - done.keys():
                    self.engine.abort(rid)
                    self.engine.release(rid)
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
