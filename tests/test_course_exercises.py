"""Exercise mechanics: predictions, written answers, solution-only cells, and the gate on references."""

from __future__ import annotations

import random

import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from minidisagg.course import checking, grading
from minidisagg.course.build import LabSourceError, build_lab
from minidisagg.course.checking import CheckFailed, TaskNotChecked, failed, learner_or_reference, passed, skip_task, task_check
from minidisagg.course.grade import written_answers
from minidisagg.course.predict import Tolerance, check_prediction, prediction_results, within_abs, within_factor, within_rel


def test_tolerances_hold_where_they_should_on_random_values():
    rng = random.Random()
    for _ in range(200):
        measured = rng.uniform(0.1, 100)
        assert within_factor(2).holds(measured * rng.uniform(0.51, 1.99), measured)
        assert not within_factor(2).holds(measured * rng.uniform(2.01, 9), measured)
        assert not within_factor(2).holds(measured / rng.uniform(2.01, 9), measured)
        assert within_rel(0.25).holds(measured * rng.uniform(0.76, 1.24), measured)
        assert not within_rel(0.25).holds(measured * rng.uniform(1.26, 3), measured)
        delta = rng.uniform(0, 1)
        assert within_abs(1).holds(measured + delta, measured) and not within_abs(1).holds(measured + 1 + delta + 1e-9, measured)
    assert not within_factor(2).holds(-1.0, 1.0)


@pytest.mark.parametrize("kwargs", [{}, {"factor": 2, "rel": 0.1}, {"factor": 0.5}, {"abs": -1}])
def test_a_malformed_tolerance_is_refused(kwargs):
    with pytest.raises(ValueError):
        Tolerance(**kwargs)


def test_a_prediction_prints_its_error_and_never_raises(capsys):
    result = check_prediction("Lab 9, Q1", 30, measured=10.0, tolerance=within_factor(2), why="caches", unit="ms")
    line = capsys.readouterr().out
    assert not result.within and "3x the measurement" in line and "outside the tolerance asked, within 2x" in line and "caches" in line
    result = check_prediction("Lab 9, Q2", 11, measured=10.0, tolerance=within_rel(0.2), why="noise")
    assert result.within and "over by 10%" in capsys.readouterr().out
    for missing in (..., None):
        result = check_prediction("Lab 9, Q3", missing, measured=1.0, tolerance=within_abs(1), why="-")
        assert result.predicted is None and "no prediction yet" in capsys.readouterr().out
    result = check_prediction("Lab 9, Q3", "twelve", measured=1.0, tolerance=within_abs(1), why="-")
    assert result.predicted is None and "a prediction is a number" in capsys.readouterr().out
    assert set(prediction_results()) >= {"Lab 9, Q1", "Lab 9, Q2", "Lab 9, Q3"}


def _solution_notebook() -> object:
    return new_notebook(cells=[
        new_markdown_cell("**Q1.** How many?"),
        new_code_cell("q1_how_many = 24  ### PREDICTION\nother = 3"),
        new_markdown_cell("Derivation: 2 * 12 = 24", metadata={"tags": ["solution-only"]}),
        new_markdown_cell("**W1.** Why?"),
        new_markdown_cell("**W1. Model answer.** Because.\n\n**Rubric.**\n- says because", metadata={"tags": ["written-answer"]}),
    ])


def test_the_generator_hides_predictions_model_answers_and_solution_only_cells():
    lab = build_lab(_solution_notebook(), 9)
    sources = [c.source for c in lab.cells]
    assert sources[1].startswith("q1_how_many = ...") and "24" not in sources[1] and sources[1].endswith("other = 3")
    assert not any("Derivation" in s for s in sources)
    assert sources[3] == "**W1. Your answer.** *(Double-click this cell and write it here.)*"
    assert not any("Because" in s or "Rubric" in s for s in sources)
    assert [(w.question, w.answered) for w in written_answers(lab)] == [("W1", False)]
    lab.cells[3].source = "**W1. Your answer.** It is memory-bound."
    assert [(w.question, w.answered, w.text) for w in written_answers(lab)] == [("W1", True, "It is memory-bound.")]


def test_a_written_answer_cell_without_its_header_is_refused():
    nb = new_notebook(cells=[new_markdown_cell("Because.", metadata={"tags": ["written-answer"]})])
    with pytest.raises(LabSourceError, match="Model answer"):
        build_lab(nb, 9)


@pytest.fixture
def lab9(monkeypatch):
    """A lab 9 with one task whose reference doubles its input."""

    @task_check("Lab 9, Task 1")
    def task1(fn):
        value = fn(21)
        return passed("doubles") if value == 42 else failed(f"got {value}")

    spec = grading.LabGrading(9, (grading.GradedTask("Lab 9, Task 1", "double", 1, task1, "operator:neg"),))
    monkeypatch.setattr(grading, "lab_grading", lambda lab: spec if lab == 9 else grading.LabGrading(lab, ()))
    checking.REGISTRY.clear()
    checking._SKIPPED.clear()
    yield task1
    checking.REGISTRY.clear()
    checking._SKIPPED.clear()


def stub(x):
    raise NotImplementedError("Lab 9, Task 1: double it")


def test_the_reference_is_out_of_reach_until_the_check_ran(lab9, capsys):
    use = learner_or_reference(stub, "Lab 9, Task 1")
    with pytest.raises(TaskNotChecked, match="run the check cell"):
        use(5)
    with pytest.raises(CheckFailed):
        lab9(stub)
    assert learner_or_reference(stub, "Lab 9, Task 1")(5) == -5  # operator.neg stands in for the reference
    assert "reference solution" in capsys.readouterr().out


def test_skipping_a_task_opens_the_reference_and_a_wrong_name_is_refused(lab9):
    skip_task("Lab 9, Task 1")
    assert learner_or_reference(stub, "Lab 9, Task 1")(3) == -3
    with pytest.raises(KeyError, match="not a task of lab 9"):
        skip_task("Lab 9, Task 7")


def test_a_working_learner_function_is_used_without_any_check(lab9):
    assert learner_or_reference(lambda x: 2 * x, "Lab 9, Task 1")(4) == 8
