"""The grader's side inside the student's kernel: hidden cases on the student's functions, then one JSON line.

``minidisagg course grade`` appends one cell to the notebook it runs:
``from minidisagg.course.grade_kernel import collect; collect(N, globals())``. ``collect`` finds each
graded task's function by name in the notebook's namespace, reads the verdict its check cell gave
it, runs the task's hidden cases on it (quietly), and prints one line framed by ``REPORT_MARK``
that the grader parses. Nothing here scores: that is the grader's job, on plain data.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

from minidisagg.course.checking import REGISTRY, CheckFailed
from minidisagg.course.grading import REPORT_MARK, GradedTask, lab_grading
from minidisagg.course.predict import prediction_results


@dataclass(frozen=True)
class TaskOutcome:
    """What the kernel saw of one task: its check cell's verdict and its hidden cases' verdict."""

    task: str
    function: str
    defined: bool
    check_passed: bool
    check_detail: str
    hidden_passed: bool
    hidden_detail: str


def _check_verdict(task: GradedTask, fn: Any) -> tuple[bool, str]:
    verdict = REGISTRY.of_function(fn) if fn is not None else None
    if verdict is not None:
        return verdict.passed, verdict.detail
    if REGISTRY.of_task(task.task) is not None:
        return False, f"{task.task}: {task.function} was redefined after its check ran: run the check cell again"
    return False, f"{task.task}: its check cell did not run"


def run_hidden(task: GradedTask, fn: Optional[Any]) -> tuple[bool, str]:
    """The hidden cases' verdict on ``fn`` (its printing swallowed); never raises."""
    if fn is None:
        return False, f"{task.task}: the notebook defines no {task.function}"
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet):
            result = task.hidden(fn)
    except CheckFailed as err:
        return False, err.result.detail
    except NotImplementedError:
        return False, f"{task.task}: not implemented yet"
    except Exception as err:  # noqa: BLE001 - whatever the student's function raised is the verdict
        return False, f"{task.task}: hidden cases raised {type(err).__name__}: {err}"
    return bool(result), getattr(result, "detail", str(result))


def task_outcomes(lab: int, namespace: Mapping[str, Any]) -> list[TaskOutcome]:
    """Each graded task of ``lab`` as the notebook left it."""
    outcomes = []
    for task in lab_grading(lab).tasks:
        fn = namespace.get(task.function)
        check_passed, check_detail = _check_verdict(task, fn)
        hidden_passed, hidden_detail = run_hidden(task, fn)
        outcomes.append(TaskOutcome(task.task, task.function, fn is not None, check_passed, check_detail,
                                    hidden_passed, hidden_detail))
    return outcomes


def collect(lab: int, namespace: Mapping[str, Any]) -> None:
    """Print the kernel's report of ``lab`` as one framed JSON line."""
    report = {
        "tasks": [asdict(outcome) for outcome in task_outcomes(lab, namespace)],
        "predictions": [result.to_json() for result in prediction_results().values()],
    }
    print(REPORT_MARK + json.dumps(report) + REPORT_MARK)
