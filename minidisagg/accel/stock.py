"""Whether a model is the stock ``models/llama.py`` Llama, the one the accelerators copy.

An accelerator here replicates the model's code in another form (C++), so it is right only for
the code it was written against. :func:`why_not_stock` names the first difference it finds:

- the model or a layer is not ``LlamaModel`` / ``LlamaLayer`` itself (a subclass, another model);
- a method the accelerator replicates is not the function ``models/llama.py`` defined (a
  monkeypatch, a wrapper), or an instance attribute or a forward hook stands in front of it;
- a kernel dispatch point those methods call is not the one ``kernels/`` defines;
- the source of those methods is not the source the accelerator was checked against
  (``STOCK_SOURCE_SHA256``, updated, once the bit-equality tests pass, when ``models/llama.py`` changes).

The functions are recorded when this module is imported, which ``minidisagg`` does before any
user code can patch them (``engine/runner.py`` imports it).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import textwrap
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn.modules import module as module_state

from minidisagg.kernels import activation, attention, linear, norm, rope, rope_cache
from minidisagg.models import llama
from minidisagg.models.llama import LlamaLayer, LlamaModel

LAYER_METHODS = ("forward", "attention_inputs", "rope_and_write_kv", "attention", "attention_output", "mlp_input", "mlp")
MODEL_METHODS = ("forward", "embed_tokens", "final_norm", "compute_logits")
_LAYER_METHOD_SET = frozenset(LAYER_METHODS)
KERNELS: dict[str, Callable[..., object]] = {  # the names models/llama.py calls, and what they must be
    "rms_norm": norm.rms_norm, "linear": linear.linear, "rope_and_write_kv": rope_cache.rope_and_write_kv,
    "apply_rope": rope.apply_rope, "paged_attention": attention.paged_attention,
    "silu_and_mul": activation.silu_and_mul,
}
STOCK_METHODS: dict[tuple[type, str], Callable[..., object]] = {
    **{(LlamaModel, name): LlamaModel.__dict__[name] for name in MODEL_METHODS},
    **{(LlamaLayer, name): LlamaLayer.__dict__[name] for name in LAYER_METHODS},
}
# sha256 of the replicated methods' source (see stock_source_sha256); the accelerators were checked
# bit for bit against the model with this source
STOCK_SOURCE_SHA256 = "ff0d3b0d89d86583f62552d2ab86ebda02705252f1822cea5a4e902b4148def3"


@functools.cache
def stock_source_sha256() -> str:
    """sha256 of the source text of the recorded methods, in a fixed order ('' when the source cannot be read)."""
    digest = hashlib.sha256()
    try:
        for (cls, name), fn in STOCK_METHODS.items():
            source = textwrap.dedent(inspect.getsource(inspect.unwrap(fn)))
            digest.update(f"{cls.__name__}.{name}\n{source}".encode())
    except (OSError, TypeError):
        return ""
    return digest.hexdigest()


def _hooked(module: nn.Module) -> bool:
    """Whether forward hooks or pre-hooks are registered on ``module`` (or on every module)."""
    return bool(module._forward_hooks or module._forward_pre_hooks
                or module_state._global_forward_hooks or module_state._global_forward_pre_hooks)


def why_not_stock(model: torch.nn.Module) -> Optional[str]:
    """None for the stock ``LlamaModel``; else one sentence saying what differs from it."""
    if type(model) is not LlamaModel:
        return f"the model is a {type(model).__qualname__}, not models/llama.py's LlamaModel"
    for (cls, name), fn in STOCK_METHODS.items():
        if cls.__dict__.get(name) is not fn:
            return f"{cls.__name__}.{name} is not the function models/llama.py defines"
    for kernel, fn in KERNELS.items():
        if getattr(llama, kernel, None) is not fn:
            return f"models/llama.py's {kernel} is not the dispatch point kernels/ defines"
    overridden = [name for name in MODEL_METHODS if name in model.__dict__]
    if overridden or _hooked(model):
        return f"an instance attribute overrides LlamaModel.{overridden[0]}" if overridden else "the model has forward hooks"
    global_hooks = module_state._global_forward_hooks or module_state._global_forward_pre_hooks
    for index, layer in enumerate(model.layers):  # every step: kept to a few dictionary lookups a layer
        if type(layer) is not LlamaLayer:
            return f"layer {index} is a {type(layer).__qualname__}, not models/llama.py's LlamaLayer"
        if not _LAYER_METHOD_SET.isdisjoint(layer.__dict__):
            name = sorted(_LAYER_METHOD_SET.intersection(layer.__dict__))[0]
            return f"an instance attribute overrides layer {index}'s {name}"
        if layer._forward_hooks or layer._forward_pre_hooks or global_hooks:
            return f"layer {index} has forward hooks"
    if stock_source_sha256() != STOCK_SOURCE_SHA256:
        return "models/llama.py's layer code is not the code the accelerator was checked against"
    return None
