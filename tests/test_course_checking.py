"""What all lab checks share: one PASS or FAIL line, recorded verdicts, and cells that say whose function they use."""

from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient

from minidisagg import roofline
from minidisagg.course.sizing import decode_batch_for_budget
from minidisagg.course import check
from minidisagg.course.checking import REGISTRY, CheckFailed, learner_or_reference


@pytest.fixture(autouse=True)
def _fresh_registry():
    REGISTRY.clear()
    yield
    REGISTRY.clear()


def no_factor_two(m, n, k, dtype):
    """Lab 1's intensity without the factor 2: half the FLOPs."""
    return roofline.arithmetic_intensity(m, n, k, dtype) / 2


def not_done(m, n, k, dtype):
    raise NotImplementedError("Lab 1, Task 1: count the FLOPs and the bytes")


def test_pass_prints_one_line_and_fail_prints_nothing_but_raises_its_line(capsys):
    assert check.lab1.task1(roofline.arithmetic_intensity, seed=0)
    out = capsys.readouterr().out
    assert out.count("PASS") == 1 and out.startswith("PASS  (200 GEMM shapes")
    with pytest.raises(CheckFailed) as info:
        check.lab1.task1(no_factor_two, seed=0)
    assert capsys.readouterr().out == ""
    assert str(info.value).startswith("FAIL  Lab 1, Task 1: arithmetic_intensity(m=1, n=1, k=1")
    assert info.value._render_traceback_() == [str(info.value)]


def test_not_implemented_is_one_fail_line_without_a_chained_traceback():
    with pytest.raises(CheckFailed) as info:
        check.lab1.task1(not_done)
    err = info.value
    assert err.__cause__ is None and err.__suppress_context__
    assert err._render_traceback_() == ["FAIL  Lab 1, Task 1: not implemented yet (count the FLOPs and the bytes)"]


def test_verdicts_are_recorded_per_task_and_per_function():
    check.lab1.task2(decode_batch_for_budget, seed=0)
    with pytest.raises(CheckFailed):
        check.lab1.task1(no_factor_two, seed=0)
    assert REGISTRY.of_task("Lab 1, Task 2").passed
    failed = REGISTRY.of_task("Lab 1, Task 1")
    assert not failed.passed and failed.function_name == "no_factor_two" and "relative error" in failed.detail
    assert REGISTRY.of_function(no_factor_two) == failed
    assert REGISTRY.of_function(not_done) is None


def test_a_later_cell_says_the_learners_function_failed_its_check(capsys):
    with pytest.raises(CheckFailed):
        check.lab1.task1(no_factor_two, seed=0)
    capsys.readouterr()
    intensity = learner_or_reference(no_factor_two, "Lab 1, Task 1")
    said = "[Lab 1, Task 1] using your no_factor_two (it FAILED its check: results below may be wrong)\n"
    assert capsys.readouterr().out == said  # at once, above the table the cell prints
    assert intensity(1, 8, 8, roofline.torch.float32) == no_factor_two(1, 8, 8, roofline.torch.float32)
    intensity(4, 8, 8, roofline.torch.float32)
    assert capsys.readouterr().out == ""


def test_a_later_cell_says_passed_unchecked_redefined_or_reference(capsys):
    def arithmetic_intensity(m, n, k, dtype):
        return roofline.arithmetic_intensity(m, n, k, dtype)

    learner_or_reference(arithmetic_intensity, "Lab 1, Task 1")(1, 2, 3, roofline.torch.float32)
    assert "not checked yet: run its check cell" in capsys.readouterr().out
    check.lab1.task1(arithmetic_intensity, seed=0)
    capsys.readouterr()
    learner_or_reference(arithmetic_intensity, "Lab 1, Task 1")(1, 2, 3, roofline.torch.float32)
    assert capsys.readouterr().out == "[Lab 1, Task 1] using your arithmetic_intensity (it passed its check)\n"

    def arithmetic_intensity(m, n, k, dtype):  # noqa: F811 - the learner edits and reruns the cell
        return 1.0

    learner_or_reference(arithmetic_intensity, "Lab 1, Task 1")(1, 2, 3, roofline.torch.float32)
    assert "redefined since its check: run the check again" in capsys.readouterr().out
    value = learner_or_reference(not_done, "Lab 1, Task 1")(1, 2, 3, roofline.torch.float32)
    assert value == roofline.arithmetic_intensity(1, 2, 3, roofline.torch.float32)
    assert capsys.readouterr().out == "[Lab 1, Task 1] not implemented yet: using the reference solution for the cells below\n"


def test_in_a_notebook_pass_and_fail_show_once_and_a_stub_shows_one_line():
    """Run check cells in a real kernel: what the learner sees is each verdict once, and no traceback."""
    setup = ("from minidisagg import roofline\nfrom minidisagg.course import check\n"
             "def half(m, n, k, dtype):\n    return roofline.arithmetic_intensity(m, n, k, dtype) / 2\n"
             "def stub(m, n, k, dtype):\n    raise NotImplementedError('Lab 1, Task 1: count')\n")
    cells = [setup, "check.lab1.task1(roofline.arithmetic_intensity, seed=0)",
             "check.lab1.task1(half, seed=0)", "check.lab1.task1(stub)"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True).execute()

    def shown(cell) -> str:
        parts = []
        for out in cell.outputs:
            parts += [out.get("text", ""), str(out.get("data", {}).get("text/plain", ""))] + out.get("traceback", [])
        return "\n".join(parts)

    passed, failed, stub = nb.cells[1], nb.cells[2], nb.cells[3]
    assert shown(passed).count("PASS") == 1 and not any(o.output_type == "execute_result" for o in passed.outputs)
    assert shown(failed).count("FAIL") == 1 and [o.output_type for o in failed.outputs] == ["error"]
    assert failed.outputs[0].traceback[0].startswith("FAIL  Lab 1, Task 1: arithmetic_intensity(m=1, n=1, k=1")
    assert stub.outputs[0].traceback == ["FAIL  Lab 1, Task 1: not implemented yet (count)"]


def test_a_stub_that_failed_as_not_implemented_says_so_when_the_cell_starts(capsys):
    with pytest.raises(CheckFailed):
        check.lab1.task1(not_done)
    intensity = learner_or_reference(not_done, "Lab 1, Task 1")
    assert capsys.readouterr().out == "[Lab 1, Task 1] not implemented yet: using the reference solution for the cells below\n"
    assert intensity(2, 3, 4, roofline.torch.float16) == roofline.arithmetic_intensity(2, 3, 4, roofline.torch.float16)
    assert capsys.readouterr().out == ""
