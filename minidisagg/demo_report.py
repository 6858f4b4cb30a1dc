"""What the interference demo reports: each run's latencies, the table, and the claims checked on them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from rich import box
from rich.table import Table

from minidisagg.course.claims import Claim, HostLoad
from minidisagg.course.interference_lab import ScenarioRun
from minidisagg.engine.step_cost import StepCostModel
from minidisagg.metrics import failure_note

CALIBRATED = "calibrated"
WALL = "wall"
POLICIES = ("prefill_first", "chunked")
DISAGG = "disagg 1P1D"  # one prefill and one decode process, joined by TCP
TAIL_RATIO_SPLIT = 2.0  # predicted whole-prompt / chunk step ratio above which chunking must pay
FAILED_MARK = "*"  # after a run's label: some of its requests failed
HEADERS = ("run", "clock", "ITL\np50 ms", "ITL\np99 ms", "ITL\nmax ms", "long\nTTFT s", "tok/s", "KV\nMB",
           "KV\nGB/s")


@dataclass
class DemoRun(ScenarioRun):
    """One replay of the workload (lab 3's ``ScenarioRun``), on which clock, and when its requests started."""

    clock: str = CALIBRATED
    start_s: float = 0.0

    @property
    def key(self) -> str:
        """``chunked, calibrated``: how ``DemoReport.runs`` names this run."""
        return run_key(self.label, self.clock)

    def row(self) -> list[str]:
        """Cells of this run's row in the demo table."""
        finished = self.finished_decodes + self.finished_longs
        moved = sum(o.metrics.kv_transfer_bytes for o in finished)
        moving_s = sum(o.metrics.kv_send_s for o in finished)  # time on the wire, not waiting for layers
        tokens_per_s = sum(len(o.token_ids) for o in self.decodes + self.longs) / self.duration_s
        label = f"{self.label}{FAILED_MARK}" if self.num_failed else self.label  # the notes say how many, and why
        return [label, self.clock, _whole_ms(self.itl_p50_s), _whole_ms(self.itl_p99_s), _whole_ms(self.itl_max_s),
                _seconds(self.long_ttft_s), f"{tokens_per_s:.0f}" if tokens_per_s >= 100 else f"{tokens_per_s:.1f}",
                f"{moved / 1e6:.1f}" if moved else "-", f"{moved / moving_s / 1e9:.2f}" if moved and moving_s else "-"]


@dataclass
class DemoReport:
    """Everything the demo measured: the runs, the calibration, the checked claims and the host load."""

    runs: dict[str, DemoRun]
    costs: StepCostModel
    claims: list[Claim]
    load_before: HostLoad
    load_after: HostLoad
    png: Optional[Path] = None
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    phases_s: dict[str, float] = field(default_factory=dict)  # where the time went: loading, calibration, runs


def failure_notes(runs: dict[str, DemoRun]) -> list[str]:
    """One line per run in which requests failed (its row's label carries ``FAILED_MARK``): how many and why."""
    notes = []
    for run in runs.values():
        note = failure_note(len(run.decodes) + len(run.longs), run.failures)
        if note:
            notes.append(f"{FAILED_MARK} {run.key}: {note}; its latencies cover the finished requests only.")
    return notes


def run_key(label: str, clock: str) -> str:
    """``chunked, calibrated``: how the demo names a run."""
    return f"{label}, {clock}"


def demo_table(runs: dict[str, DemoRun], title: str) -> Table:
    """The runs side by side, calibrated rows first; fits 80 columns (units on the headers' second line)."""
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, show_edge=False)
    for i, header in enumerate(HEADERS):
        table.add_column(header, justify="left" if i < 2 else "right", no_wrap=True)
    previous = None
    for run in runs.values():
        if previous is not None and run.clock != previous:
            table.add_section()
        table.add_row(*run.row())
        previous = run.clock
    return table


def _whole_ms(t_s: float) -> str:
    """Milliseconds without decimals ("-" when unknown: no finished request to take it from)."""
    return "-" if t_s != t_s else f"{1e3 * t_s:.0f}"


def _seconds(t_s: float) -> str:
    """Three significant figures or so, in at most five characters up to a day ("-" when unknown)."""
    if t_s != t_s:  # NaN: no request to take it from
        return "-"
    return f"{t_s:.2f}" if t_s < 10 else f"{t_s:.1f}" if t_s < 1000 else f"{t_s:.0f}"


def _ms(a_s: float, b_s: float) -> str:
    return f"{1e3 * a_s:.0f} ms vs {1e3 * b_s:.0f} ms"


def demo_claims(runs: dict[str, DemoRun], device: str, load: HostLoad, predicted_tail_ratio: float) -> list[Claim]:
    """The checks behind the demo's lesson, on the runs that were made (the calibrated pair always).

    ``predicted_tail_ratio`` (a whole-prompt step over a chunk step, in calibrated costs) says
    which way the ITL claim goes: where a step's fixed cost dominates (a small model on a GPU),
    a chunk costs nearly what the whole prompt does and chunking cannot shorten the stall much.
    """
    def check(statement: str, holds: bool, measured: str, why_not: str) -> Claim:
        return Claim(statement, bool(holds), measured, device, load, why_not)

    def tail(clock: str, chunked: DemoRun, first: DemoRun) -> Claim:
        measured = _ms(chunked.itl_max_s, first.itl_max_s)
        if predicted_tail_ratio >= TAIL_RATIO_SPLIT:
            return check(f"{clock}: chunked cuts the decodes' worst stall (ITL max) below prefill_first's by at least "
                         f"1.5x (the calibration puts a whole-prompt step at {predicted_tail_ratio:.1f}x a chunk step)",
                         chunked.itl_max_s * 1.5 <= first.itl_max_s, measured, "other programs' load on this host")
        return check(f"{clock}: a chunk step costs nearly what a whole-prompt step does here ({predicted_tail_ratio:.1f}x "
                     f"in calibrated costs: a step's fixed cost dominates), so chunking cuts the worst stall (ITL max) "
                     f"by less than {TAIL_RATIO_SPLIT:.0f}x", chunked.itl_max_s * TAIL_RATIO_SPLIT > first.itl_max_s,
                     measured, "other programs' load on this host")

    first, chunked = runs[run_key("prefill_first", CALIBRATED)], runs[run_key("chunked", CALIBRATED)]
    claims = [
        tail("calibrated replay", chunked, first),
        check("calibrated replay: the policies differ in the tail, not the median (ITL p50 within 1.5x)",
              max(chunked.itl_p50_s, first.itl_p50_s) <= 1.5 * min(chunked.itl_p50_s, first.itl_p50_s),
              _ms(chunked.itl_p50_s, first.itl_p50_s), "chunk steps outnumber plain decode steps"),
        check("calibrated replay: chunking delays the long prompts' first token",
              chunked.long_ttft_s > first.long_ttft_s, _ms(chunked.long_ttft_s, first.long_ttft_s),
              "a chunk costs less per token than the whole prompt at once"),
    ]
    wall_first = runs.get(run_key("prefill_first", WALL))
    wall_chunked = runs.get(run_key("chunked", WALL))
    disagg = runs.get(run_key(DISAGG, WALL))
    if wall_first is not None and wall_chunked is not None:
        claims.append(tail("wall clock, too", wall_chunked, wall_first))
    if wall_first is not None and disagg is not None:
        claims.append(check("wall clock: disaggregated, the decodes' worst stall (ITL max) stays below colocated "
                            "prefill_first's", disagg.itl_max_s < wall_first.itl_max_s,
                            _ms(disagg.itl_max_s, wall_first.itl_max_s),
                            "the two worker processes share this host's cores"))
    return claims
