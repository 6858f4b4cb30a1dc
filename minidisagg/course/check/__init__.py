"""Check functions the labs call after each exercise: ``check.lab1.task1(fn)`` prints PASS or FAIL."""

from __future__ import annotations

import importlib
from types import ModuleType

_LABS = ("lab1", "lab2", "lab3", "lab4", "lab5", "lab6", "lab7")


def __getattr__(name: str) -> ModuleType:
    """Import ``labN`` on first use, so one lab's imports never slow another lab down."""
    if name in _LABS:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(_LABS)
