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
from minidisagg.kernels.rope import apply_rope, cos_sin_cache
from minidisagg.kernels.rope_cache import rope_and_write_kv
from minidisagg.kv.cache import PagedKVCache


class LlamaLayer(nn.Module):
    """One transformer block: attention then MLP, each behind a (fused residual) RMSNorm.

    ``forward`` is six steps, each a method that can be called (and replaced) on its own:
    :meth:`attention_inputs` (norm, q/k/v projection), :meth:`rope_and_write_kv` (positions,
    the paged KV write), :meth:`attention`, :meth:`attention_output` (O projection),
    :meth:`mlp_input` (residual add, norm) and :meth:`mlp` (SwiGLU). Every device runs this code;
    the kernels it calls pick their implementation (Triton, native CPU ops, torch references).
    """

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
        inv = meta.batch_invariant
        q, k, v, residual = self.attention_inputs(hidden, residual, inv)
        q, k = self.rope_and_write_kv(q, k, v, positions, cos_sin, k_cache, v_cache, meta.slot_mapping)
        attn = self.attention(q, k, v, k_cache, v_cache, meta)
        hidden = self.attention_output(attn, inv)
        x, residual = self.mlp_input(hidden, residual)
        return self.mlp(x, inv), residual

    def attention_inputs(self, hidden: torch.Tensor, residual: torch.Tensor | None, batch_invariant: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Residual add, RMSNorm and the fused q/k/v projection: q [n, H, D], k and v [n, KH, D], the new residual."""
        cfg = self.cfg
        x, residual = rms_norm(hidden, self.input_norm, cfg.rms_norm_eps, residual)
        qkv = linear(x, self.qkv_proj, batch_invariant).view(-1, cfg.num_heads + 2 * cfg.num_kv_heads, cfg.head_dim)
        q, k, v = qkv.split([cfg.num_heads, cfg.num_kv_heads, cfg.num_kv_heads], dim=1)
        return q, k, v, residual

    def rope_and_write_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                          cos_sin: torch.Tensor, k_cache: Optional[torch.Tensor] = None,
                          v_cache: Optional[torch.Tensor] = None, slot_mapping: Optional[torch.Tensor] = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k rotated to their ``positions`` (RoPE); with caches, the rotated k and v go to ``slot_mapping``'s slots."""
        if k_cache is None or v_cache is None or slot_mapping is None:
            return apply_rope(q, k, positions, cos_sin)
        return rope_and_write_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Each query's attention [n, H, D] over its sequence's cached keys and values (this step's already written)."""
        return paged_attention(q, k, v, k_cache, v_cache, meta, self.cfg.head_dim**-0.5)

    def attention_output(self, attn: torch.Tensor, batch_invariant: bool = False) -> torch.Tensor:
        """The O projection of the heads' outputs [n, H, D]: hidden [n, hidden]."""
        return linear(attn.reshape(-1, self.cfg.q_size), self.o_proj, batch_invariant)

    def mlp_input(self, hidden: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual add and the post-attention RMSNorm: (the MLP's input, the new residual)."""
        return rms_norm(hidden, self.post_attn_norm, self.cfg.rms_norm_eps, residual)

    def mlp(self, x: torch.Tensor, batch_invariant: bool = False) -> torch.Tensor:
        """SwiGLU: ``down(silu(gate(x)) * up(x))``, with gate and up as one fused projection."""
        return linear(silu_and_mul(linear(x, self.gate_up_proj, batch_invariant)), self.down_proj, batch_invariant)


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

    # no_grad rather than inference_mode: torch.compile can trace it (engine/compiled.py), and the
    # engine's runner calls the model inside inference_mode anyway
    @torch.no_grad()
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
        hidden = self.embed_tokens(input_ids)
        residual = None
        for index, layer in enumerate(self.layers):
            k_cache, v_cache = kv_cache.layer(index)
            hidden, residual = layer(hidden, residual, positions, self.cos_sin, k_cache, v_cache, meta)
            if layer_done is not None:
                layer_done(index)
        return self.final_norm(hidden, residual)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings [n, hidden] of ``input_ids`` [n]."""
        return self.embed[input_ids]

    def final_norm(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The last layer's residual add and the final RMSNorm: hidden states [n, hidden] for the LM head."""
        return rms_norm(hidden, self.norm, self.cfg.rms_norm_eps, residual)[0]

    @torch.no_grad()
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

