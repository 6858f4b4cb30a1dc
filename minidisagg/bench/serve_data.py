"""Workloads for ``bench serve``: synthetic prompts of random words, or prompts read from a file; Poisson arrivals."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

# Common English words: synthetic prompts that a BPE tokenizer turns into about one token per word.
WORDS = ("the of and to in is it that for on was with as be at by this had not are but from or have an they "
         "which one you were her all she there would their we him been has when who will more no if out so said "
         "what up its about into than them can only other new some could time these two may then do first any my "
         "now such like our over man me even most made after also did many before must through back years where "
         "much your way well down should because each just those people how too little state good very make world "
         "still own see men work long get here between both life being under never day same another know while "
         "last might us great old year off come since against go came right used take three").split()
TOKENS_PER_WORD = 4 / 3  # a rough figure for English text, for a file's reply length when it gives no token count


@dataclass(frozen=True)
class BenchRequest:
    """One prompt to send and how many tokens to ask for."""

    prompt: str
    max_tokens: int


def synthetic(num_prompts: int, input_len: int, output_len: int, seed: int) -> list[BenchRequest]:
    """``num_prompts`` prompts of ``input_len`` random words, each asking for ``output_len`` tokens."""
    rng = random.Random(seed)
    return [BenchRequest(" ".join(rng.choice(WORDS) for _ in range(input_len)), output_len)
            for _ in range(num_prompts)]


def _records(path: Path) -> list[Any]:
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list or JSON lines of records")
    return data


def _request_of(record: Any, output_len: int) -> BenchRequest | None:
    """A record as a request: ``{"prompt", "output_len"?}`` or a ShareGPT ``conversations`` list."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("prompt"), str) and record["prompt"]:
        wanted = record.get("output_len", output_len)
        return BenchRequest(record["prompt"], int(wanted) if isinstance(wanted, int) and wanted > 0 else output_len)
    turns = record.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        return None
    first, reply = turns[0], turns[1]
    if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in (first, reply)) or not first["value"]:
        return None
    reply_tokens = round(len(reply["value"].split()) * TOKENS_PER_WORD)
    return BenchRequest(first["value"], max(1, min(reply_tokens, output_len)) if reply_tokens else output_len)


def from_file(path: Path, num_prompts: int, output_len: int, seed: int) -> list[BenchRequest]:
    """``num_prompts`` requests drawn (seeded) from a file's usable records; ``output_len`` caps max_tokens."""
    usable = [r for r in (_request_of(rec, output_len) for rec in _records(path)) if r is not None]
    if not usable:
        raise ValueError(f"{path}: no usable record ({{prompt, output_len}} or ShareGPT conversations)")
    rng = random.Random(seed)
    rng.shuffle(usable)
    return [usable[i % len(usable)] for i in range(num_prompts)]


def poisson_gaps_s(rate: float, seed: int) -> Iterator[float]:
    """Seconds between arrivals: exponential with mean 1/rate (a Poisson process), or 0 for rate inf."""
    rng = random.Random(seed + 1)
    while True:
        yield 0.0 if rate == float("inf") else rng.expovariate(rate)
