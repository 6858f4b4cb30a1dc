"""SamplingParams validation, the top-k/top-p mask against a reference, and the sampler's distribution."""

from __future__ import annotations

import math
import random

import pytest
import torch

from minidisagg.engine.sampling import SamplingParams, make_generator, sample, top_k_top_p_mask

CPU = torch.device("cpu")


@pytest.fixture
def seed() -> int:
    return random.SystemRandom().randrange(1 << 30)


# ---------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
        ({"max_tokens": -3}, "max_tokens must be an integer >= 1"),
        ({"max_tokens": 2.5}, "max_tokens must be an integer >= 1"),
        ({"max_tokens": "8"}, "max_tokens must be an integer >= 1"),
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"top_p": 0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"top_p": -0.2}, "top_p must be in (0, 1]"),
        ({"top_k": 0}, "top_k must be -1 (disabled) or an integer >= 1"),
        ({"top_k": -2}, "top_k must be -1 (disabled) or an integer >= 1"),
        ({"top_k": 2.0}, "top_k must be -1 (disabled) or an integer >= 1"),
        ({"stop": [""]}, "stop must be a list of non-empty strings"),
        ({"stop": ""}, "stop must be a list of non-empty strings"),
        ({"stop": ["ok", 3]}, "stop must be a list of non-empty strings"),
        ({"stop_token_ids": [-1]}, "stop_token_ids must be non-negative integers"),
        ({"stop_token_ids": [2, "3"]}, "stop_token_ids must be non-negative integers"),
        ({"stop_token_ids": [1.0]}, "stop_token_ids must be non-negative integers"),
    ],
)
def test_params_reject_bad_values(kwargs, fragment):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert fragment in str(info.value)
    # the message shows the offending value
    assert repr(next(iter(kwargs.values()))) in str(info.value) or str(next(iter(kwargs.values()))) in str(info.value)


def test_params_reject_nan_temperature():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=float("nan"))


def test_params_accept_good_values():
    p = SamplingParams(temperature=0.7, top_p=0.9, top_k=5, max_tokens=1, seed=3, stop="###", stop_token_ids=[0, 7])
    assert p.stop == ["###"]
    assert p.stop_token_ids == [0, 7]
    assert not p.greedy
    assert SamplingParams(stop=["a", "b"]).stop == ["a", "b"]
    assert SamplingParams().stop is None
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(top_p=1.0, top_k=-1).top_k == -1


# ---------------------------------------------------------------- top_k_top_p_mask


def reference_keep(logits: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    """Indices that survive: the k largest logits, then the smallest sorted prefix with mass >= top_p."""
    probs = torch.softmax(logits.double(), dim=-1)
    order = sorted(range(logits.numel()), key=lambda i: -float(probs[i]))
    if top_k > 0:
        order = order[:top_k]
    if top_p >= 1.0:
        return set(order)  # nucleus disabled (a float64 prefix can round to 1.0 before the tail)
    mass = sum(float(probs[i]) for i in order)
    kept: list[int] = []
    cum = 0.0
    for i in order:
        kept.append(i)
        cum += float(probs[i]) / mass
        if cum >= top_p:
            break
    return set(kept)


def nucleus_is_ambiguous(logits: torch.Tensor, top_k: int, top_p: float) -> bool:
    """Whether top_p lies within float32 rounding of a prefix mass (the kept set is then ill-defined)."""
    if top_p >= 1.0:
        return False  # nucleus disabled
    probs = torch.softmax(logits.double(), dim=-1).sort(descending=True).values
    if top_k > 0:
        probs = probs[:top_k] / probs[:top_k].sum()
    return bool(((probs.cumsum(0) - top_p).abs() < 1e-5).any())


def kept_by_mask(masked: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(masked)).flatten().tolist())


def random_case(rng: random.Random, gen: torch.Generator):
    vocab = rng.randint(1, 60)
    scale = rng.choice([0.1, 1.0, 3.0, 10.0])
    logits = torch.randn(vocab, generator=gen) * scale  # continuous: ties have probability 0
    top_k = rng.choice([-1, 1, 2, rng.randint(1, vocab + 3), vocab, vocab + 5])
    top_p = rng.choice([1.0, rng.uniform(0.01, 1.0), rng.uniform(0.9, 1.0), 1e-6])
    return logits, top_k, top_p


def test_mask_matches_reference(seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    checked = 0
    while checked < 400:
        logits, top_k, top_p = random_case(rng, gen)
        if nucleus_is_ambiguous(logits, top_k, top_p):
            continue
        before = logits.clone()
        masked = top_k_top_p_mask(logits, top_k, top_p)
        where = f"seed {seed}, case {checked}: vocab {logits.numel()}, top_k {top_k}, top_p {top_p}"
        assert torch.equal(logits, before), f"{where}: input was modified"
        assert masked.shape == logits.shape, where
        kept = kept_by_mask(masked)
        assert kept == reference_keep(logits, top_k, top_p), where
        assert int(logits.argmax()) in kept, f"{where}: the most likely token was masked"
        # survivors keep their logits; everything else is -inf
        idx = sorted(kept)
        assert torch.equal(masked[idx], logits[idx]), where
        assert bool((masked[[i for i in range(logits.numel()) if i not in kept]] == float("-inf")).all()), where
        checked += 1


@pytest.mark.parametrize("k", [1, 2, 5, 31])
def test_top_k_keeps_exactly_k_largest(seed, k):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(32, generator=gen)
    kept = kept_by_mask(top_k_top_p_mask(logits, k, 1.0))
    assert kept == set(torch.argsort(logits, descending=True)[:k].tolist()), f"seed {seed}"


def test_top_p_examples():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    assert kept_by_mask(top_k_top_p_mask(logits, -1, 0.4)) == {0}
    assert kept_by_mask(top_k_top_p_mask(logits, -1, 0.7)) == {0, 1}
    assert kept_by_mask(top_k_top_p_mask(logits, -1, 0.9)) == {0, 1, 2}
    assert kept_by_mask(top_k_top_p_mask(logits, -1, 0.99)) == {0, 1, 2, 3}
    assert kept_by_mask(top_k_top_p_mask(logits, -1, 1e-9)) == {0}  # at least one token
    # top-p applies to the top-k distribution renormalised: {0.5, 0.3} -> {0.625, 0.375}
    assert kept_by_mask(top_k_top_p_mask(logits, 2, 0.6)) == {0}
    assert kept_by_mask(top_k_top_p_mask(logits, 2, 0.7)) == {0, 1}
    # the order of the vocabulary does not matter
    perm = torch.tensor([2, 0, 3, 1])
    assert kept_by_mask(top_k_top_p_mask(logits[perm], -1, 0.7)) == {1, 3}


def test_mask_disabled_is_identity(seed):
    logits = torch.randn(17, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(top_k_top_p_mask(logits, -1, 1.0), logits)
    assert torch.equal(top_k_top_p_mask(logits, 17, 1.0), logits)
    assert torch.equal(top_k_top_p_mask(logits, 100, 1.0), logits)


# ---------------------------------------------------------------- sample


def test_temperature_zero_is_argmax(seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(8, 50, generator=gen) * 3
    params = [SamplingParams(temperature=0, top_k=top_k, top_p=0.5) for top_k in (-1, 1, 3, 7, -1, 2, 9, 4)]
    gens = [make_generator(p, CPU) for p in params]
    assert gens == [None] * 8  # greedy needs no randomness
    assert sample(logits, params, gens) == logits.argmax(dim=-1).tolist(), f"seed {seed}"


def test_seeded_generator_reproduces_tokens(seed):
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(seed))
    for params in (SamplingParams(temperature=1.0, seed=seed), SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=seed)):

        def draw() -> list[int]:
            gen = make_generator(params, CPU)
            return [sample(logits, [params], [gen])[0] for _ in range(50)]

        first = draw()
        assert draw() == first, f"seed {seed}, {params}"
        assert len(set(first)) > 1, f"seed {seed}: 50 draws at temperature ~1 over 100 tokens all equal"


def test_unseeded_generators_differ(seed):
    logits = torch.zeros(1, 1000)
    params = SamplingParams(temperature=1.0)
    draws = [tuple(sample(logits.expand(20, -1), [params] * 20, [make_generator(params, CPU)] * 20)) for _ in range(2)]
    assert draws[0] != draws[1], "two unseeded requests drew the same 20 tokens out of 1000"


def empirical_frequencies(logits: torch.Tensor, params: SamplingParams, n: int, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    tokens = sample(logits.expand(n, -1), [params] * n, [gen] * n)
    counts = [0] * logits.numel()
    for t in tokens:
        counts[t] += 1
    return [c / n for c in counts]


def assert_close_to(freqs: list[float], expected: list[float], n: int, where: str) -> None:
    for tok, (f, p) in enumerate(zip(freqs, expected)):
        sigma = math.sqrt(max(p * (1 - p), 1e-12) / n)
        assert abs(f - p) <= 5 * sigma + 1e-9, f"{where}: token {tok} drawn {f:.4f}, expected {p:.4f} (5 sigma {5 * sigma:.4f})"


def test_temperature_one_matches_softmax(seed):
    n = 20_000
    logits = torch.tensor([2.0, 1.0, 0.5, -0.5, -1.5])
    freqs = empirical_frequencies(logits, SamplingParams(temperature=1.0), n, seed)
    assert_close_to(freqs, torch.softmax(logits.double(), -1).tolist(), n, f"seed {seed}")


def test_temperature_and_top_k_reshape_the_distribution(seed):
    n = 5_000
    logits = torch.tensor([2.0, 1.0, 0.5, -0.5, -1.5])
    params = SamplingParams(temperature=0.5, top_k=3)
    expected = torch.softmax(logits.double() / 0.5, -1)
    expected[3:] = 0
    expected /= expected.sum()
    freqs = empirical_frequencies(logits, params, n, seed)
    assert freqs[3] == freqs[4] == 0, f"seed {seed}: top_k=3 sampled outside the top 3"
    assert_close_to(freqs, expected.tolist(), n, f"seed {seed}")


def test_top_p_never_samples_outside_nucleus(seed):
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    freqs = empirical_frequencies(logits, SamplingParams(temperature=1.0, top_p=0.7), 2_000, seed)
    assert freqs[2] == freqs[3] == 0, f"seed {seed}"
    assert_close_to(freqs, [0.625, 0.375, 0.0, 0.0], 2_000, f"seed {seed}")


def test_top_k_one_equals_greedy(seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(64, 200, generator=gen)
    params = [SamplingParams(temperature=t, top_k=1, seed=seed) for t in [0.3, 1.0, 2.5, 10.0] * 16]
    gens = [make_generator(p, CPU) for p in params]
    assert sample(logits, params, gens) == logits.argmax(dim=-1).tolist(), f"seed {seed}"
