"""What every lab check shares: one PASS or FAIL line, a registry of verdicts, and the reference fallback."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

import torch

CheckFn = TypeVar("CheckFn", bound=Callable[..., "CheckResult"])


@dataclass
class CheckResult:
    """The verdict of one check: passed or not, and a line saying why."""

    passed: bool
    detail: str

    def __str__(self) -> str:
        return f"PASS  ({self.detail})" if self.passed else f"FAIL  {self.detail}"

    def __repr__(self) -> str:
        return str(self)

    def __bool__(self) -> bool:
        return self.passed

    def _ipython_display_(self) -> None:
        """Show nothing as a cell's value: the check already printed its one PASS line."""


class CheckFailed(AssertionError):
    """Raised by a check whose verdict is FAIL, so a failing solution notebook fails CI.

    In IPython and Jupyter it shows as its one FAIL line, without a traceback.
    """

    def __init__(self, result: CheckResult | str) -> None:
        self.result = result if isinstance(result, CheckResult) else CheckResult(False, str(result))
        super().__init__(str(self.result))

    def _render_traceback_(self) -> list[str]:
        """The lines IPython shows instead of a traceback: the verdict alone."""
        return [str(self.result)]


def passed(detail: str) -> CheckResult:
    """A PASS verdict (``task_check`` prints it once)."""
    return CheckResult(True, detail)


def failed(detail: str) -> CheckResult:
    """A FAIL verdict, raised as ``CheckFailed`` (lab check cells are allowed to raise)."""
    raise CheckFailed(CheckResult(False, detail)) from None


NOT_IMPLEMENTED = "not implemented yet"
FALLBACK = "not implemented yet: using the reference solution for the cells below"


def not_implemented(task: str, err: NotImplementedError) -> CheckResult:
    """The verdict for a task the student has not done yet (a FAIL, raised)."""
    what = str(err).removeprefix(f"{task}:").strip()
    return failed(f"{task}: {NOT_IMPLEMENTED} ({what})" if what else f"{task}: {NOT_IMPLEMENTED}")


@dataclass(frozen=True)
class Verdict:
    """What the last check of one task said about one function."""

    task: str
    function_name: str
    passed: bool
    detail: str


class CheckRegistry:
    """The verdicts of the checks run in this process, by task and by the function object checked."""

    def __init__(self) -> None:
        self._by_task: dict[str, Verdict] = {}
        self._by_function: dict[int, tuple[Any, Verdict]] = {}  # id -> (the function, kept alive; its verdict)

    def record(self, task: str, fn: Any, result: CheckResult) -> Verdict:
        """Remember ``result`` as the verdict on ``fn`` for ``task``."""
        verdict = Verdict(task, getattr(fn, "__name__", type(fn).__name__), result.passed, result.detail)
        self._by_task[task] = verdict
        if callable(fn):
            self._by_function[id(fn)] = (fn, verdict)
        return verdict

    def of_function(self, fn: Any) -> Optional[Verdict]:
        """The verdict of the last check run on this very function object, or None."""
        entry = self._by_function.get(id(fn))
        return entry[1] if entry is not None and entry[0] is fn else None

    def of_task(self, task: str) -> Optional[Verdict]:
        """The verdict of the last check of ``task`` (e.g. "Lab 1, Task 1"), or None."""
        return self._by_task.get(task)

    def checked_name(self, name: str) -> Optional[Verdict]:
        """The latest verdict on any function called ``name``, or None."""
        found = [v for _, v in self._by_function.values() if v.function_name == name]
        return found[-1] if found else None

    def clear(self) -> None:
        """Forget every verdict."""
        self._by_task.clear()
        self._by_function.clear()


REGISTRY = CheckRegistry()


def task_check(task: str) -> Callable[[CheckFn], CheckFn]:
    """Make a check of ``task`` print its verdict once, raise FAIL without a chained traceback, and record it."""

    def wrap(check: CheckFn) -> CheckFn:
        @functools.wraps(check)
        def run(fn: Any, *args: Any, **kwargs: Any) -> CheckResult:
            try:
                try:
                    result = check(fn, *args, **kwargs)
                except NotImplementedError as err:  # raised where a check did not expect it
                    result = not_implemented(task, err)
            except CheckFailed as err:
                verdict = err.result
                if not verdict.detail.startswith(task):
                    verdict = CheckResult(False, f"{task}: {verdict.detail}")
                REGISTRY.record(task, fn, verdict)
                raise CheckFailed(verdict) from None
            REGISTRY.record(task, fn, result)
            print(result)
            return result

        return run  # type: ignore[return-value]

    return wrap


def hidden_check(task: str) -> Callable[[Callable[[Any], CheckResult]], Callable[[Any], CheckResult]]:
    """Make a grader's hidden check of ``task`` FAIL, not crash, on a task not done yet or on a non-function."""

    def wrap(check: Callable[[Any], CheckResult]) -> Callable[[Any], CheckResult]:
        @functools.wraps(check)
        def run(fn: Any) -> CheckResult:
            if not callable(fn):
                failed(f"{task} (hidden): no function to check, got {fn!r}")
            try:
                return check(fn)
            except NotImplementedError as err:
                return not_implemented(task, err)

        return run

    return wrap


def max_abs_error(got: Any, want: Any) -> float:
    """Largest absolute difference between two tensors, arrays or numbers."""
    got_t = torch.as_tensor(got, dtype=torch.float64)
    want_t = torch.as_tensor(want, dtype=torch.float64)
    if got_t.shape != want_t.shape:
        raise ValueError(f"shape {tuple(got_t.shape)} differs from the expected {tuple(want_t.shape)}")
    return float((got_t - want_t).abs().max()) if got_t.numel() else 0.0


def learner_status(learner_fn: Any) -> str:
    """Whether the learner's function passed its check, in words for the cells that use it."""
    name = getattr(learner_fn, "__name__", "function")
    verdict = REGISTRY.of_function(learner_fn)
    if verdict is not None and verdict.passed:
        return f"using your {name} (it passed its check)"
    if verdict is not None:
        return f"using your {name} (it FAILED its check: results below may be wrong)"
    if REGISTRY.checked_name(name) is not None:
        return f"using your {name} (redefined since its check: run the check again; results below may be wrong)"
    return f"using your {name} (not checked yet: run its check cell; results below may be wrong)"


class TaskNotChecked(RuntimeError):
    """A cell needs a task's result before the task's check cell ran (or the task was skipped)."""

    def _render_traceback_(self) -> list[str]:
        """The lines IPython shows instead of a traceback: what to do."""
        return [str(self)]


_SKIPPED: set[str] = set()


def skip_task(task: str) -> None:
    """Go on without doing ``task`` ("Lab 1, Task 2"): later cells use the reference and say so."""
    from minidisagg.course.grading import lab_grading, task_lab

    lab_grading(task_lab(task)).task(task)  # a clear KeyError for a task that does not exist
    _SKIPPED.add(task)
    print(f"[{task}] skipped: the cells below use the reference solution")


def _reference_of(task: str) -> Callable[..., Any]:
    from minidisagg.course.grading import lab_grading, task_lab

    return lab_grading(task_lab(task)).task(task).load_reference()


def learner_or_reference(learner_fn: Optional[Callable[..., Any]], task: str) -> Callable[..., Any]:
    """Return a callable that runs the learner's function, falling back (visibly) to the reference.

    Cells after an exercise use this, so a lab runs top to bottom before its exercises are done.
    The reference of ``task`` ("Lab 1, Task 2") is looked up only when the learner's function
    raises ``NotImplementedError``, and only once the task's check cell has run or the task was
    skipped (``skip_task``): before that the call raises ``TaskNotChecked``, which says what to do.
    It says once which function runs and, for the learner's, whether it passed its check.
    """
    if not isinstance(task, str):
        raise TypeError(f"learner_or_reference(fn, task): task names the task, e.g. 'Lab 1, Task 2' (got {task!r})")
    said = {"learner": False, "reference": False}

    def say(which: str, line: str) -> None:
        if not said[which]:
            print(f"[{task}] {line}")
            said[which] = True

    verdict = REGISTRY.of_function(learner_fn) if learner_fn is not None else None
    if verdict is not None and NOT_IMPLEMENTED in verdict.detail:
        say("reference", FALLBACK)
    elif verdict is not None:
        say("learner", learner_status(learner_fn))

    def call(*args: Any, **kwargs: Any) -> Any:
        if learner_fn is not None:
            try:
                value = learner_fn(*args, **kwargs)
            except NotImplementedError:
                pass
            else:
                say("learner", learner_status(learner_fn))
                return value
        if REGISTRY.of_task(task) is None and task not in _SKIPPED:
            raise TaskNotChecked(
                f"{task} is not done yet and its check cell has not run: run the check cell after the task "
                f"(it says what is missing), or call skip_task({task!r}) to go on with the reference"
            )
        say("reference", FALLBACK)
        return _reference_of(task)(*args, **kwargs)

    return call
