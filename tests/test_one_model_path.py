"""One model, one path: a change to ``models/llama.py``'s layer changes what a default ``LLM`` generates.

Every step of a default engine (prefill and decode, on a CPU and under CUDA graphs on a GPU) runs
``LlamaLayer``'s own code, so patching it, or one of its steps, must show in the greedy tokens. The
patches here act only on prefill or only on decode steps, so each half is checked on its own:

- a layer that returns zeros makes the final hidden state zero, the logits all zero and the greedy
  token 0, exactly where the patch acts;
- an MLP whose output is scaled changes the tokens of the steps it acts on (checked to differ).

With the opt-in C++ decode step (``native_cpu_decode=True``) and a patched layer, the accelerator
refuses to run, says so in one log line, and the tokens still follow the patched model.
"""

from __future__ import annotations

import logging
import random

import pytest
import torch

from minidisagg import LLM, SamplingParams
from minidisagg.models import llama

NEW_TOKENS = 10
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def random_prompts(seed: int, n: int = 2) -> list[dict]:
    """``n`` random prompts of 3-20 ordinary token ids (at least 2, so a prefill has several rows)."""
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(100, 30000) for _ in range(rng.randint(3, 20))]} for _ in range(n)]


def greedy(llm: LLM, prompts: list[dict], batched: bool = True) -> list[list[int]]:
    """Greedy tokens of each prompt, run alone (decode steps of one sequence) and, if ``batched``, all at once."""
    alone = [llm.generate([p], GREEDY, use_tqdm=False)[0].token_ids for p in prompts]
    together = [out.token_ids for out in llm.generate(prompts, GREEDY, use_tqdm=False)] if batched else []
    return alone + together


def zero_layer_when(decode: bool):
    """A ``LlamaLayer.forward`` that runs the stock layer, then returns zeros on decode (or on prefill) steps."""
    stock_forward = llama.LlamaLayer.forward

    def forward(self, hidden, residual, positions, cos_sin, k_cache, v_cache, meta):
        hidden, residual = stock_forward(self, hidden, residual, positions, cos_sin, k_cache, v_cache, meta)
        if meta.is_decode == decode:
            return hidden * 0, residual * 0
        return hidden, residual

    return forward


def scaled_mlp_when(decode: bool, factor: float = -4.0):
    """A ``LlamaLayer.mlp`` whose output is scaled by ``factor`` on one-row calls (decode of one sequence) or on
    longer ones (prefill of a prompt of 2 or more tokens)."""
    stock_mlp = llama.LlamaLayer.mlp

    def mlp(self, x, batch_invariant=False):
        out = stock_mlp(self, x, batch_invariant)
        return out * factor if (x.shape[0] == 1) == decode else out

    return mlp


def make_llm(device: str, **kwargs) -> LLM:
    """The default engine on ``device`` for the random-weight ``tiny`` preset (a small KV pool: a GPU's would fill it)."""
    return LLM("tiny", device=device, num_kv_blocks=64, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("step", ["prefill", "decode"])
def test_patched_layer_forward_changes_the_tokens(monkeypatch, device, step, seed):
    prompts = random_prompts(seed)
    stock = greedy(make_llm(device), prompts)
    monkeypatch.setattr(llama.LlamaLayer, "forward", zero_layer_when(decode=step == "decode"))
    patched = greedy(make_llm(device), prompts)
    where = f"{device}, patched on {step}, seed {seed}"
    for want, got in zip(stock, patched):
        if step == "prefill":  # the first token is prefill's: zero logits give token 0
            assert got[0] == 0, f"{where}: prefill did not run the patched layer: {got}"
        else:  # the first token is untouched; every decode step gives token 0
            assert got[0] == want[0] and got[1:] == [0] * (NEW_TOKENS - 1), f"{where}: {got} (stock {want})"


def prefill_logits(llm: LLM, prompt: dict) -> torch.Tensor:
    """Float32 logits of a prompt's last position, from one prefill through the engine's runner."""
    from minidisagg.engine.batch import BatchItem

    ids = prompt["prompt_token_ids"]
    blocks = list(range(-(-len(ids) // llm.engine.runner.kv_cache.block_size)))
    return llm.engine.runner.execute([BatchItem(ids, 0, blocks, True)])[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("step", ["prefill", "decode"])
def test_patched_mlp_changes_the_tokens(monkeypatch, device, step, seed):
    prompts = random_prompts(seed, 3)
    stock_llm = make_llm(device)
    stock, stock_logits = greedy(stock_llm, prompts, batched=False), prefill_logits(stock_llm, prompts[0])
    monkeypatch.setattr(llama.LlamaLayer, "mlp", scaled_mlp_when(decode=step == "decode"))
    patched_llm = make_llm(device)
    patched, patched_logits = greedy(patched_llm, prompts, batched=False), prefill_logits(patched_llm, prompts[0])
    where = f"{device}, MLP scaled on {step}, seed {seed}"
    if step == "decode":
        assert torch.equal(patched_logits, stock_logits), f"{where}: prefill changed"
        assert [p[0] for p in patched] == [s[0] for s in stock], f"{where}: the prefill token changed"
        assert all(p[1:] != s[1:] for p, s in zip(patched, stock)), f"{where}: decode tokens did not change"
    else:  # prefill's logits change, and with them the tokens (of every prompt, in practice)
        assert not torch.allclose(patched_logits, stock_logits), f"{where}: prefill logits did not change"
        assert any(p != s for p, s in zip(patched, stock)), f"{where}: tokens did not change"


@pytest.mark.parametrize("change", ["forward", "mlp"])
def test_accelerator_refuses_a_patched_layer_and_tokens_follow_the_model(monkeypatch, caplog, change, seed):
    from minidisagg.accel import native_decode

    if not native_decode.load_decode_step():
        pytest.skip("the C++ decode step does not build here")
    prompts = random_prompts(seed)
    patch = zero_layer_when(decode=True) if change == "forward" else scaled_mlp_when(decode=True)
    stock = greedy(make_llm("cpu"), prompts)
    monkeypatch.setattr(llama.LlamaLayer, change, patch)
    want = greedy(make_llm("cpu"), prompts)
    accelerated = make_llm("cpu", native_cpu_decode=True)
    with caplog.at_level(logging.WARNING, logger="minidisagg.accel.native_decode"):
        got = greedy(accelerated, prompts)
    assert want != stock, f"patched {change}, seed {seed}: the patch changed nothing"
    assert got == want, f"patched {change}, seed {seed}: the accelerator's tokens do not follow the model"
    refusals = [r.getMessage() for r in caplog.records if "not running the C++ decode step" in r.getMessage()]
    assert len(refusals) == 1 and f"LlamaLayer.{change} is not the function models/llama.py defines" in refusals[0], \
        refusals


def test_patch_after_the_engine_is_built_still_shows(monkeypatch, seed):
    # on a CPU nothing is captured: a patch made between two generate calls shows in the second
    prompts = random_prompts(seed, 1)
    llm = make_llm("cpu")
    before = greedy(llm, prompts)
    monkeypatch.setattr(llama.LlamaLayer, "forward", zero_layer_when(decode=True))
    after = greedy(llm, prompts)
    assert all(a[0] == b[0] and a[1:] == [0] * (NEW_TOKENS - 1) for a, b in zip(after, before)), f"seed {seed}"
