"""What a lossy KV wire does to the output: greedy tokens and logits when a prompt's pages make the trip.

``benchmarks/kv_wire_quant.py`` and lab 7 share these: each prompt is prefilled once into its own
blocks; per wire, its pages are replaced by their round trip and all prompts decode together, step by
step, in the same batches every time, so the runs differ only in the pages (no ``batch_invariant``
needed, which would be ~10x slower on a CPU).
"""

from __future__ import annotations

import statistics
from typing import Any, Callable, Mapping, Sequence

import torch

from minidisagg.engine.batch import BatchItem
from minidisagg.engine.runner import ModelRunner
from minidisagg.kv.cache import PagedKVCache
from minidisagg.kv.pages import gather_pages, scatter_pages
from minidisagg.kv.wire_quant import WireMessage
from minidisagg.models.registry import LoadedModel

RoundTrip = Callable[[torch.Tensor], torch.Tensor]
NO_WIRE = "none"  # the uncompressed pages: every other run is compared with this one


def round_trip(pages: torch.Tensor, wire: str) -> torch.Tensor:
    """``pages`` as the decode pool gets them: through a ``WireMessage`` (int8, fp8_e4m3), or cast to bfloat16 and back."""
    if wire == "bfloat16":
        return pages.to(torch.bfloat16).to(pages.dtype)
    return WireMessage.encode(pages, wire).decode(pages.dtype)


def engine_round_trips(wires: Sequence[str]) -> dict[str, RoundTrip]:
    """``round_trip`` for each named wire ("bfloat16", "int8", "fp8_e4m3")."""
    return {wire: (lambda pages, w=wire: round_trip(pages, w)) for wire in wires}


def prefill_pages(loaded: LoadedModel, prompt_ids: Sequence[int], block_size: int
                  ) -> tuple[ModelRunner, list[int], torch.Tensor]:
    """Prefill ``prompt_ids`` into a fresh pool; the runner, the block table and the first token's logits."""
    num_blocks = -(-(len(prompt_ids) + 1) // block_size)
    cache = PagedKVCache(loaded.config, num_blocks, block_size, loaded.model.dtype, loaded.model.device)
    runner = ModelRunner(loaded.model, cache, batch_invariant=True)
    table = list(range(num_blocks))
    with torch.inference_mode():
        logits = runner.execute([BatchItem(list(prompt_ids), 0, table, True)])[0]
    return runner, table, logits


def agreement(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> dict[str, float]:
    """Fraction of token positions equal, mean fraction of each output before its first difference, outputs identical."""
    equal = sum(a == b for r, o in zip(reference, other) for a, b in zip(r, o))
    total = sum(len(r) for r in reference)
    prefixes = []
    for r, o in zip(reference, other):
        n = next((i for i, (a, b) in enumerate(zip(r, o)) if a != b), min(len(r), len(o)))
        prefixes.append(n / len(r))
    return {"token_agreement": equal / total, "mean_prefix_fraction": statistics.mean(prefixes),
            "identical_outputs": sum(p == 1.0 for p in prefixes)}


def greedy_runs(loaded: LoadedModel, prompts: Sequence[Sequence[int]], block_size: int, num_tokens: int,
                wires: Mapping[str, RoundTrip]) -> dict[str, Any]:
    """Greedy tokens per wire (``none`` first) when the prompts' pages made the trip, and the first decode step's logit error.

    ``wires`` maps a name to the round trip its pages take. Each run other than ``none`` also reports
    ``agreement`` with ``none``, ``first_step_max_abs`` (the largest logit error of the first step that
    reads the transferred pages), that error over the logits' range, and the top-1 flips of that step.
    """
    if num_tokens < 2:
        raise ValueError(f"num_tokens must be >= 2 (the first decode step reads the pages), got {num_tokens}")
    tables, num_blocks = [], 0
    for p in prompts:
        n = -(-(len(p) + num_tokens) // block_size)
        tables.append(list(range(num_blocks, num_blocks + n)))
        num_blocks += n
    cache = PagedKVCache(loaded.config, num_blocks, block_size, loaded.model.dtype, loaded.model.device)
    runner = ModelRunner(loaded.model, cache)
    runs: dict[str, Any] = {}
    with torch.inference_mode():
        first, pages = [], []
        for p, table in zip(prompts, tables):
            first.append(int(runner.execute([BatchItem(list(p), 0, table, True)])[0].argmax()))
            pages.append(gather_pages(cache, table).clone())
        step_logits = {}
        for wire, trip in {NO_WIRE: (lambda x: x), **wires}.items():
            for page, table in zip(pages, tables):
                scatter_pages(cache, table, trip(page))
            tokens = [[t] for t in first]
            for step in range(num_tokens - 1):
                logits = runner.execute([BatchItem([t[-1]], len(p) + step, table, True)
                                         for t, p, table in zip(tokens, prompts, tables)])
                if step == 0:
                    step_logits[wire] = logits.clone()
                for t, row in zip(tokens, logits):
                    t.append(int(row.argmax()))
            runs[wire] = {"tokens": tokens}
            if wire != NO_WIRE:
                reference, got = step_logits[NO_WIRE], step_logits[wire]
                error = (got - reference).abs().amax(dim=-1)
                spread = reference.amax(dim=-1) - reference.amin(dim=-1)
                runs[wire].update(agreement(runs[NO_WIRE]["tokens"], tokens), first_step_max_abs=float(error.max()),
                                  first_step_max_rel_to_range=float((error / spread).max()),
                                  first_step_top1_flips=int((got.argmax(-1) != reference.argmax(-1)).sum()))
    return runs
