"""minidisagg: a compact LLM inference engine whose prefill and decode can run together or apart.

The public names are loaded on first use (``from minidisagg import LLM`` imports the engine then),
so that ``import minidisagg.cli`` and ``minidisagg --help`` do not pay for torch.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# OpenMP threads that finish a parallel region sleep at once rather than spin, unless the user chose.
# On a CPU host busier than its cores, torch's spinning threads made an engine stepped from a process's
# main thread 5-20x slower at times (a 2 s batch took up to 48 s), and PASSIVE removed that tail
# (``benchmarks/omp_wait_policy.py``, ``benchmarks/NOTES.md``). libgomp reads this once, when torch
# loads it: it applies to this process if torch is not imported yet, and to every process started from
# here (Jupyter kernels, nbval, worker processes) either way. Set ``OMP_WAIT_POLICY=ACTIVE`` to opt out
# (``MINIDISAGG_KEEP_OMP_POLICY=1`` leaves the variable unset, as the benchmark that compares them needs).
if not os.environ.get("MINIDISAGG_KEEP_OMP_POLICY"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# public name -> the module that defines it
_EXPORTS = {
    "LLM": "minidisagg.llm",
    "CacheConfig": "minidisagg.config",
    "EngineConfig": "minidisagg.config",
    "ModelConfig": "minidisagg.config",
    "LLMEngine": "minidisagg.engine.llm_engine",
    "RequestOutput": "minidisagg.engine.llm_engine",
    "SamplingParams": "minidisagg.engine.sampling",
    "RequestMetrics": "minidisagg.metrics",
}

__all__ = ["LLM", "CacheConfig", "EngineConfig", "LLMEngine", "ModelConfig", "RequestMetrics", "RequestOutput",
           "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from minidisagg.config import CacheConfig, EngineConfig, ModelConfig
    from minidisagg.engine.llm_engine import LLMEngine, RequestOutput
    from minidisagg.engine.sampling import SamplingParams
    from minidisagg.llm import LLM
    from minidisagg.metrics import RequestMetrics


def __getattr__(name: str) -> Any:
    """Import a public name's module the first time the name is asked for (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'minidisagg' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names, the lazily loaded public ones included."""
    return sorted({*globals(), *_EXPORTS})
