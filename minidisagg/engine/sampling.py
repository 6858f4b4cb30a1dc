"""Sampling parameters and the sampler (greedy, temperature, top-k, top-p), seeded per request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop, as in vLLM. ``temperature=0`` means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    seed: Optional[int] = None
    stop: Optional[list[str] | str] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or (self.top_k != -1 and self.top_k < 1):
            raise ValueError(f"top_k must be -1 (disabled) or an integer >= 1, got {self.top_k!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if self.stop_token_ids is not None and any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        """Whether this request decodes greedily."""
        return self.temperature == 0


def make_generator(params: SamplingParams, device: torch.device) -> Optional[torch.Generator]:
    """A per-request generator: seeded from ``params.seed`` when given, fresh entropy otherwise."""
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


def top_k_top_p_mask(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest nucleus of mass ``top_p``.

    ``logits`` is [vocab] (already divided by the temperature). The most likely token always
    survives. Masks are applied with ``masked_fill`` rather than boolean indexing, so on a GPU
    nothing waits for the device (boolean indexing would read the mask's size back to the host).
    """
    masked = logits
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        masked = masked.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(masked, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted[0] = False
        drop = torch.empty_like(drop_sorted).scatter_(0, order, drop_sorted)  # back to vocabulary order
        masked = masked.masked_fill(drop, float("-inf"))
    return masked if masked is not logits else logits.clone()


def sample_on_device(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[Optional[torch.Generator]]
) -> torch.Tensor:
    """One token per row of float32 ``logits`` [rows, vocab], as an int64 tensor on their device.

    Nothing waits for the device, so a caller can queue more work before reading the tokens.
    Each sampled row draws from its own generator, in row order.
    """
    tokens = logits.argmax(dim=-1)
    if all(p.greedy for p in params):
        return tokens
    rows = []
    for row, (p, gen) in enumerate(zip(params, generators)):
        if p.greedy:
            rows.append(tokens[row : row + 1])
            continue
        scaled = top_k_top_p_mask(logits[row] / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(scaled, dim=-1)
        rows.append(torch.multinomial(probs, 1, generator=gen))
    return torch.cat(rows)


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[Optional[torch.Generator]]
) -> list[int]:
    """Pick one token per row of float32 ``logits`` [rows, vocab]."""
    return sample_on_device(logits, params, generators).tolist()
