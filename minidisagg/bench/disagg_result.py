"""The result of ``minidisagg bench disagg`` as data: lookups its report and figures share, and its two files.

A result is one dict: per model, the calibration and one sweep per configuration and workload;
per sweep, one point per measured rate (attainment, counts, failures by reason, latency
percentiles, TTFT breakdown medians, KV figures). Two parts of it are per request and large:
each point's ``requests_ttft_tpot_s`` (every request's TTFT and TPOT, None for one that failed,
so attainment can be recomputed for another SLO) and each sweep's ``timelines`` (token times of
a few requests at the fixed rate, for the ITL figure). ``split_requests`` separates them: the
summary goes to ``disagg-<card>-<date>.json`` (what is committed and what the course reads), the
per-request part to ``raw/disagg-<card>-<date>.requests.json`` beside it (ignored by git);
``join_requests`` puts them back together.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

COLOCATED_BASELINE = "colocated-prefill_first"
DISAGG_CONFIGS = ("disagg-overlap", "disagg-no-overlap")
POINT_REQUEST_KEYS = ("requests_ttft_tpot_s",)  # per-request parts of a point
SWEEP_REQUEST_KEYS = ("timelines",)  # per-request parts of a sweep
RAW_DIR = "raw"


def find_sweep(res: dict[str, Any], config: str, workload: str) -> Optional[dict[str, Any]]:
    """One model's sweep of ``config`` on ``workload``, or None."""
    return next((s for s in res["sweeps"] if s["config"] == config and s["workload"] == workload), None)


def fixed_rate_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Per workload and configuration: the point at the fixed rate (the one with timelines)."""
    rows = []
    for s in res["sweeps"]:
        rate = res["calibration"].get(s["workload"], {}).get("fixed_rate_rps")
        point = next((p for p in s["points"] if rate is not None and math.isclose(p["rate_rps"], rate)), None)
        if point is not None:
            rows.append({"workload": s["workload"], "config": s["config"], **point})
    return rows


def requests_path(json_path: Path) -> Path:
    """Where the per-request part of the result in ``json_path`` goes: ``raw/<stem>.requests.json`` beside it."""
    json_path = Path(json_path)
    return json_path.parent / RAW_DIR / f"{json_path.stem}.requests.json"


def _sweeps(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(model, sweep) for every well-formed sweep of the result (a partial result may lack some)."""
    models = result.get("models")
    if not isinstance(models, dict):
        return []
    return [(model, s) for model, res in models.items() if isinstance(res, dict)
            for s in res.get("sweeps") or [] if isinstance(s, dict)]


def split_requests(result: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(summary, per-request part) of a result; the summary is a copy without the per-request keys.

    The per-request part names each sweep by model, configuration and workload and each point by its
    rate, so ``join_requests`` can match them whatever the order.
    """
    raw_models: dict[str, list[dict[str, Any]]] = {}
    replaced: dict[int, dict[str, Any]] = {}
    for model, sweep in _sweeps(result):
        points = [p for p in sweep.get("points") or [] if isinstance(p, dict)]
        raw_models.setdefault(model, []).append({
            "config": sweep.get("config"), "workload": sweep.get("workload"),
            **{k: sweep[k] for k in SWEEP_REQUEST_KEYS if k in sweep},
            "points": [{"rate_rps": p.get("rate_rps"), **{k: p[k] for k in POINT_REQUEST_KEYS if k in p}}
                       for p in points]})
        slim = {k: v for k, v in sweep.items() if k not in SWEEP_REQUEST_KEYS}
        if isinstance(sweep.get("points"), list):
            slim["points"] = [{k: v for k, v in p.items() if k not in POINT_REQUEST_KEYS} if isinstance(p, dict) else p
                              for p in sweep["points"]]
        replaced[id(sweep)] = slim
    summary = dict(result)
    if replaced:
        summary["models"] = {model: ({**res, "sweeps": [replaced.get(id(s), s) for s in res["sweeps"]]}
                                     if isinstance(res, dict) and isinstance(res.get("sweeps"), list) else res)
                             for model, res in result["models"].items()}
    raw = {"benchmark": "disagg-requests", "date": result.get("date"), "card": result.get("card"),
           "models": raw_models}
    return summary, raw


def join_requests(summary: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    """A summary with its per-request part put back (a copy; sweeps and points the part lacks stay as they are)."""
    joined = {**summary, "models": {}}
    for model, res in summary.get("models", {}).items():
        extra = {(s["config"], s["workload"]): s for s in raw.get("models", {}).get(model, [])}
        sweeps = []
        for sweep in res.get("sweeps", []):
            part = extra.get((sweep["config"], sweep["workload"]), {})
            points = []
            for point in sweep.get("points", []):
                match = next((p for p in part.get("points", [])
                              if p.get("rate_rps") is not None and math.isclose(p["rate_rps"], point["rate_rps"])), {})
                points.append({**point, **{k: match[k] for k in POINT_REQUEST_KEYS if k in match}})
            sweeps.append({**sweep, **{k: part[k] for k in SWEEP_REQUEST_KEYS if k in part}, "points": points})
        joined["models"][model] = {**res, "sweeps": sweeps}
    return joined
