"""The fused RoPE + paged KV-cache write against the two references it replaces, and in a Llama layer.

Inputs are fresh random draws (odd head counts and head dims, GQA, block sizes 16 and 5,
padding slots of -1, q/k/v as views of one fused QKV row); every message carries the seed and
``MINIDISAGG_TEST_SEED`` replays a run. With CUDA the kernel runs on the GPU; without it, under
Triton's interpreter, which only works if ``TRITON_INTERPRET=1`` was in the environment when
triton was first imported. As in ``test_triton_elementwise.py``, this file sets it before
anything can import triton, and ``test_cases_in_fresh_process`` re-runs the file in a fresh
interpreter when an earlier test already imported triton without it.

Two comparisons per case: against the torch references (``apply_rope_reference`` then
``write_kv_reference``) within the dtype's tolerance (the interpreter rounds float32 ->
bfloat16 by truncation), and bit for bit against the two unfused Triton kernels, which do the
same float32 math and the same roundings in two launches. Cache slots no token writes must keep
their noise exactly.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of triton (importing torch does not)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from minidisagg.config import TINY  # noqa: E402
from minidisagg.kernels import cache_write, cpu_native, rope, rope_cache  # noqa: E402
from minidisagg.kernels.attention import AttentionMetadata  # noqa: E402
from minidisagg.models.llama import LlamaLayer  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}  # (atol, rtol)
# (activation dtype, cache dtype): the cache may be stored in another dtype than the new k and v
DTYPE_PAIRS = [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
    (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
]
# tokens, (num_heads, num_kv_heads), head_dim, block_size: odd sizes, MHA, GQA and MQA
SHAPES = [
    (1, (9, 3), 24, 16), (37, (5, 5), 40, 5), (37, (7, 1), 64, 16), (1, (3, 1), 40, 5), (37, (6, 2), 24, 5),
]


def why_triton_cannot_run_here() -> str | None:
    """None when the Triton kernels can run in this process; otherwise the reason."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if torch.cuda.is_available():
        return None
    import triton.language as tl

    if type(tl.sum).__name__ != "InterpretedFunction":
        return "triton was imported here before TRITON_INTERPRET=1; test_cases_in_fresh_process runs these cases"
    return None


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (or ``MINIDISAGG_TEST_SEED`` to replay one)."""
    fixed = os.environ.get("MINIDISAGG_TEST_SEED")
    return int(fixed) if fixed else random.SystemRandom().randrange(1 << 31)


@pytest.fixture
def forced_triton(monkeypatch) -> None:
    """Make the dispatch points choose Triton (on CPU: under the interpreter), or skip saying why not."""
    reason = why_triton_cannot_run_here()
    if reason:
        pytest.skip(reason)
    monkeypatch.delenv("MINIDISAGG_KERNELS", raising=False)
    monkeypatch.setenv("MINIDISAGG_TRITON_ON_CPU", "1")


@dataclasses.dataclass
class RopeCacheCase:
    """One random input: fused QKV row, positions, table, noisy caches and slots (some -1)."""

    qkv: torch.Tensor  # [T, (H + 2 KH) * D]
    heads: tuple[int, int]
    head_dim: int
    positions: torch.Tensor
    cos_sin: torch.Tensor
    cache_noise: torch.Tensor  # [2, num_blocks, block_size, KH, D]
    slot_mapping: torch.Tensor

    def views(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, H, D], k and v [T, KH, D] as strided views of ``qkv``."""
        (num_heads, num_kv_heads), d = self.heads, self.head_dim
        q, k, v = qkv.split([num_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
        return q.view(-1, num_heads, d), k.view(-1, num_kv_heads, d), v.view(-1, num_kv_heads, d)

    def written(self) -> torch.Tensor:
        """Bool [num_blocks, block_size]: the slots some token writes."""
        flat = torch.zeros(self.cache_noise[0].shape[:2].numel(), dtype=torch.bool, device=self.qkv.device)
        flat[self.slot_mapping[self.slot_mapping >= 0]] = True
        return flat.view(self.cache_noise.shape[1:3])


def make_case(seed: int, tokens: int, heads: tuple[int, int], head_dim: int, block_size: int,
              dtype: torch.dtype, cache_dtype: torch.dtype, pad_share: float = 0.3) -> RopeCacheCase:
    """A random case from ``seed``; about ``pad_share`` of the tokens carry slot -1."""
    gen, rnd = torch.Generator().manual_seed(seed), random.Random(seed)
    num_heads, num_kv_heads = heads
    max_pos = 500
    theta = rnd.choice([10000.0, 100000.0, 500000.0])
    num_blocks = -(-tokens // block_size) + 3
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[torch.rand(tokens, generator=gen) < pad_share] = -1
    return RopeCacheCase(
        qkv=torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(DEVICE, dtype),
        heads=heads, head_dim=head_dim,
        positions=torch.randint(0, max_pos, (tokens,), generator=gen).to(DEVICE),
        cos_sin=rope.cos_sin_cache(max_pos, head_dim, theta, None, DEVICE),
        cache_noise=torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(DEVICE, cache_dtype),
        slot_mapping=slots.to(DEVICE),
    )


def run_reference(case: RopeCacheCase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unfused torch references: (q, k, k_cache, v_cache); padded tokens are left out of the write."""
    q, k, v = case.views(case.qkv.clone())
    k_cache, v_cache = case.cache_noise[0].clone(), case.cache_noise[1].clone()
    q, k = rope.apply_rope_reference(q, k, case.positions, case.cos_sin)
    keep = case.slot_mapping >= 0  # write_kv_reference has no notion of padding slots
    cache_write.write_kv_reference(k[keep], v[keep], k_cache, v_cache, case.slot_mapping[keep])
    return q, k, k_cache, v_cache


def run_unfused_triton(case: RopeCacheCase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two Triton kernels the fused one replaces: (q, k, k_cache, v_cache)."""
    q, k, v = case.views(case.qkv.clone())
    k_cache, v_cache = case.cache_noise[0].clone(), case.cache_noise[1].clone()
    q, k = rope.apply_rope_triton(q, k, case.positions, case.cos_sin)
    cache_write.write_kv_triton(k, v, k_cache, v_cache, case.slot_mapping)
    return q, k, k_cache, v_cache


def check_close(actual: torch.Tensor, expected: torch.Tensor, what: str, seed: int,
                rounded_in: torch.dtype | None = None) -> None:
    """Compare in float64 with the looser tolerance of the expected dtype and ``rounded_in`` (a dtype the
    values passed through on the way); the message names the check and seed."""
    atol, rtol = max(TOL[expected.dtype], TOL[rounded_in or expected.dtype])
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, f"{what} (seed {seed})"
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=atol, rtol=rtol,
        msg=lambda m: f"{what} (seed {seed}, {expected.dtype}): {m}",
    )


def check_fused(case: RopeCacheCase, seed: int, where: str) -> None:
    """Run the dispatch point on ``case`` and hold it to both references."""
    qkv = case.qkv.clone()
    q, k, v = case.views(qkv)
    k_cache, v_cache = case.cache_noise[0].clone(), case.cache_noise[1].clone()
    out_q, out_k = rope_cache.rope_and_write_kv(q, k, v, case.positions, case.cos_sin, k_cache, v_cache, case.slot_mapping)

    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr(), f"not in place ({where}, seed {seed})"
    assert torch.equal(v, case.views(case.qkv)[2]), f"v changed ({where}, seed {seed})"
    written = case.written()
    for got, name, noise in [(k_cache, "k_cache", case.cache_noise[0]), (v_cache, "v_cache", case.cache_noise[1])]:
        assert torch.equal(got[~written], noise[~written]), f"{name}: an unwritten slot changed ({where}, seed {seed})"

    ref_q, ref_k, ref_k_cache, ref_v_cache = run_reference(case)
    check_close(out_q, ref_q, f"q vs reference, {where}", seed)
    check_close(out_k, ref_k, f"k vs reference, {where}", seed)
    check_close(k_cache[written], ref_k_cache[written], f"k_cache vs reference, {where}", seed, rounded_in=k.dtype)
    check_close(v_cache[written], ref_v_cache[written], f"v_cache vs reference, {where}", seed, rounded_in=v.dtype)

    unfused = run_unfused_triton(case)
    for got, want, name in zip((out_q, out_k, k_cache, v_cache), unfused, ("q", "k", "k_cache", "v_cache")):
        assert torch.equal(got, want), f"{name} differs from the unfused Triton kernels ({where}, seed {seed})"


# every shape with two dtype pairs, every dtype pair with two shapes (the interpreter is slow)
SHAPE_DTYPE_CASES = [(*SHAPES[i], *DTYPE_PAIRS[(i + j) % len(DTYPE_PAIRS)]) for i in range(len(SHAPES)) for j in (0, 2)]


@pytest.mark.parametrize("tokens, heads, head_dim, block_size, dtype, cache_dtype", SHAPE_DTYPE_CASES)
def test_fused_matches_references(forced_triton, seed, dtype, cache_dtype, tokens, heads, head_dim, block_size):
    case = make_case(seed, tokens, heads, head_dim, block_size, dtype, cache_dtype)
    where = f"T={tokens} heads={heads} D={head_dim} block={block_size} {dtype}->{cache_dtype}"
    check_fused(case, seed, where)


@pytest.mark.parametrize("pad_share", [0.0, 1.0])
def test_fused_without_padding_and_all_padding(forced_triton, seed, pad_share):
    """Every token writes, or none does (then both caches keep all their noise but q and k still rotate)."""
    case = make_case(seed, 13, (6, 3), 40, 5, torch.float32, torch.float32, pad_share=pad_share)
    check_fused(case, seed, f"pad share {pad_share}")


def test_fused_takes_contiguous_inputs_and_no_tokens(forced_triton, seed):
    """Separate contiguous q, k, v work too; an empty batch launches nothing and changes nothing."""
    case = make_case(seed, 9, (4, 2), 24, 16, torch.float32, torch.float32)
    q, k, v = (t.contiguous() for t in case.views(case.qkv))
    k_cache, v_cache = case.cache_noise[0].clone(), case.cache_noise[1].clone()
    out_q, out_k = rope_cache.rope_and_write_kv(q, k, v, case.positions, case.cos_sin, k_cache, v_cache, case.slot_mapping)
    ref_q, ref_k, ref_k_cache, ref_v_cache = run_reference(case)
    check_close(out_q, ref_q, "contiguous q", seed)
    check_close(out_k, ref_k, "contiguous k", seed)
    check_close(k_cache, ref_k_cache, "contiguous k_cache", seed)
    check_close(v_cache, ref_v_cache, "contiguous v_cache", seed)

    empty = q[:0], k[:0], v[:0]
    before = k_cache.clone(), v_cache.clone()
    rope_cache.rope_and_write_kv(*empty, case.positions[:0], case.cos_sin, k_cache, v_cache, case.slot_mapping[:0])
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1]), f"empty batch wrote (seed {seed})"


@pytest.mark.parametrize("kernels_env, on_cpu_env", [(None, "1"), ("torch", "1"), (None, None)])
def test_dispatch_picks_one_fused_launch_or_the_references(monkeypatch, seed, kernels_env, on_cpu_env):
    expect_triton = kernels_env != "torch" and (DEVICE == "cuda" or on_cpu_env == "1")
    expect_native = not expect_triton and kernels_env != "torch" and DEVICE == "cpu" and cpu_native.load_cpu_ops()
    if expect_triton and why_triton_cannot_run_here():
        pytest.skip(why_triton_cannot_run_here())
    for name, value in [("MINIDISAGG_KERNELS", kernels_env), ("MINIDISAGG_TRITON_ON_CPU", on_cpu_env)]:
        monkeypatch.delenv(name, raising=False) if value is None else monkeypatch.setenv(name, value)
    calls: list[str] = []
    for module, name in [(rope_cache, "rope_and_write_kv_triton"), (rope_cache, "rope_and_write_kv_reference"),
                         (rope, "apply_rope_triton"), (cache_write, "write_kv_triton")]:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **kw: (calls.append(_name), _real(*a, **kw))[1])
    case = make_case(seed, 5, (4, 2), 32, 16, torch.float32, torch.float32, pad_share=0.0)
    q, k, v = case.views(case.qkv.clone())
    k_cache, v_cache = case.cache_noise[0].clone(), case.cache_noise[1].clone()
    out = rope_cache.rope_and_write_kv(q, k, v, case.positions, case.cos_sin, k_cache, v_cache, case.slot_mapping)
    if expect_native:  # the CPU's native op: no Python kernel runs, and the reference's bits come out
        ref_q, ref_k, ref_k_cache, ref_v_cache = run_reference(case)
        assert calls == [] and torch.equal(out[0], ref_q) and torch.equal(out[1], ref_k), f"seed {seed}"
        assert torch.equal(k_cache, ref_k_cache) and torch.equal(v_cache, ref_v_cache), f"seed {seed}"
        return
    assert calls == (["rope_and_write_kv_triton"] if expect_triton else ["rope_and_write_kv_reference"]), f"seed {seed}"


def prefill_metadata(query_lens: list[int], block_size: int, gen: torch.Generator) -> tuple[AttentionMetadata, torch.Tensor, int]:
    """Metadata for fresh sequences of ``query_lens`` tokens on shuffled blocks: (meta, positions, num_blocks)."""
    needed = [-(-n // block_size) for n in query_lens]
    num_blocks = sum(needed) + 2
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[free.pop() for _ in range(b)] for b in needed]
    block_tables = torch.zeros(len(tables), max(needed), dtype=torch.long)
    slots, positions = [], []
    for i, (table, n) in enumerate(zip(tables, query_lens)):
        block_tables[i, : len(table)] = torch.tensor(table)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(n)]
        positions += list(range(n))
    meta = AttentionMetadata(
        query_starts=[sum(query_lens[:i]) for i in range(len(query_lens))], query_lens=list(query_lens),
        context_lens=list(query_lens), block_tables=block_tables.to(DEVICE),
        context_lens_tensor=torch.tensor(query_lens, dtype=torch.long, device=DEVICE),
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=DEVICE),
    )
    return meta, torch.tensor(positions, dtype=torch.long, device=DEVICE), num_blocks


def test_llama_layer_triton_path_matches_torch_path(monkeypatch, forced_triton, seed):
    """One Llama layer (tiny shapes, random weights) launches the fused kernel once and matches the torch path."""
    gen = torch.Generator().manual_seed(seed)
    cfg, block_size = TINY, 5
    layer = LlamaLayer(cfg, torch.float32, DEVICE)
    for param in layer.parameters():
        param.copy_(torch.randn(param.shape, generator=gen) * param.shape[-1] ** -0.5)
    meta, positions, num_blocks = prefill_metadata([3, 8], block_size, gen)
    hidden = torch.randn(len(positions), cfg.hidden_size, generator=gen).to(DEVICE)
    cos_sin = rope.cos_sin_cache(64, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, DEVICE)
    noise = torch.randn(2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, generator=gen).to(DEVICE)

    def run() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        caches = noise.clone()
        with torch.inference_mode():
            out, residual = layer(hidden.clone(), None, positions, cos_sin, caches[0], caches[1], meta)
        return out, residual, caches

    calls: list[str] = []
    for module, name in [(rope_cache, "rope_and_write_kv_triton"), (rope, "apply_rope_triton"), (cache_write, "write_kv_triton")]:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **kw: (calls.append(_name), _real(*a, **kw))[1])
    triton_out, triton_residual, triton_caches = run()
    assert calls == ["rope_and_write_kv_triton"], f"the layer launched {calls} (seed {seed})"
    monkeypatch.setenv("MINIDISAGG_KERNELS", "torch")
    torch_out, torch_residual, torch_caches = run()
    torch.testing.assert_close(triton_out, torch_out, atol=1e-4, rtol=1e-4, msg=lambda m: f"layer output (seed {seed}): {m}")
    torch.testing.assert_close(triton_residual, torch_residual, atol=1e-4, rtol=1e-4, msg=lambda m: f"residual (seed {seed}): {m}")
    torch.testing.assert_close(triton_caches, torch_caches, atol=1e-5, rtol=1e-5, msg=lambda m: f"layer KV (seed {seed}): {m}")


def test_cases_in_fresh_process():
    reason = why_triton_cannot_run_here()
    if reason is None or reason == "triton is not installed":
        pytest.skip(reason or "the cases ran in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-m", "not gpu", "-o", "addopts="],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=600,
    )
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, f"cases failed in a fresh interpreter:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > len(SHAPE_DTYPE_CASES), f"the fresh process ran too few cases: {summary}"


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 37, 257])
def test_fused_bf16_llama8b_shapes_on_gpu(forced_triton, seed, tokens):
    """Llama-3-8B shapes in bf16 on the GPU: within bf16 tolerance of the references, bit-equal to the unfused kernels."""
    case = make_case(seed, tokens, (32, 8), 128, 16, torch.bfloat16, torch.bfloat16)
    check_fused(case, seed, f"llama-8b shapes T={tokens} bf16 on {torch.cuda.get_device_name()}")
