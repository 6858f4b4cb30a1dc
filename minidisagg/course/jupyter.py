"""``minidisagg lab [DIR]``: start JupyterLab on the labs, adding ``--allow-root`` when run as root (Docker, cloud)."""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

ROOT_NOTE = ("running as root (as in Docker and most cloud images): adding --allow-root, without which "
             "JupyterLab exits at once")


def running_as_root() -> bool:
    """Whether this process runs as root (POSIX uid 0; never on Windows)."""
    return hasattr(os, "geteuid") and os.geteuid() == 0


def lab_command(directory: Path, extra: Sequence[str] = (), as_root: bool = False) -> list[str]:
    """The command line that starts JupyterLab on ``directory`` with this interpreter's JupyterLab."""
    command = [sys.executable, "-m", "jupyterlab", str(directory)]
    if as_root and "--allow-root" not in extra:
        command.append("--allow-root")
    return command + list(extra)


def launch(directory: Path, extra: Sequence[str] = (), as_root: Optional[bool] = None,
           run: Optional[Callable[[list[str]], int]] = None) -> int:
    """Check ``directory`` and JupyterLab, say what runs, and run it; returns JupyterLab's exit status."""
    if not directory.is_dir():
        raise ValueError(f"no directory {directory}: run from the repository root, or pass the labs' folder")
    if importlib.util.find_spec("jupyterlab") is None:
        raise ValueError("JupyterLab is not installed in this environment: pip install jupyterlab")
    as_root = running_as_root() if as_root is None else as_root
    if as_root:
        print(ROOT_NOTE)
    command = lab_command(directory, extra, as_root)
    print("starting:", shlex.join(command), flush=True)
    return (run or subprocess.call)(command)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: ``[DIR] [JupyterLab options]``; DIR defaults to ``labs``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-h"], ["--help"]):
        print("usage: minidisagg lab [DIR] [JupyterLab options, e.g. --ip 0.0.0.0 --no-browser]\n\n" + __doc__)
        return 0
    directory = Path(args.pop(0)) if args and not args[0].startswith("-") else Path("labs")
    return launch(directory, args)
