"""BlockManager against a simple model: no shared blocks, no leaks, exact sizes, collision-free slots."""

from __future__ import annotations

import random

import pytest

from minidisagg.kv.block_manager import BlockManager, OutOfBlocksError


@pytest.fixture
def seed() -> int:
    return random.SystemRandom().randrange(1 << 30)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class Model:
    """What the manager should look like from outside: per live key, its token count and table."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_blocks_of: dict[object, int] = {}
        self.tables: dict[object, list[int]] = {}  # copies taken right after each grow

    def owned(self) -> int:
        return sum(self.num_blocks_of.values())

    def free(self) -> int:
        return self.num_blocks - self.owned()


def check_invariants(bm: BlockManager, model: Model, where: str) -> None:
    """Every public view of ``bm`` agrees with ``model``; blocks are disjoint and slots never collide."""
    bs = model.block_size
    assert bm.num_free_blocks == model.free(), where
    assert bm.num_free_blocks + sum(len(bm.block_table(k)) for k in model.num_blocks_of) == bm.num_blocks, where
    assert set(bm.owners()) == set(model.num_blocks_of), where
    seen_blocks: dict[int, object] = {}
    seen_slots: set[int] = set()
    for key, n in model.num_blocks_of.items():
        table = bm.block_table(key)
        assert len(table) == n, f"{where}: {key!r} has {len(table)} blocks, expected {n}"
        assert table == model.tables[key], f"{where}: {key!r}'s block table changed without a grow"
        for block in table:
            assert 0 <= block < bm.num_blocks, f"{where}: block id {block} out of range"
            assert block not in seen_blocks, f"{where}: block {block} owned by {seen_blocks[block]!r} and {key!r}"
            seen_blocks[block] = key
        slots = bm.slot_mapping(key, 0, n * bs)
        assert slots == [table[i // bs] * bs + i % bs for i in range(n * bs)], where
        assert all(0 <= s < bm.capacity_tokens for s in slots), where
        assert seen_slots.isdisjoint(slots), f"{where}: {key!r}'s slots collide with another live sequence"
        seen_slots.update(slots)


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_random_allocate_grow_free(seed, block_size):
    rng = random.Random(seed * 31 + block_size)
    num_blocks = rng.randint(1, 40)
    bm = BlockManager(num_blocks, block_size)
    model = Model(num_blocks, block_size)
    tokens_of: dict[object, int] = {}
    next_key = 0
    check_invariants(bm, model, f"seed {seed}, start")
    for step in range(400):
        where = f"seed {seed}, block_size {block_size}, num_blocks {num_blocks}, step {step}"
        op = rng.random()
        if op < 0.55 or not tokens_of:
            # grow a live sequence or start a new one (keys are opaque: mix ints, strings and tuples)
            if tokens_of and rng.random() < 0.6:
                key = rng.choice(list(tokens_of))
            else:
                key = rng.choice([next_key, f"seq-{next_key}", ("req", next_key)])
                next_key += 1
            old_tokens = tokens_of.get(key, 0)
            # mostly small growths, sometimes a big jump past the free pool, sometimes fewer tokens than held
            new_tokens = rng.choice([
                old_tokens + rng.randint(1, 2 * block_size),
                old_tokens + rng.randint(1, (num_blocks + 2) * block_size),
                rng.randint(1, max(1, old_tokens)),
            ])
            have = model.num_blocks_of.get(key, 0)
            want = max(have, ceil_div(new_tokens, block_size))
            assert bm.blocks_needed(new_tokens) == ceil_div(new_tokens, block_size), where
            assert bm.num_extra_blocks(key, new_tokens) == want - have, where
            fits = want - have <= model.free()
            assert bm.can_grow(key, new_tokens) == fits, where
            old_slots = bm.slot_mapping(key, 0, old_tokens)
            if fits:
                table = bm.grow(key, new_tokens)
                assert table == bm.block_table(key), where
                assert len(table) == want, f"{where}: grow to {new_tokens} tokens gave {len(table)} blocks, expected {want}"
                assert bm.slot_mapping(key, 0, old_tokens) == old_slots, f"{where}: grow moved tokens already held"
                model.num_blocks_of[key] = want
                model.tables[key] = list(table)
                tokens_of[key] = max(old_tokens, new_tokens)
            else:
                with pytest.raises(OutOfBlocksError):
                    bm.grow(key, new_tokens)
        elif op < 0.85:
            key = rng.choice(list(tokens_of))
            assert bm.free(key) == model.num_blocks_of.pop(key), where
            del model.tables[key], tokens_of[key]
            assert bm.block_table(key) == [], where
            assert bm.free(key) == 0, f"{where}: freeing twice returned blocks"
        else:
            # slot_mapping over a random sub-range of a live sequence, and past its blocks
            key = rng.choice(list(tokens_of))
            n = tokens_of[key]
            start = rng.randint(0, n)
            end = rng.randint(start, n)
            table = model.tables[key]
            assert bm.slot_mapping(key, start, end) == [table[i // block_size] * block_size + i % block_size
                                                        for i in range(start, end)], where
            with pytest.raises(ValueError):
                bm.slot_mapping(key, 0, len(table) * block_size + 1)
        check_invariants(bm, model, where)
    for key in list(tokens_of):
        assert bm.free(key) == model.num_blocks_of.pop(key), f"seed {seed}"
        del model.tables[key]
    assert bm.num_free_blocks == num_blocks, f"seed {seed}: blocks leaked"
    assert bm.owners() == [], f"seed {seed}"


def test_fill_pool_exactly_then_out_of_blocks(seed):
    rng = random.Random(seed)
    bs = rng.randint(1, 8)
    num_blocks = rng.randint(2, 12)
    bm = BlockManager(num_blocks, bs)
    assert bm.capacity_tokens == num_blocks * bs
    first = rng.randint(1, num_blocks - 1)
    bm.grow("a", first * bs)
    bm.grow("b", (num_blocks - first) * bs - rng.randint(0, bs - 1))  # last block partly used still counts
    assert bm.num_free_blocks == 0, f"seed {seed}"
    tables = {k: list(bm.block_table(k)) for k in "ab"}
    assert sorted(tables["a"] + tables["b"]) == list(range(num_blocks)), f"seed {seed}"

    assert not bm.can_grow("a", first * bs + 1)
    with pytest.raises(OutOfBlocksError):
        bm.grow("a", first * bs + 1)
    with pytest.raises(OutOfBlocksError):
        bm.grow("new", 1)
    # the failed grows changed nothing
    assert {k: bm.block_table(k) for k in "ab"} == tables, f"seed {seed}"
    assert bm.block_table("new") == [] and set(bm.owners()) == {"a", "b"}, f"seed {seed}"
    assert bm.num_free_blocks == 0

    # growing within blocks already held still works on a full pool
    assert bm.can_grow("a", first * bs)
    assert bm.grow("a", first * bs) == tables["a"]

    assert bm.free("a") == first
    assert bm.num_free_blocks == first
    assert len(bm.grow("new", first * bs)) == first  # the freed blocks are reusable
    assert set(bm.block_table("new")).isdisjoint(tables["b"]), f"seed {seed}"


def test_out_of_blocks_is_a_runtime_error():
    bm = BlockManager(2, 4)
    with pytest.raises(RuntimeError, match="2 free"):
        bm.grow(0, 9)
    assert bm.num_free_blocks == 2 and bm.owners() == []


def test_empty_pool_views():
    bm = BlockManager(3, 4)
    assert bm.block_table("nobody") == []
    assert bm.free("nobody") == 0
    assert bm.slot_mapping("nobody", 0, 0) == []
    with pytest.raises(ValueError):
        bm.slot_mapping("nobody", 0, 1)
    assert bm.blocks_needed(0) == 0 and bm.blocks_needed(4) == 1 and bm.blocks_needed(5) == 2


@pytest.mark.parametrize("num_blocks, block_size", [(0, 16), (-1, 16), (8, 0), (8, -4), (0, 0)])
def test_constructor_rejects_bad_sizes(num_blocks, block_size):
    with pytest.raises(ValueError, match="num_blocks >= 1 and block_size >= 1"):
        BlockManager(num_blocks, block_size)


def test_growing_by_nothing_owns_nothing_and_sizes_must_be_integers():
    manager = BlockManager(4, 2)
    assert manager.grow("a", 0) == []
    assert manager.owners() == []
    with pytest.raises(ValueError):
        BlockManager(4, 2.5)
    with pytest.raises(ValueError):
        BlockManager(2.5, 4)
