"""Lab 7 support code: prefix hits of a multi-turn chat, cache-aware routing, a lossy KV wire, and the references
of the lab's three tasks (the routing choice is the engine's own ``CacheAwareIndex``'s).

Every measurement runs the real engine: two engines (or two clusters) side by side, taking turns request by
request so that the host's load falls on both alike. The break-even arithmetic is lab 5's
(``course/reuse_break_even.py``).
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from minidisagg.config import CacheConfig, EngineConfig
from minidisagg.disagg.cluster import DisaggCluster
from minidisagg.disagg.prefix_index import CacheAwareIndex, prompt_block_keys
from minidisagg.engine.llm_engine import LLMEngine, RequestOutput
from minidisagg.engine.sampling import SamplingParams
from minidisagg.engine.steppable import run_one, run_one_on_thread
from minidisagg.kv.wire_quant import WireMessage
from minidisagg.models.registry import LoadedModel

FIRST_TOKEN_ONLY = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
TIMEOUT_S = 600.0
INT8_QMAX = 127.0
CHAT_SYSTEM = "You are a friendly cooking assistant. Answer every question in one or two short sentences."
CHAT_TURNS = ("How do I boil an egg?", "And if I want the yolk soft?", "Can I cook eggs in a microwave?",
              "What about poaching them instead?", "How do I keep a poached egg warm?",
              "Suggest a quick breakfast with eggs.")


def serve_one(engine: LLMEngine, prompt_ids: Sequence[int], params: SamplingParams = FIRST_TOKEN_ONLY) -> RequestOutput:
    """Run one request alone to its end, the engine stepped on a thread of its own; its output."""
    return run_one_on_thread(engine, {"prompt_token_ids": list(prompt_ids)}, params, timeout_s=TIMEOUT_S)


# ---------------------------------------------------------------- 1. a multi-turn chat


@dataclass(frozen=True)
class ChatTurn:
    """One turn of the chat, served by an engine with prefix caching and one without."""

    turn: int
    prompt_ids: tuple[int, ...]
    cached_tokens: int
    ttft_cached_s: float
    ttft_plain_s: float
    same_first_token: bool

    @property
    def prompt_tokens(self) -> int:
        """The prompt's length in tokens (the whole history so far)."""
        return len(self.prompt_ids)

    @property
    def hit_rate(self) -> float:
        """Prompt tokens found in the prefix cache over the prompt's tokens."""
        return self.cached_tokens / self.prompt_tokens


def chat_prompt(loaded: LoadedModel, system: str, history: Sequence[tuple[str, str]], user: str) -> list[int]:
    """Token ids of the whole conversation so far (every earlier turn resent) ending in the new user turn."""
    messages = [{"role": "system", "content": system}]
    for asked, answered in history:
        messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
    messages.append({"role": "user", "content": user})
    return list(loaded.tokenizer.apply_chat_template(messages))


def run_chat(loaded: LoadedModel, user_turns: Sequence[str] = CHAT_TURNS, system: str = CHAT_SYSTEM,
             reply_tokens: int = 12, block_size: int = 16) -> list[ChatTurn]:
    """A chat whose every turn resends the history, served turn by turn by a caching and a plain engine.

    Both engines get the same prompts (the history holds the caching engine's replies, greedy); each
    turn they take turns, in alternating order. Both are warmed up first on an unrelated prompt.
    """
    engines = {on: LLMEngine(loaded, EngineConfig(cache=CacheConfig(block_size=block_size, num_blocks=256,
                                                                    enable_prefix_caching=on)))
               for on in (True, False)}
    warm = loaded.tokenizer.encode("Warm-up: a short unrelated prompt, served once and forgotten.")
    for engine in engines.values():
        serve_one(engine, warm)
    params = SamplingParams(temperature=0, max_tokens=reply_tokens)
    history: list[tuple[str, str]] = []
    turns = []
    for i, user in enumerate(user_turns):
        ids = chat_prompt(loaded, system, history, user)
        outs = {on: serve_one(engines[on], ids, params) for on in ((True, False) if i % 2 == 0 else (False, True))}
        cached, plain = outs[True], outs[False]
        turns.append(ChatTurn(i + 1, tuple(ids), cached.num_cached_tokens, cached.metrics.ttft_s, plain.metrics.ttft_s,
                              cached.token_ids[:1] == plain.token_ids[:1]))
        history.append((user, loaded.tokenizer.decode(cached.token_ids, skip_special_tokens=True)))
    return turns


# ---------------------------------------------------------------- 2. cache-aware routing


def routing_workload(vocab_size: int, systems: int = 4, system_tokens: int = 64, turns: int = 4,
                     block_size: int = 16, seed: int = 0) -> list[list[int]]:
    """Every system prompt (random token ids) with each of its user turns (under one block each), shuffled."""
    rng = random.Random(seed)
    heads = [[rng.randrange(3, vocab_size) for _ in range(system_tokens)] for _ in range(systems)]
    prompts = [h + [rng.randrange(3, vocab_size) for _ in range(rng.randint(1, block_size - 1))]
               for h in heads for _ in range(turns)]
    rng.shuffle(prompts)
    return prompts


@dataclass(frozen=True)
class RoutingRun:
    """One routing policy's run of the workload: hit rates, TTFTs and the prompt tokens it computed."""

    policy: str
    hit_rate: float
    predicted_hit_rate: Optional[float]
    ttfts_s: tuple[float, ...]
    prompt_tokens_computed: int
    first_tokens: tuple[int, ...]

    @property
    def mean_ttft_s(self) -> float:
        """Mean TTFT over the workload's requests."""
        return statistics.fmean(self.ttfts_s)


def _serve_cluster(cluster: DisaggCluster, prompt: Sequence[int],
                   params: SamplingParams = FIRST_TOKEN_ONLY) -> RequestOutput:
    """One request to its end (by default its first token), alone in the cluster, within ``TIMEOUT_S``."""
    return run_one(cluster, {"prompt_token_ids": list(prompt)}, params, timeout_s=TIMEOUT_S, raise_on_error=True)


def compare_routing(loaded: LoadedModel, prompts: Sequence[Sequence[int]], block_size: int = 16, num_blocks: int = 10,
                    policies: Sequence[str] = ("round_robin", "cache_aware")) -> dict[str, RoutingRun]:
    """The prompts, one at a time, through one in-process 2P1D cluster per policy (prefix caching on), alternating.

    ``num_blocks`` is every worker's pool: the default holds two 64-token system prompts beside a new
    request's blocks, not three, so where a system prompt goes decides whether it is still cached next time.
    """
    config = EngineConfig(cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=True))
    clusters = {p: DisaggCluster(loaded, config, num_prefill=2, num_decode=1, routing=p,
                                 request_timeout_s=TIMEOUT_S) for p in policies}
    outs: dict[str, list[RequestOutput]] = {p: [] for p in policies}
    try:
        for prompt in prompts:
            for policy, cluster in clusters.items():
                outs[policy].append(_serve_cluster(cluster, prompt))
    finally:
        for cluster in clusters.values():
            cluster.shutdown()
    return {p: RoutingRun(p, c.prefix_hit_rate, c.router.predicted_hit_rate,
                          tuple(o.metrics.ttft_s for o in outs[p]),
                          sum(len(o.prompt_token_ids) - o.num_cached_tokens for o in outs[p]),
                          tuple(o.token_ids[0] for o in outs[p])) for p, c in clusters.items()}


def engine_choose_prefill(overlap_blocks: Sequence[int], queued_tokens: Sequence[int], block_size: int) -> int:
    """The prefill worker the engine's cache-aware router picks, given each worker's cached prefix and queue.

    Worker ``w`` is made to hold the first ``overlap_blocks[w]`` blocks of one prompt (in a real
    ``CacheAwareIndex``), which then asks for that prompt with ``queued_tokens`` waiting at each worker.
    """
    if len(overlap_blocks) != len(queued_tokens) or not overlap_blocks:
        raise ValueError("overlap_blocks and queued_tokens need one entry per worker (at least one worker)")
    longest = max(overlap_blocks)
    prompt = list(range(3, 3 + (longest + 1) * block_size + 1))
    keys = prompt_block_keys(prompt, block_size)
    index = CacheAwareIndex(len(overlap_blocks), block_size)
    for worker, blocks in zip(index.workers, overlap_blocks):
        worker.insert(keys[:blocks])
    return index.choose(prompt, list(range(len(overlap_blocks))), list(queued_tokens)).worker


@dataclass(frozen=True)
class DecodeReuseRequest:
    """One request of a 1P1D cluster whose decode worker keeps a prefix cache: what crossed the link and what not."""

    prompt_tokens: int
    kv_transfer_bytes: int
    kv_reused_tokens: int
    tail_bytes: int  # the bytes of the blocks after its reused prefix, by the decode worker's page layout
    full_bytes: int  # the bytes of all its blocks: what would cross with no decode-side cache
    token_ids: tuple[int, ...]


def decode_reuse_prompts(vocab_size: int, prefix_tokens: int = 256, tail_tokens: int = 8, requests: int = 3,
                         seed: int = 0) -> list[list[int]]:
    """``requests`` prompts: one shared prefix of random token ids, each with its own random tail (distinct first tokens)."""
    if requests > vocab_size - 3 or prefix_tokens < 0 or tail_tokens < 1:
        raise ValueError("need a tail of at least one token and fewer requests than the vocabulary has tokens")
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab_size) for _ in range(prefix_tokens)]
    heads = rng.sample(range(3, vocab_size), requests)  # tails differ from their first token on
    return [prefix + [h] + [rng.randrange(3, vocab_size) for _ in range(tail_tokens - 1)] for h in heads]


def run_decode_reuse(loaded: LoadedModel, prompts: Sequence[Sequence[int]], block_size: int = 16,
                     num_blocks: int = 96, max_tokens: int = 2) -> list[DecodeReuseRequest]:
    """The prompts one after another through an in-process 1P1D cluster, prefix caching on at both workers.

    Each request's ``kv_transfer_bytes`` and ``kv_reused_tokens`` are the engine's own counters; ``tail_bytes``
    and ``full_bytes`` are what its page layout says the blocks after the reused prefix, and all its blocks, take.
    """
    config = EngineConfig(cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=True))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    cluster = DisaggCluster(loaded, config, num_prefill=1, num_decode=1, request_timeout_s=TIMEOUT_S)
    try:
        layout = cluster.decode_workers[0].layout
        runs = []
        for prompt in prompts:
            out = _serve_cluster(cluster, prompt, params)
            blocks = -(-len(prompt) // block_size)
            m = out.metrics
            runs.append(DecodeReuseRequest(len(prompt), m.kv_transfer_bytes, m.kv_reused_tokens,
                                           layout.request_nbytes(blocks - m.kv_reused_tokens // block_size),
                                           layout.request_nbytes(blocks), tuple(out.token_ids)))
    finally:
        cluster.shutdown()
    return runs


# ---------------------------------------------------------------- 3. a lossy wire


def wire_bytes(pages: torch.Tensor) -> dict[str, int]:
    """Bytes of one request's pages on the wire: float32 and bfloat16 pages, and int8 / fp8 messages (``WireMessage``)."""
    return {"float32": pages.numel() * 4, "bfloat16": pages.numel() * 2,
            **{wire: WireMessage.encode(pages.float(), wire).nbytes for wire in ("int8", "fp8_e4m3")}}


def per_head_int8(pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and one float32 scale per (..., block, KV head) of pages [..., block_size, kv_heads, head_dim].

    The scale is the block-head's largest magnitude over 127, so nothing clips and each value is within half a
    step; an all-zero block-head gets scale 0 and zero values.
    """
    x = pages.float()
    scales = x.abs().amax(dim=(-3, -1)) / INT8_QMAX  # [..., kv_heads]
    step = scales.unsqueeze(-2).unsqueeze(-1)  # [..., 1, kv_heads, 1]
    safe = torch.where(step > 0, step, torch.ones_like(step))
    values = torch.where(step > 0, torch.round(x / safe), torch.zeros_like(x)).clamp_(-INT8_QMAX, INT8_QMAX)
    return values.to(torch.int8), scales


def dequantise_per_head(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Pages in ``dtype`` from int8 ``values`` and their per-(block, head) ``scales`` [..., kv_heads]."""
    return (values.float() * scales.float().unsqueeze(-2).unsqueeze(-1)).to(dtype)

