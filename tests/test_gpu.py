"""GPU-only engine checks: Triton path vs torch path, and CUDA graphs on vs off (skipped without CUDA).

The kernel-level GPU checks (each kernel against its reference in bf16) live with the kernel
tests, which run on the GPU whenever one is present. Models use random weights of real shapes,
so these run on a GPU machine without the GGUF.
"""

from __future__ import annotations

import random

import pytest
import torch

from minidisagg import LLM, SamplingParams

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)


@pytest.fixture
def seed() -> int:
    return random.SystemRandom().randrange(1 << 31)


def prompts(seed: int, n: int, vocab: int, lo: int = 5, hi: int = 90) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def greedy(llm: LLM, batch: list[list[int]], n: int = 24) -> list[list[int]]:
    outs = llm.generate(batch, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    return [o.token_ids for o in outs]


def engine(model: str, dtype: str, **kw) -> LLM:
    return LLM(model, device="cuda", dtype=dtype, random_weights=True, max_model_len=512, **kw)


def test_triton_path_equals_torch_path_greedy(monkeypatch, seed):
    """fp32 (no TF32): the Triton kernels and the torch references pick the same greedy tokens."""
    batch = prompts(seed, 6, 49152)
    llm = engine("smollm2-135m", "float32", cuda_graphs=False)
    with_triton = greedy(llm, batch)
    monkeypatch.setenv("MINIDISAGG_KERNELS", "torch")
    with_torch = greedy(llm, batch)
    assert with_triton == with_torch, f"seed {seed}"
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


def test_triton_path_close_to_torch_path_bf16_logits(monkeypatch, seed):
    """bf16: first-step logits of the two paths agree to bf16 precision."""
    from minidisagg.engine.batch import BatchItem

    llm = engine("smollm2-135m", "bfloat16", cuda_graphs=False)
    runner = llm.engine.runner
    ids = prompts(seed, 1, 49152, 40, 41)[0]
    item = BatchItem(ids, 0, list(range(3)), True)
    got = runner.execute([item])
    monkeypatch.setenv("MINIDISAGG_KERNELS", "torch")
    want = runner.execute([item])
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 0.03 * scale, f"seed {seed}"


@pytest.mark.parametrize("batch_size", [1, 3, 8, 13])
def test_cuda_graphs_equal_eager(seed, batch_size):
    """Graph replay (padded to a bucket) gives the same greedy tokens as eager decode, and frees every block."""
    batch = prompts(seed, batch_size, 49152)
    graphs = engine("smollm2-135m", "float32", cuda_graphs=True, max_num_seqs=16)
    assert graphs.engine.runner.decode_graphs is not None
    eager = engine("smollm2-135m", "float32", cuda_graphs=False, max_num_seqs=16)
    assert eager.engine.runner.decode_graphs is None
    assert greedy(graphs, batch) == greedy(eager, batch), f"seed {seed}"
    assert graphs.engine.runner.decode_graphs.captured_batch_sizes  # the graph path really ran
    for llm in (graphs, eager):
        assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


def test_cuda_graphs_continuous_batching(seed):
    """Requests of different lengths join and leave while graphs replay (llama-1b shape, fp32): tokens match eager."""
    batch = prompts(seed, 10, 128256, 3, 200)
    params = [SamplingParams(temperature=0.0, max_tokens=random.Random(seed + i).randint(2, 40), ignore_eos=True)
              for i in range(len(batch))]
    results = []
    for graphs in (True, False):
        llm = engine("llama-1b", "float32", cuda_graphs=graphs, max_num_seqs=8)
        results.append([o.token_ids for o in llm.generate(batch, params, use_tqdm=False)])
        assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks
        del llm
        torch.cuda.empty_cache()
    same = sum(a == b for a, b in zip(*results))
    assert same >= len(batch) - 1, f"seed {seed}: only {same}/{len(batch)} sequences equal"


def test_capture_cuda_graphs_captures_every_bucket_and_replays_equal(seed):
    """A server's capture at start covers every bucket; tokens afterwards equal eager (tiny, fp32)."""
    from minidisagg.engine.cuda_graphs import graph_batch_sizes

    batch = prompts(seed, 6, 49152)
    llm = engine("tiny", "float32", max_num_seqs=8)
    assert llm.engine.capture_cuda_graphs() == len(graph_batch_sizes(8))
    assert llm.engine.runner.decode_graphs.captured_batch_sizes == graph_batch_sizes(8)
    eager = engine("tiny", "float32", max_num_seqs=8, cuda_graphs=False)
    assert greedy(llm, batch) == greedy(eager, batch), f"seed {seed}"
    assert LLM("tiny", device="cpu").engine.capture_cuda_graphs() == 0  # no graphs off CUDA


@pytest.mark.parametrize("batch_size", [1, 5, 16])
def test_cuda_graph_logits_close_to_eager_bf16(seed, batch_size):
    """bf16: one decode step by graph replay and eagerly give logits equal to bf16 precision."""
    from minidisagg.engine.batch import BatchItem

    llm = engine("llama-1b", "bfloat16", cuda_graphs=True, max_num_seqs=16)
    runner = llm.engine.runner
    rng = random.Random(seed)
    items, next_block = [], 0
    for _ in range(batch_size):
        ctx = rng.randint(1, 300)
        blocks = list(range(next_block, next_block + -(-ctx // 16)))
        next_block += len(blocks)
        items.append(BatchItem([rng.randrange(128256)], ctx - 1, blocks, True))
    torch.manual_seed(seed)
    runner.kv_cache.kv.normal_()  # fresh random KV in every page
    graphed = runner.execute(items)
    graphs, runner.decode_graphs = runner.decode_graphs, None
    eager = runner.execute(items)
    runner.decode_graphs = graphs
    assert graphs.captured_batch_sizes
    # bf16 through 16 random layers: the paths differ in attention splits, so compare like bf16 noise, not bits
    scale = eager.abs().max().item()
    relative_rms = ((graphed - eager).norm() / eager.norm()).item()
    assert relative_rms <= 1e-2 and (graphed - eager).abs().max().item() <= 0.05 * scale, \
        f"seed {seed}: relative rms {relative_rms:.2e}, max {(graphed - eager).abs().max().item():.3g} of {scale:.3g}"


def test_async_scheduling_equals_sync_with_graphs(seed):
    """Steps queued ahead (graph replays fed by tokens sampled on the device) change no token, leak no block."""
    batch = prompts(seed, 9, 49152, 3, 120)
    rng = random.Random(seed)
    params = [SamplingParams(temperature=0.0 if i % 2 else 0.9, top_k=50 if i % 3 else -1, top_p=0.95,
                             max_tokens=rng.randint(1, 50), seed=rng.randrange(1 << 20), ignore_eos=True)
              for i in range(len(batch))]  # greedy and seeded sampled rows mixed: sampling runs on the device
    results = []
    for async_scheduling in (True, False):
        llm = engine("smollm2-135m", "float32", max_num_seqs=4, async_scheduling=async_scheduling)
        assert llm.engine.runner.async_scheduling is async_scheduling
        results.append([o.token_ids for o in llm.generate(batch, params, use_tqdm=False)])
        assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks
        if async_scheduling:
            assert llm.engine.decode_stage.lookahead.used > 0, "no step ran from the queue"
    assert results[0] == results[1], f"seed {seed}"
    assert engine("tiny", "float32").engine.runner.async_scheduling  # on by default with graphs
