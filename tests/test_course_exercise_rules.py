"""The course's rules for exercises, checked on every lab: tasks, predictions, written questions, hints, no answers."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from minidisagg.course.build import PREDICTION_LINE, WRITTEN_TAG
from minidisagg.course.grading import lab_grading

REPO = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((REPO / "solutions").glob("[0-9][0-9]_*.ipynb"))
# arithmetic between names or numbers, or the usual folds: what a formula looks like in a line of prose
# (a slash counts with spaces around it: "prefill/decode" is a phrase, "bytes / bandwidth" a formula)
FORMULA = re.compile(r"[\w)\]]\s*(?:\*\*?|//|\+|%)\s*[\w(]|[\w)\]]\s+/\s+[\w(]|\b(?:max|min|sum)\(")
HINT_LINE = re.compile(r"^\s*(?:#\s*)?(TODO|HINT):\s*(.*)$")


def _code(path: Path) -> list[str]:
    return [c.source for c in nbformat.read(str(path), as_version=4).cells if c.cell_type == "code"]


@pytest.fixture(params=SOLUTIONS, ids=lambda p: p.stem)
def lab(request):
    path = request.param
    return int(path.name[:2]), path, REPO / "labs" / path.name


def test_tasks_are_few_and_at_least_half_need_judgement(lab):
    grading = lab_grading(lab[0])
    assert 2 <= len(grading.tasks) <= 4, [t.task for t in grading.tasks]
    assert 2 * sum(t.design for t in grading.tasks) >= len(grading.tasks), [(t.task, t.design) for t in grading.tasks]
    names = [t.task for t in grading.tasks]
    assert names == [f"Lab {lab[0]}, Task {k}" for k in range(1, len(names) + 1)]


def test_three_predictions_checked_after_they_are_written(lab):
    number, solution, student = lab
    grading = lab_grading(number)
    assert len(grading.predictions) >= 3
    code = "\n".join(_code(solution))
    assert sum(bool(PREDICTION_LINE.match(line)) for line in code.split("\n")) >= len(grading.predictions)
    for question in grading.predictions:
        assert re.search(rf"check_prediction\(\s*{re.escape(repr(question))}|check_prediction\(\s*\"{re.escape(question)}\"", code), question
    assert not any(PREDICTION_LINE.match(line) for line in "\n".join(_code(student)).split("\n"))


def test_two_written_questions_with_model_answers_and_rubrics_stay_in_solutions(lab):
    number, solution, student = lab
    grading = lab_grading(number)
    assert len(grading.written) >= 2
    answers = [c.source for c in nbformat.read(str(solution), as_version=4).cells if WRITTEN_TAG in c.metadata.get("tags", [])]
    assert [a.split(".")[0].strip("*") for a in answers] == list(grading.written)
    assert all("**Rubric.**" in a for a in answers)
    lab_text = nbformat.read(str(student), as_version=4)
    assert not any("**Rubric.**" in c.source for c in lab_text.cells)


def test_no_hint_or_todo_spells_out_a_formula(lab):
    offenders = [m.group(0).strip() for source in _code(lab[2]) for line in source.split("\n")
                 if (m := HINT_LINE.match(line)) and FORMULA.search(m.group(2))]
    assert not offenders, offenders


def test_the_student_notebook_never_names_a_reference(lab):
    number, _, student = lab
    code = "\n".join(_code(student))
    for task in lab_grading(number).tasks:
        module, _, attribute = task.reference.partition(":")
        assert not re.search(rf"\.{attribute}\b", code), f"{task.task}: the lab reaches {task.reference}"
        assert not re.search(rf"import[^\n]*\b{attribute}\b", code), f"{task.task}: the lab imports {task.reference}"
    for call in re.findall(r"learner_or_reference\(([^)]*)\)", code):
        assert re.search(r",\s*[\"']Lab \d+, Task \d+[\"']\s*$", call), f"learner_or_reference({call}) hands the notebook a reference"
