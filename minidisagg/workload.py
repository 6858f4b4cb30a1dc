"""Replayable workloads: timed requests, length distributions, Poisson arrivals, CSV traces.

This module sits at the bottom of the import graph: numpy and the standard library only.
"""

from __future__ import annotations

import csv
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "TimedRequest",
    "LengthDist",
    "Fixed",
    "Uniform",
    "LogNormal",
    "poisson_arrivals",
    "poisson_workload",
    "interference_workload",
    "load_csv",
    "save_csv",
    "synthetic_prompt_ids",
]

CSV_COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens")
_ALIASES = {"prompt_tokens": ("prompt_tokens", "prompt_len"), "output_tokens": ("output_tokens", "output_len")}


@dataclass(frozen=True)
class TimedRequest:
    """One request of a replayable workload."""

    arrival_s: float  # seconds after the start of the run
    prompt_len: int  # prompt tokens, >= 1
    output_len: int  # output tokens to generate, >= 1

    def __post_init__(self) -> None:
        if not math.isfinite(self.arrival_s) or self.arrival_s < 0:
            raise ValueError(f"arrival_s must be finite and >= 0, got {self.arrival_s}")
        if self.prompt_len < 1:
            raise ValueError(f"prompt_len must be >= 1, got {self.prompt_len}")
        if self.output_len < 1:
            raise ValueError(f"output_len must be >= 1, got {self.output_len}")


class LengthDist(ABC):
    """A distribution of token counts (all values >= 1)."""

    @abstractmethod
    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Draw ``n`` lengths as an int64 array."""


def _check_n(n: int) -> None:
    """Reject a negative sample count."""
    if n < 0:
        raise ValueError(f"sample count n must be >= 0, got {n}")


def _check_bounds(low: int, high: int, who: str) -> None:
    """Require 1 <= low <= high."""
    if low < 1:
        raise ValueError(f"{who}: low must be >= 1, got {low}")
    if high < low:
        raise ValueError(f"{who}: high ({high}) must be >= low ({low})")


@dataclass(frozen=True)
class Fixed(LengthDist):
    """Always the same length."""

    value: int

    def __post_init__(self) -> None:
        if self.value < 1:
            raise ValueError(f"Fixed: value must be >= 1, got {self.value}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` copies of ``value``."""
        _check_n(n)
        return np.full(n, self.value, dtype=np.int64)


@dataclass(frozen=True)
class Uniform(LengthDist):
    """Integers uniform on [low, high], both ends included."""

    low: int
    high: int

    def __post_init__(self) -> None:
        _check_bounds(self.low, self.high, "Uniform")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` independent uniform draws."""
        _check_n(n)
        return rng.integers(self.low, self.high, size=n, endpoint=True, dtype=np.int64)


@dataclass(frozen=True)
class LogNormal(LengthDist):
    """Lognormal lengths with arithmetic mean ``mean`` and std ``sigma_frac * mean``, rounded and clipped to [low, high].

    For a lognormal exp(N(mu, s^2)) the mean is exp(mu + s^2 / 2) and the relative
    std is sqrt(exp(s^2) - 1), so s^2 = ln(1 + sigma_frac^2) and mu = ln(mean) - s^2 / 2.
    Rounding and clipping move the realised mean slightly when the bounds are tight.
    """

    mean: float
    sigma_frac: float
    low: int
    high: int

    def __post_init__(self) -> None:
        _check_bounds(self.low, self.high, "LogNormal")
        if not self.low <= self.mean <= self.high:
            raise ValueError(f"LogNormal: mean {self.mean} must lie in [low, high] = [{self.low}, {self.high}]")
        if not math.isfinite(self.sigma_frac) or self.sigma_frac < 0:
            raise ValueError(f"LogNormal: sigma_frac must be finite and >= 0, got {self.sigma_frac}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` independent draws."""
        _check_n(n)
        s2 = math.log1p(self.sigma_frac**2)
        mu = math.log(self.mean) - s2 / 2
        raw = rng.lognormal(mu, math.sqrt(s2), size=n)
        return np.clip(np.rint(raw), self.low, self.high).astype(np.int64)


def poisson_arrivals(rate_rps: float, num: int, rng: np.random.Generator) -> np.ndarray:
    """Arrival times of a Poisson process: cumulative exponential gaps of mean 1 / rate_rps.

    The first arrival is at the first gap (not at 0).
    """
    if not math.isfinite(rate_rps) or rate_rps <= 0:
        raise ValueError(f"rate_rps must be positive and finite, got {rate_rps}")
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    return np.cumsum(rng.exponential(1.0 / rate_rps, size=num))


def poisson_workload(
    rate_rps: float,
    num_requests: int,
    prompt_len: LengthDist,
    output_len: LengthDist,
    seed: int = 0,
) -> list[TimedRequest]:
    """``num_requests`` requests with Poisson arrivals at ``rate_rps``; the same seed gives the same list."""
    rng = np.random.default_rng(seed)
    arrivals = poisson_arrivals(rate_rps, num_requests, rng)
    prompts = prompt_len.sample(rng, num_requests)
    outputs = output_len.sample(rng, num_requests)
    return [
        TimedRequest(float(t), int(p), int(o)) for t, p, o in zip(arrivals, prompts, outputs)
    ]


def interference_workload(
    num_decodes: int,
    decode_prompt_len: int,
    decode_output_len: int,
    num_long: int,
    long_prompt_len: int,
    long_every_s: float,
    long_output_len: int = 1,
    start_long_s: float = 0.0,
) -> list[TimedRequest]:
    """The interference scenario: long-running decodes, disturbed by periodic long prompts.

    ``num_decodes`` requests arrive at t = 0 with short prompts and long outputs; then
    ``num_long`` long prompts arrive at start_long_s, start_long_s + long_every_s, ...
    Sorted by arrival (decodes first on a tie).
    """
    if num_decodes < 0 or num_long < 0:
        raise ValueError(f"num_decodes and num_long must be >= 0, got {num_decodes} and {num_long}")
    if not math.isfinite(long_every_s) or long_every_s <= 0:
        raise ValueError(f"long_every_s must be positive and finite, got {long_every_s}")
    if not math.isfinite(start_long_s) or start_long_s < 0:
        raise ValueError(f"start_long_s must be finite and >= 0, got {start_long_s}")
    decodes = [TimedRequest(0.0, decode_prompt_len, decode_output_len) for _ in range(num_decodes)]
    longs = [
        TimedRequest(start_long_s + i * long_every_s, long_prompt_len, long_output_len)
        for i in range(num_long)
    ]
    return sorted(decodes + longs, key=lambda r: r.arrival_s)


def _parse_count(text: str, column: str, line: int) -> int:
    """Parse a token count (an integer, '12.0' accepted) from one CSV cell."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"line {line}: {column} is not a number: {text!r}") from None
    if not value.is_integer():
        raise ValueError(f"line {line}: {column} must be a whole number, got {text!r}")
    if value < 1:
        raise ValueError(f"line {line}: {column} must be >= 1, got {text!r}")
    return int(value)


def _find_columns(fieldnames: Sequence[str] | None, path: Path) -> dict[str, str]:
    """Map each canonical column to the header name that the file uses for it."""
    header = [name.strip() for name in (fieldnames or [])]
    found: dict[str, str] = {}
    for column in CSV_COLUMNS:
        for alias in _ALIASES.get(column, (column,)):
            if alias in header:
                found[column] = (fieldnames or [])[header.index(alias)]
                break
    missing = [c for c in CSV_COLUMNS if c not in found]
    if missing:
        raise ValueError(
            f"{path}: line 1: header must name columns {', '.join(CSV_COLUMNS)}; missing {', '.join(missing)}"
        )
    return found


def load_csv(path: str | Path) -> list[TimedRequest]:
    """Read a trace with header ``arrival_s,prompt_tokens,output_tokens``, sorted by arrival.

    ``prompt_len`` / ``output_len`` are accepted as column names too; other columns are
    ignored. A bad row (missing cell, non-numeric, negative, zero tokens) raises
    ValueError naming its line number (the header is line 1).
    """
    path = Path(path)
    requests: list[TimedRequest] = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = _find_columns(reader.fieldnames, path)
        for row in reader:
            line = reader.line_num
            cells: dict[str, str] = {}
            for column, name in cols.items():
                text = row.get(name)
                if text is None or text.strip() == "":
                    raise ValueError(f"{path}: line {line}: missing value for {column}")
                cells[column] = text.strip()
            try:
                arrival = float(cells["arrival_s"])
            except ValueError:
                raise ValueError(f"{path}: line {line}: arrival_s is not a number: {cells['arrival_s']!r}") from None
            if not math.isfinite(arrival) or arrival < 0:
                raise ValueError(f"{path}: line {line}: arrival_s must be finite and >= 0, got {cells['arrival_s']!r}")
            try:
                prompt = _parse_count(cells["prompt_tokens"], "prompt_tokens", line)
                output = _parse_count(cells["output_tokens"], "output_tokens", line)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
            requests.append(TimedRequest(arrival, prompt, output))
    return sorted(requests, key=lambda r: r.arrival_s)


def save_csv(requests: Sequence[TimedRequest], path: str | Path) -> None:
    """Write requests as ``arrival_s,prompt_tokens,output_tokens`` (exact float round trip)."""
    with Path(path).open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for r in requests:
            writer.writerow((repr(float(r.arrival_s)), int(r.prompt_len), int(r.output_len)))


def synthetic_prompt_ids(
    length: int, vocab_size: int, rng: np.random.Generator, avoid: Iterable[int] = ()
) -> list[int]:
    """``length`` random token ids, uniform over [0, vocab_size) minus the ids in ``avoid`` (special tokens)."""
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    banned = np.unique(np.asarray([int(t) for t in avoid if 0 <= int(t) < vocab_size], dtype=np.int64))
    allowed = vocab_size - banned.size
    if allowed == 0:
        raise ValueError(f"avoid covers the whole vocabulary of {vocab_size} ids")
    # Draw an index among the allowed ids, then shift it past every banned id at or below it.
    ids = rng.integers(0, allowed, size=length, dtype=np.int64)
    for b in banned:  # ascending, so later banned ids see the already-shifted values
        ids = ids + (ids >= b)
    return [int(t) for t in ids]


@dataclass(frozen=True)
class Scenario:
    """The interference scenario: steady decodes from t=0 while long prompts arrive, and the step token budget.

    Lab 3, the decks and the demo all replay it; the demo derives the timing fields
    (``decode_output_len``, ``long_every_s``, ``start_long_s``) from calibrated step costs.
    """

    num_decodes: int = 4
    decode_prompt_len: int = 32
    decode_output_len: int = 32
    num_long: int = 2
    long_prompt_len: int = 384
    long_every_s: float = 0.8
    start_long_s: float = 0.2
    long_output_len: int = 4
    token_budget: int = 128
    seed: int = 0

    def workload(self) -> list[TimedRequest]:
        """The timed requests: the decodes first (all arrive at t=0), then the long prompts."""
        return interference_workload(self.num_decodes, self.decode_prompt_len, self.decode_output_len, self.num_long,
                                     self.long_prompt_len, self.long_every_s, self.long_output_len, self.start_long_s)
