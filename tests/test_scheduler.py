"""The scheduler driven with plain token lists and no model: every policy, preemption, stop rules,
chunked budgets, hand-off and adoption. A fake stage advances each sequence's KV progress the way the
real stages do and "samples" seeded random tokens."""

from __future__ import annotations

import random

import pytest

from minidisagg.engine.batch import PrefillChunk
from minidisagg.engine.sampling import SamplingParams
from minidisagg.engine.scheduler import POLICIES, Scheduler, StepBudget, StepPlan, StopRules
from minidisagg.engine.sequence import Sequence, SequenceStatus
from minidisagg.kv.block_manager import BlockManager
from minidisagg.metrics import RequestTimeline

VOCAB = 1000
EOS = 2


def make_seq(seq_id: int, prompt_len: int, blocks: BlockManager, rng: random.Random, max_tokens: int,
             **params) -> Sequence:
    """A waiting sequence with a random prompt (no EOS in it) whose KV lives in ``blocks``."""
    prompt = [rng.randrange(3, VOCAB) for _ in range(prompt_len)]
    return Sequence(seq_id, f"r{seq_id}", prompt, SamplingParams(temperature=0, max_tokens=max_tokens, **params),
                    RequestTimeline(0.0), blocks=blocks)


def run_plan(sched: Scheduler, plan: StepPlan, rng: random.Random, now_s: float, hand_off: bool = False,
             token_of=None) -> list:
    """Do what the stages do for ``plan`` (KV progress, a token per finished prefill and per decode), then update."""
    token_of = token_of or (lambda seq: rng.randrange(3, VOCAB))
    updates = []
    prefills: list[PrefillChunk] = plan.prefills
    stages = [("prefill", prefills), ("decode", plan.decodes)]
    if not plan.prefill_before_decode:
        stages.reverse()
    for name, work in stages:
        if not work:
            continue
        if name == "prefill":
            seqs = [c.seq for c in work]
            tokens = [token_of(c.seq) if c.is_last else None for c in work]
            for chunk in work:
                check_slots(sched.blocks, chunk.seq, chunk.seq.num_computed_tokens + chunk.num_tokens)
                chunk.seq.num_computed_tokens += chunk.num_tokens
        else:
            seqs = list(work)
            tokens = [token_of(s) for s in work]
            for seq in work:
                assert seq.num_prefill_tokens_left == 1, f"{seq.request_id} decoded without its KV"
                check_slots(sched.blocks, seq, seq.num_tokens)
                seq.num_computed_tokens += 1
        updates.append(sched.update_from_output(seqs, tokens, now_s, hand_off=hand_off))
    return updates


def check_slots(blocks: BlockManager, seq: Sequence, num_tokens: int) -> None:
    """The sequence's blocks hold slots for its first ``num_tokens`` tokens."""
    assert len(seq.block_table) * blocks.block_size >= num_tokens, (seq.request_id, seq.block_table, num_tokens)


def check_pool(blocks: BlockManager) -> None:
    """No block is owned twice or both owned and free."""
    owned = [b for key in blocks.owners() for b in blocks.block_table(key)]
    assert len(owned) == len(set(owned)), "a block is owned twice"
    assert len(owned) + blocks.num_free_blocks == blocks.num_blocks, "blocks leaked or were freed twice"


def drain(sched: Scheduler, rng: random.Random, max_steps: int = 5000, start_s: float = 0.0, **kwargs) -> list[Sequence]:
    """Step until no work is left; returns the finished sequences, checking the pool and the budget at every step."""
    finished = []
    for step in range(max_steps):
        if not sched.has_work():
            return finished
        plan = sched.schedule()
        assert not plan.is_empty, "work is left but nothing was scheduled"
        assert len(plan.prefills) + len(plan.decodes) <= sched.budget.max_num_seqs
        run_plan(sched, plan, rng, start_s + step, **kwargs)
        finished += sched.drain_finished()
        check_pool(sched.blocks)
    raise AssertionError("the scheduler did not finish its work")


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_finishes_every_request_with_its_length_and_returns_every_block(policy, seed):
    rng = random.Random(seed)
    blocks = BlockManager(num_blocks=rng.randint(40, 80), block_size=rng.choice([4, 8, 16]))
    sched = Scheduler(policy, StepBudget(rng.randint(2, 8), rng.randint(32, 256)), blocks,
                      stop=StopRules(frozenset({EOS}), 10_000))
    seqs = [make_seq(i, rng.randint(1, 60), blocks, rng, rng.randint(1, 20), ignore_eos=True) for i in range(12)]
    for seq in seqs:
        sched.add(seq)
    finished = drain(sched, rng)
    assert sorted(s.seq_id for s in finished) == list(range(12))
    for seq in seqs:
        assert seq.status is SequenceStatus.FINISHED and seq.finish_reason == "length"
        assert len(seq.output_token_ids) == seq.params.max_tokens, seq.request_id
        assert seq.block_table == []
    assert blocks.num_free_blocks == blocks.num_blocks


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_a_pool_too_small_for_every_decode_preempts_and_recomputes(policy, seed):
    rng = random.Random(seed + 1)
    block_size = 4
    blocks = BlockManager(num_blocks=12, block_size=block_size)  # 48 slots for 6 sequences that grow to 20 tokens
    sched = Scheduler(policy, StepBudget(6, 64), blocks)
    seqs = [make_seq(i, 8, blocks, rng, 12, ignore_eos=True) for i in range(6)]
    for seq in seqs:
        sched.add(seq)
    drain(sched, rng)
    assert sched.num_preemptions > 0, "the pool was large enough: nothing was preempted"
    assert sum(s.num_preemptions for s in seqs) == sched.num_preemptions
    assert all(len(s.output_token_ids) == 12 and s.finish_reason == "length" for s in seqs)
    assert blocks.num_free_blocks == blocks.num_blocks


def test_a_prompt_the_whole_pool_cannot_hold_finishes_with_length(seed):
    rng = random.Random(seed + 2)
    blocks = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler("prefill_first", StepBudget(4, 1000), blocks)
    big, small = make_seq(0, 17, blocks, rng, 4), make_seq(1, 3, blocks, rng, 2, ignore_eos=True)
    sched.add(big)
    sched.add(small)
    drain(sched, rng)
    assert big.finish_reason == "length" and big.output_token_ids == []
    assert small.finish_reason == "length" and len(small.output_token_ids) == 2


def test_chunked_steps_stay_within_the_token_budget_and_split_long_prompts(seed):
    rng = random.Random(seed + 3)
    budget_tokens = rng.randint(16, 48)
    blocks = BlockManager(num_blocks=200, block_size=8)
    sched = Scheduler("chunked", StepBudget(8, budget_tokens), blocks)
    seqs = [make_seq(i, rng.randint(budget_tokens + 1, 4 * budget_tokens), blocks, rng, 6, ignore_eos=True)
            for i in range(4)]
    for seq in seqs:
        sched.add(seq)
    chunk_counts = {s.seq_id: 0 for s in seqs}
    for step in range(1000):
        if not sched.has_work():
            break
        plan = sched.schedule()
        tokens = sum(c.num_tokens for c in plan.prefills) + len(plan.decodes)
        assert tokens <= budget_tokens, f"step {step}: {tokens} tokens for a budget of {budget_tokens}"
        for chunk in plan.prefills:
            chunk_counts[chunk.seq.seq_id] += 1
        run_plan(sched, plan, rng, float(step))
        sched.drain_finished()
    assert all(count >= 2 for count in chunk_counts.values()), f"a long prompt was not split: {chunk_counts}"
    assert all(len(s.output_token_ids) == 6 for s in seqs)


def scripted(tokens_by_seq: dict[int, list[int]]):
    """A token source that gives each sequence its scripted tokens in order."""
    def token_of(seq: Sequence) -> int:
        return tokens_by_seq[seq.seq_id][len(seq.output_token_ids)]
    return token_of


def test_stop_rules_eos_stop_ids_stop_strings_max_tokens_and_context(seed):
    rng = random.Random(seed + 4)
    blocks = BlockManager(num_blocks=64, block_size=4)
    hits: list[str] = []

    def stop_string_hit(seq: Sequence) -> bool:
        hits.append(seq.request_id)
        return 777 in seq.output_token_ids  # this test's "text" holds the stop string once token 777 is out

    sched = Scheduler("decode_first", StepBudget(8, 256), blocks, stop=StopRules(frozenset({EOS}), 20, stop_string_hit))
    filler = [rng.randrange(3, 700) for _ in range(30)]
    cases = {
        0: (make_seq(0, 5, blocks, rng, 10), filler[:3] + [EOS] + filler, "stop", 4),
        1: (make_seq(1, 5, blocks, rng, 10, ignore_eos=True), filler[:3] + [EOS] + filler, "length", 10),
        2: (make_seq(2, 5, blocks, rng, 10, stop_token_ids=[555]), filler[:2] + [555] + filler, "stop", 3),
        3: (make_seq(3, 5, blocks, rng, 10, stop=["x"]), filler[:5] + [777] + filler, "stop", 6),
        4: (make_seq(4, 5, blocks, rng, 4), filler, "length", 4),
        5: (make_seq(5, 15, blocks, rng, 100), filler, "length", 5),  # the context of 20 tokens ends it
    }
    for seq, *_ in cases.values():
        sched.add(seq)
    drain(sched, rng, token_of=scripted({i: c[1] for i, c in cases.items()}))
    for i, (seq, _, reason, length) in cases.items():
        assert (seq.finish_reason, len(seq.output_token_ids)) == (reason, length), f"case {i}"
    assert "r3" in hits and "r0" not in hits, "stop strings were checked for a request without any"


def test_hand_off_keeps_the_blocks_until_released_and_adopt_decodes(seed):
    rng = random.Random(seed + 5)
    prefill_blocks, decode_blocks = BlockManager(32, 4), BlockManager(32, 4)
    prefill = Scheduler("prefill_first", StepBudget(4, 256), prefill_blocks)
    seq = make_seq(0, rng.randint(5, 30), prefill_blocks, rng, 8, ignore_eos=True)
    prefill.add(seq)
    (update,) = run_plan(prefill, prefill.schedule(), rng, 1.0, hand_off=True)
    assert update.handed_off == [seq] and seq.status is SequenceStatus.HANDED_OFF
    assert not prefill.has_work() and len(seq.output_token_ids) == 1
    held = list(seq.block_table)
    assert held and prefill_blocks.num_free_blocks == 32 - len(held), "handing off freed the blocks too early"
    prefill.release_handed_off(seq)
    assert seq.finish_reason == "handed_off" and prefill_blocks.num_free_blocks == 32

    # The decode side: the KV arrives into a reservation that becomes the sequence's blocks.
    decode = Scheduler("decode_first", StepBudget(4, 256), decode_blocks)
    computed = seq.num_tokens - 1
    decode_blocks.grow("incoming", computed)
    adopted = Sequence(7, seq.request_id, list(seq.prompt_token_ids), seq.params, seq.timeline,
                       output_token_ids=list(seq.output_token_ids), num_computed_tokens=computed, blocks=decode_blocks)
    decode_blocks.rename("incoming", adopted.seq_id)
    decode.adopt(adopted)
    drain(decode, rng, start_s=2.0)
    assert adopted.finish_reason == "length" and len(adopted.output_token_ids) == 8
    assert decode_blocks.num_free_blocks == 32


def test_adopt_refuses_a_sequence_whose_kv_is_missing(seed):
    rng = random.Random(seed + 6)
    blocks = BlockManager(8, 4)
    sched = Scheduler("decode_first", StepBudget(4, 64), blocks)
    seq = make_seq(0, 9, blocks, rng, 4)
    seq.output_token_ids.append(5)
    seq.num_computed_tokens = 9
    with pytest.raises(ValueError, match="cannot hold"):
        sched.adopt(seq)  # it owns no blocks
    seq.num_computed_tokens = 3
    with pytest.raises(ValueError, match="lack KV"):
        sched.adopt(seq)
    assert not sched.has_work()


def test_allocate_slots_is_all_or_nothing(seed):
    rng = random.Random(seed + 7)
    bs = rng.choice([2, 4, 8])
    blocks = BlockManager(6, bs)
    seq = make_seq(0, 3 * bs, blocks, rng, 4)
    assert blocks.allocate_slots(seq, 7 * bs) is None and blocks.num_free_blocks == 6 and seq.block_table == []
    table = blocks.allocate_slots(seq, 3 * bs)
    assert table == seq.block_table and len(table) == 3
    seq.num_computed_tokens = 3 * bs
    assert blocks.allocate_slots(seq, 1, lookahead=2 * bs) is not None and len(seq.block_table) == 6
    assert blocks.allocate_slots(seq, 3 * bs + 1) is None and len(seq.block_table) == 6
    with pytest.raises(ValueError):
        blocks.allocate_slots(seq, -1)


def test_only_the_block_manager_writes_block_tables(seed):
    rng = random.Random(seed + 8)
    blocks = BlockManager(8, 4)
    seq = make_seq(0, 5, blocks, rng, 4)
    with pytest.raises(AttributeError):
        seq.block_table = [1, 2]  # a read-only view of the pool's table


def test_the_engine_does_not_touch_the_schedulers_queues():
    import inspect

    from minidisagg.engine import llm_engine

    source = inspect.getsource(llm_engine)
    for private_use in ("scheduler.running", "scheduler.waiting", "scheduler.finished", ".block_table ="):
        assert private_use not in source, f"llm_engine.py uses {private_use}"


def test_update_ignores_prefill_chunks_without_a_token(seed):
    rng = random.Random(seed + 9)
    blocks = BlockManager(32, 4)
    sched = Scheduler("chunked", StepBudget(4, 8), blocks)
    seq = make_seq(0, 20, blocks, rng, 3, ignore_eos=True)
    sched.add(seq)
    plan = sched.schedule()
    assert [c.num_tokens for c in plan.prefills] == [8] and not plan.prefills[0].is_last
    (update,) = run_plan(sched, plan, rng, 0.5)
    assert update.touched == [] and seq.status is SequenceStatus.WAITING and seq.num_computed_tokens == 8
    assert seq.timeline.prefill_end_s is None
