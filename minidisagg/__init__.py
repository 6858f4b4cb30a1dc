"""minidisagg: a compact LLM inference engine whose prefill and decode can run together or apart."""

from minidisagg.config import CacheConfig, EngineConfig, ModelConfig
from minidisagg.engine.llm_engine import LLMEngine, RequestOutput
from minidisagg.engine.sampling import SamplingParams
from minidisagg.llm import LLM
from minidisagg.metrics import RequestMetrics

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "CacheConfig",
    "EngineConfig",
    "LLMEngine",
    "ModelConfig",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
    "__version__",
]
