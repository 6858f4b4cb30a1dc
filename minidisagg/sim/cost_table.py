"""Step-cost models read from a committed GPU benchmark (``benchmarks/results/gpu-<card>-<date>.json``).

``minidisagg bench gpu`` measures, per model shape, the engine's decode step at a few batch sizes and whole
prefills at a few prompt lengths on one card. ``costs_from_gpu_table`` turns those rows into the
simulator's ``StepCostModel``: decode points as measured (at the benchmark's context, prompt_len +
new_tokens / 2 tokens per sequence), the prefill line fitted to the prefill rows (tokens, causal
attention pairs, seconds). The rows carry no decode time at longer contexts, so each extra context token
is charged by roofline arithmetic: its K and V bytes (bf16) read once per step at the card's measured read
bandwidth. The table holds one GPU per instance: no row is tensor-parallel, and ``tensor_parallel_degrees``
says so rather than inventing a TP cost.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from minidisagg.config import PRESETS
from minidisagg.engine.step_cost import StepCostModel

_DECODE = re.compile(r"^decode (?P<model>\S+) bs(?P<batch>\d+)(?P<tp> tp\d+)?$")
_PREFILL = re.compile(r"^prefill (?P<model>\S+) (?P<tokens>\d+)(?P<tp> tp\d+)?$")
_TP = re.compile(r"\btp(\d+)\b")
_DATE = re.compile(r"\d{4}-\d\d-\d\d")


def default_results_dir() -> Path:
    """``benchmarks/results`` of the checkout this package lives in."""
    return Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def read_result_json(path: Path, what: str) -> Any:
    """The parsed JSON of a committed results file; ValueError naming ``what`` it should be when it cannot be read."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read {what} ({exc})") from None


def find_gpu_table(card: str, results_dir: Optional[Path] = None) -> Path:
    """The newest committed ``gpu-<card>*.json`` (``card``: ``h100``, ``h200``, ...); ValueError listing what exists."""
    results_dir = results_dir or default_results_dir()
    found = [p for p in results_dir.glob("gpu-*.json") if p.stem.startswith(f"gpu-{card.lower()}")]
    found = [p for p in found if _DATE.search(p.stem)]
    if not found:
        cards = sorted({_DATE.split(p.stem)[0].strip("-").removeprefix("gpu-") for p in results_dir.glob("gpu-*.json")})
        raise ValueError(f"no committed GPU cost table for card {card!r} in {results_dir} (tables for: "
                         f"{', '.join(cards) or 'none'}); run `minidisagg bench gpu` on that card, or pass --costs")
    return max(found, key=lambda p: (_DATE.findall(p.stem)[-1], p.stem))


@dataclass(frozen=True)
class GpuTable:
    """One committed GPU benchmark, parsed: the card, its bandwidth, and the decode/prefill rows per model."""

    path: Path
    card: str
    read_GBps: float
    decode_context_tokens: int
    decode_ms: dict[str, dict[int, float]]  # model -> batch -> ms (TP 1 rows only)
    prefill_ms: dict[str, dict[int, float]]  # model -> prompt tokens -> ms
    tp_rows: tuple[str, ...]  # names of rows measured with tensor parallelism (none in today's tables)

    @classmethod
    def load(cls, path: str | Path) -> "GpuTable":
        """Parse ``path``; ValueError when it is not a ``bench gpu`` result."""
        path = Path(path)
        data = read_result_json(path, "a GPU cost table")
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            raise ValueError(f"{path}: no 'rows' list; is it a `minidisagg bench gpu` result?")
        decode: dict[str, dict[int, float]] = {}
        prefill: dict[str, dict[int, float]] = {}
        tp_rows = []
        for row in data["rows"]:
            name, value, unit = row.get("name", ""), row.get("value"), row.get("unit")
            if _TP.search(name):
                tp_rows.append(name)
            if unit != "ms" or not value or value <= 0:
                continue
            if m := _DECODE.match(name):
                if not m["tp"]:
                    decode.setdefault(m["model"], {})[int(m["batch"])] = float(value)
            elif (m := _PREFILL.match(name)) and not m["tp"]:
                prefill.setdefault(m["model"], {})[int(m["tokens"])] = float(value)
        bandwidth = float(data.get("read_GBps") or data.get("copy_GBps") or 0.0)
        context = int(data.get("prompt_len", 0)) + int(data.get("new_tokens", 0)) // 2
        return cls(path, str(data.get("card", path.stem)), bandwidth, context, decode, prefill, tuple(tp_rows))

    @property
    def models(self) -> list[str]:
        """Models with both decode and prefill rows."""
        return sorted(set(self.decode_ms) & set(self.prefill_ms))

    def tensor_parallel_degrees(self, model: str) -> list[int]:
        """TP degrees the table measured for ``model``: [1] unless rows named ``... tpN`` exist."""
        degrees = {1}
        for name in self.tp_rows:
            if f" {model} " in f" {name} ":
                degrees |= {int(d) for d in _TP.findall(name)}
        return sorted(degrees)

    def tp_note(self, model: str) -> str:
        """One line saying which TP degrees the table holds for ``model``."""
        degrees = self.tensor_parallel_degrees(model)
        if degrees == [1]:
            return (f"tensor parallelism: not in the cost table ({self.path.name} times {model} on one GPU only); "
                    f"every instance is planned at TP 1")
        return f"tensor parallelism: the cost table has TP degrees {degrees} for {model}"


def costs_from_gpu_table(table: GpuTable, model: str) -> StepCostModel:
    """The ``StepCostModel`` of ``model`` on ``table``'s card (TP 1); ValueError naming the models it has."""
    if model not in table.models:
        raise ValueError(f"{table.path.name} has no decode and prefill rows for {model!r}; it has: "
                         f"{', '.join(table.models) or 'none'}")
    if len(table.prefill_ms[model]) < 2:
        raise ValueError(f"{table.path.name}: {model} needs prefill rows at two or more prompt lengths")
    if table.read_GBps <= 0:
        raise ValueError(f"{table.path.name}: no read_GBps or copy_GBps to charge decode context by")
    kv_bytes_per_token = PRESETS[model].kv_bytes_per_token(2) if model in PRESETS else 0
    points = [(n, n * (n + 1) / 2, ms / 1e3) for n, ms in sorted(table.prefill_ms[model].items())]
    batches = sorted(table.decode_ms[model])
    return StepCostModel.fitted(points, batches, [table.decode_ms[model][b] / 1e3 for b in batches],
                                decode_context_s=kv_bytes_per_token / (table.read_GBps * 1e9),
                                decode_reference_context=table.decode_context_tokens, device=table.card)
