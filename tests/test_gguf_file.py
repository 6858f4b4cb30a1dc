"""The mmap GGUF parser against gguf.GGUFReader, and the errors corrupt files raise."""

from __future__ import annotations

import random
import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

from minidisagg.config import SMOLLM2_135M
from minidisagg.models.gguf_file import (
    GGUFError,
    GGUFVersionError,
    NotGGUFError,
    open_gguf,
    read_metadata,
    tensor_bytes,
)
from minidisagg.models.tokenizer import TokenizerError, read_gguf_metadata
from minidisagg.models.weights import (
    WeightsError,
    _gguf_to_hf_name,
    _unpermute_rows,
    config_from_gguf,
    iter_gguf_tensors,
)


def _user_fields(reader: gguf.GGUFReader) -> dict[str, gguf.ReaderField]:
    return {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}  # header pseudo-keys


def _assert_same_as_reader(path: Path, seed: int, n_sampled: int) -> None:
    """Header, metadata, tensor infos and the raw bytes of sampled tensors equal GGUFReader's."""
    reader = gguf.GGUFReader(path)
    with open_gguf(path) as ours:
        assert (ours.header.version, ours.header.tensor_count, ours.header.kv_count) == (
            reader.fields["GGUF.version"].contents(), len(reader.tensors), len(_user_fields(reader)))
        assert (ours.alignment, ours.data_offset) == (reader.alignment, reader.data_offset)
        assert ours.metadata.keys() == _user_fields(reader).keys()
        for key, field in _user_fields(reader).items():
            assert ours.metadata[key] == field.contents(), key
        assert list(ours.tensors) == [t.name for t in reader.tensors]
        for ref in reader.tensors:
            info = ours.tensors[ref.name]
            assert info.shape == tuple(int(d) for d in ref.shape), ref.name
            assert info.ggml_type is ref.tensor_type, ref.name
            assert (info.offset, info.n_bytes, info.n_elements) == (ref.data_offset, ref.n_bytes, ref.n_elements)
        rng = random.Random(seed)
        for ref in rng.sample(reader.tensors, min(n_sampled, len(reader.tensors))):
            raw = tensor_bytes(ours, ours.tensors[ref.name])
            assert raw.dtype == np.uint8 and not raw.flags.writeable
            assert raw.tobytes() == ref.data.tobytes(), f"seed={seed} tensor={ref.name}"
            del raw


# ------------------------------------------------------------------ the real SmolLM2 file


@pytest.mark.slow
def test_smollm2_matches_gguf_reader(smollm2_gguf: Path, seed: int) -> None:
    _assert_same_as_reader(smollm2_gguf, seed, n_sampled=6)


def _reference_tensor(reader_tensor: gguf.ReaderTensor, name: str) -> torch.Tensor:
    """What iter_gguf_tensors yielded when it read tensors through gguf.GGUFReader."""
    shape = tuple(int(d) for d in reversed(reader_tensor.shape))
    arr = dequantize(reader_tensor.data, reader_tensor.tensor_type)
    if np.may_share_memory(arr, reader_tensor.data):
        arr = arr.copy()
    arr = np.asarray(arr, dtype=np.float32).reshape(shape)
    if name.endswith("self_attn.q_proj.weight"):
        arr = _unpermute_rows(arr, SMOLLM2_135M.num_heads)
    elif name.endswith("self_attn.k_proj.weight"):
        arr = _unpermute_rows(arr, SMOLLM2_135M.num_kv_heads)
    return torch.from_numpy(arr)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.slow
def test_iter_gguf_tensors_bit_identical_to_reader(smollm2_gguf: Path, seed: int) -> None:
    reader = gguf.GGUFReader(smollm2_gguf)
    by_name = {_gguf_to_hf_name(t.name): t for t in reader.tensors}
    rng = random.Random(seed)
    # the embedding is the file's only Q8_0 tensor; q/k go through the row unpermutation
    sample = {"embed_tokens.weight", *rng.sample(sorted(by_name), 10),
              f"layers.{rng.randrange(30)}.self_attn.q_proj.weight",
              f"layers.{rng.randrange(30)}.self_attn.k_proj.weight"}
    checked = 0
    for name, tensor in iter_gguf_tensors(smollm2_gguf, SMOLLM2_135M):
        if name not in sample:
            continue
        ref = _reference_tensor(by_name[name], name)
        assert tensor.dtype == torch.float32 and tensor.shape == ref.shape, f"seed={seed} {name}"
        assert torch.equal(_bits(tensor), _bits(ref)), f"seed={seed} {name} differs from gguf.GGUFReader's"
        checked += 1
    assert checked == len(sample), f"seed={seed}"


# ------------------------------------------------------------------ small files written here


def _write(path: Path, *, alignment: int | None = None, endianess=gguf.GGUFEndian.LITTLE) -> Path:
    """A GGUF with every metadata value type and tensors of several storage types and ranks."""
    writer = gguf.GGUFWriter(str(path), "llama", endianess=endianess)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_block_count(1)
    writer.add_uint8("test.u8", 7)
    writer.add_int64("test.i64", -(2**40))
    writer.add_float64("test.f64", 0.1)
    writer.add_bool("test.bool", False)
    writer.add_string("test.string", "héllo 😀")
    writer.add_array("test.floats", [0.5, -1.25])
    writer.add_token_list(["a", "b b", "日本", ""])
    rng = np.random.default_rng(0)
    dtypes = {"F32": np.float32, "F16": np.float16}
    for index, (qtype, shape) in enumerate([("F32", (5,)), ("F16", (3, 64)), ("BF16", (2, 64)),
                                            ("Q8_0", (4, 64)), ("Q4_0", (2, 3, 32)), ("Q4_1", (2, 96))]):
        values = rng.standard_normal(shape).astype(np.float32)
        if qtype in dtypes:
            writer.add_tensor(f"t{index}.{qtype}", values.astype(dtypes[qtype]))
        else:
            kind = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(f"t{index}.{qtype}", quantize(values, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("alignment", [None, 64])
def test_small_file_matches_gguf_reader(tmp_path: Path, alignment: int | None, seed: int) -> None:
    path = _write(tmp_path / "small.gguf", alignment=alignment)
    _assert_same_as_reader(path, seed, n_sampled=6)
    reader = gguf.GGUFReader(path)
    with open_gguf(path) as ours:
        for ref in reader.tensors:  # dequantized from our bytes == dequantized from the reader's arrays
            info = ours.tensors[ref.name]
            raw = tensor_bytes(ours, info)
            if len(info.shape) > 1:
                raw = raw.reshape(-1, raw.size // int(np.prod(info.shape[1:])))
            got, want = dequantize(raw, info.ggml_type), dequantize(ref.data, ref.tensor_type)
            assert np.array_equal(got.reshape(-1).view(np.int32), want.reshape(-1).view(np.int32)), ref.name
            del raw, got


def test_big_endian_metadata_and_refusal(tmp_path: Path) -> None:
    path = _write(tmp_path / "big.gguf", endianess=gguf.GGUFEndian.BIG)
    reader = gguf.GGUFReader(path)
    with open_gguf(path) as ours:
        assert ours.header.byte_order == ">"
        assert ours.metadata == {k: f.contents() for k, f in _user_fields(reader).items()}
        assert [(t.name, t.offset) for t in ours.tensors.values()] == [(t.name, t.data_offset) for t in reader.tensors]
    with pytest.raises(WeightsError, match="big-endian"):
        next(iter_gguf_tensors(path, SMOLLM2_135M))


def test_read_metadata_needs_no_tensor_table(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.gguf")
    with open_gguf(path) as full:
        metadata, first_info = full.metadata, min(t.offset for t in full.tensors.values())
    assert read_metadata(path) == metadata == read_gguf_metadata(path)
    cut = tmp_path / "cut.gguf"
    info_start = gguf.GGUFReader(path).tensors[0].field.offset
    cut.write_bytes(path.read_bytes()[:info_start])  # the key/values survive, the tensor table does not
    assert read_gguf_metadata(cut) == metadata
    with pytest.raises(GGUFError, match=r"ends inside the tensor-info table \(6 tensors\)"):
        open_gguf(cut)
    assert first_info > info_start


# ------------------------------------------------------------------ corrupt files


def _info_offsets(path: Path, index: int) -> dict[str, int]:
    """Byte positions of the fields of tensor info ``index`` (little-endian file)."""
    field = gguf.GGUFReader(path).tensors[index].field
    name_len, name, n_dims, dims = (int(part.nbytes) for part in field.parts[:4])
    start = field.offset
    return {"start": start, "n_dims": start + name_len + name, "type": start + name_len + name + n_dims + dims,
            "offset": start + name_len + name + n_dims + dims + 4}


def _patched(src: Path, dst: Path, at: int, fmt: str, value: int) -> Path:
    data = bytearray(src.read_bytes())
    struct.pack_into(fmt, data, at, value)
    dst.write_bytes(bytes(data))
    return dst


def _assert_weights_error(path: Path, *patterns: str) -> str:
    """Both GGUF entry points raise WeightsError naming the file, the refetch hint and ``patterns``."""
    for call in (lambda: config_from_gguf(path), lambda: next(iter_gguf_tensors(path, SMOLLM2_135M))):
        start = time.perf_counter()
        with pytest.raises(WeightsError) as err:
            call()
        assert time.perf_counter() - start < 1.0, "a corrupt count made the parser loop or allocate"
        message = str(err.value)
        assert str(path) in message and "not a readable GGUF file" in message and "Delete it" in message, message
        for pattern in patterns:
            assert pattern in message, message
    return message


def test_truncated_inside_tensor_info_table(tmp_path: Path) -> None:
    path = _write(tmp_path / "ok.gguf")
    where = _info_offsets(path, 4)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: where["type"] + 2])
    _assert_weights_error(cut, "the file ends inside the ggml type of tensor 't4.Q4_0'", "truncated or corrupt")


def test_truncated_inside_data(tmp_path: Path) -> None:
    path = _write(tmp_path / "ok.gguf")
    with open_gguf(path) as f:
        last = max(f.tensors.values(), key=lambda t: t.offset)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: last.offset + last.n_bytes // 2])
    _assert_weights_error(cut, f"tensor '{last.name}'", "past the end of the file")


def test_huge_string_length_and_counts(tmp_path: Path) -> None:
    path = _write(tmp_path / "ok.gguf")
    first_key_len = 24  # right after magic, version, tensor count, kv count
    _assert_weights_error(_patched(path, tmp_path / "key.gguf", first_key_len, "<Q", 2**62),
                          "ends inside metadata key 0", str(2**62))
    _assert_weights_error(_patched(path, tmp_path / "kv.gguf", 16, "<Q", 2**63), "key/value pairs")
    _assert_weights_error(_patched(path, tmp_path / "tensors.gguf", 8, "<Q", 2**40), "tensor-info table")
    tokens = gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"]
    count_at = tokens.offset + sum(int(p.nbytes) for p in tokens.parts[:4])  # key len, key, type, item type
    _assert_weights_error(_patched(path, tmp_path / "array.gguf", count_at, "<Q", 2**61),
                          "tokenizer.ggml.tokens", f"({2**61} items)")
    _assert_weights_error(_patched(path, tmp_path / "dims.gguf", _info_offsets(path, 1)["n_dims"], "<I", 2**32 - 1),
                          "dimensions of tensor 't1.F16'")
    with pytest.raises(TokenizerError, match="corrupt or truncated GGUF header.*ends inside metadata key 0"):
        read_gguf_metadata(tmp_path / "key.gguf")


def test_tensor_offset_past_end(tmp_path: Path) -> None:
    path = _write(tmp_path / "ok.gguf")
    bad = _patched(path, tmp_path / "far.gguf", _info_offsets(path, 3)["offset"], "<Q", path.stat().st_size)
    _assert_weights_error(bad, "tensor 't3.Q8_0'", "past the end of the file")


def test_unknown_ggml_type(tmp_path: Path) -> None:
    path = _write(tmp_path / "ok.gguf")
    bad = _patched(path, tmp_path / "type.gguf", _info_offsets(path, 0)["type"], "<I", 999)
    _assert_weights_error(bad, "tensor 't0.F32' has ggml type id 999", "pip install -U gguf")


def test_bad_magic_and_version(tmp_path: Path) -> None:
    path = _write(tmp_path / "ok.gguf")
    data = path.read_bytes()
    ggml = tmp_path / "old.gguf"
    ggml.write_bytes(b"ggjt" + data[4:])
    _assert_weights_error(ggml, "it starts with b'ggjt")
    with pytest.raises(NotGGUFError):
        open_gguf(ggml)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _assert_weights_error(empty, "it starts with b''")
    v9 = _patched(path, tmp_path / "v9.gguf", 4, "<I", 9)
    _assert_weights_error(v9, "GGUF version 9 is not supported")
    with pytest.raises(GGUFVersionError) as err:
        open_gguf(v9)
    assert err.value.version == 9
    with pytest.raises(TokenizerError, match="is GGUF version 9; only versions 2 and 3"):
        read_gguf_metadata(v9)


def test_random_damage_raises_only_gguf_error(tmp_path: Path, seed: int) -> None:
    path = _write(tmp_path / "ok.gguf")
    data = path.read_bytes()
    with open_gguf(path) as f:
        header_end = f.data_offset
    rng = random.Random(seed)
    damaged = tmp_path / "damaged.gguf"
    for trial in range(300):
        buf = bytearray(data[: rng.randrange(len(data))] if trial % 3 == 0 else data)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(min(len(buf), header_end)) if buf else 0
            if at < len(buf):
                buf[at] = rng.randrange(256)
        damaged.write_bytes(bytes(buf))
        start = time.perf_counter()
        try:
            open_gguf(damaged).close()
        except GGUFError:
            pass
        except Exception as exc:  # anything else is a parser bug
            raise AssertionError(f"seed={seed} trial={trial}: {type(exc).__name__}: {exc}") from exc
        assert time.perf_counter() - start < 1.0, f"seed={seed} trial={trial}"


@pytest.mark.parametrize("heads, hidden", [(0, 64), (4, 0), (-1, 64)])
def test_nonsense_shape_metadata_is_a_weights_error(tmp_path: Path, heads: int, hidden: int) -> None:
    path = tmp_path / "shape.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(hidden)
    writer.add_int32("llama.attention.head_count", heads)
    writer.add_feed_forward_length(128)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(WeightsError, match="inconsistent llama.* metadata: .*must be positive"):
        config_from_gguf(path)
