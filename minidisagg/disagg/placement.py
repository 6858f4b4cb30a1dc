"""Which device each worker process runs on: validation, and the arguments and environment that pin it.

Under NCCL every rank needs a GPU of its own. A pinned GPU worker sees every GPU, its own
first (``CUDA_VISIBLE_DEVICES`` rotated), and runs on ``cuda:0``: every thread it starts then
defaults to its own GPU (CUDA's current device is per thread), and NCCL still sees the peer
GPUs it needs for direct GPU-to-GPU copies.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional, Sequence


def visible_cuda_devices() -> list[str]:
    """This process's CUDA devices as ``CUDA_VISIBLE_DEVICES`` names them (indices when it is unset)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def check_placement(devices: Optional[Sequence[str]], count: int, role: str) -> list[Optional[str]]:
    """Validate the devices given for ``count`` workers of ``role`` (None: each worker picks its own)."""
    if devices is None:
        return [None] * count
    devices = [str(d) for d in devices]
    if len(devices) != count:
        raise ValueError(f"got {len(devices)} {role} device(s) {devices} for {count} {role} worker(s)")
    visible = None
    for text in devices:
        if text == "cpu":
            continue
        if not text.startswith("cuda:") or not text[5:].isdigit():
            raise ValueError(f"a {role} worker's device must be 'cpu' or 'cuda:N', got {text!r}")
        visible = visible_cuda_devices() if visible is None else visible
        if int(text[5:]) >= len(visible):
            raise ValueError(f"{role} device {text} does not exist: this machine shows {len(visible)} CUDA device(s)")
    return list(devices)


def placement(device: Optional[str]) -> tuple[list[str], dict[str, str]]:
    """Extra ``serve`` arguments and environment that pin a worker to ``device``.

    A GPU worker sees every GPU, its own first (``CUDA_VISIBLE_DEVICES`` rotated), and runs
    on ``cuda:0``: every thread of it then defaults to its GPU, and NCCL still sees the
    peers it needs for direct GPU-to-GPU transfers.
    """
    if device is None:
        return [], {}
    if device == "cpu":
        return ["--device", "cpu"], {}
    visible = visible_cuda_devices()
    index = int(device.removeprefix("cuda:"))
    order = [visible[index], *visible[:index], *visible[index + 1:]]
    return ["--device", "cuda:0"], {"CUDA_VISIBLE_DEVICES": ",".join(order)}


def check_dist_placement(devices: Sequence[Optional[str]]) -> None:
    """One process group needs one backend (all CPU, gloo; or all GPU, NCCL) and, under NCCL, a GPU per rank."""
    pinned = [d for d in devices if d is not None]
    if not pinned:
        return
    if len(pinned) != len(devices):
        raise ValueError("with the dist transport, pin every worker to a device or none")
    kinds = {d.partition(":")[0] for d in pinned}
    if len(kinds) > 1:
        raise ValueError(f"the dist transport cannot mix CPU and GPU workers (gloo vs NCCL), got {list(pinned)}")
    gpus = [d for d in pinned if d != "cpu"]
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"NCCL needs a GPU of its own for every worker, got {list(pinned)}")


@contextlib.contextmanager
def child_environment(env: dict[str, str]) -> Iterator[None]:
    """Set ``env`` while a child process starts (it copies the environment before its first import)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
