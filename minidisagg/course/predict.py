"""Predict, then measure: a student's number for a lab question, compared with what the lab measured.

A lab asks a numbered question before it measures, e.g. "at what decode batch does one layer stop
being memory-bound?". The student writes a number into a variable (in the solution notebook the
line ends in ``### PREDICTION``; the generated lab holds ``...`` there). After the measurement, a
cell calls ``check_prediction``, which prints how far off the prediction was, whether that is
within the tolerance the question states, and why a good prediction can still differ.

A prediction is never an error: a wrong guess is how the lesson lands, so nothing here raises on
it. The grader (``minidisagg course grade``) reports each prediction with its error.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any, Optional

PREDICTION_MARK = "PREDICTION"


@dataclass(frozen=True)
class Tolerance:
    """How close a prediction must come to count as right: set exactly one of the three.

    ``factor`` (e.g. 2.0): within that ratio either way; ``rel`` (e.g. 0.25): within that fraction of
    the measured value; ``abs`` (e.g. 1.0): within that absolute difference, in the question's unit.
    """

    factor: Optional[float] = None
    rel: Optional[float] = None
    abs: Optional[float] = None

    def __post_init__(self) -> None:
        given = [v for v in (self.factor, self.rel, self.abs) if v is not None]
        if len(given) != 1:
            raise ValueError("a Tolerance takes exactly one of factor=, rel= or abs=")
        if self.factor is not None and self.factor < 1.0:
            raise ValueError(f"factor={self.factor}: a ratio tolerance is at least 1 (2.0 means 'within 2x')")
        if any(v < 0 for v in given):
            raise ValueError(f"a tolerance is not negative (got {given[0]})")

    def holds(self, predicted: float, measured: float) -> bool:
        """Whether ``predicted`` is within this tolerance of ``measured``."""
        if self.abs is not None:
            return abs(predicted - measured) <= self.abs
        if self.rel is not None:
            return abs(predicted - measured) <= self.rel * abs(measured)
        if predicted == measured:
            return True
        if predicted <= 0 or measured <= 0:
            return False  # a ratio tolerance compares positive quantities only
        return max(predicted / measured, measured / predicted) <= self.factor  # type: ignore[operator]

    def describe(self) -> str:
        """``within 2x``, ``within 25%`` or ``within 1``."""
        if self.factor is not None:
            return f"within {self.factor:g}x"
        if self.rel is not None:
            return f"within {self.rel * 100:g}%"
        return f"within {self.abs:g}"


def within_factor(factor: float) -> Tolerance:
    """Right when the prediction is within ``factor`` times the measurement, either way."""
    return Tolerance(factor=factor)


def within_rel(fraction: float) -> Tolerance:
    """Right when the prediction is within ``fraction`` of the measurement (0.25 = 25%)."""
    return Tolerance(rel=fraction)


def within_abs(difference: float) -> Tolerance:
    """Right when the prediction differs from the measurement by at most ``difference``."""
    return Tolerance(abs=difference)


@dataclass(frozen=True)
class PredictionResult:
    """One question's prediction against its measurement; ``predicted`` is None when none was written."""

    question: str
    predicted: Optional[float]
    measured: float
    tolerance: str
    within: bool
    error: Optional[str]
    why: str
    unit: str = ""

    def line(self) -> str:
        """The line ``check_prediction`` prints."""
        unit = f" {self.unit}" if self.unit else ""
        if self.predicted is None:
            return (f"{self.question}: no prediction yet ({self.error}); measured {_fmt(self.measured)}{unit}. "
                    f"Why a prediction can differ: {self.why}")
        verdict = f"{'inside' if self.within else 'outside'} the tolerance asked, {self.tolerance}"
        return (f"{self.question}: you predicted {_fmt(self.predicted)}{unit}, measured {_fmt(self.measured)}{unit} "
                f"({self.error}; {verdict}). Why they can differ: {self.why}")

    def to_json(self) -> dict[str, Any]:
        """A plain dict for the grader's report."""
        return asdict(self)


_RESULTS: dict[str, PredictionResult] = {}  # this process's (a lab kernel's) latest result per question


def _fmt(value: float) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _how_far(predicted: float, measured: float) -> str:
    if measured == 0:
        return f"off by {abs(predicted - measured):.3g}"
    off = (predicted - measured) / abs(measured)
    if predicted > 0 and measured > 0 and max(predicted / measured, measured / predicted) >= 2:
        ratio = predicted / measured
        return f"{ratio:.2g}x the measurement" if ratio > 1 else f"1/{1 / ratio:.2g} of the measurement"
    return f"{'over' if off > 0 else 'under'} by {abs(off) * 100:.0f}%"


def check_prediction(question: str, predicted: Any, measured: float, tolerance: Tolerance, why: str,
                     unit: str = "") -> PredictionResult:
    """Compare a student's prediction with the measured value, print one line, and remember it.

    ``question`` names it as the lab does ("Lab 1, Q2"); ``predicted`` is the student's variable
    (``...`` or None until they write a number); ``why`` says why a sound prediction can still
    differ on this device. Never raises on a wrong or missing prediction.
    """
    if not isinstance(tolerance, Tolerance):
        raise TypeError(f"{question}: tolerance must be a Tolerance (within_factor, within_rel or within_abs)")
    measured_value = float(measured)
    value: Optional[float] = None
    error: Optional[str]
    if predicted is None or predicted is Ellipsis:
        error = "set the variable to a number in the cell that asks, then run this cell again"
    elif isinstance(predicted, bool) or not isinstance(predicted, numbers.Real):
        error = f"a prediction is a number, not {type(predicted).__name__} {predicted!r}"
    elif not math.isfinite(float(predicted)):
        error = f"a prediction is a finite number, not {predicted!r}"
    else:
        value = float(predicted)
        error = _how_far(value, measured_value)
    within = value is not None and tolerance.holds(value, measured_value)
    result = PredictionResult(question, value, measured_value, tolerance.describe(), within, error, why, unit)
    _RESULTS[question] = result
    print(result.line())
    return result


def prediction_results() -> dict[str, PredictionResult]:
    """Every prediction checked in this process, by question (the grader reads them)."""
    return dict(_RESULTS)
