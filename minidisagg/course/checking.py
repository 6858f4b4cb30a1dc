"""What every lab check shares: a verdict that prints PASS or a precise FAIL, and the reference fallback."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch


@dataclass
class CheckResult:
    """The verdict of one check: passed or not, and a line saying why."""

    passed: bool
    detail: str

    def __str__(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  ({self.detail})" if self.passed else f"FAIL  {self.detail}"

    def __repr__(self) -> str:
        return str(self)

    def __bool__(self) -> bool:
        return self.passed


def report(result: CheckResult) -> CheckResult:
    """Print the verdict (what the student sees) and return it (what tests assert on)."""
    print(result)
    return result


def passed(detail: str) -> CheckResult:
    """A PASS verdict, printed."""
    return report(CheckResult(True, detail))


class CheckFailed(AssertionError):
    """Raised by a check whose verdict is FAIL, so a failing solution notebook fails CI."""


def failed(detail: str) -> CheckResult:
    """A FAIL verdict: printed, then raised as ``CheckFailed`` (lab check cells are allowed to raise)."""
    result = report(CheckResult(False, detail))
    raise CheckFailed(str(result))


def not_implemented(task: str, err: NotImplementedError) -> CheckResult:
    """The verdict for a task the student has not done yet (a FAIL, raised)."""
    return failed(f"{task}: not implemented yet ({err})")


def max_abs_error(got: Any, want: Any) -> float:
    """Largest absolute difference between two tensors, arrays or numbers."""
    got_t = torch.as_tensor(got, dtype=torch.float64)
    want_t = torch.as_tensor(want, dtype=torch.float64)
    if got_t.shape != want_t.shape:
        raise ValueError(f"shape {tuple(got_t.shape)} differs from the expected {tuple(want_t.shape)}")
    return float((got_t - want_t).abs().max()) if got_t.numel() else 0.0


def learner_or_reference(learner_fn: Optional[Callable[..., Any]], reference_fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """Return a callable that runs the learner's function, falling back (visibly) to the reference.

    Cells after an exercise use this, so a lab runs top to bottom before its exercises are done.
    """

    warned = False

    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal warned
        if learner_fn is not None:
            try:
                return learner_fn(*args, **kwargs)
            except NotImplementedError:
                pass
        if not warned:
            print(f"[{name}] not implemented yet: using the reference solution for the cells below")
            warned = True
        return reference_fn(*args, **kwargs)

    return call
