"""Write labs/ from solutions/: each solution block becomes a NotImplementedError stub, outputs go.

``solutions/NN_topic.ipynb`` is the single source of a lab. In an exercise cell, the lines from
``### BEGIN SOLUTION`` to ``### END SOLUTION`` become
``raise NotImplementedError("Lab N, Task K: <the TODO line>")`` at the marker's indentation; the
docstring with its TODO and HINT lines stays. The lab's exercise and check cells are tagged
``raises-exception`` so that ``pytest --nbval-lax`` accepts them raising. The output is
deterministic (same solution, same bytes), which is what ``--check`` and the tests compare.

Three more things stay in solutions/ only:

- a prediction's value: ``q1_name = 24  ### PREDICTION`` becomes ``q1_name = ...`` for the student;
- a written question's model answer and rubric: a markdown cell tagged ``written-answer`` that
  starts ``**W1. Model answer.**`` becomes an empty ``**W1. Your answer.**`` cell;
- a worked derivation: a cell tagged ``solution-only`` is left out of the lab.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:  # nbformat is imported where notebooks are read or written (it takes a second or two)
    from nbformat import NotebookNode

BEGIN_MARKER = "### BEGIN SOLUTION"
END_MARKER = "### END SOLUTION"
RAISES_TAG = "raises-exception"
CHECK_OUTPUT_MARKER = "NBVAL_CHECK_OUTPUT"
CHECK_OUTPUT_TAG = "nbval-check-output"
LAB_FILE_NAME = re.compile(r"^(\d{2})_[A-Za-z0-9][A-Za-z0-9_-]*\.ipynb$")
TODO_LINE = re.compile(r"""^\s*(?:#\s*|[rRuU]?(?:"{3}|'{3}))?TODO:\s*(.*?)\s*(?:"{3}|'{3})?\s*$""")
CHECK_CALL = re.compile(r"\bcheck\.lab\d+\.task\d+\s*\(")
ANY_MARKER = re.compile(r"(BEGIN|END)\s+SOLUTION", re.IGNORECASE)
EXECUTION_RECORD_KEYS = ("execution", "ExecuteTime")  # timestamps written when a cell runs
BUILD_COMMAND = "minidisagg course build"
PREDICTION_LINE = re.compile(r"^(\s*)([A-Za-z_]\w*)\s*=\s*(.+?)\s*###\s*PREDICTION\s*$")
PREDICTION_STUB = "...  # your prediction: replace ... with a number"
WRITTEN_TAG = "written-answer"
SOLUTION_ONLY_TAG = "solution-only"
WRITTEN_HEADER = re.compile(r"^\*\*(W\d+)\. Model answer\.\*\*")
WRITTEN_PROMPT = "*(Double-click this cell and write it here.)*"
WRITTEN_STUB = "**{question}. Your answer.** " + WRITTEN_PROMPT


class LabSourceError(ValueError):
    """A solution notebook the generator cannot turn into a lab; the message says where and why."""


@dataclass(frozen=True)
class SolutionBlock:
    """One ``### BEGIN SOLUTION`` .. ``### END SOLUTION`` block of a cell (0-based line numbers)."""

    begin_line: int
    end_line: int
    indent: str
    todo: str


def lab_number(path: Path) -> int:
    """The lab's number from its file name: ``03_interference.ipynb`` -> 3."""
    match = LAB_FILE_NAME.match(Path(path).name)
    if match is None:
        raise LabSourceError(f"{Path(path).name}: a lab notebook is named NN_topic.ipynb (e.g. 03_interference.ipynb)")
    return int(match.group(1))


def _reject_stray_markers(source: str, cell_type: str, where: str) -> None:
    """Solution markers belong in code cells only."""
    for number, line in enumerate(source.split("\n"), 1):
        if ANY_MARKER.search(line):
            raise LabSourceError(
                f"{where}, line {number}: solution markers belong in code cells only "
                f"(found {line.strip()!r} in a {cell_type} cell)"
            )


def find_solution_block(source: str, where: str) -> Optional[SolutionBlock]:
    """The cell's solution block with its TODO text, None if it has none; LabSourceError if malformed."""
    lines = source.split("\n")
    blocks: list[tuple[int, int]] = []
    begin: Optional[int] = None
    for index, line in enumerate(lines):
        text = line.strip()
        if text == BEGIN_MARKER:
            if begin is not None:
                raise LabSourceError(
                    f"{where}, line {index + 1}: nested {BEGIN_MARKER!r} (the block opened on line "
                    f"{begin + 1} is not closed yet)"
                )
            begin = index
        elif text == END_MARKER:
            if begin is None:
                raise LabSourceError(f"{where}, line {index + 1}: {END_MARKER!r} without a {BEGIN_MARKER!r} before it")
            blocks.append((begin, index))
            begin = None
        elif ANY_MARKER.search(line):
            raise LabSourceError(
                f"{where}, line {index + 1}: malformed marker {text!r}; write exactly "
                f"{BEGIN_MARKER!r} or {END_MARKER!r} on a line of its own"
            )
    if begin is not None:
        raise LabSourceError(f"{where}, line {begin + 1}: {BEGIN_MARKER!r} without a matching {END_MARKER!r}")
    if not blocks:
        return None
    if len(blocks) > 1:
        starts = ", ".join(str(b + 1) for b, _ in blocks)
        raise LabSourceError(
            f"{where}: {len(blocks)} solution blocks in one cell (lines {starts}); one exercise per cell"
        )
    begin_line, end_line = blocks[0]
    todos = [(i, m.group(1)) for i in range(begin_line) if (m := TODO_LINE.match(lines[i]))]
    if not todos:
        raise LabSourceError(
            f"{where}, line {begin_line + 1}: no 'TODO:' line before the solution block in this cell "
            f"(the lab's NotImplementedError message is taken from it)"
        )
    if len(todos) > 1:
        numbers = ", ".join(str(i + 1) for i, _ in todos)
        raise LabSourceError(
            f"{where}: {len(todos)} 'TODO:' lines (lines {numbers}) before one solution block; keep exactly one"
        )
    todo_line, todo = todos[0]
    if not todo:
        raise LabSourceError(f"{where}, line {todo_line + 1}: the 'TODO:' line says nothing to do")
    indent = lines[begin_line][: len(lines[begin_line]) - len(lines[begin_line].lstrip())]
    return SolutionBlock(begin_line, end_line, indent, todo)


def stub_line(lab: int, task: int, block: SolutionBlock) -> str:
    """The line that replaces a solution block: ``raise NotImplementedError("Lab N, Task K: ...")``."""
    message = json.dumps(f"Lab {lab}, Task {task}: {block.todo}", ensure_ascii=False)  # a valid Python literal
    return f"{block.indent}raise NotImplementedError({message})"


def _is_check_output_marker(line: str) -> bool:
    text = line.strip()
    return text.startswith("#") and text.lstrip("#").strip() == CHECK_OUTPUT_MARKER


def strip_predictions(source: str) -> str:
    """Each ``name = value  ### PREDICTION`` line with its value replaced by ``...``."""
    lines = []
    for line in source.split("\n"):
        match = PREDICTION_LINE.match(line)
        lines.append(f"{match.group(1)}{match.group(2)} = {PREDICTION_STUB}" if match else line)
    return "\n".join(lines)


def written_question(source: str, where: str) -> str:
    """The question a ``written-answer`` cell answers ("W1"), from its ``**W1. Model answer.**`` header."""
    match = WRITTEN_HEADER.match(source.lstrip())
    if match is None:
        raise LabSourceError(f"{where}: a {WRITTEN_TAG!r} cell starts with '**W<n>. Model answer.**'")
    return match.group(1)


def _set_tags(cell: NotebookNode, tags: list[str]) -> None:
    if tags:
        cell.metadata["tags"] = tags
    else:
        cell.metadata.pop("tags", None)


def build_lab(solution_nb: NotebookNode, lab: int, name: str = "notebook") -> NotebookNode:
    """The lab made from a solution notebook (which is left unchanged); ``lab`` is its number N."""
    nb = copy.deepcopy(solution_nb)
    nb.metadata.pop("widgets", None)  # saved widget state belongs to the stripped outputs
    nb.nbformat_minor = max(int(nb.get("nbformat_minor", 0)), 5)  # 4.5+ carries cell ids
    task = 0
    nb.cells = [cell for cell in nb.cells if SOLUTION_ONLY_TAG not in cell.metadata.get("tags", [])]
    for index, cell in enumerate(nb.cells, 1):
        where = f"{name}, cell {index} ({cell.cell_type})"
        source = cell.source if isinstance(cell.source, str) else "".join(cell.source)
        cell["id"] = f"cell-{index}"  # stable, whatever ids the solution happens to carry
        for key in EXECUTION_RECORD_KEYS:
            cell.metadata.pop(key, None)
        if cell.cell_type != "code":
            _reject_stray_markers(source, cell.cell_type, where)
            if WRITTEN_TAG in cell.metadata.get("tags", []):
                source = WRITTEN_STUB.format(question=written_question(source, where))
            cell.source = source
            continue
        cell.outputs = []
        cell.execution_count = None
        lines = strip_predictions(source).split("\n")
        block = find_solution_block(source, where)
        if block is not None:
            task += 1
            lines[block.begin_line : block.end_line + 1] = [stub_line(lab, task, block)]
        lines = [line for line in lines if not _is_check_output_marker(line)]
        cell.source = "\n".join(lines)
        tags = [tag for tag in cell.metadata.get("tags", []) if tag != CHECK_OUTPUT_TAG]
        if (block is not None or CHECK_CALL.search(cell.source)) and RAISES_TAG not in tags:
            tags.append(RAISES_TAG)
        _set_tags(cell, tags)
    import nbformat

    try:
        nbformat.validate(nb)
    except nbformat.ValidationError as exc:
        raise LabSourceError(f"{name}: the lab would not be a valid notebook ({exc.message})") from exc
    return nb


def read_notebook(path: Path) -> NotebookNode:
    """Read a notebook as nbformat 4, with a clear error naming the file if it cannot be read."""
    import nbformat

    try:
        return nbformat.read(str(path), as_version=4)
    except (OSError, ValueError) as exc:
        raise LabSourceError(f"{path}: not a readable notebook ({exc})") from exc


def render_lab(solution_path: Path) -> str:
    """The exact text of the lab generated from one solution notebook."""
    solution_path = Path(solution_path)
    lab = build_lab(read_notebook(solution_path), lab_number(solution_path), solution_path.name)
    import nbformat

    return nbformat.writes(lab) + "\n"


def solution_paths(solutions_dir: Path) -> list[Path]:
    """The solution notebooks in ``solutions_dir``, in lab order; one per lab number."""
    solutions_dir = Path(solutions_dir)
    if not solutions_dir.is_dir():
        raise FileNotFoundError(f"solutions directory {solutions_dir} does not exist")
    paths = sorted(solutions_dir.glob("*.ipynb"))
    seen: dict[int, Path] = {}
    for path in paths:
        number = lab_number(path)
        if number in seen:
            raise LabSourceError(
                f"{seen[number].name} and {path.name} are both lab {number}; give each lab its own number"
            )
        seen[number] = path
    return paths


def build_all(solutions_dir: Path, labs_dir: Path) -> list[Path]:
    """Write ``labs_dir/NN_topic.ipynb`` for every solution; returns the labs' paths (rewritten only if changed)."""
    texts = {path.name: render_lab(path) for path in solution_paths(solutions_dir)}  # all errors before any write
    labs_dir = Path(labs_dir)
    labs_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in texts.items():
        path = labs_dir / name
        data = text.encode("utf-8")
        if not path.exists() or path.read_bytes() != data:
            path.write_bytes(data)
        written.append(path)
    return written


def _first_difference(existing: bytes, expected: str) -> str:
    """Where an existing lab departs from the generated one, in a few words."""
    try:
        have = json.loads(existing.decode("utf-8"))
    except ValueError:
        return "not a valid notebook file"
    want = json.loads(expected)
    have_cells, want_cells = have.get("cells", []), want["cells"]
    for index, (got, expect) in enumerate(zip(have_cells, want_cells), 1):
        if got != expect:
            return f"cell {index} differs"
    if len(have_cells) != len(want_cells):
        return f"{len(have_cells)} cells, expected {len(want_cells)}"
    return "notebook metadata differs" if have != want else "formatting differs"


def stale_labs(solutions_dir: Path, labs_dir: Path) -> list[str]:
    """What in ``labs_dir`` differs from what the generator makes from ``solutions_dir`` (empty: up to date)."""
    expected = {path.name: render_lab(path) for path in solution_paths(solutions_dir)}
    labs_dir = Path(labs_dir)
    problems = []
    for name, text in expected.items():
        path = labs_dir / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.read_bytes() != text.encode("utf-8"):
            problems.append(f"{name}: out of date ({_first_difference(path.read_bytes(), text)})")
    if labs_dir.is_dir():
        for path in sorted(labs_dir.glob("*.ipynb")):
            if path.name not in expected:
                problems.append(f"{path.name}: no solution notebook of that name (delete it or add the solution)")
    return problems


def default_course_dirs(root: Optional[Path] = None) -> tuple[Path, Path]:
    """``solutions/`` and ``labs/`` of the repository (by default the one this package sits in)."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    for folder in ("solutions", "labs"):
        if not (root / folder).is_dir():
            raise FileNotFoundError(
                f"no {folder}/ directory at {root}: run from a source checkout of minidisagg "
                f"(pip install -e .) or pass --solutions DIR --labs DIR"
            )
    return root / "solutions", root / "labs"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``minidisagg course build [--solutions DIR] [--labs DIR] [--check]``."""
    parser = argparse.ArgumentParser(prog=BUILD_COMMAND, description="Write labs/ from solutions/.")
    parser.add_argument("--solutions", type=Path, help="solution notebooks (default: the repository's solutions/)")
    parser.add_argument("--labs", type=Path, help="where the labs go (default: the repository's labs/)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 and name the labs that are stale")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        solutions_dir, labs_dir = args.solutions, args.labs
        if solutions_dir is None or labs_dir is None:
            default_solutions, default_labs = default_course_dirs()
            solutions_dir, labs_dir = solutions_dir or default_solutions, labs_dir or default_labs
        if not args.check:
            for path in build_all(solutions_dir, labs_dir):
                print(f"built {path}")
        problems = stale_labs(solutions_dir, labs_dir)  # after a build, only labs without a solution remain
        for problem in problems:
            print(f"stale {labs_dir}/{problem}")
        if problems:
            if args.check:
                print(f"{labs_dir} differs from what {solutions_dir} makes; run `{BUILD_COMMAND}`")
            return 1
        print(f"{labs_dir} is up to date with {solutions_dir} ({len(solution_paths(solutions_dir))} notebooks)")
        return 0
    except (LabSourceError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
