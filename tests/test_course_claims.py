"""Claims as code: the helper's verdicts, strict mode, the verifier's counting, and saved outputs with no failed claim."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minidisagg.course import claims, verify
from minidisagg.course.claims import ClaimNotSeen, by_device, claim, count_claims

ROOT = Path(__file__).resolve().parents[1]


def test_a_claim_prints_ok_or_not_seen_with_a_cause(capsys, monkeypatch):
    monkeypatch.delenv(claims.STRICT_ENV, raising=False)
    assert claim("a < b", 1 < 2, "1 vs 2")
    assert not claim("a > b", 1 > 2, "1 vs 2", why_not="the sizes are too small")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "CLAIM ok: a < b  [1 vs 2]"
    assert out[1] == "CLAIM NOT SEEN: a > b  [1 vs 2]"
    assert out[2].startswith("    likely cause: the sizes are too small") and "measured on CPU" in out[2]


def test_strict_mode_raises_and_a_busy_host_is_named(monkeypatch):
    monkeypatch.setenv(claims.STRICT_ENV, "1")
    monkeypatch.setattr(claims.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    with pytest.raises(ClaimNotSeen, match="host is busy"):
        claim("never", False)
    claim("always", True)  # a claim that holds never raises


def test_by_device_picks_the_statement_for_the_device():
    import torch

    assert by_device(torch.device("cpu"), cpu="c", gpu="g") == "c"
    assert by_device("cuda", cpu="c", gpu="g") == "g"
    assert by_device(type("Lab", (), {"device": torch.device("cuda")})(), cpu=1, gpu=2) == 2


def test_counting_claims_in_outputs():
    text = "CLAIM ok: x\nCLAIM NOT SEEN: y\n    likely cause: z\nCLAIM ok: w  [1]\nno claim here"
    assert count_claims(text) == (3, 2)


def _saved_outputs(path: Path) -> str:
    nb = json.loads(path.read_text())
    return "\n".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                     for c in nb["cells"] for o in c.get("outputs", []))


@pytest.mark.parametrize("path", sorted((ROOT / "solutions").glob("*.ipynb")) + sorted((ROOT / "slides").glob("*.ipynb")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_saved_output_holds_a_claim_not_seen(path):
    """The prose next to a saved output never disagrees with it."""
    assert "CLAIM NOT SEEN" not in _saved_outputs(path)


def test_verify_selects_notebooks_by_lab_number_and_refuses_unknown_ones():
    chosen = verify.select_notebooks(["3"])
    assert {p.parent.name for p in chosen} == {"solutions", "slides"} and all(p.name.startswith("03_") for p in chosen)
    assert all(p.parent.name == "solutions" for p in verify.select_notebooks(["3"], decks=False))
    with pytest.raises(SystemExit, match="no solution or deck matches"):
        verify.select_notebooks(["99"])


def test_verify_fails_a_notebook_whose_claim_is_not_seen(tmp_path, monkeypatch):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("from minidisagg.course.claims import claim\n"
                                          f"for i in range(5): claim(f'c{{i}}', i != 3)")]
    path = tmp_path / "solutions" / "09_x.ipynb"
    path.parent.mkdir()
    nbformat.write(nb, path)
    monkeypatch.setenv(claims.STRICT_ENV, "0")
    v = verify.verify_notebook(path, timeout_s=120, write=True)
    assert (v.claims, v.held, v.error) == (5, 4, None)
    assert not nbformat.read(path, as_version=4).cells[0].outputs  # --write keeps a claim not seen out of the file
    assert not v.ok and "1 claim(s) not seen: c3" in v.problem()
    assert "| solutions/09_x.ipynb | 5 | 4 |" in verify.table_markdown([v])
    assert v.claim_lines[3].startswith("CLAIM NOT SEEN: c3") and "- CLAIM ok: c4" in verify.claims_markdown([v])


def test_verify_saves_a_failed_notebook_with_its_traceback(tmp_path, monkeypatch):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("from minidisagg.course.claims import claim\nclaim('c0', True)"),
                nbformat.v4.new_code_cell("raise ValueError('boom in cell two')")]
    path = tmp_path / "solutions" / "09_y.ipynb"
    path.parent.mkdir()
    nbformat.write(nb, path)
    monkeypatch.setenv(claims.STRICT_ENV, "0")
    v = verify.verify_notebook(path, timeout_s=120, write=True, executed_dir=tmp_path / "executed")
    assert "boom in cell two" in v.problem() and (v.claims, v.held) == (1, 1)
    assert not nbformat.read(path, as_version=4).cells[0].outputs  # a failed notebook is never written in place
    saved = nbformat.read(tmp_path / "executed" / "09_y.ipynb", as_version=4)
    error = saved.cells[1].outputs[0]
    assert error.output_type == "error" and error.ename == "ValueError" and "boom in cell two" in error.evalue
