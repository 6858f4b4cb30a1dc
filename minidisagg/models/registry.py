"""Model names and paths -> a loaded model: shape, weights on the device, and (lazily) a tokenizer."""

from __future__ import annotations

import os

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from minidisagg.config import PRESETS, ModelConfig
from minidisagg.models.fetch import SMOLLM2_GGUF, fetch
from minidisagg.models.llama import LlamaModel
from minidisagg.models.sanity import checked_tensors
from minidisagg.models.tokenizer import Tokenizer, load_tokenizer
from minidisagg.models.weights import (
    config_from_gguf,
    config_from_hf_dir,
    iter_gguf_tensors,
    iter_hf_dir_tensors,
    random_tensors,
)

REAL_MODELS = {"smollm2-135m"}
RANDOM_MODELS = {"tiny", "llama-1b", "llama-8b"}


class UnknownModelError(ValueError):
    """The model name is neither a known preset nor a local directory or GGUF file (or names a missing one)."""


def known_models() -> list[str]:
    """Names ``LLM(model=...)`` accepts besides local paths."""
    return sorted(REAL_MODELS | RANDOM_MODELS)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` means CUDA when present, else CPU; an unavailable device raises ValueError."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for, but torch sees no CUDA device; use device='cpu' or 'auto'")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto`` is float32 on CPU and bfloat16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use 'auto', 'float32', 'bfloat16' or 'float16'")
    return _DTYPES[dtype]


@dataclass
class LoadedModel:
    """A model ready to serve: its config, weights on the device, and a tokenizer loaded on first use."""

    name: str
    config: ModelConfig
    model: Optional[LlamaModel]
    load_s: float
    tokenizer_loader: Callable[[], Tokenizer]
    random_weights: bool = False
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    seed: int = 0  # what seeded random weights (worker processes rebuild the same ones from it)
    _tokenizer: Optional[Tokenizer] = field(default=None, repr=False)

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer (loading it the first time; random presets borrow SmolLM2's)."""
        if self._tokenizer is None:
            self._tokenizer = self.tokenizer_loader()
        return self._tokenizer

    @property
    def has_tokenizer_loaded(self) -> bool:
        """Whether the tokenizer has been loaded already."""
        return self._tokenizer is not None


def _smollm2_tokenizer(download: bool) -> Callable[[], Tokenizer]:
    return lambda: load_tokenizer(fetch(SMOLLM2_GGUF, download=download))


RANDOM_WEIGHTS_ENV = "MINIDISAGG_RANDOM_WEIGHTS"


def load_model(
    model: str,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    seed: int = 0,
    random_weights: bool = False,
    download: bool = True,
    weights: bool = True,
) -> LoadedModel:
    """Load a model by name (see ``known_models``), HF-format directory, or ``.gguf`` file.

    ``random_weights=True`` keeps the shape but fills seeded random weights (for speed work).
    ``weights=False`` loads only the shape and tokenizer (a router that serves no model itself).
    ``$MINIDISAGG_RANDOM_WEIGHTS=1`` makes a named real model (``smollm2-135m``) load random weights of its
    shape, saying so: for measuring on a machine that cannot fetch the weights, where text is not the point.
    """
    if model in REAL_MODELS and not random_weights and os.environ.get(RANDOM_WEIGHTS_ENV, "") not in ("", "0"):
        print(f"{model}: random weights of its shape (${RANDOM_WEIGHTS_ENV} is set); outputs are not text")
        random_weights = True
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    t0 = time.perf_counter()
    path = Path(model).expanduser()
    source = str(path)  # where the weights come from, for error messages
    if model in PRESETS:
        config = PRESETS[model]
        if model in REAL_MODELS and not random_weights:
            gguf_path = fetch(SMOLLM2_GGUF, download=download)
            source = str(gguf_path)
            tensors = iter_gguf_tensors(gguf_path, config, dt)
            tok_loader = lambda: load_tokenizer(gguf_path)  # noqa: E731
        else:
            random_weights = True
            tensors = random_tensors(config, dt, dev, seed)
            tok_loader = _smollm2_tokenizer(download)
    elif path.is_dir():
        config = config_from_hf_dir(path)
        tensors = random_tensors(config, dt, dev, seed) if random_weights else iter_hf_dir_tensors(path, config, dt)
        tok_loader = (lambda: load_tokenizer(path)) if (path / "tokenizer.json").exists() else _smollm2_tokenizer(download)
    elif path.suffix == ".gguf" and path.is_file():
        config = config_from_gguf(path)
        tensors = random_tensors(config, dt, dev, seed) if random_weights else iter_gguf_tensors(path, config, dt)
        tok_loader = lambda: load_tokenizer(path)  # noqa: E731
    elif path.suffix == ".gguf":
        raise UnknownModelError(f"file not found: {path}")
    else:
        raise UnknownModelError(
            f"unknown model {model!r}: use one of {known_models()}, a local HF-format directory "
            f"(config.json + *.safetensors + tokenizer.json), or a .gguf file"
        )
    net = None
    if weights:
        net = LlamaModel(config, dt, dev)
        # a file's tensors are checked as they stream in: damaged data would load silently otherwise
        net.load_weights(tensors if random_weights else checked_tensors(tensors, source))
    return LoadedModel(config.name if model in PRESETS else str(path), config, net, time.perf_counter() - t0,
                       tok_loader, random_weights, device=dev, dtype=dt, seed=seed)
