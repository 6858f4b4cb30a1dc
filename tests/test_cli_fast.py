"""The CLI answers ``--help`` without loading torch, and a missing ``.gguf`` file is named as such."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minidisagg.cli import BENCH_SUITES, COURSE_ACTIONS, SLIDES_ACTIONS, main

REPO = Path(__file__).resolve().parents[1]
# Run the CLI's entry point on argv, let --help exit, then say whether torch was imported on the way.
HELP_PROBE = """
import sys
from minidisagg import cli
try:
    cli.main(sys.argv[1:])
except SystemExit:
    pass
print("torch imported:", "torch" in sys.modules)
"""


def run_help(*argv: str) -> str:
    """stdout of ``minidisagg ARGV --help`` in a fresh interpreter, with the probe's last line."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
    done = subprocess.run([sys.executable, "-c", HELP_PROBE, *argv, "--help"], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def subcommands() -> list[str]:
    """The subcommands, as the top-level help lists them (so a new one is checked too)."""
    found = re.search(r"\{([\w,-]+)\}", run_help())
    assert found, "the top-level help lists no subcommands"
    return found.group(1).split(",")


def test_top_level_help_does_not_import_torch():
    out = run_help()
    assert "usage: minidisagg" in out and out.rstrip().endswith("torch imported: False")


@pytest.mark.parametrize("argv", [[name] for name in subcommands()]
                         + [["bench", suite] for suite in BENCH_SUITES]
                         + [["course", action] for action in COURSE_ACTIONS]
                         + [["slides", action] for action in SLIDES_ACTIONS],
                         ids=" ".join)
def test_subcommand_help_does_not_import_torch(argv):
    out = run_help(*argv)
    assert "usage:" in out, out
    assert out.rstrip().endswith("torch imported: False"), out[-300:]


def test_model_device_and_dtype_are_explained_wherever_they_appear():
    for name in ("generate", "demo", "serve"):
        out = " ".join(run_help(name).split())
        for flag in ("--model MODEL", "--device DEVICE", "--dtype DTYPE"):
            if flag in out:
                assert re.search(re.escape(flag) + r" [a-z(]", out), f"{name} {flag} has no help text"
        assert "--model MODEL smollm2-135m" in out and "--device DEVICE auto" in out


def test_a_missing_gguf_file_is_reported_as_not_found(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line per message
    missing = tmp_path / "no-such-model.gguf"
    for argv in (["generate", "--model", str(missing), "--prompt", "hi", "--device", "cpu"], ["fetch", str(missing)]):
        assert main(argv) == 2, argv
        out = " ".join(capsys.readouterr().out.split())
        assert f"file not found: {missing}" in out and "unknown model" not in out, out


def test_the_lazy_console_hands_a_real_console_to_progress_bars():
    from rich.console import Console
    from rich.progress import Progress

    from minidisagg import cli

    real = cli.console.real()
    assert isinstance(real, Console) and cli.console.real() is real
    with Progress(console=real, transient=True) as progress:  # what cmd_demo does: entered as a context manager
        progress.add_task("x", total=1)
