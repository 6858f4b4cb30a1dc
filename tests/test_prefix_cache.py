"""Prefix caching: the hash chain, reference counts, LRU eviction, the scheduler's sharing, and the
engine's greedy tokens with the cache on equal to those with it off."""

from __future__ import annotations

import hashlib
import os
import random
import struct
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from minidisagg.config import CacheConfig
from minidisagg.engine.sampling import SamplingParams
from minidisagg.engine.scheduler import POLICIES, Scheduler, StepBudget, StopRules
from minidisagg.engine.sequence import SequenceStatus
from minidisagg.kv.block_manager import BlockManager
from minidisagg.kv.prefix_cache import hash_block, hash_chain
from test_scheduler import EOS, make_seq, run_plan


@pytest.fixture
def seed() -> int:
    return random.SystemRandom().randrange(1 << 30)


@dataclass
class FakeSeq:
    """What the block manager reads of a sequence: its key, its tokens and how many have KV."""

    seq_id: object
    all_token_ids: list[int]
    num_computed_tokens: int = 0
    table: list[int] = field(default_factory=list)


def reference_key(parent: bytes | None, tokens: list[int]) -> bytes:
    """The documented key, written out independently: BLAKE2b-128 of a tag, the parent key and int64 LE ids."""
    data = (b"\x00" if parent is None else b"\x01" + parent) + b"".join(struct.pack("<q", t) for t in tokens)
    return hashlib.blake2b(data, digest_size=16).digest()


# ---- the hash chain ---------------------------------------------------------------------------------
def test_hash_chain_is_equal_for_equal_prefixes_and_differs_from_the_first_different_block(seed):
    rng = random.Random(seed)
    bs = rng.randint(1, 8)
    n = rng.randint(2, 10)
    tokens = [rng.randrange(50_000) for _ in range(n * bs + rng.randint(0, bs - 1))]
    keys = hash_chain(tokens, bs, n)
    parent = None
    for i in range(n):  # matches the documented formula
        parent = reference_key(parent, tokens[i * bs:(i + 1) * bs])
        assert keys[i] == parent
    assert hash_chain(list(tokens), bs, n) == keys  # deterministic
    j = rng.randrange(n)
    other = list(tokens)
    other[j * bs + rng.randrange(bs)] += 1
    other_keys = hash_chain(other, bs, n)
    assert other_keys[:j] == keys[:j], "blocks before the change keep their keys"
    assert all(a != b for a, b in zip(other_keys[j:], keys[j:])), "the change reaches every later block"
    # the same block tokens under a different parent get a different key (a key names the whole prefix)
    block = tokens[:bs]
    assert hash_block(None, block) != hash_block(keys[0], block)
    assert hash_chain(tokens[bs:2 * bs], bs, 1, parent=keys[0]) == keys[1:2]
    with pytest.raises(ValueError, match="full blocks"):
        hash_chain(tokens[:bs], bs, 2)


def test_hash_chain_is_the_same_in_another_process_whatever_its_hash_seed():
    tokens = list(range(1000, 1032))
    code = ("from minidisagg.kv.prefix_cache import hash_chain; "
            "print(hash_chain(list(range(1000, 1032)), 8, 4)[-1].hex())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == hash_chain(tokens, 8, 4)[-1].hex()


# ---- the allocator ----------------------------------------------------------------------------------
def start(bm: BlockManager, seq: FakeSeq, num_tokens: int) -> int:
    """Admit ``seq`` sharing its longest cached prefix, compute ``num_tokens`` tokens, cache its full blocks."""
    cached = bm.cached_prefix(seq.all_token_ids)
    num_cached = len(cached) * bm.block_size
    table = bm.allocate_slots(seq, num_tokens - num_cached, cached_blocks=cached)
    assert table is not None
    seq.num_computed_tokens = num_tokens
    bm.cache_full_blocks(seq)
    seq.table = list(table)
    return num_cached


def test_sharing_counts_references_and_a_freed_chain_stays_cached_until_reused(seed):
    rng = random.Random(seed)
    bs = 4
    bm = BlockManager(16, bs, enable_prefix_caching=True)
    prefix = [rng.randrange(50_000) for _ in range(3 * bs)]
    a = FakeSeq("a", prefix + [7, 8])
    b = FakeSeq("b", prefix + [9])
    assert start(bm, a, len(a.all_token_ids)) == 0
    assert bm.prefix_cache.num_cached_blocks == 3  # the partial fourth block is not cached
    assert start(bm, b, len(b.all_token_ids)) == 3 * bs
    assert b.table[:3] == a.table[:3] and b.table[3] != a.table[3]
    assert [bm.ref_count(x) for x in a.table] == [2, 2, 2, 1]
    assert bm.num_free_blocks == 16 - 5
    assert bm.free("a") == 4
    assert [bm.ref_count(x) for x in b.table] == [1, 1, 1, 1] and bm.num_free_blocks == 16 - 4
    assert bm.free("b") == 4 and bm.free("b") == 0  # a second free of the same key changes nothing
    assert bm.num_free_blocks == 16 and bm.prefix_cache.num_evictable_blocks == 3
    # a prompt that is exactly the cached blocks still leaves its last token (so its last block) to compute
    c = FakeSeq("c", list(prefix))
    assert start(bm, c, len(prefix)) == 2 * bs
    with pytest.raises(ValueError, match="already has KV"):
        bm.allocate_slots(c, 1, cached_blocks=c.table[:1])
    uncached = [b for b in range(16) if bm.prefix_cache.key_of(b) is None]
    with pytest.raises(ValueError, match="prefix cache holds"):
        bm.allocate_slots(FakeSeq("d", [1] * 9), 1, cached_blocks=uncached[:1])
    bm.free("c")
    assert bm.num_free_blocks == 16


def test_eviction_takes_free_blocks_first_then_the_least_recently_used_tail_first(seed):
    rng = random.Random(seed)
    bs = 2
    bm = BlockManager(10, bs, enable_prefix_caching=True)  # three chains of 3 cached blocks and one free block
    stems = [[rng.randrange(50_000) for _ in range(3 * bs)] for _ in range(3)]
    for i, stem in enumerate(stems):  # three chains of 3 cached blocks; freed in the order a, b, c
        seq = FakeSeq(i, stem + [1])
        start(bm, seq, len(stem) + 1)
        bm.free(i)
    assert bm.prefix_cache.num_evictable_blocks == 9 and bm.num_free_blocks == 10
    # touch chain 0 again: it becomes the most recently used
    again = FakeSeq("again", stems[0] + [5])
    assert start(bm, again, len(stems[0]) + 1) == 3 * bs
    bm.free("again")
    hits = lambda: [len(bm.cached_prefix(stem + [1])) for stem in stems]  # noqa: E731
    assert hits() == [3, 3, 3]
    new = FakeSeq("new", [0] * 20)
    # the free block goes first; then chain 1 (the least recently used now), from its tail
    for want in ([3, 3, 3], [3, 2, 3], [3, 1, 3], [3, 0, 3], [3, 0, 2]):
        bm.allocate_slots(new, bs)
        new.num_computed_tokens += bs
        assert hits() == want
    bm.free("new")
    assert bm.num_free_blocks == 10


def test_a_block_that_was_computed_twice_is_cached_once_and_freed_once(seed):
    rng = random.Random(seed)
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    tokens = [rng.randrange(50_000) for _ in range(9)]
    a, b = FakeSeq("a", tokens), FakeSeq("b", list(tokens))
    for seq in (a, b):  # both admitted before either computed anything: no sharing
        assert bm.allocate_slots(seq, 9, cached_blocks=bm.cached_prefix(seq.all_token_ids)) is not None
    for seq in (a, b):
        seq.num_computed_tokens = 9
        bm.cache_full_blocks(seq)
    assert bm.prefix_cache.num_cached_blocks == 2  # b's copies of the same two blocks stay uncached
    bm.free("a")
    bm.free("b")
    assert bm.num_free_blocks == 8 and bm.prefix_cache.num_evictable_blocks == 2
    assert bm.cached_prefix(tokens) == bm.cached_prefix(list(tokens)) and len(bm.cached_prefix(tokens)) == 2


def check_pool(bm: BlockManager, live: dict[object, FakeSeq], content: dict[int, tuple], where: str) -> None:
    """Counts add up, held blocks are never free or evictable, and every held block holds its holder's tokens."""
    held: dict[int, int] = {}
    for key in bm.owners():
        for block in bm.block_table(key):
            held[block] = held.get(block, 0) + 1
    evictable = set(bm.prefix_cache.evictable_blocks())
    assert set(bm.owners()) == set(live), where
    assert all(bm.ref_count(b) == n for b, n in held.items()), f"{where}: a reference count is off"
    assert not evictable & set(held), f"{where}: a block in use is evictable"
    assert len(held) + bm.num_free_blocks == bm.num_blocks, f"{where}: blocks leaked or were freed twice"
    bs = bm.block_size
    for key, seq in live.items():
        for i, block in enumerate(bm.block_table(key)[: seq.num_computed_tokens // bs]):
            assert content[block] == tuple(seq.all_token_ids[i * bs:(i + 1) * bs]), \
                f"{where}: {key!r}'s block {i} was overwritten by another sequence"


@pytest.mark.parametrize("block_size", [1, 3, 4])
def test_random_sharing_never_hands_a_block_in_use_to_another_sequence(seed, block_size):
    rng = random.Random(seed * 7 + block_size)
    bm = BlockManager(rng.randint(6, 30), block_size, enable_prefix_caching=True)
    stems = [[rng.randrange(3, 60) for _ in range(rng.randint(0, 12))] for _ in range(4)]
    live: dict[object, FakeSeq] = {}
    content: dict[int, tuple] = {}  # what each block's slots hold, written as tokens are "computed"
    bs = block_size
    for step in range(300):
        where = f"seed {seed}, block_size {bs}, step {step}"
        if live and rng.random() < 0.35:
            key = rng.choice(list(live))
            bm.free(key)
            del live[key]
        elif live and rng.random() < 0.5:  # compute a few more tokens of a live sequence
            seq = live[rng.choice(list(live))]
            n = rng.randint(1, 2 * bs)
            if bm.allocate_slots(seq, n) is not None:
                seq.all_token_ids += [rng.randrange(3, 60) for _ in range(max(0, seq.num_computed_tokens + n
                                                                              - len(seq.all_token_ids)))]
                seq.num_computed_tokens += n
        else:  # a new sequence: a shared stem and a tail
            seq = FakeSeq(step, rng.choice(stems) + [rng.randrange(3, 60) for _ in range(rng.randint(1, 6))])
            cached = bm.cached_prefix(seq.all_token_ids)
            for i, block in enumerate(cached):  # a hit holds exactly the tokens it stands for
                assert content[block] == tuple(seq.all_token_ids[i * bs:(i + 1) * bs]), where
            assert len(cached) * bs < len(seq.all_token_ids), where
            num_new = len(seq.all_token_ids) - len(cached) * bs
            if bm.allocate_slots(seq, num_new, cached_blocks=cached) is None:
                continue
            seq.num_computed_tokens = len(seq.all_token_ids)
            live[seq.seq_id] = seq
        for key, seq in live.items():  # write the KV of newly computed tokens, then cache the full blocks
            table = bm.block_table(key)
            for i in range(seq.num_computed_tokens // bs):
                if bm.ref_count(table[i]) == 1 and bm.prefix_cache.key_of(table[i]) is None:
                    content[table[i]] = tuple(seq.all_token_ids[i * bs:(i + 1) * bs])
            bm.cache_full_blocks(seq)
        check_pool(bm, live, content, where)
    for key in list(live):
        bm.free(key)
    assert bm.num_free_blocks == bm.num_blocks and not bm.owners()


def test_the_flag_is_checked():
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        CacheConfig(enable_prefix_caching="yes")  # type: ignore[arg-type]
    assert BlockManager(4, 2).cached_prefix([1, 2, 3, 4, 5]) == []


# ---- the scheduler ----------------------------------------------------------------------------------
def shared_prompt_seqs(rng: random.Random, blocks: BlockManager, n: int, max_tokens: int) -> list:
    stems = [[rng.randrange(3, 1000) for _ in range(rng.randint(4, 30))] for _ in range(3)]
    seqs = []
    for i in range(n):
        seq = make_seq(i, rng.randint(1, 12), blocks, rng, max_tokens, ignore_eos=True)
        seq.prompt_token_ids = rng.choice(stems) + seq.prompt_token_ids
        seqs.append(seq)
    return seqs


def drain_shared(sched: Scheduler, rng: random.Random, max_steps: int = 5000) -> list:
    """Step until no work is left, checking after every step that held blocks are counted right and never free.

    Returns the sequences in the order they finished.
    """
    blocks = sched.blocks
    finished = []
    for step in range(max_steps):
        if not sched.has_work():
            return finished
        plan = sched.schedule()
        assert not plan.is_empty, "work is left but nothing was scheduled"
        assert sum(c.num_tokens for c in plan.prefills) + len(plan.decodes) <= max(
            sched.budget.max_num_batched_tokens, max((c.num_tokens for c in plan.prefills), default=0))
        run_plan(sched, plan, rng, float(step))
        finished += sched.drain_finished()
        held: dict[int, int] = {}
        for key in blocks.owners():
            for block in blocks.block_table(key):
                held[block] = held.get(block, 0) + 1
        assert all(blocks.ref_count(b) == n for b, n in held.items()), "a reference count is off"
        assert not set(blocks.prefix_cache.evictable_blocks()) & set(held), "a block in use is evictable"
        assert len(held) + blocks.num_free_blocks == blocks.num_blocks, "blocks leaked or were freed twice"
    raise AssertionError("the scheduler did not finish its work")


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_with_caching_finishes_everything_and_leaves_every_block_free_or_cached(policy, seed):
    rng = random.Random(seed)
    bs = rng.choice([2, 4])
    longest = -(-(30 + 12 + 12) // bs)  # blocks of the longest sequence: it fits alone, but not many do at once
    blocks = BlockManager(num_blocks=rng.randint(longest, 2 * longest), block_size=bs, enable_prefix_caching=True)
    sched = Scheduler(policy, StepBudget(rng.randint(2, 6), rng.randint(16, 64)), blocks,
                      stop=StopRules(frozenset({EOS}), 10_000))
    seqs = shared_prompt_seqs(rng, blocks, 14, rng.randint(1, 12))
    for seq in seqs[:7]:
        sched.add(seq)
    last = drain_shared(sched, rng)[-1]
    # the next prompt continues the last one to finish: its prompt's full blocks were cached last, so are still there
    seqs[7].prompt_token_ids = last.prompt_token_ids + seqs[7].prompt_token_ids[-3:]
    for seq in seqs[7:]:
        sched.add(seq)
    drain_shared(sched, rng)
    for seq in seqs:
        assert seq.status is SequenceStatus.FINISHED and len(seq.output_token_ids) == seq.params.max_tokens
        assert seq.num_cached_tokens % bs == 0 and seq.num_cached_tokens < len(seq.prompt_token_ids)
    assert blocks.num_free_blocks == blocks.num_blocks and not blocks.owners()
    assert seqs[7].num_cached_tokens >= len(last.prompt_token_ids) // bs * bs > 0, f"seed {seed}"
    assert sched.num_preemptions == sum(s.num_preemptions for s in seqs)


# ---- the engine -------------------------------------------------------------------------------------
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def shared_prefix_prompts(rng: random.Random, n: int, vocab: int) -> list[list[int]]:
    """``n`` prompts, each one of two random stems plus a short random tail (some repeat a whole prompt)."""
    stems = [[rng.randrange(3, vocab) for _ in range(rng.randint(5, 18))] for _ in range(2)]
    prompts: list[list[int]] = []
    for _ in range(n):
        if prompts and rng.random() < 0.2:
            prompts.append(list(rng.choice(prompts)))
        else:
            prompts.append(rng.choice(stems) + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 6))])
    return prompts


def run_engine(loaded, prompts, arrivals, **config):
    """Greedy tokens and outputs of every prompt through one engine on a simulated clock; checks no block leaked."""
    from conftest import make_engine, run_all
    from minidisagg.engine.clock import SimulatedClock

    engine = make_engine(loaded, batch_invariant=True, clock=SimulatedClock(), **config)
    ids = [engine.add_request({"prompt_token_ids": p}, GREEDY, arrival_time=t) for p, t in zip(prompts, arrivals)]
    done = run_all(engine)
    blocks = engine.blocks
    assert blocks.num_free_blocks == blocks.num_blocks and not blocks.owners(), "KV blocks leaked"
    prefill_tokens = sum(s.num_tokens for s in engine.stats.steps if s.stage == "prefill")
    return [done[i] for i in ids], prefill_tokens, engine


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_greedy_tokens_with_prefix_caching_equal_those_without(tiny_loaded, seed, policy):
    rng = random.Random(seed)
    prompts = shared_prefix_prompts(rng, 8, tiny_loaded.config.vocab_size)
    arrivals = sorted(rng.uniform(0, 0.3) for _ in prompts)
    common = dict(policy=policy, block_size=4, max_num_batched_tokens=rng.choice([12, 64]), max_num_seqs=3,
                  num_blocks=rng.choice([9, 64]))  # 9 blocks: preemptions and evictions; 64: neither
    ref, _, _ = run_engine(tiny_loaded, prompts, arrivals, **common)
    outs, prefill_tokens, engine = run_engine(tiny_loaded, prompts, arrivals, enable_prefix_caching=True, **common)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref], f"seed {seed}, {common}"
    assert all(o.num_cached_tokens == 0 for o in ref)
    for o in outs:
        assert o.num_cached_tokens % 4 == 0 and 0 <= o.num_cached_tokens < len(o.prompt_token_ids)
    if not engine.stats.num_preemptions:  # each prefill computed exactly what the cache lacked
        assert prefill_tokens == sum(len(o.prompt_token_ids) - o.num_cached_tokens for o in outs)


def test_on_the_real_model_num_cached_tokens_is_the_longest_prefix_computed_before(smollm2_loaded, seed):
    from conftest import make_engine, run_all  # two tokens a request: the real model is slow in this mode on a CPU

    rng = random.Random(seed + 1)
    bs = rng.choice([2, 4])
    engines = [make_engine(smollm2_loaded, batch_invariant=True, block_size=bs, num_blocks=64,
                           enable_prefix_caching=on) for on in (True, False)]
    computed: set[tuple[int, ...]] = set()  # every full-block prefix whose KV an earlier request computed

    def ask(prompt: list[int]) -> list[int]:
        outs = []
        for engine in engines:
            rid = engine.add_request({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=2))
            outs.append(run_all(engine)[rid])
        assert outs[0].token_ids == outs[1].token_ids, f"seed {seed}: cached KV changed the greedy tokens"
        want = max(j for j in range((len(prompt) - 1) // bs + 1) if j == 0 or tuple(prompt[:j * bs]) in computed)
        assert outs[0].num_cached_tokens == want * bs, f"seed {seed}, prompt {prompt}"
        tokens = prompt + outs[0].token_ids
        computed.update(tuple(tokens[:j * bs]) for j in range(1, (len(tokens) - 1) // bs + 1))  # all KV but the last
        return tokens

    vocab = smollm2_loaded.config.vocab_size
    stem = [rng.randrange(3, vocab) for _ in range(rng.randint(5, 14))]
    first = ask(stem + [rng.randrange(3, vocab)])
    ask(stem + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 4))])  # the same stem, another tail
    ask(first + [rng.randrange(3, vocab) for _ in range(3)])  # a follow-up turn: the first prompt, its reply, more
    assert len(stem) // bs and computed


def test_llm_front_door_reports_cached_tokens_and_the_same_text():
    from minidisagg.llm import LLM

    llm = LLM("tiny", device="cpu", batch_invariant=True, enable_prefix_caching=True, block_size=4)
    plain = LLM("tiny", device="cpu", batch_invariant=True, block_size=4)
    prompt = list(range(100, 121))
    first, second = llm.generate([prompt], GREEDY)[0], llm.generate([prompt], GREEDY)[0]
    assert (first.num_cached_tokens, second.num_cached_tokens) == (0, 20)
    assert first.token_ids == second.token_ids == plain.generate([prompt], GREEDY)[0].token_ids


@pytest.mark.parametrize("overlap", [False, True])
def test_a_disaggregated_prefill_worker_computes_only_what_its_cache_lacks(tiny_loaded, seed, overlap):
    from minidisagg.config import EngineConfig
    from minidisagg.disagg.cluster import DisaggCluster
    from test_disagg_inproc import assert_no_leaks, colocated, serve

    rng = random.Random(seed + 2)
    prompts = shared_prefix_prompts(rng, 6, tiny_loaded.config.vocab_size)
    config = EngineConfig(batch_invariant=True, cache=CacheConfig(block_size=4, enable_prefix_caching=True))
    cluster = DisaggCluster(tiny_loaded, config, overlap=overlap)
    try:
        outs = [serve(cluster, [p], GREEDY)[0] for p in prompts]  # one at a time: each finds the ones before
        assert [o.token_ids for o in outs] == colocated(tiny_loaded, prompts, GREEDY), f"seed {seed}"
        assert outs[0].num_cached_tokens == 0 and any(o.num_cached_tokens for o in outs), f"seed {seed}"
        steps = cluster.prefill_workers[0].engine.stats.steps
        assert sum(s.num_tokens for s in steps) == sum(len(o.prompt_token_ids) - o.num_cached_tokens for o in outs)
        assert_no_leaks(cluster)
    finally:
        cluster.shutdown()


def test_num_cached_tokens_crosses_the_wire_and_a_bad_count_is_refused(tiny_loaded):
    from conftest import make_engine, run_all
    from minidisagg.disagg.serve import output_to_dict
    from minidisagg.disagg.validate import InvalidMessage, MessageLimits, check_output, check_sequence_state
    from minidisagg.engine.sequence import SequenceState

    engine = make_engine(tiny_loaded, block_size=4, enable_prefix_caching=True)
    prompt = list(range(100, 110))
    for _ in range(2):
        rid = engine.add_request({"prompt_token_ids": prompt}, GREEDY)
        out = run_all(engine)[rid]
    assert out.num_cached_tokens == 8
    assert check_output(output_to_dict(out)).num_cached_tokens == 8
    with pytest.raises(InvalidMessage, match="num_cached_tokens"):
        check_output({**output_to_dict(out), "num_cached_tokens": len(prompt)})  # the last token is always computed
    state = SequenceState(rid, prompt, out.token_ids[:1], {"temperature": 0.0}, {"arrival_s": 0.0},
                          num_cached_tokens=8)
    limits = MessageLimits(tiny_loaded.config.vocab_size, 2048)
    assert SequenceState.from_dict(state.to_dict()).num_cached_tokens == 8
    check_sequence_state(state, limits, 1.0)
    with pytest.raises(InvalidMessage, match="num_cached_tokens"):
        check_sequence_state(SequenceState.from_dict({**state.to_dict(), "num_cached_tokens": -4}), limits, 1.0)


def test_socket_workers_take_the_flag_and_report_cached_tokens(tiny_loaded):
    from minidisagg.llm import LLM

    prompt = list(range(200, 221))
    ref = LLM("tiny", device="cpu", batch_invariant=True, block_size=4).generate([prompt], GREEDY)[0].token_ids
    with LLM("tiny", device="cpu", batch_invariant=True, block_size=4, enable_prefix_caching=True, mode="disagg",
             transport="socket") as llm:
        first, second = llm.generate([prompt], GREEDY)[0], llm.generate([prompt + [7]], GREEDY)[0]
        again = llm.generate([prompt], GREEDY)[0]
    assert (first.num_cached_tokens, second.num_cached_tokens, again.num_cached_tokens) == (0, 20, 20)
    assert first.token_ids == again.token_ids == ref
