"""Lab 2 helpers: a layer split around its attention, the engine's own logits, decode timing, block tables drawn.

The layer split calls the model's own steps (``LlamaLayer``'s methods in ``models/llama.py``), so
the lab's cached decode loop computes exactly what the engine computes, and a change to the model
shows in both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from minidisagg.config import ModelConfig
from minidisagg.course.gemm_lab import min_time_s
from minidisagg.engine.batch import BatchItem
from minidisagg.engine.runner import ModelRunner
from minidisagg.kernels.attention import AttentionMetadata
from minidisagg.kernels.linear import linear
from minidisagg.kv.block_manager import BlockManager, OutOfBlocksError
from minidisagg.kv.cache import PagedKVCache
from minidisagg.models.llama import LlamaModel
from minidisagg.roofline import dtype_bytes, synchronize

if TYPE_CHECKING:  # matplotlib is needed only to draw
    from matplotlib.axes import Axes


# --- one layer, opened up around attention: the model's own steps (LlamaLayer's methods), minus the paged cache ---

def embed(model: LlamaModel, token_ids: torch.Tensor) -> torch.Tensor:
    """Embeddings [n, hidden] of ``token_ids`` [n] (``LlamaModel.embed_tokens``)."""
    return model.embed_tokens(token_ids.to(model.device))


@torch.inference_mode()
def attention_inputs(model: LlamaModel, layer_index: int, hidden: torch.Tensor, residual: Optional[torch.Tensor],
                     positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer ``layer_index`` up to attention: returns q [n, H, D], k and v [n, KH, D] (RoPE applied), residual.

    ``LlamaLayer.attention_inputs`` (norm, q/k/v projection), then ``LlamaLayer.rope_and_write_kv``
    without a cache: the rotation only.
    """
    layer = model.layers[layer_index]
    q, k, v, residual = layer.attention_inputs(hidden, residual)
    q, k = layer.rope_and_write_kv(q, k, v, positions.to(model.device), model.cos_sin)
    return q, k, v, residual


@torch.inference_mode()
def causal_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Attention of the last ``n`` tokens q [n, H, D] over all ``L`` tokens' keys/values [L, KH, D]; returns [n, H, D].

    Query ``i`` sits at position ``L - n + i`` and sees keys at positions ``0 .. L - n + i``.
    """
    n, length = q.shape[0], keys.shape[0]
    if n > length:
        raise ValueError(f"{n} queries but only {length} keys: the new tokens' keys must be in the cache too")
    query_pos = torch.arange(length - n, length, device=q.device)
    mask = torch.arange(length, device=q.device)[None, :] <= query_pos[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                                         attn_mask=mask, scale=q.shape[-1] ** -0.5, enable_gqa=True)
    return out.transpose(0, 1)


@torch.inference_mode()
def attention_outputs(model: LlamaModel, layer_index: int, attn: torch.Tensor,
                      residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``layer_index`` after attention: returns (hidden, residual) for the next layer.

    ``LlamaLayer.attention_output`` (O projection), ``mlp_input`` (residual add, norm), then ``mlp``.
    """
    layer = model.layers[layer_index]
    x, residual = layer.mlp_input(layer.attention_output(attn), residual)
    return layer.mlp(x), residual


@torch.inference_mode()
def final_logits(model: LlamaModel, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Float32 logits [n, vocab] after the last layer (``LlamaModel.final_norm``, then ``compute_logits``)."""
    return model.compute_logits(model.final_norm(hidden, residual))


# --- the engine as the outside reference ---

def engine_logits(model: LlamaModel, token_ids: Sequence[int], block_size: int = 16) -> torch.Tensor:
    """Logits [len(token_ids), vocab] of every position, from one forward pass of the engine's ``LlamaModel``."""
    n = len(token_ids)
    if n < 1:
        raise ValueError("engine_logits needs at least one token")
    num_blocks = -(-n // block_size)
    cache = PagedKVCache(model.cfg, num_blocks, block_size, model.dtype, model.device)
    dev = model.device
    meta = AttentionMetadata(  # one sequence whose blocks are 0, 1, 2, ...: token i sits in slot i
        query_starts=[0], query_lens=[n], context_lens=[n],
        block_tables=torch.arange(num_blocks, device=dev)[None, :],
        context_lens_tensor=torch.tensor([n], device=dev),
        slot_mapping=torch.arange(n, device=dev),
    )
    ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=dev)
    return model.compute_logits(model(ids, torch.arange(n, device=dev), cache, meta))


def decode_with_engine_cache(model: LlamaModel, prompt_ids: Sequence[int], num_new_tokens: int,
                             block_size: int = 16) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding on the engine's paged KV cache (prefill once, then one token per step): tokens and logits."""
    num_blocks = max(1, -(-(len(prompt_ids) + num_new_tokens) // block_size))
    runner = ModelRunner(model, PagedKVCache(model.cfg, num_blocks, block_size, model.dtype, model.device))
    table = list(range(num_blocks))
    logits = [runner.execute([BatchItem(list(prompt_ids), 0, table, True)])[0]]
    tokens = [int(logits[-1].argmax())]
    while len(tokens) < num_new_tokens:
        position = len(prompt_ids) + len(tokens) - 1
        logits.append(runner.execute([BatchItem([tokens[-1]], position, table, True)])[0])
        tokens.append(int(logits[-1].argmax()))
    return tokens, torch.stack(logits)


# --- what a decode loop computes and reads, counted ---

@dataclass(frozen=True)
class LoopCounts:
    """Work of a greedy decode loop over the weight GEMMs: token rows, FLOPs (layers, LM head) and weight bytes read."""

    token_rows: int
    layer_flops: int
    lm_head_flops: int
    weight_bytes: int

    @property
    def flops(self) -> int:
        """All weight-GEMM FLOPs of the loop."""
        return self.layer_flops + self.lm_head_flops


def decode_loop_counts(cfg: ModelConfig, prompt_len: int, num_new_tokens: int, cached: bool,
                       dtype: torch.dtype = torch.float32) -> LoopCounts:
    """Count a greedy loop's weight-GEMM work (attention and norms left out); every step reads every weight once.

    Without a cache step ``i`` pushes all ``prompt_len + i`` tokens through the layers; with one, the
    first step pushes the prompt and each later step one token. Both loops run the LM head on one row per step.
    """
    layer_params = cfg.num_layers * (cfg.hidden_size * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * cfg.hidden_size
                                     + 3 * cfg.hidden_size * cfg.intermediate_size)
    lm_head_params = cfg.vocab_size * cfg.hidden_size
    if cached:
        rows = prompt_len + num_new_tokens - 1
    else:
        rows = sum(prompt_len + i for i in range(num_new_tokens))
    return LoopCounts(rows, 2 * rows * layer_params, 2 * num_new_tokens * lm_head_params,
                      num_new_tokens * (layer_params + lm_head_params) * dtype_bytes(dtype))


@torch.inference_mode()
def weight_gemms_s(model: LlamaModel, batch: int, passes: int = 3) -> float:
    """Time of the model's bare weight products for ``batch`` rows: every layer's four, then the LM head.

    The products are the engine's own (``kernels.linear``). Each pass runs them all in order, so a
    layer's weights have left the caches before it runs again; each layer keeps its fastest time over
    the passes and the layers are summed, so a busy machine inflates this less than a whole step.
    """
    groups = [[layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj] for layer in model.layers]
    groups.append([model.lm_head])
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], device=model.device, dtype=model.dtype)
              for group in groups for w in group}
    best_s = [float("inf")] * len(groups)
    for index in range(passes + 1):  # the first pass warms up
        for g, group in enumerate(groups):
            synchronize(model.device)
            t0 = time.perf_counter()
            for w in group:
                linear(inputs[w.shape[1]], w)
            synchronize(model.device)
            if index:
                best_s[g] = min(best_s[g], time.perf_counter() - t0)
    return sum(best_s)


# --- decode step time against context length ---

@dataclass(frozen=True)
class DecodeTiming:
    """One measured decode step: batch size, context length per sequence, time, and the KV bytes it read."""

    batch: int
    context_len: int
    step_s: float
    kv_bytes: int


class DecodeTimer:
    """A KV pool with room for ``batch`` sequences of ``max_context`` tokens, filled, to time decode steps."""

    def __init__(self, model: LlamaModel, batch: int, max_context: int, block_size: int = 16) -> None:
        self.model = model
        self.batch = batch
        self.block_size = block_size
        self.blocks_per_seq = -(-max_context // block_size)
        self.cache = PagedKVCache(model.cfg, batch * self.blocks_per_seq, block_size, model.dtype, model.device)
        self.cache.kv.fill_(0.01)  # touch every page: a zero-filled pool may not be backed by memory yet
        self.runner = ModelRunner(model, self.cache)

    def measure(self, context_len: int, iters: int = 3) -> DecodeTiming:
        """Fastest of ``iters`` decode steps in which each of the ``batch`` sequences has ``context_len`` tokens."""
        if not 1 <= context_len <= self.blocks_per_seq * self.block_size:
            raise ValueError(f"context_len must be in 1..{self.blocks_per_seq * self.block_size}, got {context_len}")
        per_seq = self.blocks_per_seq
        items = [BatchItem([1 + i], context_len - 1, list(range(i * per_seq, (i + 1) * per_seq)), True)
                 for i in range(self.batch)]
        # Each step rewrites the newest token's slot, so the pool stays the same size between calls.
        step_s = min_time_s(lambda: self.runner.execute(items), self.model.device, warmup=1, iters=iters)
        kv_bytes = self.batch * context_len * self.cache.bytes_per_block // self.block_size
        return DecodeTiming(self.batch, context_len, step_s, kv_bytes)


# --- admission: requests that share one pool ---

@dataclass(frozen=True)
class Request:
    """A request as the scheduler sees it: its prompt, the most tokens it may generate, and how many it has so far."""

    prompt_len: int
    max_new_tokens: int
    generated: int = 0

    @property
    def tokens_now(self) -> int:
        """Tokens whose KV it holds now (prompt and output so far)."""
        return self.prompt_len + self.generated

    @property
    def tokens_at_most(self) -> int:
        """Tokens whose KV it will hold if it runs to ``max_new_tokens``."""
        return self.prompt_len + self.max_new_tokens


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold ``tokens`` token slots (a partly used block is still a whole block)."""
    return -(-tokens // block_size)


AdmitFn = Callable[[list[Request], list[Request], int, int], int]


@dataclass(frozen=True)
class AdmissionRun:
    """A replay of a queue through one pool: steps taken, requests finished, the fullest the pool got, the first failure."""

    steps: int
    finished: int
    peak_blocks: int
    out_of_blocks_step: Optional[int]  # the step at which a running request found no free block, or None


def replay_admission(admit: AdmitFn, queue: Sequence[Request], num_blocks: int, block_size: int,
                     stop_after: Sequence[int], max_steps: int = 100_000) -> AdmissionRun:
    """Run ``queue`` through a ``BlockManager``: each step admits by ``admit``, then every running request gains a token.

    Request ``i`` finishes after ``stop_after[i]`` tokens (at most its ``max_new_tokens``): the rule does
    not know when. A running request that needs a block when none is free ends the replay.
    """
    manager = BlockManager(num_blocks, block_size)
    waiting, running = list(enumerate(queue)), []  # (index, request)
    finished = peak = 0
    for step in range(max_steps):
        if not waiting and not running:
            return AdmissionRun(step, finished, peak, None)
        count = admit([r for _, r in waiting], [r for _, r in running], manager.num_free_blocks, block_size)
        for index, request in waiting[:count]:
            manager.grow(index, request.tokens_now)
            running.append((index, request))
        waiting = waiting[count:]
        still = []
        for index, request in running:
            grown = Request(request.prompt_len, request.max_new_tokens, request.generated + 1)
            try:
                manager.grow(index, grown.tokens_now)
            except OutOfBlocksError:
                return AdmissionRun(step, finished, peak, step)
            if grown.generated >= min(stop_after[index], grown.max_new_tokens):
                manager.free(index)
                finished += 1
            else:
                still.append((index, grown))
        running = still
        peak = max(peak, num_blocks - manager.num_free_blocks)
    return AdmissionRun(max_steps, finished, peak, None)


# --- the block table, drawn ---

def draw_block_pool(ax: Axes, manager: BlockManager, token_counts: dict[object, int], title: str = "") -> None:
    """Physical blocks of ``manager`` as a row of cells, each labelled with the owner's logical block index."""
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]
    owner_of: dict[int, tuple[object, int]] = {}
    for key in manager.owners():
        for logical, physical in enumerate(manager.block_table(key)):
            owner_of[physical] = (key, logical)
    for physical in range(manager.num_blocks):
        if physical in owner_of:
            key, logical = owner_of[physical]
            color = colors[sum(map(ord, str(key))) % len(colors)]  # stable across snapshots
            bs = manager.block_size
            used = min(bs, token_counts.get(key, 0) - logical * bs)
            ax.add_patch(_cell(physical, color, alpha=0.85))
            ax.text(physical + 0.5, 0.55, f"{key}{logical}", ha="center", va="center", fontsize=9, color="white",
                    weight="bold")
            ax.text(physical + 0.5, 0.18, f"{used}/{bs}", ha="center", va="center", fontsize=7, color="white")
        else:
            ax.add_patch(_cell(physical, "lightgray", alpha=0.6))
            ax.text(physical + 0.5, 0.5, "free", ha="center", va="center", fontsize=7, color="dimgray")
    ax.set_xlim(0, manager.num_blocks)
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ax.set_xticks([b + 0.5 for b in range(manager.num_blocks)])
    ax.set_xticklabels([str(b) for b in range(manager.num_blocks)], fontsize=7)
    ax.set_xlabel("physical block id", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9, loc="left")


def _cell(x: int, color: str, alpha: float):  # noqa: ANN202 - a matplotlib patch
    from matplotlib.patches import Rectangle

    return Rectangle((x + 0.04, 0.05), 0.92, 0.9, color=color, alpha=alpha)
