"""The Llama-family decoder: RMSNorm, RoPE, grouped-query attention over paged KV, SwiGLU.

The model works on a packed batch: all tokens of all sequences in one [num_tokens] row,
with ``AttentionMetadata`` saying which tokens belong to which sequence. Projections are
fused (q/k/v into one matrix, gate/up into one) so each layer does four matmuls.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn

from minidisagg.config import ModelConfig
from minidisagg.kernels.activation import silu_and_mul
from minidisagg.kernels.attention import AttentionMetadata, paged_attention
from minidisagg.kernels.linear import linear
from minidisagg.kernels.norm import rms_norm
from minidisagg.kernels.rope import cos_sin_cache
from minidisagg.kernels.rope_cache import rope_and_write_kv
from minidisagg.kv.cache import PagedKVCache


class LlamaLayer(nn.Module):
    """One transformer block: attention then MLP, each behind a (fused residual) RMSNorm."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        h, f = cfg.hidden_size, cfg.intermediate_size

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)

        self.cfg = cfg
        self.input_norm = param(h)
        self.qkv_proj = param(cfg.q_size + 2 * cfg.kv_size, h)
        self.o_proj = param(h, cfg.q_size)
        self.post_attn_norm = param(h)
        self.gate_up_proj = param(2 * f, h)
        self.down_proj = param(h, f)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the block on packed tokens; returns (hidden, residual) for the next block."""
        cfg, inv = self.cfg, meta.batch_invariant
        x, residual = rms_norm(hidden, self.input_norm, cfg.rms_norm_eps, residual)
        qkv = linear(x, self.qkv_proj, inv).view(-1, cfg.num_heads + 2 * cfg.num_kv_heads, cfg.head_dim)
        q, k, v = qkv.split([cfg.num_heads, cfg.num_kv_heads, cfg.num_kv_heads], dim=1)
        q, k = rope_and_write_kv(q, k, v, positions, cos_sin, k_cache, v_cache, meta.slot_mapping)
        attn = paged_attention(q, k, v, k_cache, v_cache, meta, cfg.head_dim**-0.5)
        hidden = linear(attn.reshape(-1, cfg.q_size), self.o_proj, inv)
        x, residual = rms_norm(hidden, self.post_attn_norm, cfg.rms_norm_eps, residual)
        hidden = linear(silu_and_mul(linear(x, self.gate_up_proj, inv)), self.down_proj, inv)
        return hidden, residual


class LlamaModel(nn.Module):
    """The whole decoder with its LM head; weights come from ``load_weights``."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.device = torch.device(device)
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.layers = nn.ModuleList(LlamaLayer(cfg, dtype, device) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.empty(cfg.hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.lm_head = (
            self.embed
            if cfg.tie_embeddings
            else nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device), requires_grad=False)
        )
        self.register_buffer(
            "cos_sin", cos_sin_cache(cfg.max_position, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, device), persistent=False
        )

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: PagedKVCache,
        meta: AttentionMetadata,
        layer_done: Optional[Callable[[int], None]] = None,
    ) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] after the final norm; writes every token's KV into the cache.

        ``layer_done(i)`` is called once layer ``i``'s KV is in the cache (for layer-wise KV shipping).
        """
        hidden = self.embed[input_ids]
        residual = None
        for index, layer in enumerate(self.layers):
            k_cache, v_cache = kv_cache.layer(index)
            hidden, residual = layer(hidden, residual, positions, self.cos_sin, k_cache, v_cache, meta)
            if layer_done is not None:
                layer_done(index)
        hidden, _ = rms_norm(hidden, self.norm, self.cfg.rms_norm_eps, residual)
        return hidden

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor, batch_invariant: bool = False) -> torch.Tensor:
        """Float32 logits [rows, vocab] for the given final hidden states."""
        return linear(hidden, self.lm_head, batch_invariant).float()

    @torch.inference_mode()
    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy weights given under HF Llama names (no ``model.`` prefix), fusing q/k/v and gate/up."""
        cfg = self.cfg
        seen: set[str] = set()
        for name, tensor in tensors:
            target, rows = self._destination(name)
            target[rows].copy_(tensor.to(device=target.device, dtype=target.dtype))
            seen.add(name)
        missing = sorted(set(self.expected_weight_names()) - seen)
        if missing:
            raise ValueError(f"weights for {cfg.name} are incomplete; missing {len(missing)}: {missing[:5]}...")

    def expected_weight_names(self) -> list[str]:
        """Every HF-style tensor name ``load_weights`` needs."""
        names = ["embed_tokens.weight", "norm.weight"] + ([] if self.cfg.tie_embeddings else ["lm_head.weight"])
        for i in range(self.cfg.num_layers):
            names += [f"layers.{i}.{n}.weight" for n in (
                "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
        return names

    def _destination(self, name: str) -> tuple[torch.Tensor, slice]:
        cfg = self.cfg
        everything = slice(None)
        if name == "embed_tokens.weight":
            return self.embed, everything
        if name == "norm.weight":
            return self.norm, everything
        if name == "lm_head.weight":
            if cfg.tie_embeddings:
                return self.embed, everything
            return self.lm_head, everything
        parts = name.split(".")
        if len(parts) not in (4, 5) or parts[0] != "layers" or not parts[1].isdigit() or int(parts[1]) >= cfg.num_layers:
            raise ValueError(f"unexpected weight {name!r} for {cfg.name}")
        layer: LlamaLayer = self.layers[int(parts[1])]
        key = ".".join(parts[2:4])
        q, kv, f = cfg.q_size, cfg.kv_size, cfg.intermediate_size
        table: dict[str, tuple[torch.Tensor, slice]] = {
            "input_layernorm.weight": (layer.input_norm, everything),
            "post_attention_layernorm.weight": (layer.post_attn_norm, everything),
            "self_attn.q_proj": (layer.qkv_proj, slice(0, q)),
            "self_attn.k_proj": (layer.qkv_proj, slice(q, q + kv)),
            "self_attn.v_proj": (layer.qkv_proj, slice(q + kv, q + 2 * kv)),
            "self_attn.o_proj": (layer.o_proj, everything),
            "mlp.gate_proj": (layer.gate_up_proj, slice(0, f)),
            "mlp.up_proj": (layer.gate_up_proj, slice(f, 2 * f)),
            "mlp.down_proj": (layer.down_proj, everything),
        }
        lookup = key if key in table else ".".join(parts[2:])
        if lookup not in table:
            raise ValueError(f"unexpected weight {name!r} for {cfg.name}")
        return table[lookup]


def weight_bytes(model: LlamaModel) -> int:
    """Bytes of all distinct parameters (a tied LM head counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total

