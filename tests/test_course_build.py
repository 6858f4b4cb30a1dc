"""The lab generator (solutions/ -> labs/), its repository check, and the notebook CI settings."""

from __future__ import annotations

import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from minidisagg.course import build
from minidisagg.course.build import LabSourceError, build_all, build_lab, render_lab, stale_labs

REPO = Path(__file__).resolve().parents[1]
SANITIZE_CFG = REPO / "tests" / "nbval_sanitize.cfg"
WORDS = ["count", "the", "FLOPs", "bytes", "moved", "divide", "by", "\"quoted\"", "back\\slash", "µs", "x'y", "{braces}"]


def exercise_source(rng: random.Random, name: str, todo: str, nesting: int) -> tuple[str, str]:
    """An exercise cell defining ``name(x) -> 3*x + 1``, top level or as a method; returns (source, call)."""
    outer = "    " * nesting
    inner = outer + "    "
    lines = ["class Box:", "    @staticmethod"] if nesting else []
    lines += [
        f"{outer}def {name}(x):",
        f'{inner}r"""Three x plus one.',
        "",
        f"{inner}TODO: {todo}",
        f"{inner}HINT: multiply, then add.",
        f'{inner}"""',
        f"{inner}### BEGIN SOLUTION",
        f"{inner}y = 3 * x",
        f"{inner}return y + 1",
        f"{inner}### END SOLUTION",
        f"{name}_defined = True",
    ]
    if rng.random() < 0.5:
        lines.append("")  # a trailing newline must survive too
    return "\n".join(lines), f"Box.{name}" if nesting else name


def random_todo(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))


def random_solution(rng: random.Random, num_tasks: int) -> tuple[nbformat.NotebookNode, list[dict]]:
    """A solution notebook with ``num_tasks`` exercises among other cells; returns it and the exercises."""
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells.append(new_markdown_cell("# Goals\nA one-minute recap. TODO: not a task, a markdown word."))
    exercises = []
    for task in range(1, num_tasks + 1):
        if rng.random() < 0.5:
            nb.cells.append(new_code_cell(f"value_{task} = {rng.randint(0, 99)}"))
        todo = random_todo(rng)
        source, call = exercise_source(rng, f"task_fn_{task}", todo, nesting=rng.choice([0, 1]))
        nb.cells.append(new_code_cell(source))
        exercises.append({"cell": len(nb.cells) - 1, "todo": todo, "call": call, "task": task})
        nb.cells.append(new_code_cell(f"check.lab9.task{task}({call})"))
    nb.cells.append(new_markdown_cell("## Takeaways\n- Try this: change x."))
    return nb, exercises


def write(nb: nbformat.NotebookNode, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


def run_cell(source: str) -> dict:
    namespace: dict = {}
    exec(compile(source, "<cell>", "exec"), namespace)
    return namespace


def resolve(namespace: dict, call: str):
    obj = namespace[call.split(".")[0]]
    for part in call.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


# --- the stub -------------------------------------------------------------------------------


def test_block_becomes_one_raise_line_at_the_marker_indentation(module_seed):
    rng = random.Random(module_seed)
    for _ in range(20):
        nb, exercises = random_solution(rng, rng.randint(1, 4))
        lab_no = rng.randint(1, 6)
        lab = build_lab(nb, lab_no, "seeded.ipynb")
        for ex in exercises:
            sol_lines = nb.cells[ex["cell"]].source.split("\n")
            lab_lines = lab.cells[ex["cell"]].source.split("\n")
            begin = next(i for i, line in enumerate(sol_lines) if line.strip() == build.BEGIN_MARKER)
            end = next(i for i, line in enumerate(sol_lines) if line.strip() == build.END_MARKER)
            indent = sol_lines[begin][: len(sol_lines[begin]) - len(sol_lines[begin].lstrip())]
            assert lab_lines[:begin] == sol_lines[:begin], f"seed {module_seed}: docstring and code before the block kept"
            assert lab_lines[begin + 1 :] == sol_lines[end + 1 :], f"seed {module_seed}: lines after the block kept"
            stub = lab_lines[begin]
            assert stub.startswith(indent + "raise NotImplementedError(") and not stub[len(indent)].isspace()
            assert "return y + 1" not in lab.cells[ex["cell"]].source
            assert any(line.strip() == f"TODO: {ex['todo']}" for line in lab_lines), "TODO line stays visible"
            assert any(line.strip().startswith("HINT:") for line in lab_lines), "HINT line stays visible"


def test_generated_exercise_raises_lab_and_task_and_solution_runs(module_seed):
    rng = random.Random(module_seed + 1)
    nb, exercises = random_solution(rng, rng.randint(2, 5))
    lab_no = rng.randint(1, 6)
    lab = build_lab(nb, lab_no, "seeded.ipynb")
    for ex in exercises:
        x = rng.randint(-1000, 1000)
        solution_fn = resolve(run_cell(nb.cells[ex["cell"]].source), ex["call"])
        assert solution_fn(x) == 3 * x + 1, f"seed {module_seed}"
        lab_fn = resolve(run_cell(lab.cells[ex["cell"]].source), ex["call"])
        with pytest.raises(NotImplementedError) as info:
            lab_fn(x)
        assert str(info.value) == f"Lab {lab_no}, Task {ex['task']}: {ex['todo']}", f"seed {module_seed}"


def test_lab_number_comes_from_the_file_name_and_tasks_count_in_order(tmp_path, module_seed):
    rng = random.Random(module_seed + 2)
    lab_no = rng.randint(1, 6)
    nb, exercises = random_solution(rng, rng.randint(3, 6))
    path = write(nb, tmp_path / "solutions" / f"{lab_no:02d}_topic.ipynb")
    lab = nbformat.reads(render_lab(path), as_version=4)
    messages = re.findall(r'NotImplementedError\("Lab (\d+), Task (\d+): ', "\n".join(c.source for c in lab.cells))
    assert messages == [(str(lab_no), str(k)) for k in range(1, len(exercises) + 1)], f"seed {module_seed}"
    assert build.lab_number(Path("03_interference.ipynb")) == 3


# --- tags, outputs, markers, determinism ------------------------------------------------------


def test_exercise_and_check_cells_are_tagged_only_in_the_lab(module_seed):
    rng = random.Random(module_seed + 3)
    nb, exercises = random_solution(rng, 3)
    nb.cells[exercises[0]["cell"]].metadata["tags"] = ["keep-me"]
    lab = build_lab(nb, 2, "tags.ipynb")
    raising = {i for i, cell in enumerate(lab.cells) if build.RAISES_TAG in cell.metadata.get("tags", [])}
    expected = {ex["cell"] for ex in exercises} | {ex["cell"] + 1 for ex in exercises}
    assert raising == expected
    assert lab.cells[exercises[0]["cell"]].metadata["tags"] == ["keep-me", build.RAISES_TAG]
    assert not any(build.RAISES_TAG in cell.metadata.get("tags", []) for cell in nb.cells), "solution untouched"


def test_outputs_execution_records_and_check_output_markers_are_stripped():
    nb = new_notebook()
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    nb.metadata["custom"] = {"keep": 1}
    cell = new_code_cell("# NBVAL_CHECK_OUTPUT\nprint(2 + 2)\n", execution_count=7)
    cell.outputs = [new_output("stream", name="stdout", text="4\n")]
    cell.metadata["execution"] = {"iopub.status.busy": "2026-01-01T00:00:00Z"}
    cell.metadata["slideshow"] = {"slide_type": "slide"}
    cell.metadata["tags"] = ["nbval-check-output"]
    ignored = new_code_cell("# NBVAL_IGNORE_OUTPUT\nprint('t')", execution_count=8)
    nb.cells = [cell, ignored]
    lab = build_lab(nb, 1, "strip.ipynb")
    assert lab.cells[0].outputs == [] and lab.cells[0].execution_count is None
    assert lab.cells[0].source == "print(2 + 2)\n"
    assert lab.cells[0].metadata == {"slideshow": {"slide_type": "slide"}}
    assert lab.cells[1].source.startswith("# NBVAL_IGNORE_OUTPUT"), "other nbval markers stay"
    assert "widgets" not in lab.metadata and lab.metadata["custom"] == {"keep": 1}
    assert nb.cells[0].outputs and nb.cells[0].source.startswith("# NBVAL_CHECK_OUTPUT"), "solution untouched"


def test_same_solution_gives_the_same_bytes_whatever_its_ids_and_outputs(tmp_path, module_seed):
    rng = random.Random(module_seed + 4)
    nb, _ = random_solution(rng, 3)
    first = write(nb, tmp_path / "a" / "04_same.ipynb")
    for cell in nb.cells:
        cell["id"] = f"x{rng.randrange(1 << 40):x}"
        if cell.cell_type == "code":
            cell.execution_count = rng.randint(1, 99)
            cell.outputs = [new_output("stream", name="stdout", text=f"{rng.random()} ms\n")]
    second = write(nb, tmp_path / "b" / "04_same.ipynb")
    text = render_lab(first)
    assert render_lab(first) == text == render_lab(second)
    nbformat.validate(nbformat.reads(text, as_version=4))


# --- errors a lab author can act on ------------------------------------------------------------

GOOD_HEAD = 'def f(x):\n    """Doc.\n\n    TODO: do it\n    """\n'
BEGIN, END = "    ### BEGIN SOLUTION\n", "    ### END SOLUTION\n"
BAD_CELLS = {  # case: (cell source, cell type, what the error must say)
    "begin without end": (
        GOOD_HEAD + BEGIN + "    return x\n",
        "code",
        r"cell 2 \(code\), line 6: '### BEGIN SOLUTION' without a matching",
    ),
    "end without begin": (
        GOOD_HEAD + "    return x\n" + END,
        "code",
        r"cell 2 \(code\), line 7: '### END SOLUTION' without",
    ),
    "nested": (
        GOOD_HEAD + BEGIN + BEGIN + "    return x\n" + END + END,
        "code",
        r"line 7: nested .*opened on line 6",
    ),
    "no todo": (
        'def f(x):\n    """Doc."""\n' + BEGIN + "    return x\n" + END,
        "code",
        r"line 3: no 'TODO:' line before the solution block",
    ),
    "two todos": (
        'def f(x):\n    """TODO: a\n    TODO: b\n    """\n' + BEGIN + "    return x\n" + END,
        "code",
        r"2 'TODO:' lines \(lines 2, 3\)",
    ),
    "empty todo": (
        'def f(x):\n    """TODO:\n    """\n' + BEGIN + "    return x\n" + END,
        "code",
        r"line 2: the 'TODO:' line says nothing",
    ),
    "two blocks": (
        GOOD_HEAD + BEGIN + "    y = x\n" + END + BEGIN + "    return y\n" + END,
        "code",
        r"2 solution blocks in one cell \(lines 6, 9\)",
    ),
    "markdown markers": (
        "Write it:\n### BEGIN SOLUTION\nx\n### END SOLUTION\n",
        "markdown",
        r"cell 2 \(markdown\), line 2: solution markers belong in code cells only",
    ),
    "malformed marker": (
        GOOD_HEAD + "    ## BEGIN SOLUTION\n    return x\n" + END,
        "code",
        r"line 6: malformed marker '## BEGIN SOLUTION'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CELLS))
def test_malformed_solution_gives_a_clear_error_and_writes_nothing(tmp_path, case):
    source, cell_type, message = BAD_CELLS[case]
    nb = new_notebook()
    nb.cells = [new_markdown_cell("# Lab"), (new_code_cell if cell_type == "code" else new_markdown_cell)(source)]
    write(new_notebook(cells=[new_code_cell("x = 1")]), tmp_path / "solutions" / "01_fine.ipynb")
    write(nb, tmp_path / "solutions" / "02_broken.ipynb")
    with pytest.raises(LabSourceError, match=r"02_broken\.ipynb, .*" + message):
        build_all(tmp_path / "solutions", tmp_path / "labs")
    assert not (tmp_path / "labs").exists(), "every solution is checked before any lab is written"


def test_bad_file_names_and_duplicate_lab_numbers_are_refused(tmp_path):
    write(new_notebook(), tmp_path / "s1" / "interference.ipynb")
    with pytest.raises(LabSourceError, match="named NN_topic.ipynb"):
        build_all(tmp_path / "s1", tmp_path / "labs")
    write(new_notebook(), tmp_path / "s2" / "03_a.ipynb")
    write(new_notebook(), tmp_path / "s2" / "03_b.ipynb")
    with pytest.raises(LabSourceError, match="03_a.ipynb and 03_b.ipynb are both lab 3"):
        build_all(tmp_path / "s2", tmp_path / "labs")
    (tmp_path / "s3").mkdir()
    (tmp_path / "s3" / "01_junk.ipynb").write_text("{not json")
    with pytest.raises(LabSourceError, match="01_junk.ipynb: not a readable notebook"):
        build_all(tmp_path / "s3", tmp_path / "labs")
    with pytest.raises(FileNotFoundError, match="pass --solutions DIR --labs DIR"):
        build.default_course_dirs(tmp_path)
    invalid = new_notebook(cells=[new_code_cell("x = 1")])
    invalid.cells[0]["unexpected"] = 1
    with pytest.raises(LabSourceError, match="04_v.ipynb: the lab would not be a valid notebook"):
        build_lab(invalid, 4, "04_v.ipynb")


# --- labs/ stays in step with solutions/ ------------------------------------------------------


def test_repository_labs_are_what_the_generator_makes():
    solutions_dir, labs_dir = build.default_course_dirs()
    assert (solutions_dir, labs_dir) == (REPO / "solutions", REPO / "labs")
    problems = stale_labs(solutions_dir, labs_dir)
    assert problems == [], f"labs/ is stale, run `minidisagg course build`: {problems}"


def test_stale_labs_names_every_difference(tmp_path, module_seed):
    rng = random.Random(module_seed + 5)
    solutions, labs = tmp_path / "solutions", tmp_path / "labs"
    exercises = {}
    for lab_no in (1, 2, 3):
        nb, exercises[lab_no] = random_solution(rng, 2)
        write(nb, solutions / f"0{lab_no}_t{lab_no}.ipynb")
    assert stale_labs(solutions, labs) == ["01_t1.ipynb: missing", "02_t2.ipynb: missing", "03_t3.ipynb: missing"]
    built = build_all(solutions, labs)
    assert [p.name for p in built] == ["01_t1.ipynb", "02_t2.ipynb", "03_t3.ipynb"]
    assert stale_labs(solutions, labs) == []
    nb = nbformat.read(str(solutions / "01_t1.ipynb"), as_version=4)
    cell = nb.cells[exercises[1][1]["cell"]]
    cell.source = cell.source.replace("3 * x", "4 * x")
    write(nb, solutions / "01_t1.ipynb")
    assert stale_labs(solutions, labs) == [], "a change inside a solution block does not show in the lab"
    cell.source = cell.source.replace("TODO:", "TODO: now")
    write(nb, solutions / "01_t1.ipynb")
    (labs / "02_t2.ipynb").unlink()
    shutil.copy(labs / "03_t3.ipynb", labs / "07_orphan.ipynb")
    assert stale_labs(solutions, labs) == [
        f"01_t1.ipynb: out of date (cell {exercises[1][1]['cell'] + 1} differs)",
        "02_t2.ipynb: missing",
        "07_orphan.ipynb: no solution notebook of that name (delete it or add the solution)",
    ], f"seed {module_seed}"
    build_all(solutions, labs)
    (labs / "07_orphan.ipynb").unlink()
    assert stale_labs(solutions, labs) == []
    (labs / "03_t3.ipynb").write_text((labs / "03_t3.ipynb").read_text().replace('"cell-1"', '"cell-x"'))
    assert stale_labs(solutions, labs) == ["03_t3.ipynb: out of date (cell 1 differs)"]


def test_check_mode_exits_1_names_stale_labs_and_writes_nothing(tmp_path, capsys):
    solutions, labs = tmp_path / "solutions", tmp_path / "labs"
    write(random_solution(random.Random(0), 1)[0], solutions / "05_x.ipynb")
    args = ["--solutions", str(solutions), "--labs", str(labs)]
    assert build.main([*args, "--check"]) == 1
    assert "05_x.ipynb: missing" in capsys.readouterr().out and not labs.exists()
    assert build.main(args) == 0 and (labs / "05_x.ipynb").is_file()
    assert build.main([*args, "--check"]) == 0
    assert "up to date" in capsys.readouterr().out
    write(new_notebook(cells=[new_markdown_cell("### END SOLUTION")]), solutions / "06_bad.ipynb")
    assert build.main(args) == 2
    assert "06_bad.ipynb, cell 1 (markdown)" in capsys.readouterr().err


def test_cli_and_python_m_route_to_the_generator(tmp_path, capsys):
    from minidisagg.cli import main as cli_main

    solutions, labs = tmp_path / "solutions", tmp_path / "labs"
    write(random_solution(random.Random(1), 1)[0], solutions / "02_y.ipynb")
    args = ["--solutions", str(solutions), "--labs", str(labs), "--check"]
    assert cli_main(["course", "build", *args]) == 1
    command = [sys.executable, "-m", "minidisagg.course", "build", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "02_y.ipynb: missing" in done.stdout, done.stdout + done.stderr
    assert not labs.exists()


# --- the sanitize file nbval uses ---------------------------------------------------------------


def sanitize(text: str) -> str:
    """Mask ``text`` exactly as nbval does with tests/nbval_sanitize.cfg."""
    from nbval.plugin import get_sanitize_patterns

    for regex, replacement in get_sanitize_patterns(SANITIZE_CFG.read_text(encoding="utf-8")):
        text = re.sub(regex, replacement, text)
    return text


def random_run_output(rng: random.Random) -> str:
    """A lab's printout whose timings, rates, addresses, ports, paths and errors change every run."""

    def number() -> str:
        return f"{rng.uniform(0.01, 9999):.{rng.randint(0, 3)}f}"

    unit = rng.choice(["ms", "s", "us", "µs", "ns"])
    return (
        f"TTFT {number()} ms, ITL p99 {number()} {unit}; {number()} ms/token\n"
        f"copy {number()} GB/s, {number()} MB/s, {number()} tokens/s, {number()} TFLOP/s, {number()} GFLOP/s\n"
        f"<function f at 0x7f{rng.randrange(1 << 40):010x}>\n"
        f"listening on 127.0.0.1:{rng.randint(1024, 65535)} and localhost:{rng.randint(1024, 65535)}\n"
        f"saved /tmp/pytest-of-me/pytest-{rng.randint(0, 99)}/kv{rng.randint(0, 9)}.bin\n"
        f"PASS  (40 random cases; max error {rng.uniform(0, 1e-5):.3e})\n"
        "The capital of France is Paris. 30 layers, 5 steps, Lab 3, Task 2, [1, 2, 3]\n"
    )


def test_sanitize_masks_what_varies_between_runs(module_seed):
    rng = random.Random(module_seed + 6)
    masked = {sanitize(random_run_output(rng)) for _ in range(30)}
    assert len(masked) == 1, f"seed {module_seed}: {masked}"
    assert masked.pop() == (
        "TTFT TIME, ITL p99 TIME; TIME/token\n"
        "copy RATE, RATE, RATE, RATE, RATE\n"
        "<function f at 0xADDRESS>\n"
        "listening on 127.0.0.1:PORT and localhost:PORT\n"
        "saved TMPPATH\n"
        "PASS  (40 random cases; max error ERR)\n"
        "The capital of France is Paris. 30 layers, 5 steps, Lab 3, Task 2, [1, 2, 3]\n"
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        ("took 4.5 s and 0.8 μs", "took TIME and TIME"),
        ("max |err| 2e-7, max_abs_err=1e-06, max abs error 0", "max |err| ERR, max_abs_err=ERR, max abs error ERR"),
        ("port 54321 on [::1]:8000", "port PORT on [::1]:PORT"),
        (r"C:\Users\me\AppData\Local\Temp\tmpab12\f.bin", "TMPPATH"),
        *[(same, same) for same in ["tokens [504, 3] -> ' Paris'", "0xff, /home/me/tmp/x, 5 sequences, 30 layers"]],
    ],
)
def test_sanitize_samples(text, expected):
    assert sanitize(text) == expected


# --- notebook CI: `python -m pytest` runs solutions/ and labs/ under nbval ------------------------


NBVAL_SETUP = """\
import time
from types import SimpleNamespace

def task1(fn):
    assert fn(2) == 7
    print("PASS  (1 case; max error 0)")

check = SimpleNamespace(lab1=SimpleNamespace(task1=task1))
"""
NBVAL_TIMED = """\
# NBVAL_CHECK_OUTPUT
start = time.perf_counter()
print(f"7 tokens in {(time.perf_counter() - start) * 1e3:.3f} ms")
"""


def nbval_solution() -> nbformat.NotebookNode:
    """A small solution notebook: an exercise, its check, and a checked output holding a timing."""
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    exercise, _ = exercise_source(random.Random(0), "three_x_plus_one", "return 3 * x + 1", nesting=0)
    timed = new_code_cell(NBVAL_TIMED, execution_count=4)
    timed.outputs = [new_output("stream", name="stdout", text="7 tokens in 12.345 ms\n")]
    check_cell = new_code_cell("check.lab1.task1(three_x_plus_one)")
    nb.cells = [new_markdown_cell("# Lab 1"), new_code_cell(NBVAL_SETUP), new_code_cell(exercise), check_cell, timed]
    return nb


@pytest.mark.slow
def test_pytest_runs_solution_and_lab_notebooks_under_nbval(tmp_path):
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "tests").mkdir()
    shutil.copy(SANITIZE_CFG, tmp_path / "tests" / "nbval_sanitize.cfg")
    (tmp_path / "tests" / "test_plain.py").write_text("def test_plain():\n    assert 1 + 1 == 2\n")
    solution = nbval_solution()
    write(solution, tmp_path / "solutions" / "01_ci.ipynb")
    build_all(tmp_path / "solutions", tmp_path / "labs")
    untagged = nbformat.read(str(tmp_path / "labs" / "01_ci.ipynb"), as_version=4)
    for cell in untagged.cells:
        cell.metadata.pop("tags", None)
    write(untagged, tmp_path / "broken" / "01_untagged.ipynb")
    solution.cells[-1].outputs[0].text = "8 tokens in 12.345 ms\n"  # a deterministic part differs
    write(solution, tmp_path / "broken" / "01_wrong_output.ipynb")

    def pytest_run(*args: str) -> str:
        command = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *args]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300).stdout

    out = pytest_run()  # the testpaths: tests, solutions, labs
    assert "PASSED tests/test_plain.py::test_plain" in out, out
    for notebook in ("solutions/01_ci.ipynb", "labs/01_ci.ipynb"):
        assert len(re.findall(rf"PASSED {notebook}::Cell \d", out)) == 4, out
    assert re.search(r"\b9 passed\b", out) and "failed" not in out.splitlines()[-1], out
    out = pytest_run("broken")
    assert "FAILED broken/01_untagged.ipynb::Cell 2" in out, out
    assert "FAILED broken/01_wrong_output.ipynb::Cell 3" in out, out
    assert re.search(r"\b2 failed\b", out), out
