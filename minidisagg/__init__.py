"""minidisagg: a compact LLM inference engine whose prefill and decode can run together or apart.

The public names are loaded on first use (``from minidisagg import LLM`` imports the engine then),
so that ``import minidisagg.cli`` and ``minidisagg --help`` do not pay for torch.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# OpenMP threads that finish a parallel region spin at most 10,000 times before they sleep, unless the user
# chose (GNU OpenMP, torch's runtime on Linux, spins 300,000 by default). On a CPU host busier than its
# cores, the default made an engine stepped from a process's main thread up to 20-40x slower at times (a
# 2 s batch took up to 48 s); the short spin cut that tail to under 4x the median and cost nothing on a
# quiet host, where never spinning (OMP_WAIT_POLICY=PASSIVE) was 1.25-1.4x slower (``benchmarks/omp_wait_policy.py``,
# ``benchmarks/NOTES.md``). libgomp reads this once, when torch loads it: it applies to this process if
# torch is not imported yet, and to every process started from here (Jupyter kernels, nbval, worker
# processes) either way. Setting OMP_WAIT_POLICY or GOMP_SPINCOUNT yourself overrides it;
# ``MINIDISAGG_KEEP_OMP_POLICY=1`` leaves both unset, as the benchmark that compares them needs.
if not (os.environ.get("MINIDISAGG_KEEP_OMP_POLICY") or "OMP_WAIT_POLICY" in os.environ):
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

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
