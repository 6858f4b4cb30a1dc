"""KV links for the simulator: bandwidth and per-message latency, shared fairly by concurrent transfers.

A transfer of ``num_bytes`` alone on a link takes ``latency_s x num_messages + num_bytes / bandwidth``,
the line the course's ``LinkModel`` (``course.transfer_lab``, a ``LinkSpec`` that also takes arrays of
sizes) fits to measured transports. Transfers that overlap on one link share its bandwidth equally
(processor sharing, as TCP flows and NCCL channels roughly do): each gets ``bandwidth / n`` while
``n`` are active, and the latency is paid after the bytes are through. ``links_from_transport_json``
reads a committed ``bench transport`` result.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from minidisagg.sim.events import LINK, EventLoop

Landed = Callable[[float, object], None]


@dataclass(frozen=True)
class LinkSpec:
    """A link's measured figures: bandwidth in GB/s and a fixed cost per message in seconds.

    ``control_rtt_s``: the round trip of a control exchange between the instances it joins, half each way
    (a prefill instance asking its decode instance for blocks and hearing back: ``sim.fleet``); 0 makes the
    answer come at the decode instance's step boundary itself.
    """

    name: str
    bandwidth_GBps: float
    latency_s: float = 0.0
    control_rtt_s: float = 0.0

    def __post_init__(self) -> None:
        if not (self.bandwidth_GBps > 0 and math.isfinite(self.bandwidth_GBps)):
            raise ValueError(f"{type(self).__name__}.bandwidth_GBps must be positive and finite, got {self.bandwidth_GBps}")
        if not (self.latency_s >= 0 and math.isfinite(self.latency_s)):
            raise ValueError(f"{type(self).__name__}.latency_s must be >= 0 and finite, got {self.latency_s}")
        if not (self.control_rtt_s >= 0 and math.isfinite(self.control_rtt_s)):
            raise ValueError(f"{type(self).__name__}.control_rtt_s must be >= 0 and finite, got {self.control_rtt_s}")

    def seconds(self, num_bytes: int, num_messages: int = 1) -> float:
        """Time of one transfer alone on the link."""
        return self.latency_s * num_messages + num_bytes / (self.bandwidth_GBps * 1e9)


class SharedLink:
    """One link in the simulation: active transfers share its bandwidth; each lands ``latency`` after its last byte."""

    def __init__(self, spec: LinkSpec, loop: EventLoop) -> None:
        self.spec = spec
        self.loop = loop
        self._bytes_per_s = spec.bandwidth_GBps * 1e9
        self._active: dict[int, list] = {}  # transfer id -> [bytes left, messages, landed callback, payload]
        self._last_s = 0.0
        self._version = 0
        self._ids = 0
        self.bytes_sent = 0
        self.max_concurrent = 0

    @property
    def num_active(self) -> int:
        """Transfers whose bytes are still on the wire."""
        return len(self._active)

    def send(self, now_s: float, num_bytes: int, num_messages: int, landed: Landed, payload: object) -> None:
        """Start a transfer at ``now_s``; ``landed(t_s, payload)`` is called when it has arrived."""
        if num_bytes < 0 or num_messages < 1:
            raise ValueError(f"a transfer needs num_bytes >= 0 and num_messages >= 1, got {num_bytes}, {num_messages}")
        self._drain(now_s)
        self._ids += 1
        self._active[self._ids] = [float(num_bytes), num_messages, landed, payload]
        self.bytes_sent += num_bytes
        self.max_concurrent = max(self.max_concurrent, len(self._active))
        self._plan(now_s)

    def _drain(self, now_s: float) -> None:
        """Move every active transfer forward to ``now_s`` at its fair share."""
        if self._active and now_s > self._last_s:
            sent = (now_s - self._last_s) * self._bytes_per_s / len(self._active)
            for entry in self._active.values():
                entry[0] -= sent
        self._last_s = now_s

    def _plan(self, now_s: float) -> None:
        self._version += 1
        if self._active:
            left = min(entry[0] for entry in self._active.values())
            done_s = now_s + max(0.0, left) * len(self._active) / self._bytes_per_s
            self.loop.push(done_s, LINK, self._complete, self._version)

    def _complete(self, now_s: float, version: int) -> None:
        if version != self._version:
            return  # superseded by a later send or completion
        self._drain(now_s)
        least = min(entry[0] for entry in self._active.values())
        tolerance = 1e-9 * self._bytes_per_s * max(now_s, 1.0) + 1.0  # float residue of the shared-rate sums
        for tid in [t for t, e in self._active.items() if e[0] <= least + tolerance]:
            _, messages, landed, payload = self._active.pop(tid)
            self.loop.push(now_s + self.spec.latency_s * messages, LINK, landed, payload)
        self._plan(now_s)


def links_from_transport_json(path: str | Path) -> dict[str, LinkSpec]:
    """``LinkSpec``s fitted (latency + bytes / bandwidth) to each transport of a committed ``bench transport`` JSON."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc}); is it a bench transport result?") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not an object with rows; is it a bench transport result?")
    try:
        return links_from_transport_rows(data.get("rows", []))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def links_from_transport_rows(rows: list[dict], gbps_key: str = "GBps_best") -> dict[str, LinkSpec]:
    """``LinkSpec``s fitted (latency + bytes / bandwidth) to ``bench transport`` rows, e.g. just measured by
    ``bench.transport_bandwidth.run_bandwidth``: each transport's (message bytes, GB/s) points, least squares.

    ``gbps_key``: ``GBps_best`` (the fastest sample: the link itself) or ``GBps`` (the median: the link as a
    loaded host delivers it)."""
    points: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        name, size, gbps = row.get("transport"), row.get("message_bytes"), row.get(gbps_key, row.get("GBps"))
        if name and size and gbps and gbps > 0:
            points.setdefault(name, []).append((float(size), float(size) / (gbps * 1e9)))
    if not points:
        raise ValueError("no rows with transport, message_bytes and GBps; is it a bench transport result?")
    specs = {}
    for name, pts in points.items():
        pts.sort()
        if len(pts) == 1:
            specs[name] = LinkSpec(name, pts[0][0] / pts[0][1] / 1e9)
            continue
        n = len(pts)
        mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
        sxx = sum((x - mx) ** 2 for x, _ in pts)
        slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
        if slope <= 0:
            specs[name] = LinkSpec(name, max(x / y for x, y in pts) / 1e9)
        else:
            specs[name] = LinkSpec(name, 1.0 / slope / 1e9, max(0.0, my - slope * mx))
    return specs
