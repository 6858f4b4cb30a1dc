"""Cache-aware routing: the per-worker index of block keys, the scoring rule, the metrics, and a 2P1D cluster
whose realised prefix hit rate beats round robin's with the colocated engine's greedy tokens."""

from __future__ import annotations

import math
import random
import re
import threading

import pytest

from minidisagg.config import CacheConfig, EngineConfig
from minidisagg.disagg.prefix_index import CacheAwareIndex, WorkerPrefixIndex, prompt_block_keys
from minidisagg.disagg.router import ROUTING_POLICIES, Router
from minidisagg.engine.sampling import SamplingParams
from minidisagg.kv.block_manager import BlockManager
from test_prefix_cache import FakeSeq, start

GREEDY = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


@pytest.fixture
def seed() -> int:
    return random.SystemRandom().randrange(1 << 30)


def random_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 49_000) for _ in range(n)]


class ReferenceRouter:
    """The documented rule written out over token prefixes (no hashes, no LRU): what each worker was sent."""

    def __init__(self, num_workers: int, block_size: int, load_weight: float) -> None:
        self.seen: list[set[tuple[int, ...]]] = [set() for _ in range(num_workers)]
        self.bs, self.weight = block_size, load_weight

    def overlap(self, w: int, prompt: list[int]) -> int:
        most = (len(prompt) - 1) // self.bs
        return max(j for j in range(most + 1) if j == 0 or tuple(prompt[:j * self.bs]) in self.seen[w])

    def choose(self, prompt: list[int], alive: list[int], queued: list[int]) -> int:
        keys = {w: len(self.seen[w]) for w in alive}  # full-block prefixes held = keys in the index
        w = min(alive, key=lambda w: (-(self.overlap(w, prompt) - self.weight * queued[w] / self.bs), queued[w],
                                      keys[w], w))
        self.seen[w].update(tuple(prompt[:j * self.bs]) for j in range(1, len(prompt) // self.bs + 1))
        return w


# ---- the index and the score ------------------------------------------------------------------------
def test_choices_follow_the_documented_score_on_random_prompts_and_loads(seed):
    rng = random.Random(seed)
    bs, n = rng.choice([1, 2, 4, 16]), rng.randint(2, 4)
    weight = rng.choice([0.0, 0.5, 1.0, 3.0])
    index = CacheAwareIndex(n, bs, capacity_blocks=100_000, load_weight=weight)
    ref = ReferenceRouter(n, bs, weight)
    stems = [random_tokens(rng, rng.randint(0, 6 * bs)) for _ in range(5)]
    routed = predicted = 0
    for step in range(120):
        prompt = rng.choice(stems) + random_tokens(rng, rng.randint(1, 3 * bs))
        if rng.random() < 0.2:  # a later turn: an earlier stem plus more, or a whole prompt again
            prompt = rng.choice(stems) + prompt
        alive = sorted(rng.sample(range(n), rng.randint(1, n)))
        queued = [rng.choice([0, 0, rng.randint(0, 8 * bs)]) for _ in range(n)]
        want_overlaps = {w: ref.overlap(w, prompt) for w in alive}
        want = ref.choose(prompt, alive, queued)
        choice = index.choose(prompt, alive, queued)
        where = f"seed {seed}, step {step}, bs {bs}, weight {weight}"
        assert choice.worker == want, where
        assert choice.overlap_blocks == want_overlaps[want], where
        assert choice.predicted_cached_tokens == want_overlaps[want] * bs, where
        assert choice.score_blocks == pytest.approx(want_overlaps[want] - weight * queued[want] / bs)
        routed += len(prompt)
        predicted += choice.predicted_cached_tokens
    assert index.predicted_hit_rate == pytest.approx(predicted / routed) and predicted > 0, f"seed {seed}"


def test_a_shared_prefix_goes_to_the_worker_that_served_it_unless_its_queue_outweighs_the_hit(seed):
    rng = random.Random(seed)
    bs = 4
    router = Router(3, 2, "cache_aware", block_size=bs, load_weight=1.0)
    systems = [random_tokens(rng, 6 * bs + rng.randrange(bs)) for _ in range(3)]
    home, home_d = {}, {}
    for i, system in enumerate(systems):  # three new prefixes spread over three empty workers
        home[i], home_d[i] = router.pick([0, 0, 0], [0, 0], prompt_token_ids=system + random_tokens(rng, 3))
    assert sorted(home.values()) == [0, 1, 2], f"seed {seed}: prompts that match nowhere go to the emptier caches"
    assert set(home_d.values()) == {0, 1}, f"seed {seed}: the decode side too"
    for _ in range(10):  # later turns find their system prompt's workers, whatever their own tail
        i = rng.randrange(3)
        p, d = router.pick([0, 0, 0], [0, 0], prompt_token_ids=systems[i] + random_tokens(rng, rng.randint(1, 9)))
        assert p == home[i] and d == home_d[i] and router.last_choice.overlap_blocks == 6
        assert router.last_decode_choice.overlap_blocks == 6
    # the home worker is behind by 6 blocks' worth of tokens (the hit): a tie, broken for the smaller queue;
    # one token less and the hit wins; the others' queues are empty
    loads = [0, 0, 0]
    loads[home[0]] = 6 * bs - 1
    assert router.pick(loads, [0, 0], prompt_token_ids=systems[0] + random_tokens(rng, 2))[0] == home[0]
    loads[home[0]] = 6 * bs
    assert router.pick(loads, [0, 0], prompt_token_ids=systems[0] + random_tokens(rng, 2))[0] != home[0]
    # a dead home worker: the prompt goes elsewhere; a failed worker is forgotten whole
    assert router.pick([0, 0, 0], [0, 0], exclude_prefill=[home[1]], prompt_token_ids=systems[1] + [7])[0] != home[1]
    router.forget(home[2])
    assert router.cache_index.workers[home[2]].overlap_blocks(prompt_block_keys(systems[2], bs)) == 0


def test_the_index_forgets_least_recently_used_chains_from_their_tails(seed):
    rng = random.Random(seed)
    bs = 2
    index = WorkerPrefixIndex(capacity_blocks=9)
    chains = [prompt_block_keys(random_tokens(rng, 3 * bs), bs) for _ in range(3)]
    for keys in chains:
        index.insert(keys)
    index.insert(chains[0])  # chain 0 is the most recently used again; chain 1 is the oldest
    assert [index.overlap_blocks(k) for k in chains] == [3, 3, 3] and len(index) == 9
    more = prompt_block_keys(random_tokens(rng, 4 * bs), bs)
    for i, want in enumerate(([3, 2, 3], [3, 1, 3], [3, 0, 3], [3, 0, 2])):
        index.insert(more[:i + 1])
        assert [index.overlap_blocks(k) for k in chains] == want and len(index) == 9
    index.resize(4)  # the pool turned out smaller: keep the 4 most recent keys, heads of chains first
    assert [index.overlap_blocks(k) for k in chains] == [0, 0, 0] and index.overlap_blocks(more) == 4
    index.clear()
    assert len(index) == 0


@pytest.mark.parametrize("num_blocks", [10, 16, 1000])
def test_the_index_sized_to_a_pool_never_forgets_a_block_the_pool_still_holds(seed, num_blocks):
    """Two prefill workers' pools (real ``BlockManager``s) serve what the router sends them, one request at a time.

    The index is an upper bound of what each pool holds (it forgets later than the pool evicts);
    with a pool that never evicts, it is exact.
    """
    rng = random.Random(seed)
    bs = 4
    pools = [BlockManager(num_blocks, bs, enable_prefix_caching=True) for _ in range(2)]
    router = Router(2, 1, "cache_aware", block_size=bs, index_blocks=num_blocks)
    stems = [random_tokens(rng, rng.randint(1, 4) * bs) for _ in range(4)]
    for step in range(150):
        prompt = rng.choice(stems) + random_tokens(rng, rng.randint(1, 2 * bs))
        w = router.pick([0, 0], [0], prompt_token_ids=prompt)[0]
        held = pools[w].cached_prefix(prompt)
        predicted = router.last_choice.overlap_blocks
        assert predicted >= len(held), f"seed {seed}, step {step}: the index forgot what worker {w} holds"
        if num_blocks == 1000:
            assert predicted == len(held), f"seed {seed}, step {step}"
        seq = FakeSeq(step, prompt)
        assert start(pools[w], seq, len(prompt)) == len(held) * bs
        pools[w].free(step)


def test_bad_configuration_is_refused_with_a_clear_message(tiny_loaded):
    from minidisagg.disagg.cluster import DisaggCluster
    from minidisagg.disagg.replicas import ReplicaCluster
    from minidisagg.sim.router import InstancePicker

    assert "cache_aware" in ROUTING_POLICIES
    with pytest.raises(ValueError, match="block_size"):
        Router(2, 1, "cache_aware")
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        Router(2, 1, "cache_aware", block_size=0)
    with pytest.raises(ValueError, match="capacity_blocks must be a positive int"):
        Router(2, 1, "cache_aware", block_size=4, index_blocks=0)
    for weight in (-1.0, math.nan, math.inf, "1"):
        with pytest.raises(ValueError, match="load_weight"):
            Router(2, 1, "cache_aware", block_size=4, load_weight=weight)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prompt_token_ids"):
        Router(2, 1, "cache_aware", block_size=4).pick([0, 0], [0])
    with pytest.raises(ValueError, match="queued_tokens has 1 entries for 2 workers"):
        Router(2, 1, "cache_aware", block_size=4).pick([0], [0], prompt_token_ids=[1, 2, 3])
    with pytest.raises(RuntimeError, match="no prefill worker is alive"):
        Router(2, 1, "cache_aware", block_size=4).pick([0, 0], [0], [0, 1], prompt_token_ids=[1, 2])
    with pytest.raises(ValueError, match="unknown routing policy 'cache'"):
        Router(2, 1, "cache")
    with pytest.raises(ValueError, match="the simulator knows"):
        InstancePicker(2, "cache_aware")
    with pytest.raises(ValueError, match="enable_prefix_caching=True"):
        DisaggCluster(tiny_loaded, EngineConfig(), num_prefill=2, routing="cache_aware")
    with pytest.raises(ValueError, match="replicas take 'least_loaded' or 'round_robin'"):
        ReplicaCluster("tiny", EngineConfig(), ["cpu", "cpu"], routing="cache_aware")


# ---- a 2P1D cluster ---------------------------------------------------------------------------------
def chat_workload(rng: random.Random, bs: int, num_systems: int = 4, turns: int = 5) -> list[list[int]]:
    """``num_systems`` system prompts of 4 full blocks, each with ``turns`` user turns of a partial block, shuffled."""
    systems = [random_tokens(rng, 4 * bs) for _ in range(num_systems)]
    prompts = [s + random_tokens(rng, rng.randint(1, bs - 1)) for s in systems for _ in range(turns)]
    rng.shuffle(prompts)
    return prompts


def run_cluster(loaded, prompts: list[list[int]], routing: str, num_blocks: int):
    from minidisagg.disagg.cluster import DisaggCluster
    from test_disagg_inproc import assert_no_leaks, serve

    config = EngineConfig(batch_invariant=True, cache=CacheConfig(block_size=4, num_blocks=num_blocks,
                                                                  enable_prefix_caching=True))
    cluster = DisaggCluster(loaded, config, num_prefill=2, num_decode=1, routing=routing)
    try:
        outs = [serve(cluster, [p], GREEDY)[0] for p in prompts]  # one at a time: each finds what came before
        assert_no_leaks(cluster)
        return outs, cluster.prefix_hit_rate, cluster.router.predicted_hit_rate
    finally:
        cluster.shutdown()


def test_cache_aware_routing_hits_more_than_round_robin_with_the_colocated_tokens(tiny_loaded, seed):
    from test_disagg_inproc import colocated

    rng = random.Random(seed)
    prompts = chat_workload(rng, bs=4)
    # 12 blocks a worker: two system prompts (8 blocks) fit beside a request's own, three do not
    aware, aware_rate, predicted = run_cluster(tiny_loaded, prompts, "cache_aware", num_blocks=12)
    rr, rr_rate, rr_predicted = run_cluster(tiny_loaded, prompts, "round_robin", num_blocks=12)
    want = colocated(tiny_loaded, prompts, GREEDY)
    assert [o.token_ids for o in aware] == want and [o.token_ids for o in rr] == want, f"seed {seed}"
    for outs, rate in ((aware, aware_rate), (rr, rr_rate)):  # the cluster's rate is its outputs' rate
        assert rate == sum(o.num_cached_tokens for o in outs) / sum(len(o.prompt_token_ids) for o in outs)
    # each system prompt is computed once (4 x 16 of 20 x 17.x tokens missed): the rest is found
    assert aware_rate >= 1 - sum(len(p) - 16 for p in prompts) / sum(map(len, prompts)) - 64 / sum(map(len, prompts))
    assert aware_rate > rr_rate, f"seed {seed}: cache_aware {aware_rate:.3f}, round robin {rr_rate:.3f}"
    assert predicted == pytest.approx(aware_rate) and rr_predicted is None, f"seed {seed}"


def test_the_server_exports_the_realised_and_predicted_hit_rates_and_decode_reuse(tiny_loaded, seed):
    from minidisagg.disagg.cluster import DisaggCluster
    from minidisagg.server.engine_loop import EngineLoop
    from minidisagg.server.metrics import ServerMetrics

    rng = random.Random(seed)
    system = random_tokens(rng, 12)
    config = EngineConfig(batch_invariant=True, cache=CacheConfig(block_size=4, enable_prefix_caching=True))
    cluster = DisaggCluster(tiny_loaded, config, num_prefill=2, num_decode=2, routing="cache_aware")
    metrics = ServerMetrics()
    loop = EngineLoop(cluster, metrics)
    loop.start()
    try:
        for i in range(3):  # one at a time: the second and third find the system prompt where the first left it,
            # on its prefill worker (not computed) and on its decode worker (not sent)
            done = threading.Event()
            loop.submit(f"q{i}", {"prompt_token_ids": system + random_tokens(rng, 2), "prompt": None}, GREEDY,
                        lambda event, done=done: done.set() if event.finished else None)
            assert done.wait(120), "the request did not finish"
    finally:
        loop.stop()
        cluster.shutdown()
    text = metrics.render().decode()
    hit = float(re.search(r"^minidisagg_prefix_cache_hit_tokens_total (\S+)$", text, re.M).group(1))
    prompt = float(re.search(r"^minidisagg_prompt_tokens_total (\S+)$", text, re.M).group(1))
    predicted = float(re.search(r"^minidisagg_router_predicted_prefix_hit_rate (\S+)$", text, re.M).group(1))
    assert (hit, prompt) == (24, 42) and hit / prompt == pytest.approx(cluster.prefix_hit_rate)
    assert predicted == pytest.approx(cluster.router.predicted_hit_rate) == pytest.approx(24 / 42)
    reused = float(re.search(r"^minidisagg_decode_kv_reused_tokens_total (\S+)$", text, re.M).group(1))
    predicted = float(re.search(r"^minidisagg_router_predicted_decode_reuse_rate (\S+)$", text, re.M).group(1))
    assert reused == 24 and reused / prompt == pytest.approx(cluster.decode_reuse_rate)
    assert predicted == pytest.approx(cluster.router.predicted_decode_reuse_rate) == pytest.approx(24 / 42)
