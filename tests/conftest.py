"""Shared fixtures: the real SmolLM2 GGUF (fetched once into the cache) and device skips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import minidisagg  # noqa: F401,I001 - before torch: its OpenMP spin count (minidisagg/__init__.py) applies here too
import torch

# A notebook claim not seen raises under the test suite, so nbval fails the cell whose prose it contradicts
# (the notebooks' kernels inherit this process's environment).
os.environ.setdefault("MINIDISAGG_STRICT_CLAIMS", "1")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the verified SmolLM2-135M-Instruct GGUF in the model cache."""
    from minidisagg.models.fetch import SMOLLM2_GGUF, fetch

    return fetch(SMOLLM2_GGUF)


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``gpu`` when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_loaded(smollm2_gguf):
    """SmolLM2-135M loaded once on CPU in float32 (engines in tests share it)."""
    from minidisagg.models.registry import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """The outside reference: HF transformers' LlamaForCausalLM loaded from the same GGUF."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def tiny_loaded():
    """The random-weight ``tiny`` preset on CPU (fast; no download)."""
    from minidisagg.models.registry import load_model

    return load_model("tiny", device="cpu", dtype="float32", seed=0)


def make_engine(loaded, **overrides):
    """An LLMEngine over an already loaded model, with EngineConfig fields overridden."""
    from minidisagg.config import CacheConfig, EngineConfig
    from minidisagg.engine.llm_engine import LLMEngine

    cache_fields = {k: overrides.pop(k) for k in ("num_blocks", "block_size", "layout", "enable_prefix_caching") if k in overrides}
    clock = overrides.pop("clock", None)
    config = EngineConfig(cache=CacheConfig(**cache_fields), **overrides)
    return LLMEngine(loaded, config, clock=clock)


def run_all(engine):
    """Step the engine until every request is done; returns finished outputs by request id."""
    done = {}
    for _ in range(100_000):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    else:
        raise AssertionError("engine did not finish")
    return done


def token_prompts(seed: int, n: int, lo: int = 3, hi: int = 50) -> list[dict]:
    """``n`` random token-id prompts (ordinary SmolLM2 ids) of ``lo``..``hi`` tokens, from ``seed``."""
    import random

    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(100, 49000) for _ in range(rng.randint(lo, hi))]} for _ in range(n)]


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (or ``MINIDISAGG_TEST_SEED`` to replay one); put it in assertion messages."""
    import os
    import random

    fixed = os.environ.get("MINIDISAGG_TEST_SEED")
    return int(fixed) if fixed else random.SystemRandom().randrange(1 << 31)


@pytest.fixture(scope="module")
def module_seed() -> int:
    """A fresh seed per test module (put it in assertion messages)."""
    import random

    return random.SystemRandom().randrange(1 << 30)
