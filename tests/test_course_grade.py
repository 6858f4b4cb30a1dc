"""``minidisagg course grade``: a stub lab scores 0, its solution full marks, and bad input gets a clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from minidisagg.course.grade import GradeError, grade_notebook
from minidisagg.course.grading import lab_grading

REPO = Path(__file__).resolve().parents[1]
LABS = sorted((REPO / "labs").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("lab_path", LABS, ids=lambda p: p.stem)
def test_the_stub_scores_zero_and_the_solution_full_marks(lab_path):
    grading = lab_grading(int(lab_path.name[:2]))
    stub = grade_notebook(lab_path)
    assert stub.points == 0 and stub.max_points == grading.total_points > 0, stub.tasks
    assert all("not implemented" in t.message for t in stub.tasks), [t.message for t in stub.tasks]
    assert all(not w.answered for w in stub.written) and len(stub.written) == len(grading.written)
    assert all(p["predicted"] is None for p in stub.predictions)
    solution = grade_notebook(REPO / "solutions" / lab_path.name)
    assert solution.points == grading.total_points, [t.message for t in solution.tasks if not t.points]
    assert {p["question"] for p in solution.predictions} == set(grading.predictions)
    assert all(p["predicted"] is not None for p in solution.predictions)
    assert not solution.problems


def test_the_command_refuses_what_is_not_a_lab_and_still_writes_its_report(tmp_path):
    junk = tmp_path / "99_not_a_lab.ipynb"  # no lab has this number
    junk.write_text("{ this is not json")
    missing = tmp_path / "01_missing.ipynb"
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "minidisagg.course", "grade", str(junk), str(missing), "--json", str(report)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "not a gradable lab" in done.stderr and "file not found" in done.stderr
    assert json.loads(report.read_text()) == []


def test_a_corrupt_lab_file_is_named(tmp_path):
    broken = tmp_path / "01_arithmetic_intensity.ipynb"
    broken.write_text("{ truncated")
    with pytest.raises(GradeError, match="not a readable notebook"):
        grade_notebook(broken)
