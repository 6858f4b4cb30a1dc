"""Sampling parameters and the sampler (greedy, temperature, top-k, top-p), seeded per request."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch


SEED_MIN = -(2**63)  # the range torch.Generator.manual_seed accepts
SEED_MAX = 2**64 - 1
MIN_TEMPERATURE = 1e-5  # below it (and above 0) logits / temperature can overflow to inf


def _is_int(value: object) -> bool:
    """An integer that is not a bool (``True`` is an ``int`` to Python, never a count or a token id)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop, as in vLLM. ``temperature=0`` means greedy.

    Every field is checked at construction (``verify``): a bad value raises ``ValueError`` naming
    the field, the value and what is allowed, before any request is queued.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    seed: Optional[int] = None
    stop: Optional[list[str] | str] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.stop, tuple):
            self.stop = list(self.stop)
        if isinstance(self.stop_token_ids, tuple):
            self.stop_token_ids = list(self.stop_token_ids)
        self.verify()

    def verify(self) -> None:
        """Raise ``ValueError`` naming the first field whose value is not allowed (fields can change after construction)."""
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_real(self.temperature) or not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature!r}")
        if not math.isfinite(self.temperature) or 0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, "
                             f"got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or (self.top_k != -1 and self.top_k < 1):
            raise ValueError(f"top_k must be -1 (disabled) or an integer >= 1, got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_MIN <= self.seed <= SEED_MAX):
            raise ValueError(f"seed must be None or an integer in [-2**63, 2**64 - 1], got {self.seed!r}")
        if self.stop is not None and (not isinstance(self.stop, list)
                                      or any(not isinstance(s, str) or not s for s in self.stop)):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if self.stop_token_ids is not None and (not isinstance(self.stop_token_ids, list)
                                                or any(not _is_int(t) or t < 0 for t in self.stop_token_ids)):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")

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
