"""``minidisagg lab``: the JupyterLab command line it runs, as root and not (no server is started)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from minidisagg import cli
from minidisagg.course import jupyter


@pytest.fixture
def ran(monkeypatch):
    """Capture the command ``minidisagg lab`` would run instead of starting JupyterLab."""
    commands: list[list[str]] = []

    def fake_call(command):
        commands.append(command)
        return 0

    monkeypatch.setattr(jupyter.subprocess, "call", fake_call)
    return commands


def test_as_root_it_adds_allow_root_and_says_why(ran, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(jupyter, "running_as_root", lambda: True)
    assert cli.main(["lab", str(tmp_path), "--ip", "0.0.0.0"]) == 0
    assert ran == [[sys.executable, "-m", "jupyterlab", str(tmp_path), "--allow-root", "--ip", "0.0.0.0"]]
    out = capsys.readouterr().out
    assert jupyter.ROOT_NOTE in out and "--allow-root" in out.splitlines()[-1]


def test_as_a_user_it_runs_plain_jupyterlab_on_labs(ran, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(jupyter, "running_as_root", lambda: False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "labs").mkdir()
    assert cli.main(["lab", "--no-browser"]) == 0
    assert ran == [[sys.executable, "-m", "jupyterlab", "labs", "--no-browser"]]
    assert "root" not in capsys.readouterr().out


def test_allow_root_given_by_hand_is_not_repeated():
    command = jupyter.lab_command(Path("labs"), ["--allow-root"], as_root=True)
    assert command.count("--allow-root") == 1


def test_a_missing_directory_is_one_error_line(ran, capsys, tmp_path):
    assert cli.main(["lab", str(tmp_path / "nowhere")]) == 2
    assert "no directory" in capsys.readouterr().out and ran == []


def test_the_repository_labs_folder_is_the_default_and_exists():
    assert (Path(__file__).resolve().parents[1] / "labs").is_dir()
    assert jupyter.lab_command(Path("labs"))[1:4] == ["-m", "jupyterlab", "labs"]
