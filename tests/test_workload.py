"""Tests for minidisagg.workload: distributions, arrivals, scenarios and CSV traces."""

from __future__ import annotations

import secrets
from pathlib import Path

import numpy as np
import pytest

from minidisagg.workload import (
    Fixed,
    LogNormal,
    TimedRequest,
    Uniform,
    interference_workload,
    load_csv,
    poisson_arrivals,
    poisson_workload,
    save_csv,
    synthetic_prompt_ids,
)


@pytest.fixture
def seeded_rng() -> tuple[int, np.random.Generator]:
    """A generator with a fresh seed each run; the seed goes into failure messages."""
    seed = secrets.randbits(32)
    return seed, np.random.default_rng(seed)


def test_poisson_mean_gap(seeded_rng: tuple[int, np.random.Generator]) -> None:
    seed, rng = seeded_rng
    rate, n = 4.0, 20000
    t = poisson_arrivals(rate, n, rng)
    gaps = np.diff(np.concatenate([[0.0], t]))
    assert t.shape == (n,) and np.all(gaps > 0), f"seed={seed}"
    # The mean of n exponential gaps has std (1/rate)/sqrt(n); allow 5 standard errors.
    tol = 5 * (1 / rate) / np.sqrt(n)
    assert abs(gaps.mean() - 1 / rate) < tol, f"seed={seed} mean gap {gaps.mean()}"
    assert t[0] == gaps[0] > 0


def test_poisson_arrival_errors() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="rate_rps"):
        poisson_arrivals(0.0, 3, rng)
    with pytest.raises(ValueError, match="num"):
        poisson_arrivals(1.0, -1, rng)
    assert poisson_arrivals(1.0, 0, rng).shape == (0,)


def test_length_bounds(seeded_rng: tuple[int, np.random.Generator]) -> None:
    seed, rng = seeded_rng
    assert np.all(Fixed(7).sample(rng, 5) == 7)
    u = Uniform(3, 6).sample(rng, 4000)
    assert u.dtype == np.int64 and u.min() == 3 and u.max() == 6, f"seed={seed}"
    ln = LogNormal(200, 1.0, 50, 400).sample(rng, 4000)
    assert ln.min() >= 50 and ln.max() <= 400, f"seed={seed}"
    assert ln.min() == 50 and ln.max() == 400, f"seed={seed}: clipping never reached a bound"
    assert Uniform(2, 9).sample(rng, 0).shape == (0,)


def test_lognormal_mean_and_spread(seeded_rng: tuple[int, np.random.Generator]) -> None:
    seed, rng = seeded_rng
    x = LogNormal(mean=512, sigma_frac=0.5, low=1, high=100_000).sample(rng, 20000)
    assert abs(x.mean() / 512 - 1) < 0.05, f"seed={seed} mean {x.mean()}"
    assert abs(x.std() / x.mean() - 0.5) < 0.05, f"seed={seed} relative std {x.std() / x.mean()}"
    assert np.all(LogNormal(100, 0.0, 1, 1000).sample(rng, 10) == 100)


def test_length_dist_errors() -> None:
    with pytest.raises(ValueError, match="Fixed"):
        Fixed(0)
    with pytest.raises(ValueError, match="high"):
        Uniform(5, 4)
    with pytest.raises(ValueError, match="low"):
        Uniform(0, 4)
    with pytest.raises(ValueError, match="mean"):
        LogNormal(10, 0.5, 20, 40)
    with pytest.raises(ValueError, match="sigma_frac"):
        LogNormal(30, -0.1, 20, 40)
    with pytest.raises(ValueError, match="n must"):
        Fixed(3).sample(np.random.default_rng(0), -1)


def test_poisson_workload_reproducible() -> None:
    args = (10.0, 200, Uniform(16, 64), LogNormal(100, 0.5, 10, 300))
    a = poisson_workload(*args, seed=3)
    assert a == poisson_workload(*args, seed=3)
    assert a != poisson_workload(*args, seed=4)
    assert len(a) == 200 and all(isinstance(r, TimedRequest) for r in a)
    assert all(16 <= r.prompt_len <= 64 and 10 <= r.output_len <= 300 for r in a)
    assert all(type(r.prompt_len) is int and type(r.arrival_s) is float for r in a)
    assert [r.arrival_s for r in a] == sorted(r.arrival_s for r in a)


def test_timed_request_validation() -> None:
    with pytest.raises(ValueError, match="arrival_s"):
        TimedRequest(-1.0, 4, 4)
    with pytest.raises(ValueError, match="prompt_len"):
        TimedRequest(0.0, 0, 4)
    with pytest.raises(ValueError, match="output_len"):
        TimedRequest(0.0, 4, 0)


def test_interference_workload() -> None:
    reqs = interference_workload(
        num_decodes=3, decode_prompt_len=8, decode_output_len=500,
        num_long=4, long_prompt_len=2048, long_every_s=0.5, start_long_s=1.0,
    )
    assert len(reqs) == 7
    assert reqs[:3] == [TimedRequest(0.0, 8, 500)] * 3
    assert [r.arrival_s for r in reqs[3:]] == [1.0, 1.5, 2.0, 2.5]
    assert all(r.prompt_len == 2048 and r.output_len == 1 for r in reqs[3:])
    # Long prompts at t=0 come after the decodes.
    tied = interference_workload(2, 8, 100, 2, 1024, 1.0, long_output_len=4)
    assert [(r.arrival_s, r.prompt_len, r.output_len) for r in tied] == [
        (0.0, 8, 100), (0.0, 8, 100), (0.0, 1024, 4), (1.0, 1024, 4),
    ]
    with pytest.raises(ValueError, match="long_every_s"):
        interference_workload(1, 8, 10, 2, 100, 0.0)


def test_csv_round_trip(tmp_path: Path) -> None:
    reqs = poisson_workload(3.0, 50, Uniform(1, 1000), Fixed(32), seed=1)
    path = tmp_path / "trace.csv"
    save_csv(reqs, path)
    assert path.read_text().splitlines()[0] == "arrival_s,prompt_tokens,output_tokens"
    assert load_csv(path) == reqs
    assert load_csv(str(path)) == reqs


def test_csv_sorts_and_accepts_aliases(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("id,arrival_s,prompt_len,output_len\na,2.5,10,3\nb,0.5,20,4.0\n\nc,1,30,5\n")
    assert load_csv(path) == [TimedRequest(0.5, 20, 4), TimedRequest(1.0, 30, 5), TimedRequest(2.5, 10, 3)]


@pytest.mark.parametrize(
    "row, line, message",
    [
        ("0.5,abc,3", 3, "prompt_tokens is not a number"),
        ("-0.5,10,3", 3, "arrival_s must be"),
        ("0.5,10,-3", 3, "output_tokens must be >= 1"),
        ("0.5,10", 3, "missing value for output_tokens"),
        ("x,10,3", 3, "arrival_s is not a number"),
        ("0.5,10.5,3", 3, "prompt_tokens must be a whole number"),
        ("\n1.0,10,0", 4, "output_tokens must be >= 1"),
    ],
)
def test_csv_bad_rows(tmp_path: Path, row: str, line: int, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(f"arrival_s,prompt_tokens,output_tokens\n0.0,5,5\n{row}\n")
    with pytest.raises(ValueError, match=f"line {line}: {message}"):
        load_csv(path)


def test_csv_bad_header(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("arrival_s,prompt_tokens\n0.0,5\n")
    with pytest.raises(ValueError, match="line 1: .*missing output_tokens"):
        load_csv(path)
    path.write_text("")
    with pytest.raises(ValueError, match="line 1"):
        load_csv(path)


def test_synthetic_prompt_ids(seeded_rng: tuple[int, np.random.Generator]) -> None:
    seed, rng = seeded_rng
    avoid = {0, 1, 2, 7, 99, 500}  # 500 is outside the vocabulary and ignored
    ids = synthetic_prompt_ids(20000, 100, rng, avoid=avoid)
    assert len(ids) == 20000 and all(type(t) is int for t in ids)
    assert set(ids) == set(range(100)) - avoid, f"seed={seed}"
    counts = np.bincount(ids, minlength=100)[sorted(set(range(100)) - avoid)]
    assert counts.min() > 0.6 * 20000 / 95, f"seed={seed}: not uniform"
    assert synthetic_prompt_ids(0, 10, rng) == []
    assert synthetic_prompt_ids(5, 3, rng, avoid=[0, 2]) == [1] * 5
    with pytest.raises(ValueError, match="whole vocabulary"):
        synthetic_prompt_ids(3, 2, rng, avoid=[0, 1])
    with pytest.raises(ValueError, match="length"):
        synthetic_prompt_ids(-1, 10, rng)
