"""``minidisagg course verify [--gpu] [LAB ...]``: execute the solutions and decks, and count their claims.

Each notebook runs top to bottom in a fresh kernel (cells tagged ``raises-exception`` may raise).
The table lists, per notebook, the claims it checked, how many held, how long it took and on which
device; the command exits non-zero when a claim was not seen, a cell failed, or a notebook checks
fewer claims than the course promises (``MIN_CLAIMS``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from minidisagg.course.claims import NOT_SEEN_MARK, OK_MARK, STRICT_ENV, count_claims, device_name, host_load

ROOT = Path(__file__).resolve().parents[2]
MIN_CLAIMS = {"solutions": 5, "slides": 3}
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # the colours of a traceback's text


@dataclass
class NotebookVerdict:
    """What executing one notebook showed."""

    path: Path
    claims: int = 0
    held: int = 0
    seconds: float = 0.0
    device: str = "CPU"
    error: Optional[str] = None
    not_seen: list[str] = field(default_factory=list)
    claim_lines: list[str] = field(default_factory=list)  # every CLAIM line the notebook printed, in order

    @property
    def kind(self) -> str:
        """``solutions`` or ``slides``."""
        return self.path.parent.name

    @property
    def ok(self) -> bool:
        """No cell error, every claim held, and at least the promised number of claims."""
        return self.error is None and self.held == self.claims and self.claims >= MIN_CLAIMS.get(self.kind, 0)

    def problem(self) -> str:
        """Why this notebook fails verification ('' if it does not)."""
        if self.error:
            return self.error
        if self.held < self.claims:
            return f"{self.claims - self.held} claim(s) not seen: " + " | ".join(self.not_seen)
        if self.claims < MIN_CLAIMS.get(self.kind, 0):
            return f"only {self.claims} claims (at least {MIN_CLAIMS[self.kind]} expected)"
        return ""


def select_notebooks(names: Sequence[str], labs: bool = True, decks: bool = True) -> list[Path]:
    """Solutions and decks whose file name starts with one of ``names`` ('3', '03', '03_interference'), or all."""
    found: list[Path] = []
    for folder, wanted in (("solutions", labs), ("slides", decks)):
        if wanted:
            found += sorted((ROOT / folder).glob("[0-9][0-9]_*.ipynb"))
    if not names:
        return found
    keys = [n.zfill(2) if n.isdigit() else n for n in names]
    chosen = [p for p in found if any(p.name.startswith(k) for k in keys)]
    unknown = [n for n, k in zip(names, keys) if not any(p.name.startswith(k) for p in found)]
    if unknown:
        raise SystemExit(f"no solution or deck matches {unknown}; try a lab number such as 3 or a name such as "
                         f"03_interference")
    return chosen


def _output_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif out.get("output_type") == "error":
                parts.append("\n".join(out.get("traceback", [])))
            elif "text/plain" in out.get("data", {}):
                parts.append(out["data"]["text/plain"])
    return "\n".join(parts)


def verify_notebook(path: Path, timeout_s: int = 1200, write: bool = False,
                    executed_dir: Optional[Path] = None) -> NotebookVerdict:
    """Execute ``path`` in a fresh kernel (claims never raise here, so all are counted) and read its claims.

    ``executed_dir``: also save the executed notebook there, whatever happened (to read a failure's traceback).
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    verdict = NotebookVerdict(path, device=device_name("cuda" if os.environ.get("MINIDISAGG_LAB_DEVICE") == "cuda" else None))
    start = time.perf_counter()
    try:
        NotebookClient(nb, timeout=timeout_s, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    except CellExecutionError as err:
        verdict.error = f"a cell failed: {ANSI_ESCAPE.sub('', str(err)).strip().splitlines()[-1][:300]}"
    except Exception as err:  # a kernel that died or timed out
        verdict.error = f"{type(err).__name__}: {str(err)[:300]}"
    verdict.seconds = time.perf_counter() - start
    text = _output_text(nb)
    verdict.claims, verdict.held = count_claims(text)
    verdict.not_seen = [line.split(":", 1)[1].strip()[:160] for line in text.splitlines() if line.startswith(NOT_SEEN_MARK)]
    verdict.claim_lines = [line.strip() for line in text.splitlines() if line.startswith((OK_MARK, NOT_SEEN_MARK))]
    if write and verdict.ok:  # a saved output never holds a claim not seen (tests/test_course_claims.py)
        nb.metadata.pop("widgets", None)  # widget state means nothing without the kernel that drew it
        nbformat.write(nb, path)
    if executed_dir is not None:
        executed_dir.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, executed_dir / path.name)
    return verdict


def table_markdown(verdicts: Sequence[NotebookVerdict]) -> str:
    """The verification table as Markdown (what ``--report`` writes)."""
    lines = ["| notebook | claims checked | claims held | time (s) | device | verdict |", "|---|---:|---:|---:|---|---|"]
    for v in verdicts:
        lines.append(f"| {v.kind}/{v.path.name} | {v.claims} | {v.held} | {v.seconds:.0f} | {v.device} | "
                     f"{'ok' if v.ok else v.problem().replace('|', '/')} |")
    return "\n".join(lines)


def claims_markdown(verdicts: Sequence[NotebookVerdict]) -> str:
    """Every claim line of every notebook, under the notebook's name (the report's second part)."""
    parts = []
    for v in verdicts:
        parts.append(f"### {v.kind}/{v.path.name}\n")
        parts.extend(f"- {line}" for line in v.claim_lines)
        parts.append("")
    return "\n".join(parts)


def _write_report(path: Path, verdicts: Sequence[NotebookVerdict], host: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# course verify on {verdicts[0].device if verdicts else '-'}\n\nhost {host}\n\n"
                    f"{table_markdown(verdicts)}\n\n## Claims\n\n{claims_markdown(verdicts)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse the arguments, execute the chosen notebooks, print the table; 1 if anything failed."""
    parser = argparse.ArgumentParser(prog="minidisagg course verify", description=__doc__.splitlines()[0])
    parser.add_argument("labs", nargs="*", help="lab numbers or notebook names (default: every solution and deck)")
    parser.add_argument("--gpu", action="store_true", help="run the notebooks on the CUDA device (their GPU sizes)")
    parser.add_argument("--labs-only", action="store_true", help="solutions only, no decks")
    parser.add_argument("--decks-only", action="store_true", help="decks only, no solutions")
    parser.add_argument("--write", action="store_true", help="save each executed notebook's outputs in place (only a notebook whose every claim held)")
    parser.add_argument("--report", type=Path, help="also write the table as Markdown to this file")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds one cell may take (default 1200)")
    parser.add_argument("--save-executed", type=Path, metavar="DIR",
                        help="also save every executed notebook in DIR, failed ones included (tracebacks and all)")
    args = parser.parse_args(argv)
    if args.labs_only and args.decks_only:
        parser.error("--labs-only and --decks-only exclude each other")
    paths = select_notebooks(args.labs, labs=not args.decks_only, decks=not args.labs_only)
    os.environ[STRICT_ENV] = "0"  # count every claim instead of stopping at the first one not seen
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            print("--gpu: torch sees no CUDA device", file=sys.stderr)
            return 2
        os.environ["MINIDISAGG_LAB_DEVICE"] = "cuda"
    load = host_load()
    print(f"verifying {len(paths)} notebook(s); host {load.describe()}")
    verdicts = []
    for path in paths:
        print(f"  running {path.parent.name}/{path.name} ...", flush=True)
        v = verify_notebook(path, args.timeout, args.write, args.save_executed)
        print(f"    {v.claims} claims, {v.held} held, {v.seconds:.0f} s{'' if v.ok else '  FAILED: ' + v.problem()}", flush=True)
        verdicts.append(v)
        if args.report:  # after every notebook, so a run cut short still leaves what it verified
            _write_report(args.report, verdicts, load.describe())
    table = table_markdown(verdicts)
    print(table)
    failed = [v for v in verdicts if not v.ok]
    print(f"{len(verdicts) - len(failed)} of {len(verdicts)} notebooks verified"
          + (f"; failed: {', '.join(v.path.name for v in failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
