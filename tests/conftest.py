"""Shared fixtures: the real SmolLM2 GGUF (fetched once into the cache) and device skips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


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
