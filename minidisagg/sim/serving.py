"""The serving path's costs, fitted on the committed two-GPU sweeps, for planning with the simulator.

``benchmarks/sim_gpu_validation.py`` fits, per card and per predicted sweep file, what the real serving path
costs beyond the device rows (its JSON, ``sim-validation-gpu-<date>[tag].json``, holds them under
``commit_fit.serving_fits``): the decode instance's KV commit (``StepCostModel.decode_commit_s``), the router's
hand-over of a request (``FleetSpec.submit_s``), the reservation's round trip over the link
(``LinkSpec.control_rtt_s``), host work per decoding sequence and step (``StepCostModel.decode_per_seq_s``) and,
since 2026-12-08c, how much more the decode attention's KV read per context token costs than the rows' roofline
(``decode_context_extra``: ``StepCostModel.decode_context_s`` is multiplied by 1 + it; files written before it
existed lack it and load it as 0). Each fit was made on the card's *other* sweep files. ``load_serving_costs`` takes the median of a card's fits
(or, for a held-out prediction, only the fits that never saw a named sweep file), and ``apply_serving_costs``
puts them into a fleet and its step-cost model.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from minidisagg.engine.step_cost import StepCostModel
from minidisagg.sim.cost_table import default_results_dir, read_result_json
from minidisagg.sim.fleet import FleetSpec

REQUIRED = ("decode_commit_s", "submit_s", "control_rtt_s", "decode_per_seq_s")  # in every file with serving fits
OPTIONAL = {"decode_context_extra": 0.0}  # added later: the value a file that lacks it means
VALUES = (*REQUIRED, *OPTIONAL)
_VALIDATION = re.compile(r"^sim-validation-gpu-(?P<date>\d{4}-\d\d-\d\d)(?P<tag>[A-Za-z0-9_-]*)$")
_SWEEP_CARD = re.compile(r"^disagg-(?P<card>[A-Za-z0-9]+)-")


class NoServingFits(ValueError):
    """No committed validation has serving fits for the card asked (unlike a corrupt file, a reason to plan without)."""


@dataclass(frozen=True)
class ServingCosts:
    """The serving-path costs of one card (seconds; ``decode_context_extra`` a fraction), and where they were read."""

    decode_commit_s: float
    submit_s: float
    control_rtt_s: float
    decode_per_seq_s: float
    card: str
    source: Path
    decode_context_extra: float = 0.0  # the decode KV read per context token costs this fraction more than the rows say
    fitted_on: tuple[str, ...] = ()  # the sweep files (stems) the fits it was taken from were made on
    num_fits: int = 1  # how many per-file fits its values are the median of

    def describe(self) -> str:
        """One line: the values and their source."""
        what = (f"median of {self.num_fits} fits" if self.num_fits > 1
                else f"the fit made on {', '.join(self.fitted_on) or 'no listed files'}")
        return (f"serving costs ({self.card}, {what} in {self.source.name}): KV commit {1e3 * self.decode_commit_s:.2f} ms, router hand-over "
                f"{1e3 * self.submit_s:.2f} ms, reservation round trip {1e3 * self.control_rtt_s:.2f} ms, "
                f"decode host work {1e6 * self.decode_per_seq_s:.0f} us per sequence and step"
                + (f", decode context cost +{100 * self.decode_context_extra:.0f}%" if self.decode_context_extra else ""))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the values, the card, the source file's name and the files fitted on."""
        return {**{k: getattr(self, k) for k in VALUES}, "card": self.card, "source": self.source.name,
                "fitted_on": list(self.fitted_on), "num_fits": self.num_fits}


def _card_of(sweep: str) -> Optional[str]:
    m = _SWEEP_CARD.match(Path(sweep).stem if sweep.endswith(".json") else sweep)
    return m["card"].lower() if m else None


def read_serving_fits(path: str | Path) -> dict[str, dict[str, Any]]:
    """``commit_fit.serving_fits`` of one validation JSON (``{}`` for files written before they existed).

    ValueError when the file cannot be read, a fit lacks one of the ``REQUIRED`` values or a value is negative
    (an ``OPTIONAL`` value may be absent: files written before it existed).
    """
    path = Path(path)
    data = read_result_json(path, "a GPU validation result")
    if not isinstance(data, dict) or not isinstance(data.get("commit_fit"), dict):
        raise ValueError(f"{path}: no 'commit_fit'; is it a benchmarks/sim_gpu_validation.py result?")
    fits = data["commit_fit"].get("serving_fits", {})
    if not isinstance(fits, dict):
        raise ValueError(f"{path}: 'serving_fits' is not a mapping of sweep file to fit")
    for stem, fit in fits.items():
        bad = [k for k in VALUES if not isinstance(fit, dict) or (k in REQUIRED or k in fit)
               and (not isinstance(fit.get(k), (int, float)) or not fit[k] >= 0)]
        if bad:
            raise ValueError(f"{path}: the serving fit for {stem} lacks a value >= 0 for {', '.join(bad)}")
    return fits


def validation_files(results_dir: Optional[Path] = None) -> list[Path]:
    """The committed ``sim-validation-gpu-<date>[tag].json`` files, newest first (by date, then tag)."""
    found = [p for p in Path(results_dir or default_results_dir()).glob("sim-validation-gpu-*.json")
             if _VALIDATION.match(p.stem)]
    return sorted(found, key=lambda p: (_VALIDATION.match(p.stem)["date"], _VALIDATION.match(p.stem)["tag"]),
                  reverse=True)


def find_serving_fits(card: str, results_dir: Optional[Path] = None) -> tuple[Path, dict[str, dict[str, Any]]]:
    """(the newest validation file with serving fits for ``card``, those fits by sweep stem).

    Files without serving fits (written before they existed) are passed over; a corrupt file is not: ValueError.
    ``NoServingFits`` (a ValueError), listing the cards that have fits, when none has ``card``'s.
    """
    cards: set[str] = set()
    files = validation_files(results_dir)
    for path in files:
        fits = read_serving_fits(path)
        cards |= {c for stem in fits if (c := _card_of(stem))}
        mine = {stem: fit for stem, fit in fits.items() if _card_of(stem) == card.lower()}
        if mine:
            return path, mine
    where = results_dir or default_results_dir()
    if not files:
        raise NoServingFits(f"no sim-validation-gpu-<date>.json in {where}: run benchmarks/sim_gpu_validation.py")
    raise NoServingFits(f"no serving-cost fits for card {card!r} in {where} (fits for: {', '.join(sorted(cards)) or 'none'})")


def load_serving_costs(card: str, results_dir: Optional[Path] = None, exclude: Optional[str] = None) -> ServingCosts:
    """The median of ``card``'s serving fits in the newest committed validation.

    ``exclude``: a sweep file (``disagg-h100-2026-11-28`` or its ``.json`` name) that must not have entered the
    fit, for predicting that file held out: only the fits whose ``fitted_on`` lacks it are used (the one the
    validation made to predict it). ValueError when none is left.
    """
    path, fits = find_serving_fits(card, results_dir)
    if exclude is not None:
        held = Path(exclude).stem if exclude.endswith(".json") else exclude
        fits = {stem: fit for stem, fit in fits.items() if held not in fit.get("fitted_on", ())}
        if not fits:
            raise ValueError(f"{path.name}: every {card} serving fit was made on {held}; none can predict it held out")
    values = {k: statistics.median(float(fit.get(k, OPTIONAL.get(k))) for fit in fits.values()) for k in VALUES}
    fitted_on = sorted({f for fit in fits.values() for f in fit.get("fitted_on", ())})
    return ServingCosts(**values, card=card.lower(), source=path, fitted_on=tuple(fitted_on), num_fits=len(fits))


def apply_serving_costs(serving: ServingCosts, fleet: FleetSpec, costs: StepCostModel) -> tuple[FleetSpec, StepCostModel]:
    """(``fleet`` with the router hand-over and the link's round trip, ``costs`` with the commit, the host work and
    the decode context cost scaled by 1 + ``decode_context_extra``). Apply it to the device-only costs, once."""
    fleet = replace(fleet, submit_s=serving.submit_s, link=replace(fleet.link, control_rtt_s=serving.control_rtt_s))
    return fleet, replace(costs, decode_commit_s=serving.decode_commit_s, decode_per_seq_s=serving.decode_per_seq_s,
                          decode_context_s=costs.decode_context_s * (1.0 + serving.decode_context_extra))


def fit_decode_terms(points: Sequence[tuple[float, float, float]]) -> tuple[float, float]:
    """(``decode_per_seq_s``, ``decode_context_extra``) >= 0 fitting (batch, context seconds, residual seconds) points.

    Each point is one measured decode step's excess over the simulated one: ``residual ~ per_seq x batch + extra x
    context``, where ``context`` is the seconds the simulated step spends on its context tokens
    (``decode_context_s`` x tokens beyond the reference). Least squares with both terms non-negative: where the
    unconstrained fit makes one negative, the other alone is fitted (then floored at 0). ValueError on no points.
    """
    if not points:
        raise ValueError("fit_decode_terms: no (batch, context seconds, residual seconds) points")
    x = np.array([[b, c] for b, c, _ in points], dtype=np.float64)
    y = np.array([r for _, _, r in points], dtype=np.float64)
    sol, *_ = np.linalg.lstsq(x, y, rcond=None)
    if (sol >= 0).all():
        return float(sol[0]), float(sol[1])
    best = (0.0, 0.0)
    best_err = float(np.sum(y ** 2))
    for i in (0, 1):  # one term alone, non-negative
        norm = float(x[:, i] @ x[:, i])
        coef = max(0.0, float(x[:, i] @ y) / norm) if norm > 0 else 0.0
        err = float(np.sum((y - coef * x[:, i]) ** 2))
        if err < best_err:
            best, best_err = ((coef, 0.0) if i == 0 else (0.0, coef)), err
    return best
