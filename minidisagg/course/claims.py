"""Claims as code: every number or direction a lab's prose states, checked against what it just measured.

A notebook calls ``claim(...)`` next to each figure. It prints one line, ``CLAIM ok: ...`` or
``CLAIM NOT SEEN: ...`` followed by the likely cause (host load, device), and returns a
``Claim``. ``minidisagg course verify`` executes the notebooks and counts those lines; under
pytest (``MINIDISAGG_STRICT_CLAIMS=1``, set by the test suite) a claim not seen raises, so
nbval fails the cell.

Where the answer depends on hardware, ``by_device`` picks the statement (and the expected
direction) for the lab's device, and the prose states both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, TypeVar

if TYPE_CHECKING:  # torch is imported where a device is looked at: ``course verify --help`` needs none of it
    import torch

STRICT_ENV = "MINIDISAGG_STRICT_CLAIMS"
OK_MARK = "CLAIM ok"
NOT_SEEN_MARK = "CLAIM NOT SEEN"

T = TypeVar("T")

_MADE: list["Claim"] = []  # every claim this process checked, in order (a lab's kernel: its own)


class ClaimNotSeen(AssertionError):
    """Raised (only in strict mode) when a notebook's claim does not hold on the values it measured."""


@dataclass(frozen=True)
class HostLoad:
    """The host's 1-minute load average against its core count, read when a claim is made."""

    load_1min: float
    num_cores: int

    @property
    def overloaded(self) -> bool:
        """More runnable work than cores: wall-clock measurements then include other programs' time."""
        return self.load_1min > self.num_cores

    def describe(self) -> str:
        """``load 3.1 on 2 cores``."""
        return f"load {self.load_1min:.1f} on {self.num_cores} cores"


def host_load() -> HostLoad:
    """The current 1-minute load average and the number of cores this process may use."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # not every platform has it
        load = 0.0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return HostLoad(load, cores)


def device_name(device: "torch.device | str | None" = None) -> str:
    """``CPU`` or the CUDA card's name."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    return "CPU"


def is_gpu(device: "torch.device | str | object | None") -> bool:
    """Whether ``device`` (a torch device, its name, or anything with ``.device``) is a CUDA device."""
    import torch

    dev = getattr(device, "device", device)
    return dev is not None and torch.device(dev).type == "cuda"


def by_device(device: "torch.device | str | object | None", cpu: T, gpu: T) -> T:
    """``cpu`` or ``gpu``, whichever fits ``device``: a claim whose answer depends on the hardware."""
    return gpu if is_gpu(device) else cpu


@dataclass(frozen=True)
class Claim:
    """One checked statement: what the prose says, whether the measurement shows it, and the numbers."""

    statement: str
    held: bool
    measured: str
    device: str
    load: HostLoad
    why_not: str = ""

    def line(self) -> str:
        """The line a notebook prints."""
        measured = f"  [{self.measured}]" if self.measured else ""
        if self.held:
            return f"{OK_MARK}: {self.statement}{measured}"
        causes = [self.why_not] if self.why_not else []
        if self.load.overloaded:
            causes.append(f"the host is busy ({self.load.describe()}): wall-clock figures include other programs")
        causes.append(f"measured on {self.device}; the prose may describe another device")
        return f"{NOT_SEEN_MARK}: {self.statement}{measured}\n    likely cause: " + "; ".join(causes)

    def __bool__(self) -> bool:
        return self.held


def strict() -> bool:
    """Whether a claim not seen raises (``MINIDISAGG_STRICT_CLAIMS=1``; the test suite sets it)."""
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def claim(statement: str, holds: bool, measured: str = "", *, device: "torch.device | str | object | None" = None,
          why_not: str = "") -> Claim:
    """Check one statement of the prose against the values just measured, and print the verdict.

    ``holds`` is the check itself (a bool computed from measurements), ``measured`` the numbers
    behind it as a short string, ``why_not`` the most likely reason it might not hold.
    """
    dev = getattr(device, "device", device)
    result = Claim(statement, bool(holds), measured, device_name(dev), host_load(), why_not)
    print(result.line())
    _MADE.append(result)
    if not result.held and strict():
        raise ClaimNotSeen(result.line())
    return result


def made_claims() -> list[Claim]:
    """Every claim checked in this process so far, oldest first (``course.beside`` pairs them with a GPU run's)."""
    return list(_MADE)


def ratio(a: float, b: float) -> float:
    """``a / b`` (inf when ``b`` is 0): the form every "x times faster" claim takes."""
    return a / b if b else float("inf")


def count_claims(text: str) -> tuple[int, int]:
    """(claims checked, claims held) in a notebook's printed output."""
    ok = text.count(OK_MARK + ":")
    not_seen = text.count(NOT_SEEN_MARK + ":")
    return ok + not_seen, ok


def load_banner(device: "torch.device | str | object | None" = None) -> Optional[str]:
    """A warning line when the host is too busy for wall-clock figures to mean much (else None); printed too."""
    load = host_load()
    if not load.overloaded:
        return None
    line = (f"WARNING: {load.describe()} ({device_name(getattr(device, 'device', device))}). Wall-clock figures in this "
            f"lab will include other programs' time; simulated-clock replays use costs calibrated up front.")
    print(line)
    return line
