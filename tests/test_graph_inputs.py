"""The CUDA-graph decode inputs, packed on the host (no GPU needed): real rows, then padding rows."""

from __future__ import annotations

import random

import pytest
import torch

from minidisagg.engine.cuda_graphs import PAD_SLOT, HostInputs

BLOCK_SIZE = 4


@pytest.fixture(scope="module")
def seed() -> int:
    return random.SystemRandom().randrange(1 << 30)


def packed(bucket: int, max_blocks: int) -> tuple[torch.Tensor, HostInputs]:
    buf = torch.full((bucket * (4 + max_blocks),), 7, dtype=torch.int64)  # stale values from an earlier step
    return buf, HostInputs.of(buf, bucket, max_blocks)


def test_rows_and_padding(seed):
    rng = random.Random(seed)
    bucket, max_blocks = 8, 6
    for _ in range(20):
        n = rng.randint(1, bucket)
        tables = [rng.sample(range(100), rng.randint(1, max_blocks)) for _ in range(n)]
        positions = [rng.randrange(len(t) * BLOCK_SIZE) for t in tables]
        token_ids = [rng.randrange(1000) for _ in range(n)]
        buf, host = packed(bucket, max_blocks)
        host.pack(token_ids, positions, tables, BLOCK_SIZE)
        views = buf[: 4 * bucket].view(4, bucket).tolist()
        pad = bucket - n
        assert views[0] == token_ids + [0] * pad, f"seed {seed}"
        assert views[1] == positions + [0] * pad
        assert views[2] == [t[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for t, p in zip(tables, positions)] + [PAD_SLOT] * pad
        assert views[3] == [p + 1 for p in positions] + [1] * pad
        rows = buf[4 * bucket :].view(bucket, max_blocks).tolist()
        assert rows == [t + [0] * (max_blocks - len(t)) for t in tables] + [[0] * max_blocks] * pad


def test_tables_that_do_not_fit_are_rejected():
    _, host = packed(2, 3)
    with pytest.raises(ValueError, match="exceeds the graph's 3"):
        host.pack([1], [0], [[0, 1, 2, 3]], BLOCK_SIZE)
    with pytest.raises(ValueError, match="past a block table of 2 blocks"):
        host.pack([1], [2 * BLOCK_SIZE], [[0, 1]], BLOCK_SIZE)
