"""A lab's claims beside the committed GPU run's: the same statements, measured on two devices.

``course verify --gpu`` writes a report (``benchmarks/results/course-gpu-<card>-<date>.md``) with every
claim line each notebook printed on that card. At the end of a lab, ``beside_gpu_run`` pairs the
claims this kernel just made with that report's: a statement both runs made shows both
measurements; a statement keyed by device (``claims.by_device``) shows each device's wording, which
is where the lesson differs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from minidisagg.course.claims import NOT_SEEN_MARK, OK_MARK, Claim, made_claims

_LINE = re.compile(r"^(?P<mark>CLAIM ok|CLAIM NOT SEEN): (?P<statement>.*?)(?:  \[(?P<measured>.*)\])?$")


@dataclass(frozen=True)
class RecordedClaim:
    """One claim line of a committed report: its statement, its numbers, and whether it held there."""

    statement: str
    measured: str
    held: bool

    @classmethod
    def parse(cls, line: str) -> Optional["RecordedClaim"]:
        """``CLAIM ok: statement  [measured]`` as a record (None for any other line)."""
        match = _LINE.match(line.strip())
        if match is None:
            return None
        return cls(match["statement"], match["measured"] or "", match["mark"] == OK_MARK)


@dataclass(frozen=True)
class Beside:
    """The claims of one lab on this device and on the recorded GPU."""

    here: str  # this kernel's device, e.g. "CPU"
    card: str  # the recorded run's card
    report: str  # its file name
    both: list[tuple[Claim, RecordedClaim]]  # same statement, two measurements
    here_only: list[Claim]  # worded for this device (or new since the recording)
    there_only: list[RecordedClaim]  # worded for the GPU

    @property
    def recorded_all_held(self) -> bool:
        """Whether every claim of this lab held in the recorded run."""
        return all(r.held for _, r in self.both) and all(r.held for r in self.there_only)

    def text(self, width: int = 100) -> str:
        """The side-by-side listing a lab prints."""
        def cut(s: str) -> str:
            return s if len(s) <= width else s[: width - 3] + "..."

        lines = [f"{len(self.both)} statements measured on both; {self.card} from {self.report}"]
        for mine, theirs in self.both:
            lines += [f"- {cut(mine.statement)}", f"    {self.here}: {cut(mine.measured)}",
                      f"    {self.card}: {cut(theirs.measured)}"]
        if self.here_only or self.there_only:
            lines.append("worded for each device (the lesson differs):")
            lines += [f"  {self.here}: {cut(c.statement)}  [{cut(c.measured)}]" for c in self.here_only]
            lines += [f"  {self.card}: {cut(r.statement)}  [{cut(r.measured)}]"
                      + ("" if r.held else f"  ({NOT_SEEN_MARK} there)") for r in self.there_only]
        return "\n".join(lines)


def beside_gpu_run(notebook: str, claims: Optional[Sequence[Claim]] = None,
                   results: Optional[Path] = None) -> Optional[Beside]:
    """Pair this kernel's claims (or ``claims``) with the committed GPU report's claims of ``notebook``; print it.

    ``notebook`` names the solution as the report does (``solutions/04_disaggregation.ipynb``). None (and a
    line saying so) when no report is committed or it does not cover the notebook.
    """
    from minidisagg.course.deck_figures import gpu_course_run

    run = gpu_course_run(results)
    if run is None or notebook not in run["claims"]:
        print(f"no committed GPU run covers {notebook} (run `minidisagg course verify --gpu --report ...`)")
        return None
    recorded = [r for r in (RecordedClaim.parse(line) for line in run["claims"][notebook]) if r is not None]
    mine = list(made_claims() if claims is None else claims)
    by_statement = {r.statement: r for r in recorded}
    both = [(c, by_statement[c.statement]) for c in mine if c.statement in by_statement]
    said_here = {c.statement for c in mine}
    here = mine[0].device if mine else "here"
    result = Beside(here, run["card"], run["file"], both,
                    [c for c in mine if c.statement not in by_statement],
                    [r for r in recorded if r.statement not in said_here])
    print(result.text())
    return result
