"""The engine's output text, decoded incrementally: equal to decoding all ids at once, at every step."""

from __future__ import annotations

import random

import pytest

from conftest import make_engine
from minidisagg.engine.text_decoder import TextDecoder
from minidisagg.engine.sampling import SamplingParams

MIXED_SCRIPTS = "日本語 こんにちは 🐱🐶 é ü € 𝄞 Привет мир"


@pytest.fixture(scope="module")
def seed() -> int:
    return random.SystemRandom().randrange(1 << 30)


@pytest.fixture(scope="module")
def tokenizer(tiny_loaded):
    return tiny_loaded.tokenizer


def assert_every_prefix_matches(tokenizer, ids: list[int], context: str) -> None:
    decoder = TextDecoder(tokenizer)
    for k in range(len(ids) + 1):
        want = tokenizer.decode(ids[:k], skip_special_tokens=True)
        assert decoder.text(ids[:k]) == want, f"{context}: ids {ids[:k]}"


def test_byte_level_tokenizer_is_decoded_incrementally(tokenizer):
    assert TextDecoder(tokenizer).incremental


def test_characters_split_across_tokens(tokenizer):
    ids = tokenizer.encode(MIXED_SCRIPTS)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some characters do span several tokens
    assert_every_prefix_matches(tokenizer, ids, "mixed scripts")


def test_special_tokens_and_a_real_replacement_character(tokenizer):
    special = tokenizer.encode("<|im_start|>")
    assert len(special) == 1
    replacement = tokenizer.encode("a\ufffdb")
    ids = special + tokenizer.encode("é") + special + replacement + tokenizer.encode("日") + special
    assert_every_prefix_matches(tokenizer, ids, "special tokens and U+FFFD")


def test_random_ids(tokenizer, seed):
    rng = random.Random(seed)
    pieces = tokenizer.encode(MIXED_SCRIPTS)
    pools = [range(300), range(49152), pieces + list(range(20))]  # bytes and specials; anything; split characters
    for trial in range(60):
        pool = pools[trial % len(pools)]
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 40))]
        assert_every_prefix_matches(tokenizer, ids, f"seed {seed}")


class WholeTextTokenizer:
    """Not byte-level: its text of a list is not the joined text of its parts."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def decode(self, ids, skip_special_tokens=False) -> str:
        self.calls.append(list(ids))
        return " ".join(str(i) for i in ids)


def test_other_tokenizers_are_decoded_whole():
    tok = WholeTextTokenizer()
    decoder = TextDecoder(tok)
    assert not decoder.incremental
    assert decoder.text([1, 2]) == "1 2"
    assert decoder.text([1, 2]) == "1 2"  # unchanged ids: no second decode
    assert decoder.text([1, 2, 3]) == "1 2 3"
    assert tok.calls == [[1, 2], [1, 2, 3]]


def test_streamed_text_and_stop_strings_match_a_full_decode(tiny_loaded, tokenizer):
    engine = make_engine(tiny_loaded, max_num_seqs=4)
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = [f"Story {i}: {MIXED_SCRIPTS}" for i in range(3)]
    first = [engine.add_request(p, greedy) for p in prompts][0]  # the same batch as below: the same tokens
    full = ""
    while engine.has_unfinished():
        for out in engine.step():
            full = out.text if out.request_id == first else full
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop, "never in this text"])
    ids = [engine.add_request(p, params) for p in prompts]
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            text = tokenizer.decode(out.token_ids, skip_special_tokens=True)
            cut = text.find(stop)
            assert out.text == (text if cut < 0 else text[:cut])
            if out.finished:
                finished[out.request_id] = out
    assert finished[ids[0]].finish_reason == "stop"
    assert stop not in finished[ids[0]].text
