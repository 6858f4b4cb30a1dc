"""``minidisagg course grade labs/NN_topic.ipynb ...``: run a student's lab headless and score it.

The notebook runs top to bottom in a fresh kernel (a failing cell does not stop it; a cell that
hangs is interrupted after ``--cell-timeout-s``). One appended cell then runs every task's hidden
cases on the student's own functions (``grade_kernel.collect``). A task scores its points when its
check cell and its hidden cases both passed. Predictions are listed with their error, written
answers as "to be read". The table goes to the terminal and a JSON report to ``--json`` (one file
for all the notebooks graded), for an instructor to collect. The exit code is 0 once every
notebook was graded, whatever the score; 2 when one could not be (not a lab, unreadable).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from minidisagg.course.claims import STRICT_ENV
from minidisagg.course.build import WRITTEN_HEADER, WRITTEN_PROMPT, WRITTEN_STUB, WRITTEN_TAG, LabSourceError, lab_number
from minidisagg.course.grading import REPORT_MARK, LabGrading, lab_grading

COLLECT_CELL = "from minidisagg.course.grade_kernel import collect\ncollect({lab}, globals())"


class GradeError(RuntimeError):
    """A notebook that cannot be graded; the message says why and what to do."""


@dataclass(frozen=True)
class TaskGrade:
    """One task's score, with the check's and the hidden cases' messages."""

    task: str
    points: int
    max_points: int
    check_passed: bool
    hidden_passed: bool
    message: str


@dataclass(frozen=True)
class WrittenAnswer:
    """A written question's answer as the student left it, for a person to read."""

    question: str
    answered: bool
    text: str


@dataclass
class LabGrade:
    """The whole grade of one notebook."""

    notebook: str
    lab: int
    tasks: list[TaskGrade]
    predictions: list[dict[str, Any]]
    written: list[WrittenAnswer]
    seconds: float
    problems: list[str] = field(default_factory=list)

    @property
    def points(self) -> int:
        """Points scored."""
        return sum(t.points for t in self.tasks)

    @property
    def max_points(self) -> int:
        """Full marks."""
        return sum(t.max_points for t in self.tasks)


def written_answers(nb: Any) -> list[WrittenAnswer]:
    """The ``written-answer`` cells of a notebook: the text under their header, empty when untouched."""
    answers = []
    for cell in nb.cells:
        if cell.cell_type != "markdown" or WRITTEN_TAG not in cell.metadata.get("tags", []):
            continue
        source = cell.source if isinstance(cell.source, str) else "".join(cell.source)
        text = source.strip()
        question = text[2:].split(".", 1)[0] if text.startswith("**W") else "W?"
        stub = WRITTEN_STUB.format(question=question)
        header = f"**{question}. Your answer.**"
        if text == stub:
            answers.append(WrittenAnswer(question, False, ""))
            continue
        match = WRITTEN_HEADER.match(text)
        body = text[match.end():] if match else text.removeprefix(header)
        body = body.replace(WRITTEN_PROMPT, "").strip()
        answers.append(WrittenAnswer(question, bool(body), body))
    return answers


def _kernel_report(nb: Any) -> Optional[dict[str, Any]]:
    for output in nb.cells[-1].get("outputs", []):
        text = output.get("text", "")
        text = text if isinstance(text, str) else "".join(text)
        if REPORT_MARK in text:
            return json.loads(text.split(REPORT_MARK)[1])
    return None


def _kernel_error(nb: Any) -> str:
    for output in nb.cells[-1].get("outputs", []):
        if output.get("output_type") == "error":
            return f"{output.get('ename')}: {output.get('evalue')}"
    return "the grading cell printed no report"


def score(grading: LabGrading, report: dict[str, Any]) -> list[TaskGrade]:
    """Each task's points from the kernel's report: full when check and hidden cases passed, else 0."""
    outcomes = {o["task"]: o for o in report.get("tasks", [])}
    grades = []
    for task in grading.tasks:
        outcome = outcomes.get(task.task)
        if outcome is None:
            grades.append(TaskGrade(task.task, 0, task.points, False, False, "not graded: the kernel did not report it"))
            continue
        ok = outcome["check_passed"] and outcome["hidden_passed"]
        if ok:
            message = f"check: {outcome['check_detail']}; hidden cases: {outcome['hidden_detail']}"
        elif not outcome["check_passed"]:
            message = outcome["check_detail"]
        else:
            message = f"passed its check, but the hidden cases failed: {outcome['hidden_detail']}"
        grades.append(TaskGrade(task.task, task.points if ok else 0, task.points, outcome["check_passed"],
                                outcome["hidden_passed"], message))
    return grades


def grade_notebook(path: Path, cell_timeout_s: int = 600) -> LabGrade:
    """Run ``path`` in a fresh kernel and grade it (GradeError when it is not a gradable lab)."""
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    if not path.is_file():
        raise GradeError(f"{path}: file not found")
    try:
        lab = lab_number(path)
        grading = lab_grading(lab)
    except (LabSourceError, LookupError, ModuleNotFoundError) as err:
        raise GradeError(f"{path}: not a gradable lab ({err})") from err
    try:
        nb = nbformat.read(str(path), as_version=4)
    except Exception as err:  # noqa: BLE001 - nbformat raises several kinds on a corrupt file
        raise GradeError(f"{path}: not a readable notebook ({err})") from err
    written = written_answers(nb)
    nb.cells.append(nbformat.v4.new_code_cell(COLLECT_CELL.format(lab=lab)))
    start = time.perf_counter()
    problems = []
    client = NotebookClient(nb, timeout=cell_timeout_s, kernel_name="python3", allow_errors=True,
                            interrupt_on_timeout=True, startup_timeout=300,  # a loaded host starts kernels slowly
                            resources={"metadata": {"path": str(path.resolve().parent)}})
    strict = os.environ.pop(STRICT_ENV, None)  # the kernel inherits this: its claims print, never raise
    try:
        client.execute()
    except Exception as err:  # noqa: BLE001 - a dead kernel: grade what came back
        problems.append(f"the notebook did not finish: {type(err).__name__}: {str(err)[:200]}")
    finally:
        if strict is not None:
            os.environ[STRICT_ENV] = strict
    report = _kernel_report(nb)
    if report is None:
        problems.append(f"no report from the grading cell ({_kernel_error(nb)})")
        report = {"tasks": [], "predictions": []}
    return LabGrade(str(path), lab, score(grading, report), report.get("predictions", []), written,
                    time.perf_counter() - start, problems)


def print_grade(grade: LabGrade) -> None:
    """The grade as a table on the terminal."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(100, Console().width))
    table = Table(title=f"{grade.notebook}: {grade.points} / {grade.max_points} points ({grade.seconds:.0f} s)")
    for column in ("item", "points", "verdict", "message"):
        table.add_column(column, overflow="fold")
    for t in grade.tasks:
        table.add_row(t.task, f"{t.points}/{t.max_points}", "passed" if t.points else "failed", t.message)
    for p in grade.predictions:
        verdict = "no prediction" if p["predicted"] is None else ("within" if p["within"] else "outside")
        table.add_row(p["question"], "-", verdict, f"{p['error']}; tolerance {p['tolerance']}; measured {p['measured']:.4g}")
    for w in grade.written:
        table.add_row(w.question, "-", "to be read" if w.answered else "not answered", w.text[:200])
    console.print(table)
    for problem in grade.problems:
        console.print(f"[red]problem:[/red] {problem}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``minidisagg course grade``."""
    parser = argparse.ArgumentParser(prog="minidisagg course grade", description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path, help="lab notebooks, e.g. labs/01_arithmetic_intensity.ipynb")
    parser.add_argument("--json", type=Path, default=Path("grade-report.json"), help="report path (default: %(default)s)")
    parser.add_argument("--cell-timeout-s", type=int, default=600, help="interrupt a cell after this long")
    args = parser.parse_args(argv)
    grades, failed = [], False
    for path in args.notebooks:
        try:
            grade = grade_notebook(path, args.cell_timeout_s)
        except GradeError as err:
            print(f"error: {err}", file=sys.stderr)
            failed = True
            continue
        print_grade(grade)
        grades.append(grade)
    report = [dict(asdict(g), points=g.points, max_points=g.max_points) for g in grades]
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"report: {args.json}")
    return 2 if failed else 0
