"""minidisagg: a compact LLM inference engine whose prefill and decode can run together or apart.

The public names are loaded on first use (``from minidisagg import LLM`` imports the engine then),
so that ``import minidisagg.cli`` and ``minidisagg --help`` do not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

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
