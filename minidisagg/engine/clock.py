"""Engine clocks: wall time, or simulated time that jumps over idle gaps and advances by work done."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    import torch

    from minidisagg.engine.step_cost import StepCostModel, StepShape


class WallClock:
    """Seconds since ``origin_s`` (default: when the clock was made); waiting really sleeps.

    ``origin_s`` is a ``time.perf_counter()`` reading. On Linux that counter is the system-wide
    monotonic clock, so processes on one host given the same origin share one timeline.
    """

    simulated = False

    def __init__(self, origin_s: float | None = None) -> None:
        self.origin_s = time.perf_counter() if origin_s is None else origin_s

    def now(self) -> float:
        """Current time in seconds."""
        return time.perf_counter() - self.origin_s

    def wait_until(self, t_s: float) -> None:
        """Sleep until ``t_s``."""
        delay = t_s - self.now()
        if delay > 0:
            time.sleep(delay)

    def advance(self, dt_s: float) -> None:
        """Wall time advances by itself; nothing to do."""

    def charge(self, shape: "StepShape", measured_s: float) -> float:
        """A stage run of ``shape`` took ``measured_s``; wall time already moved by that much, so return it."""
        return measured_s


def event_time_s(event: torch.cuda.Event, now_s: Callable[[], float],
                 stream: Optional[torch.cuda.Stream] = None) -> float:
    """When (on the clock read by ``now_s``) the device passed ``event``, a completed timing event.

    The host queues work ahead of the device, so a host reading taken when the work is queued
    is too early, and one taken when a poll sees the event is too late. This queues a second
    event on ``stream`` (which must have nothing pending; default: the current stream), waits
    for it, reads the clock, and subtracts the device time between the two events.
    """
    import torch

    now_event = torch.cuda.Event(enable_timing=True)
    now_event.record(stream)
    now_event.synchronize()
    host_now_s = now_s()
    return host_now_s - max(0.0, event.elapsed_time(now_event)) / 1e3


class SimulatedClock:
    """Time that only moves when told: by the cost of each step, or to the next arrival.

    Replaying a workload on a simulated clock gives the latencies a dedicated machine would
    see, without sleeping through idle gaps. With a ``cost_model`` (``engine.calibrate``) each
    step is charged what its shape cost when calibrated, so the replay is deterministic and load
    from other programs during it cannot change its timeline; without one, a step is charged its
    own measured wall time (which another program's load inflates).
    """

    simulated = True

    def __init__(self, start_s: float = 0.0, cost_model: Optional["StepCostModel"] = None) -> None:
        self._t = start_s
        self.cost_model = cost_model

    def now(self) -> float:
        """Current simulated time in seconds."""
        return self._t

    def wait_until(self, t_s: float) -> None:
        """Jump forward to ``t_s`` (never backwards)."""
        self._t = max(self._t, t_s)

    def advance(self, dt_s: float) -> None:
        """Move forward by ``dt_s`` seconds of work."""
        if dt_s < 0:
            raise ValueError(f"cannot advance a clock by a negative time ({dt_s})")
        self._t += dt_s

    def charge(self, shape: "StepShape", measured_s: float) -> float:
        """Advance by the cost of a stage run of ``shape`` (the model's, else ``measured_s``); returns it."""
        dt_s = measured_s if self.cost_model is None else self.cost_model.cost_s(shape)
        self.advance(dt_s)
        return dt_s


Clock = WallClock | SimulatedClock
