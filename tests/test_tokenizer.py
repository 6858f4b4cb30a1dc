"""Tokenizer vs the outside reference: HF transformers loading the same SmolLM2 GGUF."""

from __future__ import annotations

import random
import time
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import pytest
from tokenizers import Tokenizer as HFBackend
from tokenizers import pre_tokenizers

from minidisagg.models.tokenizer import (
    IncrementalDetokenizer,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
    read_gguf_metadata,
)

TRICKY = [
    "",
    "Hello, world!",
    "café naïve résumé Ångström",
    "e\u0301 a\u0308 n\u0303o",  # combining marks
    "中文测试，日本語のテキスト、한국어",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "def f(x):\n    if x:\n\t\treturn [i ** 2 for i in range(10)]\n    return None\n",
    "spaces    between   words  ",
    "\t\ttabs\tand\n\nnewlines\n\n\n",
    "   leading and trailing   ",
    "12345678",
    "pi is 3.14159, year 2024, 1,000,000",
    "don't I'M we'll they've she'd it's",
    "<|im_start|>user\nhi<|im_end|>",
    "text<|im_end|>more<|endoftext|>",
    "Ελληνικά, русский, العربية, עברית",
]

_ALPHABETS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789",
    " \t\n",
    ".,;:!?'\"()[]{}<>|-_=+*/\\#@$%^&~`",
    "éèêëñüöäßçÅøœ",
    "\u0301\u0308\u0303",
    "中文日本語한국어漢字かなカナ",
    "😀👍🏽👨‍👩‍👧🇫🇷🚀",
    "αβγδЖЖщяشعبש",
]
_CHUNKS = ["<|im_start|>", "<|im_end|>", "'s", "'t", "'M", "    ", "\n\n", "hello", " world"]
_HF_GGUF_DIVERGENCE = "whitespace run of 2+ right before a digit"


def _random_string(rng: random.Random) -> str:
    pieces = []
    for _ in range(rng.randint(1, 25)):
        if rng.random() < 0.1:
            pieces.append(rng.choice(_CHUNKS))
        else:
            pieces.append("".join(rng.choices(rng.choice(_ALPHABETS), k=rng.randint(1, 4))))
    return "".join(pieces)


def _hf_gguf_diverges(text: str) -> bool:
    """True where HF's GGUF loader splits differently from SmolLM2's tokenizer.json (see below)."""
    return any(
        i >= 2 and text[i - 2 : i].isspace() and unicodedata.category(c).startswith("N")
        for i, c in enumerate(text)
    )


def _hf_ids(out: Any) -> list[int]:
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


@pytest.fixture(scope="session")
def tok(smollm2_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_gguf)


@pytest.fixture(scope="session")
def hf(smollm2_gguf: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def hf_spec(hf: Any) -> HFBackend:
    """HF's tokenizer with the pre-tokenizer that SmolLM2's own tokenizer.json (and llama.cpp) use.

    transformers' GGUF loader has no entry for tokenizer.ggml.pre 'smollm' and falls back to plain
    GPT-2 splitting, which lacks the Digits(individual_digits) step that SmolLM2 was trained with.
    """
    backend = HFBackend.from_str(hf.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return backend


@pytest.mark.parametrize("text", TRICKY)
def test_encode_decode_match_hf(tok: Tokenizer, hf: Any, text: str) -> None:
    assert not _hf_gguf_diverges(text)
    ids = tok.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_random_strings_match_hf(tok: Tokenizer, hf: Any, hf_spec: HFBackend) -> None:
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    for _ in range(50):
        text = _random_string(rng)
        where = f"seed={seed} text={text!r}"
        ids = tok.encode(text)
        assert ids == hf_spec.encode(text, add_special_tokens=False).ids, where
        if not _hf_gguf_diverges(text):
            assert ids == hf.encode(text, add_special_tokens=False), where
        assert tok.decode(ids) == text, where
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), where


@pytest.mark.parametrize(
    ("text", "pieces"),
    [("a  1", ["a", "ĠĠ", "1"]), ("x\n\n 2", ["x", "ĊĊĠ", "2"]),
     ("def f():\n    1", ["def", "Ġf", "():", "ĊĠĠĠĠ", "1"])],
)
def test_smollm_splits_digits_like_tokenizer_json(
    tok: Tokenizer, hf_spec: HFBackend, text: str, pieces: list[str]
) -> None:
    # llama.cpp's 'smollm' rule: split off every \p{N} first, then GPT-2's regex on the rest, so a
    # whitespace run before a digit stays whole (HF's GGUF loader cuts it: 'a  1' -> a, Ġ, Ġ, 1).
    expected = [tok.token_to_id(p) for p in pieces]
    assert None not in expected
    assert tok.encode(text) == expected == hf_spec.encode(text).ids


def test_digits_are_single_tokens(tok: Tokenizer) -> None:
    assert [tok.id_to_token(i) for i in tok.encode("12345678")] == list("12345678")


CONVERSATIONS = {
    "user": [{"role": "user", "content": "What is the capital of France?"}],
    "system_user": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime > 10, café ☕."},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Write `print(1)` in Python:\n\n    indented"},
    ],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_template_matches_hf(tok: Tokenizer, hf: Any, name: str) -> None:
    messages = CONVERSATIONS[name]
    ours = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert ours == _hf_ids(hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    no_prompt = tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert no_prompt == hf.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)


def test_chat_template_uses_im_start_as_one_token(tok: Tokenizer) -> None:
    ids = tok.apply_chat_template(CONVERSATIONS["user"])
    im_start = tok.token_to_id("<|im_start|>")
    assert im_start is not None and ids[0] == im_start and ids.count(im_start) == 3
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_special_ids(tok: Tokenizer, hf: Any) -> None:
    assert tok.vocab_size == len(hf) == 49152
    assert (tok.bos_token_id, tok.eos_token_id) == (hf.bos_token_id, hf.eos_token_id) == (1, 2)
    assert tok.eos_token_ids == (2,)
    assert tok.stop_token_ids == (tok.token_to_id("<|im_end|>"),)
    assert tok.id_to_token(1) == "<|im_start|>" and tok.id_to_token(10**6) is None
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")  # add_bos_token is False


def test_incremental_detokenizer_never_splits_characters(tok: Tokenizer) -> None:
    text = "Grüße 👨‍👩‍👧 and 日本語, café 🇫🇷 한국어 e\u0301! 😀😀"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    parts = [detok.push(i) for i in ids]
    assert "".join(parts) == tok.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in p for p in parts)
    assert "" in parts  # some token did end mid-character, so this test exercised the hold-back


def test_incremental_detokenizer_after_prompt(tok: Tokenizer) -> None:
    prompt = tok.apply_chat_template(CONVERSATIONS["user"])
    answer = tok.encode("Paris 🗼 — the capital.") + [tok.token_to_id("<|im_end|>")]
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    assert "".join(detok.push(i) for i in answer) + detok.flush() == "Paris 🗼 — the capital."
    keep = IncrementalDetokenizer(tok, prompt_ids=prompt, skip_special_tokens=False)
    assert "".join(keep.push(i) for i in answer).endswith("capital.<|im_end|>")


def test_incremental_detokenizer_gives_up_on_invalid_bytes(tok: Tokenizer) -> None:
    lone_continuation_byte = tok.token_to_id("Ģ")  # byte 0x80 in the byte-level alphabet
    ids = [lone_continuation_byte, *tok.encode("abc def ghi jkl")]
    detok = IncrementalDetokenizer(tok)
    streamed = "".join(detok.push(i) for i in ids)
    assert streamed.startswith("\ufffdabc")  # held back at most 4 tokens, then shown as U+FFFD
    assert streamed + detok.flush() == tok.decode(ids)


def test_chat_template_errors_are_value_errors(tok: Tokenizer) -> None:
    strict = Tokenizer(tok.backend, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="roles must alternate"):
        strict.apply_chat_template(CONVERSATIONS["user"])
    broken = Tokenizer(tok.backend, "{% for m in messages %}")
    with pytest.raises(ValueError, match="TemplateSyntaxError"):
        broken.apply_chat_template(CONVERSATIONS["user"])


def test_from_hf_dir_matches_hf(hf: Any, tok: Tokenizer, tmp_path: Path) -> None:
    hf.save_pretrained(tmp_path)
    local = Tokenizer.from_hf_dir(tmp_path)
    assert load_tokenizer(tmp_path).vocab_size == local.vocab_size == tok.vocab_size
    for text in [*TRICKY, "a  1"]:
        ids = local.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False)  # the saved tokenizer.json is HF's
        assert local.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    for messages in CONVERSATIONS.values():
        assert local.apply_chat_template(messages) == tok.apply_chat_template(messages)
        as_text = local.apply_chat_template(messages, tokenize=False)
        assert as_text == tok.apply_chat_template(messages, tokenize=False)
    assert (local.bos_token_id, local.eos_token_id, local.stop_token_ids) == (1, 2, (2,))


def test_load_time_and_dispatch(smollm2_gguf: Path) -> None:
    start = time.perf_counter()
    loaded = load_tokenizer(smollm2_gguf)
    elapsed_s = time.perf_counter() - start
    assert elapsed_s < 2.0, f"loading the SmolLM2 tokenizer took {elapsed_s:.2f} s"
    assert loaded.vocab_size == 49152


# --- bad inputs and small synthetic GGUFs --------------------------------------------------------


def _write_gguf(path: Path, fields: dict[str, Any]) -> Path:
    writer = gguf.GGUFWriter(path, arch="llama")
    for key, value in fields.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


def test_bad_paths_raise_value_error(tmp_path: Path) -> None:
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("definitely not a model")
    with pytest.raises(ValueError, match="not a GGUF file"):
        Tokenizer.from_gguf(not_gguf)
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="not a file"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="neither a .gguf file nor a directory"):
        load_tokenizer(tmp_path / "weights.bin")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00\x00")
    with pytest.raises(TokenizerError, match="corrupt or truncated"):
        Tokenizer.from_gguf(truncated)


def test_gguf_without_tokenizer_or_with_unsupported_model(tmp_path: Path) -> None:
    bare = _write_gguf(tmp_path / "bare.gguf", {"general.name": "no tokenizer here"})
    with pytest.raises(ValueError, match="no tokenizer metadata"):
        Tokenizer.from_gguf(bare)
    spm = _write_gguf(tmp_path / "spm.gguf", {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<s>"]})
    with pytest.raises(ValueError, match="tokenizer.ggml.model='llama'"):
        Tokenizer.from_gguf(spm)


def _byte_level_gguf(path: Path, pre: str) -> Path:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    return _write_gguf(path, {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": [*alphabet, "34", "12", "<eos>"],
        "tokenizer.ggml.token_type": [1] * (len(alphabet) + 2) + [3],
        "tokenizer.ggml.merges": ["3 4", "1 2"],
        "tokenizer.ggml.eos_token_id": len(alphabet) + 2,
    })


@pytest.mark.parametrize(
    ("pre", "pieces"),
    [("gpt2", ["12", "34"]), ("llama-bpe", ["12", "3", "4"]), ("qwen2", list("1234")), ("smollm", list("1234"))],
)
def test_pre_tokenizer_names(tmp_path: Path, pre: str, pieces: list[str]) -> None:
    tiny = Tokenizer.from_gguf(_byte_level_gguf(tmp_path / f"{pre}.gguf", pre))
    assert [tiny.id_to_token(i) for i in tiny.encode("1234<eos>")] == [*pieces, "<eos>"]
    assert tiny.stop_token_ids == (tiny.vocab_size - 1,)
    with pytest.raises(TokenizerError, match="no chat template"):
        tiny.apply_chat_template(CONVERSATIONS["user"])


def test_unknown_pre_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tokenizer.ggml.pre is 'mystery'"):
        Tokenizer.from_gguf(_byte_level_gguf(tmp_path / "m.gguf", "mystery"))


def test_metadata_reader_matches_gguf_reader(tmp_path: Path) -> None:
    path = tmp_path / "types.gguf"
    writer = gguf.GGUFWriter(path, arch="llama")
    values = [
        ("uint8", 200), ("int8", -5), ("uint16", 60000), ("int16", -300), ("int32", -70000),
        ("float32", 0.5), ("bool", True), ("uint64", 2**40), ("int64", -(2**40)), ("float64", 1.25),
        ("string", "héllo 😀"), ("array", [1, -2, 3]), ("array", [0.25, 1.5]), ("array", ["a b", "", "日本"]),
    ]
    for index, (kind, value) in enumerate(values):
        getattr(writer, f"add_{kind}")(f"test.{kind}{index}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    ours = read_gguf_metadata(path)
    reference = gguf.GGUFReader(path)
    fields = {k: f for k, f in reference.fields.items() if not k.startswith("GGUF.")}  # header pseudo-keys
    assert set(ours) == set(fields)
    for key, field in fields.items():
        assert ours[key] == field.contents(), key
