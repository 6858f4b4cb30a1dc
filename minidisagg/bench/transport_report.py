"""The transport benchmark's report: rich tables, Markdown, the bandwidth figure, the files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from rich.table import Table

from minidisagg.bench.common import compact_png, default_out_dir
from minidisagg.bench.transport_names import CEILING_OF, SOCKET, TCP_POOL, size_label


def _num(x: Optional[float], fmt: str = ".2f", scale: float = 1.0) -> str:
    return "" if x is None else format(x * scale, fmt)


TableSpec = tuple[str, str, list[tuple[str, Callable[[dict[str, Any]], str]]]]
TABLES: list[TableSpec] = [
    ("KV transfer bandwidth", "rows", [
        ("transport", lambda r: r["transport"]), ("message", lambda r: size_label(r["message_bytes"])),
        ("GB/s", lambda r: _num(r["GBps"])), ("best GB/s", lambda r: _num(r["GBps_best"])),
        ("ceiling", lambda r: r["ceiling"] or ""),
        ("ceiling GB/s", lambda r: _num(r["ceiling_GBps"])),
        ("fraction of ceiling", lambda r: _num(r["fraction_of_ceiling"])),
        ("fraction of raw TCP into pool-sized memory", lambda r: _num(r.get("fraction_of_pool_destination_ceiling")))]),
    ("KV transfer vs prefill (measured: LLMEngine prefill on this CPU, random weights; socket transfer)",
     "kv_vs_prefill", [
        ("model", lambda r: r["model"]), ("prompt tokens", lambda r: str(r["prompt_tokens"])),
        ("KV MB", lambda r: _num(r["kv_bytes"], ".1f", 1e-6)),
        ("prefill ms", lambda r: _num(r["prefill_s"], ".1f", 1e3)),
        ("transfer ms", lambda r: _num(r["transfer_s"], ".1f", 1e3)),
        ("transfer GB/s", lambda r: _num(r["transfer_GBps"])),
        ("transfer / prefill", lambda r: _num(r["transfer_over_prefill"], ".3f"))]),
    ("Llama-8B: a PROJECTION, not a measurement (KV bf16 / link GB/s; prefill = H200 roofline lower bound)",
     "projection_llama8b", [
        ("prompt tokens", lambda r: str(r["prompt_tokens"])), ("KV MB", lambda r: _num(r["kv_bytes"], ".1f", 1e-6)),
        ("link", lambda r: r["link"]), ("transfer ms", lambda r: _num(r["transfer_s"], ".3g", 1e3)),
        ("prefill estimate ms", lambda r: _num(r["prefill_estimate_s"], ".3g", 1e3)),
        ("transfer / prefill", lambda r: _num(r["transfer_over_prefill"], ".3f"))]),
]


def render_tables(result: dict[str, Any]) -> list[Table]:
    """The three tables (bandwidth, KV vs prefill, projection) for rich."""
    tables = []
    for title, key, columns in TABLES:
        table = Table(title=title)
        for i, (name, _) in enumerate(columns):
            table.add_column(name, justify="right" if i and name not in ("ceiling", "link") else "left")
        for row in result[key]:
            table.add_row(*(cell(row) for _, cell in columns))
        tables.append(table)
    return tables


def to_markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown report."""
    m, s = result["machine"], result["settings"]
    lines = [f"# KV transfer bandwidth ({result['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch threads {s['torch_threads']}; torch {m['torch']}; "
             f"load average {m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end. "
             f"{s['definition']}. Pages: {s['pages']}. Median of {s['repeats']} interleaved repetitions. "
             f"dist (gloo): {result['dist']}. Every transfer's bytes checked: {all(result['verified'].values())}."]
    for title, key, columns in TABLES:
        align = ["---" if name in ("transport", "model", "ceiling", "link") else "---:" for name, _ in columns]
        header = "| " + " | ".join(name for name, _ in columns) + " |"
        lines += ["", f"## {title}", "", header, "|" + "|".join(align) + "|"]
        lines += ["| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in result[key]]
    lines += ["", "Goals:", ""] + [f"- {'met' if ok else 'MISSED'}: {goal}" for goal, ok in result["goals"].items()]
    return "\n".join(lines) + "\n"


def plot_bandwidth(result: dict[str, Any], path: Path) -> None:
    """GB/s against message size (log x): a line per transport, its ceiling dashed in the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for color, (transport, ceiling) in zip(("tab:blue", "tab:orange", "tab:green"), CEILING_OF.items()):
        for name, style in ((transport, "-o"), (ceiling, "--"), (TCP_POOL if transport == SOCKET else "", ":")):
            rows = [r for r in result["rows"] if r["transport"] == name]
            if rows:
                ax.plot([r["message_bytes"] for r in rows], [r["GBps"] for r in rows], style, color=color,
                        label=name if name == transport else f"ceiling: {name}" if name == ceiling else name)
    sizes = sorted({r["message_bytes"] for r in result["rows"]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [size_label(n) for n in sizes])
    ax.set(xlabel="message size (one layer's pages)", ylabel="GB/s", ylim=(0, None))
    ax.set_title(f"KV transfer bandwidth, {result['machine']['cpu']} ({result['machine']['cores']} cores)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    compact_png(path)


def write_results(result: dict[str, Any], out_dir: Optional[Path] = None) -> list[Path]:
    """Write ``transport-<date>.json``, ``.md`` and ``.png``; returns their paths."""
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"transport-{result['date'][:10]}{ext}" for ext in (".json", ".md", ".png")]
    paths[0].write_text(json.dumps(result, indent=2) + "\n")
    paths[1].write_text(to_markdown(result))
    plot_bandwidth(result, paths[2])
    return paths
