"""Prefill CUDA graphs (``engine/prefill_graphs.py``) against eager prefill on the GPU, and their refusals elsewhere."""

from __future__ import annotations

import random

import pytest
import torch

from minidisagg import LLM, SamplingParams
from minidisagg.engine.batch import BatchItem


def test_prefill_graphs_are_refused_off_cuda_and_ignored_by_a_cpu_engine():
    llm = LLM("smollm2-135m", device="cpu", dtype="float32", random_weights=True, max_model_len=64,
              prefill_cuda_graphs=True, num_kv_blocks=8)
    try:
        assert llm.engine.runner.prefill_graphs is None
        with pytest.raises(ValueError, match="prefill CUDA graphs need a CUDA model"):
            llm.engine.runner.enable_prefill_graphs()
    finally:
        llm.shutdown()


@pytest.mark.gpu
def test_prefill_graphs_match_eager_logits_kv_and_greedy_tokens():
    seed = random.SystemRandom().randrange(1 << 31)
    rng = random.Random(seed)
    llm = LLM("smollm2-135m", device="cuda", dtype="bfloat16", random_weights=True, max_model_len=640,
              max_num_seqs=2, prefill_cuda_graphs=True)
    try:
        runner = llm.engine.runner
        cache, bs = runner.kv_cache, runner.kv_cache.block_size
        vocab = llm.loaded.config.vocab_size
        lengths = [rng.randint(1, 127), rng.randint(129, 511), 512]
        assert runner.prefill_graphs is not None, "LLM(prefill_cuda_graphs=True) did not enable them"
        runner.enable_prefill_graphs((128, 512))
        for n in lengths:
            tokens = [rng.randrange(vocab) for _ in range(n)]
            blocks = list(range(-(-n // bs)))
            item = BatchItem(tokens, 0, blocks, True)
            graphs, runner.prefill_graphs = runner.prefill_graphs, None
            eager = runner.execute([item])
            eager_k = cache.layer(3)[0][blocks].flatten(0, 1)[:n].clone()
            runner.prefill_graphs = graphs
            cache.layer(3)[0].zero_()
            replayed = runner.execute([item])
            graph_k = cache.layer(3)[0][blocks].flatten(0, 1)[:n]
            where = f"{n} tokens (seed {seed})"
            assert graphs.bucket_for(n) in graphs._steps, f"the graph did not run for {where}"
            assert replayed.shape == eager.shape == (1, vocab), where
            assert torch.equal(replayed.argmax(-1), eager.argmax(-1)), f"greedy token differs, {where}"
            torch.testing.assert_close(replayed, eager, atol=5e-2, rtol=5e-2, msg=lambda m: f"logits, {where}: {m}")
            torch.testing.assert_close(graph_k, eager_k, atol=2e-2, rtol=2e-2, msg=lambda m: f"KV, {where}: {m}")
            # a first chunk that wants no logits: none come back, the KV is written all the same
            cache.layer(3)[0].zero_()
            assert runner.execute([BatchItem(tokens, 0, blocks, False)]).shape == (0, vocab), where
            torch.testing.assert_close(cache.layer(3)[0][blocks].flatten(0, 1)[:n], eager_k, atol=2e-2, rtol=2e-2)
        # whole requests: greedy tokens with prefill graphs (the decode that follows reads their KV) == without
        prompts = [[rng.randrange(vocab) for _ in range(rng.randint(20, 500))] for _ in range(2)]
        params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
        replays = graphs.graph_replays
        with_graphs = [llm.generate([p], params, use_tqdm=False)[0].token_ids for p in prompts]
        assert graphs.graph_replays == replays + len(prompts), f"prompts did not take the prefill graphs (seed {seed})"
        runner.prefill_graphs = None
        without = [llm.generate([p], params, use_tqdm=False)[0].token_ids for p in prompts]
        assert with_graphs == without, f"greedy tokens differ with prefill graphs (seed {seed})"
    finally:
        llm.shutdown()
