"""What every bench suite shares: the machine record, the source commit, the results folder, a progress bar."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from minidisagg.kernels import cpu_native


def git_commit() -> Optional[str]:
    """The source checkout's HEAD commit, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info() -> dict[str, Any]:
    """CPU model, core count, the bf16 instruction sets present, library versions, commit and load.

    ``transformers`` is None where it is not installed (only the CPU suite needs it).
    """
    model, flags = cpu_native.cpu_model_and_flags()
    try:
        import transformers

        transformers_version: Optional[str] = transformers.__version__
    except ImportError:
        transformers_version = None
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "minidisagg_commit": git_commit(), "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "torch": torch.__version__, "transformers": transformers_version,
            "python": platform.python_version(), "loadavg_start": list(os.getloadavg())}


def default_out_dir() -> Path:
    """``benchmarks/results`` of the source checkout when there is one, else under the current directory."""
    repo = Path(__file__).resolve().parents[2]
    base = repo if (repo / "pyproject.toml").exists() else Path.cwd()
    return base / "benchmarks" / "results"


def write_result_files(result: dict[str, Any], stem: str, markdown: str,
                       out_dir: Optional[Path] = None) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` under ``out_dir`` (default ``benchmarks/results``)."""
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path


def add_output_args(ap: argparse.ArgumentParser, stem_default: str) -> None:
    """``--out-dir`` and ``--stem`` (default ``<stem_default>-<device>-<date>``) of a benchmark script."""
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--stem", default=None, help=f"file name stem (default {stem_default}-<device>-<date>)")


def finish_run(benchmark: str, args: argparse.Namespace, info: dict[str, Any], rows: list, summary: dict[str, Any],
               stem_default: str, markdown: Callable[[dict[str, Any], str], str]) -> dict[str, Any]:
    """Assemble a benchmark script's result, print its Markdown and write ``<stem>.{json,md}``; the result.

    ``args`` carries ``model``, ``device``, ``stem`` and ``out_dir`` (``add_output_args``); the stem
    defaults to ``<stem_default>-<device>-<date>``.
    """
    result = {"benchmark": benchmark, "model": args.model, "device": args.device, "args": vars(args),
              "machine": info, "loadavg_end": list(os.getloadavg()), "rows": rows, "summary": summary}
    date = datetime.date.today().isoformat()
    md = markdown(result, date)
    print(md)
    json_path, md_path = write_result_files(result, args.stem or f"{stem_default}-{args.device}-{date}", md,
                                            args.out_dir)
    print(f"wrote {json_path} and {md_path}")
    return result


def compact_png(path: Path) -> None:
    """Re-save a chart PNG with a 256-colour palette: about a third of the bytes, no visible change for a plot."""
    from PIL import Image

    with Image.open(path) as image:
        palette = image.convert("RGB").quantize(256)
    palette.save(path, optimize=True)


def progress_bar(console: Console, enabled: bool) -> Progress:
    """A rich progress bar: description, bar, done/total, elapsed time (silent when not ``enabled``)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=console, disable=not enabled)
