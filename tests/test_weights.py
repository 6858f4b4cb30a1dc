"""Weights loading: GGUF and HF safetensors against HF transformers, random weights, and clear errors."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from minidisagg.config import PRESETS, SMOLLM2_135M, TINY, ModelConfig
from minidisagg.models.weights import (
    WeightsError,
    check_complete,
    config_from_gguf,
    config_from_hf_dir,
    expected_shapes,
    iter_gguf_tensors,
    iter_hf_dir_tensors,
    random_tensors,
)

SHAPE_FIELDS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                "vocab_size", "max_position", "rope_theta", "rms_norm_eps", "tie_embeddings", "rope_scaling",
                "bos_token_id", "eos_token_ids")


def _hf_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ real GGUF vs HF transformers


@pytest.mark.slow
def test_gguf_config_matches_preset_and_hf(smollm2_gguf: Path, hf_smollm2) -> None:
    cfg = config_from_gguf(smollm2_gguf, name="smollm2-135m")
    assert cfg == SMOLLM2_135M
    hf = hf_smollm2.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.max_position) == (
        hf.intermediate_size, hf.vocab_size, hf.max_position_embeddings)
    assert cfg.tie_embeddings == hf.tie_word_embeddings
    assert cfg.rms_norm_eps == pytest.approx(hf.rms_norm_eps, rel=1e-6)
    theta = getattr(hf, "rope_theta", None) or hf.rope_parameters["rope_theta"]
    assert cfg.rope_theta == pytest.approx(theta)
    assert cfg.bos_token_id == hf.bos_token_id and cfg.eos_token_ids == (hf.eos_token_id,)
    assert config_from_gguf(smollm2_gguf).name == smollm2_gguf.stem


@pytest.mark.slow
def test_gguf_tensors_equal_hf(smollm2_gguf: Path, hf_smollm2) -> None:
    cfg = config_from_gguf(smollm2_gguf)
    ours = dict(iter_gguf_tensors(smollm2_gguf, cfg))
    ref = _hf_state(hf_smollm2)
    assert list(ours) == list(expected_shapes(cfg))
    assert "lm_head.weight" not in ours  # tied: HF's lm_head is the embedding itself
    assert torch.equal(ref.pop("lm_head.weight"), ref["embed_tokens.weight"])
    assert set(ours) == set(ref)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32 and tensor.shape == ref[name].shape, name
        torch.testing.assert_close(tensor, ref[name], rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------ GGUF written here (all storage types)


def _llamacpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's converter: each head's rows (2, D/2) -> (D/2, 2), half-split -> interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def _write_gguf(path: Path, cfg: ModelConfig, state: dict[str, torch.Tensor], qtype_name: str,
                arch: str = "llama") -> None:
    """A small Llama GGUF the way llama.cpp's converter writes one (names, q/k permutation, metadata)."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(cfg.max_position)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])  # no vocab_size key: falls back to this
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_ids[0])
    to_gguf = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    qtype = gguf.GGMLQuantizationType[qtype_name]
    for name, w in state.items():
        base = name.removesuffix(".weight")
        if base.startswith("layers."):
            _, i, rest = base.split(".", 2)
            gname = f"blk.{i}.{to_gguf[rest]}.weight"
        else:
            gname = f"{to_gguf[base]}.weight"
        if name.endswith("q_proj.weight"):
            w = _llamacpp_permute(w, cfg.num_heads)
        elif name.endswith("k_proj.weight"):
            w = _llamacpp_permute(w, cfg.num_kv_heads)
        arr = w.float().numpy()
        if arr.ndim == 1 or qtype_name == "F32":
            writer.add_tensor(gname, arr)
        else:
            writer.add_tensor(gname, quantize(arr, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


SMALL = ModelConfig(name="small", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                    intermediate_size=96, vocab_size=128, max_position=256, rope_theta=10000.0,
                    rms_norm_eps=1e-5, tie_embeddings=False)


@pytest.mark.parametrize("qtype,atol", [("F32", 0.0), ("F16", 1e-4), ("BF16", 1e-3), ("Q8_0", 2e-3)])
def test_gguf_round_trip_all_storage_types(tmp_path: Path, qtype: str, atol: float) -> None:
    state = dict(random_tensors(SMALL, torch.float32, seed=3))
    path = tmp_path / "small.gguf"
    _write_gguf(path, SMALL, state, qtype)
    cfg = config_from_gguf(path, name="small")
    assert cfg == SMALL  # untied (output.weight present), vocab from the token list
    got = dict(iter_gguf_tensors(path, cfg))
    assert list(got) == list(expected_shapes(SMALL))
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")
    bf16 = dict(iter_gguf_tensors(path, cfg, dtype=torch.bfloat16))
    assert all(t.dtype == torch.bfloat16 for t in bf16.values())
    assert torch.equal(bf16["layers.1.self_attn.k_proj.weight"], got["layers.1.self_attn.k_proj.weight"].bfloat16())


# ------------------------------------------------------------------ HF safetensors directory


def _small_hf_config(tied: bool):
    transformers = pytest.importorskip("transformers")
    extra = {}
    if tied:
        extra = {"rope_theta": 500000.0, "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024}}
    return transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=512, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        bos_token_id=1, eos_token_id=2, **extra)


def _save_hf(tmp_path: Path, tied: bool) -> tuple[Path, torch.nn.Module]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(_small_hf_config(tied))
    out = tmp_path / ("hf-tied" if tied else "hf-untied")
    model.save_pretrained(out, safe_serialization=True)
    return out, model


@pytest.mark.parametrize("tied", [False, True])
def test_hf_dir_round_trip(tmp_path: Path, tied: bool) -> None:
    path, model = _save_hf(tmp_path, tied)
    cfg = config_from_hf_dir(path)
    assert cfg.name == path.name
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 64, 4, 2, 16)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.max_position, cfg.rms_norm_eps) == (128, 512, 4096, 1e-5)
    assert cfg.tie_embeddings is tied and (cfg.bos_token_id, cfg.eos_token_ids) == (1, (2,))
    if tied:
        assert cfg.rope_theta == 500000.0
        assert (cfg.rope_scaling.factor, cfg.rope_scaling.low_freq_factor, cfg.rope_scaling.high_freq_factor,
                cfg.rope_scaling.original_max_position) == (8.0, 1.0, 4.0, 1024)
    else:
        assert cfg.rope_theta == model.config.rope_parameters["rope_theta"] and cfg.rope_scaling is None
    got = dict(iter_hf_dir_tensors(path, cfg))
    ref = _hf_state(model)
    if tied:
        ref.pop("lm_head.weight")
    assert set(got) == set(ref) == set(expected_shapes(cfg))
    for name, tensor in got.items():
        assert torch.equal(tensor, ref[name]), name
    assert all(t.dtype == torch.bfloat16 for _, t in iter_hf_dir_tensors(path, cfg, dtype=torch.bfloat16))


# ------------------------------------------------------------------ random weights


def test_random_tensors_seeded_and_shaped() -> None:
    a = dict(random_tensors(TINY, torch.float32, seed=0))
    b = dict(random_tensors(TINY, torch.float32, seed=0))
    c = dict(random_tensors(TINY, torch.float32, seed=1))
    assert {k: tuple(v.shape) for k, v in a.items()} == expected_shapes(TINY)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.self_attn.q_proj.weight"], c["layers.0.self_attn.q_proj.weight"])
    assert torch.equal(a["norm.weight"], torch.ones(TINY.hidden_size))
    assert a["embed_tokens.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    # a tensor's values depend on (seed, name) only, not on what was generated before it
    last_name, last = list(random_tensors(TINY, torch.float32, seed=0))[-1]
    assert torch.equal(last, a[last_name])
    assert all(t.dtype == torch.bfloat16 for _, t in random_tensors(TINY, torch.bfloat16))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_expected_shapes_of_presets(name: str) -> None:
    cfg = PRESETS[name]
    shapes = expected_shapes(cfg)  # shapes only: llama-8b is not materialized
    assert len(shapes) == 9 * cfg.num_layers + 2 + (0 if cfg.tie_embeddings else 1)
    assert sum(int(np.prod(s)) for s in shapes.values()) == cfg.num_params()
    assert shapes["layers.0.self_attn.k_proj.weight"] == (cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size)
    check_complete(cfg, shapes)


# ------------------------------------------------------------------ errors a student can act on


def test_truncated_gguf(tmp_path: Path, smollm2_gguf: Path) -> None:
    half = tmp_path / "half.gguf"
    with open(smollm2_gguf, "rb") as src:
        half.write_bytes(src.read(smollm2_gguf.stat().st_size // 2))
    for call in (lambda: config_from_gguf(half), lambda: next(iter_gguf_tensors(half, SMOLLM2_135M))):
        with pytest.raises(WeightsError, match="truncated or corrupt") as err:
            call()
        assert str(half) in str(err.value) and "Delete it" in str(err.value)


def test_garbage_gguf(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    with pytest.raises(WeightsError, match="not a readable GGUF file.*Delete it"):
        config_from_gguf(junk)
    with pytest.raises(WeightsError, match="no such GGUF file"):
        config_from_gguf(tmp_path / "absent.gguf")


def test_gguf_wrong_architecture(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    _write_gguf(path, SMALL, dict(random_tensors(SMALL, torch.float32)), "F32", arch="gpt2")
    with pytest.raises(WeightsError, match="general.architecture is 'gpt2'"):
        config_from_gguf(path)


def test_gguf_shape_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "small.gguf"
    _write_gguf(path, SMALL, dict(random_tensors(SMALL, torch.float32)), "F32")
    wrong = dataclasses.replace(SMALL, intermediate_size=128)
    with pytest.raises(WeightsError, match=r"'layers.0.mlp.gate_proj.weight' has shape \(96, 64\), expected \(128, 64\)"):
        next(iter_gguf_tensors(path, wrong))
    with pytest.raises(WeightsError, match="unexpected 9 tensor"):
        next(iter_gguf_tensors(path, dataclasses.replace(SMALL, num_layers=1)))


def test_hf_config_not_llama(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(WeightsError, match="model_type 'gpt2'.*not a Llama model"):
        config_from_hf_dir(tmp_path)
    with pytest.raises(WeightsError, match="no config.json"):
        config_from_hf_dir(tmp_path / "nowhere")


def test_hf_config_unsupported_rope_scaling(tmp_path: Path) -> None:
    path, _ = _save_hf(tmp_path, tied=False)
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="RoPE scaling type 'yarn' is not supported"):
        config_from_hf_dir(path)


def _rewrite_safetensors(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_hf_dir_missing_tensor(tmp_path: Path) -> None:
    path, _ = _save_hf(tmp_path, tied=False)
    cfg = config_from_hf_dir(path)
    _rewrite_safetensors(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(WeightsError, match=r"missing 1 tensor\(s\): layers.1.mlp.up_proj.weight"):
        next(iter_hf_dir_tensors(path, cfg))


def test_hf_dir_wrong_shape(tmp_path: Path) -> None:
    path, _ = _save_hf(tmp_path, tied=False)
    cfg = config_from_hf_dir(path)
    _rewrite_safetensors(path, lambda t: t.update({"model.layers.0.self_attn.v_proj.weight": torch.zeros(64, 64)}))
    with pytest.raises(WeightsError, match=r"'layers.0.self_attn.v_proj.weight' has shape \(64, 64\), expected \(32, 64\)"):
        next(iter_hf_dir_tensors(path, cfg))


def test_hf_dir_corrupt_safetensors(tmp_path: Path) -> None:
    path, _ = _save_hf(tmp_path, tied=False)
    cfg = config_from_hf_dir(path)
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        next(iter_hf_dir_tensors(path, cfg))
    shutil.rmtree(path)
    path.mkdir()
    with pytest.raises(WeightsError, match="no \\*.safetensors files"):
        next(iter_hf_dir_tensors(path, cfg))


@pytest.mark.gpu
def test_random_tensors_on_cuda() -> None:
    a = dict(random_tensors(TINY, torch.bfloat16, device="cuda", seed=5))
    b = dict(random_tensors(TINY, torch.bfloat16, device="cuda", seed=5))
    assert all(t.is_cuda and t.dtype == torch.bfloat16 for t in a.values())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert {k: tuple(v.shape) for k, v in a.items()} == expected_shapes(TINY)


def test_the_random_weights_switch_loads_a_real_models_shape_without_its_file(monkeypatch, capsys):
    """$MINIDISAGG_RANDOM_WEIGHTS=1: smollm2-135m's shape with seeded random weights, the GGUF never opened."""
    from minidisagg.config import PRESETS
    from minidisagg.models import registry

    def no_fetch(*args, **kwargs):
        raise AssertionError("the weights file was fetched")

    monkeypatch.setattr(registry, "fetch", no_fetch)
    monkeypatch.setenv(registry.RANDOM_WEIGHTS_ENV, "1")
    loaded = registry.load_model("smollm2-135m", device="cpu", dtype="float32")
    assert loaded.random_weights and loaded.config == PRESETS["smollm2-135m"]
    assert "random weights of its shape" in capsys.readouterr().out
    monkeypatch.setenv(registry.RANDOM_WEIGHTS_ENV, "0")
    with pytest.raises(AssertionError, match="fetched"):
        registry.load_model("smollm2-135m", device="cpu", dtype="float32")


# ------------------------------------------------------------------ damaged tensor data, bad configs


def _overwrite_tensor(path: Path, gguf_name: str, make) -> None:
    """Replace one tensor's data bytes in a GGUF file by ``make(n_bytes)``."""
    from minidisagg.models.gguf_file import open_gguf

    gguf_file = open_gguf(path)
    info = gguf_file.tensors[gguf_name]
    gguf_file.close()
    with open(path, "r+b") as f:
        f.seek(info.offset)
        f.write(make(info.n_bytes))


@pytest.mark.parametrize("damage", ["random", "zeros", "all"])
def test_gguf_with_damaged_tensor_data_is_refused_naming_the_tensor(tmp_path: Path, damage: str) -> None:
    from minidisagg.models.gguf_file import open_gguf
    from minidisagg.models.registry import load_model

    rng = np.random.default_rng()
    path = tmp_path / "small.gguf"
    _write_gguf(path, SMALL, dict(random_tensors(SMALL, torch.float32, seed=int(rng.integers(1 << 30)))), "F32")
    gguf_file = open_gguf(path)
    names = [n for n, info in gguf_file.tensors.items() if len(info.shape) == 2]  # matrices, >= 1024 values each
    data_offset, size = gguf_file.data_offset, path.stat().st_size
    gguf_file.close()
    victim = str(rng.choice(names))
    if damage == "random":  # F32 data of random bytes: NaN and inf among them, and absurd magnitudes
        _overwrite_tensor(path, victim, lambda n: rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        fragment = "non-finite"
    elif damage == "zeros":
        _overwrite_tensor(path, victim, lambda n: bytes(n))
        fragment = "every value"
    else:
        with open(path, "r+b") as f:
            f.seek(data_offset)
            f.write(rng.integers(0, 256, size - data_offset, dtype=np.uint8).tobytes())
        fragment = "non-finite"
    with pytest.raises(WeightsError, match=fragment) as info:
        load_model(str(path), device="cpu", dtype="float32")
    assert str(path) in str(info.value)
    if damage != "all":
        hf_name = next(n for n in expected_shapes(SMALL) if _gguf_name(n) == victim)
        assert repr(hf_name) in str(info.value), info.value


def _gguf_name(hf_name: str) -> str:
    to_gguf = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    base = hf_name.removesuffix(".weight")
    if base.startswith("layers."):
        _, i, rest = base.split(".", 2)
        return f"blk.{i}.{to_gguf[rest]}.weight"
    return f"{to_gguf[base]}.weight"


def test_an_intact_small_gguf_loads_and_a_zero_norm_is_refused(tmp_path: Path) -> None:
    from minidisagg.models.registry import load_model
    from minidisagg.models.sanity import check_tensor

    path = tmp_path / "small.gguf"
    _write_gguf(path, SMALL, dict(random_tensors(SMALL, torch.float32, seed=5)), "F32")
    assert load_model(str(path), device="cpu", dtype="float32").model is not None
    with pytest.raises(WeightsError, match="'layers.1.input_layernorm.weight' is all zeros"):
        check_tensor("layers.1.input_layernorm.weight", torch.zeros(64), "here")
    check_tensor("norm.weight", torch.ones(64), "here")  # a freshly initialised norm is fine


@pytest.mark.parametrize("field, value, fragment", [
    ("max_position", 2**40, "max_position must be at most"),
    ("max_position", 0, "max_position must be an integer >= 1"),
    ("num_kv_heads", 0, "num_kv_heads must be an integer >= 1"),
    ("num_layers", True, "num_layers must be an integer >= 1"),
    ("hidden_size", 64.0, "hidden_size must be an integer >= 1"),
    ("head_dim", 15, "head_dim must be even"),
    ("rope_theta", float("inf"), "rope_theta must be a finite number > 0"),
    ("rms_norm_eps", 0.0, "rms_norm_eps must be a finite number > 0"),
    ("eos_token_ids", (2, -1), "eos_token_ids"),
])
def test_model_config_refuses_bad_values(field: str, value, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        dataclasses.replace(SMALL, **{field: value})


def test_hf_config_with_an_absurd_context_is_refused_clearly(tmp_path: Path) -> None:
    rng = np.random.default_rng()
    path, _ = _save_hf(tmp_path, tied=False)
    cfg = json.loads((path / "config.json").read_text())
    cfg["max_position_embeddings"] = 2**int(rng.integers(21, 48))
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="max_position must be at most") as info:
        config_from_hf_dir(path)
    assert "config.json" in str(info.value)
