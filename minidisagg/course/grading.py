"""What a lab is graded on: its tasks (points, hidden cases), its predictions and its written questions.

Each ``course/check/labN.py`` declares one ``LabGrading``. ``minidisagg course grade`` runs the
student's notebook, then, in the same kernel, calls every task's ``hidden`` check on the student's
function: cases the notebook never shows, drawn fresh. A task scores its points only when both its
check cell and its hidden cases pass. Predictions are reported with their error, written answers
are listed for a person to read; neither is scored by the machine.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

REPORT_MARK = "@@minidisagg-grade@@"  # frames the JSON line the grading cell prints


@dataclass(frozen=True)
class GradedTask:
    """One exercise: the notebook's function name, its points and the check of its hidden cases.

    ``reference`` is ``"module:attribute"``, resolved only when a later cell must fall back to it
    (``checking.learner_or_reference``), so a student notebook never imports it. ``design`` marks a
    task that needs judgement (a policy, a rule, a choice under a budget) rather than a formula.
    """

    task: str
    function: str
    points: int
    hidden: Callable[[Callable[..., Any]], Any]  # returns a CheckResult; raises CheckFailed on a wrong answer
    reference: str
    design: bool = False

    def load_reference(self) -> Callable[..., Any]:
        """The reference implementation (imported now, not before)."""
        module, _, attribute = self.reference.partition(":")
        return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class LabGrading:
    """Everything ``course grade`` scores or lists for one lab."""

    lab: int
    tasks: tuple[GradedTask, ...]
    predictions: tuple[str, ...] = field(default_factory=tuple)  # questions, e.g. "Lab 1, Q1"
    written: tuple[str, ...] = field(default_factory=tuple)  # written questions, e.g. "W1"

    @property
    def total_points(self) -> int:
        """The lab's full marks."""
        return sum(t.points for t in self.tasks)

    def task(self, name: str) -> GradedTask:
        """The task called ``name`` ("Lab 1, Task 2"); KeyError names the lab's tasks if there is none."""
        for graded in self.tasks:
            if graded.task == name:
                return graded
        raise KeyError(f"{name!r} is not a task of lab {self.lab} (its tasks: {', '.join(t.task for t in self.tasks)})")


def lab_grading(lab: int) -> LabGrading:
    """The ``GRADING`` of ``course/check/labN.py``."""
    module = importlib.import_module(f"minidisagg.course.check.lab{lab}")
    grading = getattr(module, "GRADING", None)
    if not isinstance(grading, LabGrading):
        raise LookupError(f"minidisagg.course.check.lab{lab} declares no GRADING")
    return grading


def task_lab(task: str) -> int:
    """The lab number in a task's name: "Lab 3, Task 2" -> 3."""
    head = task.split(",")[0].strip()
    if not head.startswith("Lab ") or not head[4:].isdigit():
        raise ValueError(f"{task!r}: a task is named like 'Lab 3, Task 2'")
    return int(head[4:])
