"""The engine against the outside reference: HF transformers on the same weights."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import make_engine, run_all
from minidisagg.engine.batch import BatchItem
from minidisagg.engine.runner import ModelRunner
from minidisagg.engine.sampling import SamplingParams
from minidisagg.kv.cache import PagedKVCache

CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a KV cache is in one paragraph.",
    "List three prime numbers and say why they are prime.",
]


def hf_greedy(hf, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """HF's greedy continuation with its own KV cache, never stopping early at EOS."""
    tokens, past, x = [], None, torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out = hf(x, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
            x = torch.tensor([[tokens[-1]]])
    return tokens


def test_logits_match_hf_for_every_prompt_position(smollm2_loaded, hf_smollm2):
    tok = smollm2_loaded.tokenizer
    seed = random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    ids = tok.apply_chat_template([{"role": "user", "content": rng.choice(CHATS)}]) + [
        rng.randrange(100, 49152) for _ in range(rng.randint(1, 20))]
    with torch.no_grad():
        ref = hf_smollm2(torch.tensor([ids])).logits[0]
    cache = PagedKVCache(smollm2_loaded.config, num_blocks=16, block_size=16, dtype=torch.float32, device="cpu")
    runner = ModelRunner(smollm2_loaded.model, cache)
    table = list(range(16))
    # logits of every position: run the prompt one prefix at a time through the paged path
    prefill = runner.execute([BatchItem(ids[:-1], 0, table, True)])
    last = runner.execute([BatchItem(ids[-1:], len(ids) - 1, table, True)])  # a decode step on the cached prefix
    torch.testing.assert_close(prefill[0], ref[-2], atol=2e-4, rtol=1e-4, msg=lambda m: f"seed {seed}: {m}")
    torch.testing.assert_close(last[0], ref[-1], atol=2e-4, rtol=1e-4, msg=lambda m: f"seed {seed}: {m}")


def test_greedy_tokens_match_hf_on_chat_prompts(smollm2_loaded, hf_smollm2):
    tok = smollm2_loaded.tokenizer
    engine = make_engine(smollm2_loaded)
    prompts = [tok.apply_chat_template([{"role": "user", "content": c}]) for c in CHATS]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ids = [engine.add_request({"prompt_token_ids": p}, params) for p in prompts]
    done = run_all(engine)
    for rid, prompt in zip(ids, prompts):
        assert done[rid].token_ids == hf_greedy(hf_smollm2, prompt, 40), tok.decode(prompt)


def test_capital_of_france(smollm2_loaded):
    from minidisagg.llm import LLM

    llm = LLM.__new__(LLM)  # share the loaded weights instead of loading again
    llm.loaded = smollm2_loaded
    llm.engine = make_engine(smollm2_loaded)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=32))[0]
    assert out.text == "The capital of France is Paris."
    assert out.finish_reason == "stop" and out.token_ids[-1] == 2


def test_hf_directory_with_random_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    from minidisagg.models.registry import load_model

    seed = random.SystemRandom().randrange(1 << 30)
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, rope_theta=5000.0,
        bos_token_id=1, eos_token_id=2,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_model(str(tmp_path), device="cpu", dtype="float32")
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 1000) for _ in range(rng.randint(4, 30))] for _ in range(3)]
    engine = make_engine(loaded)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    ids = [engine.add_request({"prompt_token_ids": p}, params) for p in prompts]
    done = run_all(engine)
    for rid, p in zip(ids, prompts):
        assert done[rid].token_ids == hf_greedy(hf, p, 20), f"seed {seed}"


def test_bfloat16_stays_close_to_float32(smollm2_gguf):
    from minidisagg.models.registry import load_model

    loaded = load_model("smollm2-135m", device="cpu", dtype="bfloat16")
    engine = make_engine(loaded)
    tok = loaded.tokenizer
    rid = engine.add_request({"prompt_token_ids": tok.apply_chat_template([{"role": "user", "content": CHATS[0]}])},
                             SamplingParams(temperature=0, max_tokens=12))
    out = run_all(engine)[rid]
    assert tok.decode(out.token_ids, skip_special_tokens=True).startswith("The capital of France is Paris")
