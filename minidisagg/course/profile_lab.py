"""Lab 2's profiler helpers: engine decode steps under ``torch.profiler``, and their breakdown measured two ways.

Each named step of the model (``LlamaLayer``'s methods in ``models/llama.py``, and the LM head,
``LlamaModel.compute_logits``) runs inside a ``record_function`` label of its own name, so the trace's
``key_averages()`` has one row per label beside the operators' rows. The same wrappers also time
each method with ``time.perf_counter``: that is the engine's own breakdown, measured in the same run
without the trace, which a learner's reading of the trace is compared with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import EventList
from torch.profiler import ProfilerActivity, profile, record_function

from minidisagg.engine.batch import BatchItem
from minidisagg.engine.runner import ModelRunner
from minidisagg.kv.cache import PagedKVCache
from minidisagg.models.llama import LlamaModel
from minidisagg.roofline import synchronize

STEP_LABEL = "decode_step"
LAYER_METHODS = ("attention_inputs", "rope_and_write_kv", "attention", "attention_output", "mlp_input", "mlp")
MODEL_METHODS = {"embed_tokens": "embed_tokens", "final_norm": "final_norm", "compute_logits": "lm_head"}
LABELS = (STEP_LABEL, *LAYER_METHODS, *MODEL_METHODS.values())
US_PER_S = 1e6


@dataclass
class ProfiledSteps:
    """Decode steps run under the profiler: the trace's averages, the steps' wall time, and each method's own timing.

    ``step_wall_s`` is the host's time per step, from entering the runner to its return; on a GPU the
    kernels may still run after it (the next step waits for them outside the timed span).
    """

    averages: Any  # an EventList of the host's rows: one per label and per operator
    num_steps: int
    step_wall_s: float
    method_s: dict[str, float] = field(default_factory=dict)  # per step, summed over layers, by label
    on_gpu: bool = False
    all_rows: Any = None  # every row of the trace, the GPU's own (kernels, labels seen on the device) included

    def device_share(self, label: str) -> float:
        """On a GPU, the fraction of the step's kernel time that ran under ``label`` (0.0 on a CPU)."""
        if not self.on_gpu:
            return 0.0

        def device_s(key: str) -> float:
            return max((e.device_time_total for e in self.all_rows if e.key == key), default=0.0)

        total = device_s(STEP_LABEL)
        return device_s(label) / total if total > 0 else 0.0

    def table(self, row_limit: int = 12) -> str:
        """The profiler's table, busiest host operators first: the whole trace on a GPU (its kernels included).

        On a GPU the host rows alone cannot be tabled: torch sums device time over the device's rows only,
        and those are what this selection leaves out.
        """
        rows = self.all_rows if self.on_gpu else self.averages
        return rows.table(sort_by="self_cpu_time_total", row_limit=row_limit)


def _timed(label: str, fn: Callable[..., Any], spent: dict[str, float]) -> Callable[..., Any]:
    """``fn`` inside a profiler label, its host time added to ``spent[label]``."""

    def run(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        with record_function(label):
            value = fn(*args, **kwargs)
        spent[label] = spent.get(label, 0.0) + time.perf_counter() - t0
        return value

    return run


@torch.inference_mode()
def profile_decode_steps(model: LlamaModel, batch: int, context_len: int, num_steps: int = 3,
                         block_size: int = 16) -> ProfiledSteps:
    """Profile ``num_steps`` engine decode steps of ``batch`` sequences of ``context_len`` cached tokens each."""
    if batch < 1 or context_len < 1 or num_steps < 1:
        raise ValueError(f"batch, context_len and num_steps must be >= 1, got {batch}, {context_len}, {num_steps}")
    per_seq = -(-(context_len + 1) // block_size)
    cache = PagedKVCache(model.cfg, batch * per_seq, block_size, model.dtype, model.device)
    cache.kv.fill_(0.01)
    runner = ModelRunner(model, cache)
    items = [BatchItem([1 + i], context_len, list(range(i * per_seq, (i + 1) * per_seq)), True) for i in range(batch)]
    runner.execute(items)  # warm up outside the trace
    synchronize(model.device)
    spent: dict[str, float] = {}
    patched: list[tuple[Any, str]] = []
    try:
        for layer in model.layers:
            for name in LAYER_METHODS:
                setattr(layer, name, _timed(name, getattr(layer, name), spent))
                patched.append((layer, name))
        for name, label in MODEL_METHODS.items():
            setattr(model, name, _timed(label, getattr(model, name), spent))
            patched.append((model, name))
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if model.device.type == "cuda" else [])
        wall_s = 0.0
        with profile(activities=activities) as prof:
            for _ in range(num_steps):
                t0 = time.perf_counter()
                with record_function(STEP_LABEL):
                    runner.execute(items)
                wall_s += time.perf_counter() - t0
                synchronize(model.device)
    finally:
        for owner, name in patched:
            delattr(owner, name)  # the class's method shows through again
    all_rows = prof.key_averages()
    on_gpu = model.device.type == "cuda"
    # A label shows up twice on a GPU (as the host ran it, and as the device saw it): keep the host's rows.
    host_rows = EventList([e for e in all_rows if e.device_type == DeviceType.CPU], use_device="cuda" if on_gpu else None)
    return ProfiledSteps(host_rows, num_steps, wall_s / num_steps, {label: s / num_steps for label, s in spent.items()},
                         on_gpu, all_rows)


def breakdown_from_trace(averages: Any, num_steps: int, step_wall_s: float) -> tuple[float, float, float]:
    """(LM head's share of the step, attention's share, Python overhead per step in s), read from the trace.

    A label's share is its total host time per step over the step's wall time; the overhead is the wall
    time left after every operator's self time (the labels are not operators).
    """
    rows = {e.key: e for e in averages}
    per_step_s = 1.0 / (US_PER_S * num_steps)
    lm_head = rows["lm_head"].cpu_time_total * per_step_s / step_wall_s
    attention = rows["attention"].cpu_time_total * per_step_s / step_wall_s
    in_operators_s = sum(e.self_cpu_time_total for e in averages if not e.is_user_annotation) * per_step_s
    return lm_head, attention, step_wall_s - in_operators_s


def breakdown_from_methods(steps: ProfiledSteps) -> tuple[float, float]:
    """(LM head's share, attention's share) of the step from the methods' own timers, in the same run."""
    wall = steps.step_wall_s
    return steps.method_s.get("lm_head", 0.0) / wall, steps.method_s.get("attention", 0.0) / wall


def operator_rows(steps: ProfiledSteps, top: int = 8) -> list[tuple[str, float, int]]:
    """The ``top`` operators by self host time: (name, self time per step in ms, calls per step)."""
    ops = [e for e in steps.averages if not e.is_user_annotation]
    ops.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.self_cpu_time_total / 1e3 / steps.num_steps, e.count // steps.num_steps) for e in ops[:top]]
