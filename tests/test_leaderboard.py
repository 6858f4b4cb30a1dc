"""The placement leaderboard: stable ranks, clear errors for bad submissions, and equal numbers for equal entries."""

from __future__ import annotations

import json
import textwrap

import pytest

from minidisagg.course import leaderboard as lb
from minidisagg.course import leaderboard_cli

# The documented order of the reference entries under RULES (goodput per GPU, req/s): 2P2D ~1.58,
# colocated chunked ~1.22, colocated prefill_first ~1.13, 1P3D ~0.63 (one prefill GPU cannot keep up).
REFERENCE_ORDER = ["2P2D prefill_first", "colocated chunked", "colocated prefill_first", "1P3D prefill_first"]


@pytest.fixture(scope="module")
def reference_run():
    """The reference entries ranked twice, and the JSON of a CLI run."""
    return lb.run_leaderboard(None), lb.run_leaderboard(None)


def write(tmp_path, body: str, name: str = "entry.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def test_reference_entries_rank_in_the_documented_order_with_the_same_numbers(reference_run):
    first, second = reference_run
    assert [e.name for e in first] == REFERENCE_ORDER
    assert [e.name for e in second] == REFERENCE_ORDER
    assert [e.goodput_per_gpu_rps for e in first] == [e.goodput_per_gpu_rps for e in second]
    assert all(e.goodput_per_gpu_rps > 0 for e in first)


def test_a_submission_that_copies_a_reference_ties_it(tmp_path, reference_run):
    path = write(tmp_path, """
        from minidisagg.engine.scheduler import StepPlan, chunked


        def policy(waiting, running, budget):
            return chunked(waiting, running, budget)


        NAME = "my chunked copy"
        PLACEMENT = (0, 4)
    """)
    mine = lb.evaluate(lb.load_submission(path), is_submission=True)
    reference = next(e for e in reference_run[0] if e.name == "colocated chunked")
    assert mine.goodput_per_gpu_rps == reference.goodput_per_gpu_rps


@pytest.mark.parametrize("body, message", [
    ("NAME = 'x'\nPLACEMENT = (0, 4)\n", "missing policy"),
    ("from minidisagg.engine.scheduler import chunked as policy\nNAME = 'x'\nPLACEMENT = (3, 3)\n",
     "uses 6 GPUs, over the budget of 4"),
    ("from minidisagg.engine.scheduler import chunked as policy\nNAME = 'x'\nPLACEMENT = (1.0, 3)\n", "two ints"),
    ("from minidisagg.engine.scheduler import chunked as policy\nNAME = 7\nPLACEMENT = (0, 4)\n", "NAME must be"),
    ("def policy(w, r, b):\n    raise KeyError('oops')\nNAME = 'x'\nPLACEMENT = (0, 1)\n", "policy raised KeyError"),
    ("def policy(w, r, b):\n    return None\nNAME = 'x'\nPLACEMENT = (0, 1)\n", "not a StepPlan"),
    ("from minidisagg.engine.scheduler import StepPlan\n"
     "def policy(w, r, b):\n    return StepPlan(decodes=list(w))\nNAME = 'x'\nPLACEMENT = (0, 1)\n",
     "invalid plan: policy scheduled a decode"),
    ("from minidisagg.engine.scheduler import StepPlan\n"
     "def policy(w, r, b):\n    return StepPlan()\nNAME = 'x'\nPLACEMENT = (0, 1)\n", "empty plan"),
])
def test_a_bad_submission_gets_one_line_and_exit_code_2(tmp_path, capsys, body, message):
    path = write(tmp_path, body)
    assert leaderboard_cli.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith("bad submission: entry.py") or "policy" in err
    assert err.count("\n") == 1


def test_cli_ranks_a_submission_and_writes_json(tmp_path, capsys):
    path = write(tmp_path, """
        from minidisagg.engine.scheduler import prefill_first as policy
        NAME = "three prefill GPUs"
        PLACEMENT = (3, 1)
    """)
    out_json = tmp_path / "board.json"
    assert leaderboard_cli.main([str(path), "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "gpu_budget" in out and "three prefill GPUs:" in out and "rank" in out
    data = json.loads(out_json.read_text())
    assert data["rules"]["gpu_budget"] == 4
    names = [e["name"] for e in data["entries"]]
    assert set(REFERENCE_ORDER) <= set(names) and "three prefill GPUs" in names
    assert sum(e["submission"] for e in data["entries"]) == 1
