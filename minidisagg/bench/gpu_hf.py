"""HF transformers on the same card, side by side: eager ``generate`` and the static-cache compiled path.

Only the GPU benchmark imports this, and only where ``transformers`` is installed (it is a
test/benchmark reference, never a runtime dependency of the engine).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from minidisagg.config import PRESETS, ModelConfig


def hf_config(cfg: ModelConfig) -> Any:
    """A transformers ``LlamaConfig`` of the same shape as ``cfg``."""
    from transformers import LlamaConfig

    rope_scaling = None
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        rope_scaling = {"rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
                        "high_freq_factor": rs.high_freq_factor,
                        "original_max_position_embeddings": rs.original_max_position}
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, rope_scaling=rope_scaling,
        max_position_embeddings=cfg.max_position, tie_word_embeddings=cfg.tie_embeddings,
    )


def hf_model(name: str) -> Any:
    """A bf16 HF Llama of ``name``'s shape with random weights, built directly on the GPU."""
    from transformers import LlamaForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(hf_config(PRESETS[name]))
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _generate_s(model: Any, input_ids: torch.Tensor, new_tokens: int, static: bool) -> float:
    """Wall time of one greedy ``generate`` producing exactly ``new_tokens`` tokens."""
    kwargs: dict[str, Any] = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if static:
        kwargs["cache_implementation"] = "static"
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def hf_decode_ms(name: str, batch: int, prompt_len: int, static: bool, short: int = 8, long: int = 40) -> float:
    """Per-token decode time of HF ``generate``: (time for ``long`` tokens - time for ``short``) / difference.

    The difference cancels prefill and setup; ``static=True`` uses HF's static cache, which HF
    compiles itself (the first calls pay the compile and are not timed).
    """
    model = hf_model(name)
    try:
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=gen).cuda()
        for _ in range(2 if static else 1):  # warm-up (and compile, for the static cache)
            _generate_s(model, ids, long, static)
        t_short = min(_generate_s(model, ids, short, static) for _ in range(2))
        t_long = min(_generate_s(model, ids, long, static) for _ in range(2))
        return 1000 * (t_long - t_short) / (long - short)
    finally:
        del model
        torch.cuda.empty_cache()
