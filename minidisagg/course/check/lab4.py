"""Checks for lab 4 (disaggregation): the KV hand-off and the prefill -> transport -> decode loop.

Both compare against outside references: the prefill pool's own pages (read with
``gather_pages``), the engine's block accounting, and the colocated engine's greedy tokens
in batch-invariant mode, on fresh random prompts over the in-process and the TCP transport.
Every case holds the lengths where a slip shows: a prompt that fills its blocks exactly (the
first output token then needs a new block that has no KV yet), a one-token prompt, and lengths
that leave the last block partly filled.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Optional

import torch

from minidisagg.config import CacheConfig, EngineConfig
from minidisagg.course.checking import CheckResult, failed, not_implemented, passed, task_check
from minidisagg.course.grading import GradedTask, LabGrading
from minidisagg.course.handoff_lab import (
    DisaggPair,
    HandOff,
    fill_random,
    hand_off_kv_reference,
    make_pair,
    scramble_free_blocks,
)
from minidisagg.engine.llm_engine import LLMEngine
from minidisagg.engine.sampling import SamplingParams
from minidisagg.engine.sequence import Sequence
from minidisagg.kv.pages import gather_pages
from minidisagg.models.registry import LoadedModel, load_model
from minidisagg.transport.base import TransferError

NUM_BLOCKS = 96
MAX_LOOP_STEPS = 2000  # far more steps than any check case needs
BLOCK_SIZES = (4, 8, 16)
HIDDEN_BLOCK_SIZES = (2, 5, 32)  # block sizes the notebook's check never draws
ServePrompts = Callable[[DisaggPair, list[list[int]], SamplingParams, HandOff], list[list[int]]]


def _tiny() -> LoadedModel:
    return load_model("tiny", device="cpu", dtype="float32", seed=0)


def prompt_lengths(rng: random.Random, n: int, block_size: int) -> list[int]:
    """``n >= 2`` prompt lengths: a multiple of ``block_size``, one token, then lengths that leave the last block partly filled."""
    lengths = [block_size * rng.randint(1, 4), 1]
    while len(lengths) < n:
        length = rng.randint(2, 6 * block_size)
        if length % block_size:
            lengths.append(length)
    rng.shuffle(lengths)
    return lengths


def _random_prompts(rng: random.Random, n: int, block_size: int, vocab: int) -> list[list[int]]:
    """``n`` random prompts with the lengths of ``prompt_lengths``."""
    return [[rng.randrange(100, min(49000, vocab)) for _ in range(length)]
            for length in prompt_lengths(rng, n, block_size)]


class WatchedSender:
    """A sender that passes every call through and remembers how many tokens each transfer reserved."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.reserved_tokens: dict[str, int] = {}

    def reserve(self, transfer_id: str, num_tokens: int, *args: Any, **kwargs: Any) -> bool:
        """Record the reservation, then make it."""
        self.reserved_tokens[transfer_id] = num_tokens
        return self._inner.reserve(transfer_id, num_tokens, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _reservation_error(sender: WatchedSender, transfer_id: str, seq: Sequence, block_size: int) -> Optional[str]:
    """Why the reservation of ``transfer_id`` cannot hold ``seq``'s pages, or None when it fits them exactly."""
    if transfer_id not in sender.reserved_tokens:
        return "it never reserved room on the decode side (sender.reserve) before sending pages"
    got = int(sender.reserved_tokens[transfer_id])
    want = seq.num_computed_tokens
    got_blocks, want_blocks = -(-got // block_size), len(seq.block_table)
    if got_blocks == want_blocks:
        return None
    return (f"it reserved {got} tokens ({_blocks(got_blocks)} of {block_size}), but the prompt of "
            f"{len(seq.prompt_token_ids)} tokens has KV for {want} tokens (seq.num_computed_tokens) in "
            f"{_blocks(want_blocks)}: the first output token has no KV yet, so reserve what was computed")


def _blocks(count: int) -> str:
    return f"{count} block" if count == 1 else f"{count} blocks"


def colocated_tokens(loaded: LoadedModel, prompts: list[list[int]], params: SamplingParams,
                     block_size: int) -> list[list[int]]:
    """Greedy tokens of the colocated engine in batch-invariant mode (the equivalence oracle)."""
    engine = LLMEngine(loaded, EngineConfig(batch_invariant=True, cache=CacheConfig(block_size=block_size,
                                                                                   num_blocks=NUM_BLOCKS)))
    ids = [engine.add_request({"prompt_token_ids": p}, params) for p in prompts]
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    return [done[i] for i in ids]


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits as integers (so -0.0 != 0.0 and NaN == NaN, as bytes on the wire)."""
    return t.contiguous().view(_INT_OF_SIZE[t.element_size()])


def _first_difference(got: torch.Tensor, want: torch.Tensor, block_size: int) -> str:
    """Where two [layers, 2, blocks, block_size, heads, dim] page stacks first differ, in words."""
    differs = _bits(got) != _bits(want)
    layers = [int(i) for i in differs.flatten(1).any(1).nonzero().flatten()]
    layer = layers[0]
    kv = int(differs[layer].flatten(1).any(1).nonzero()[0])
    block = int(differs[layer, kv].flatten(1).any(1).nonzero()[0])
    err = float((got[layer, kv, block].double() - want[layer, kv, block].double()).abs().max())
    return (f"layer(s) {layers} differ; first: layer {layer} {'KV'[kv]}, block {block} of {got.shape[2]} "
            f"(tokens {block * block_size}..{(block + 1) * block_size - 1}), max |diff| {err:.3g}")


class LoopStuck(RuntimeError):
    """A serving loop kept stepping long after every request could have finished."""


def _limit_steps(worker: object, limit: int) -> None:
    """Make ``worker.step`` raise ``LoopStuck`` after ``limit`` calls, so a loop that never ends fails the check."""
    inner = worker.step  # type: ignore[attr-defined]
    calls = 0

    def step() -> object:
        nonlocal calls
        calls += 1
        if calls > limit:
            raise LoopStuck(f"{type(worker).__name__}.step() was called {limit} times and the loop still runs")
        return inner()

    worker.step = step  # type: ignore[attr-defined]


def _leaks(pair: DisaggPair) -> Optional[str]:
    """Blocks still owned after every request finished and was released, or None."""
    sides = (("prefill", pair.prefill.blocks, "a handed-off sequence never freed with release_handed_off?"),
             ("decode", pair.decode.engine.blocks, "a reservation never committed or cancelled?"))
    for side, blocks, likely in sides:
        if blocks.num_free_blocks != blocks.num_blocks:
            return (f"{blocks.num_blocks - blocks.num_free_blocks} {side} block(s) still owned by {blocks.owners()} "
                    f"after every request finished ({likely})")
    return None


def _prefill_all(pair: DisaggPair, prompts: list[list[int]], params: SamplingParams) -> tuple[list[str], list[Sequence]]:
    handed: list[Sequence] = []
    pair.prefill.handoff = handed.append
    ids = [pair.prefill.add_request({"prompt_token_ids": p}, params) for p in prompts]
    while pair.prefill.has_unfinished():
        pair.prefill.step()
    return ids, handed


@task_check("Lab 4, Task 1")
def task1(hand_off: HandOff, num_cases: int = 4, loaded: Optional[LoadedModel] = None,
          seed: Optional[int] = None, block_sizes: tuple[int, ...] = BLOCK_SIZES) -> CheckResult:
    """Move prefilled requests with ``hand_off``; decode pages must equal the prefill pool's, bit for bit."""
    seed = random.SystemRandom().randrange(1 << 30) if seed is None else seed
    rng = random.Random(seed)
    loaded = loaded or _tiny()
    num_requests = num_bytes = 0
    for case in range(num_cases):
        block_size = rng.choice(block_sizes)
        transport = "inproc" if case % 2 == 0 else "socket"
        prompts = _random_prompts(rng, rng.randint(2, 4), block_size, loaded.config.vocab_size)
        params = SamplingParams(temperature=0, max_tokens=rng.randint(3, 8), ignore_eos=True)
        where = f"case {case + 1} ({transport}, block_size {block_size}, seed {seed})"
        want_tokens = colocated_tokens(loaded, prompts, params, block_size)
        with make_pair(loaded, transport, block_size=block_size, num_blocks=NUM_BLOCKS) as pair:
            for i, cache in enumerate((pair.prefill.kv_cache, pair.decode.engine.kv_cache)):
                fill_random(cache, seed + 2 * case + i)
            scramble_free_blocks(pair.prefill.blocks, rng)
            scramble_free_blocks(pair.decode.engine.blocks, rng)
            ids, handed = _prefill_all(pair, prompts, params)
            sender = WatchedSender(pair.sender)
            for seq in handed:
                n = len(seq.block_table)
                want = gather_pages(pair.prefill.kv_cache, seq.block_table).clone()
                what = f"request of {len(seq.prompt_token_ids)} tokens in {where}"
                transfer_id = f"check-{seq.request_id}"
                try:
                    sent = hand_off(seq, pair.prefill.kv_cache, sender, transfer_id)
                except NotImplementedError as err:
                    return not_implemented("Lab 4, Task 1", err)
                except Exception as err:  # noqa: BLE001 - report whatever the learner's code raised
                    if transfer_id in sender.reserved_tokens and \
                            (wrong := _reservation_error(sender, transfer_id, seq, block_size)) is not None:
                        return failed(f"hand_off raised {type(err).__name__} for the {what}: {wrong}")
                    return failed(f"hand_off raised {type(err).__name__}: {err} ({what})")
                if (wrong := _reservation_error(sender, transfer_id, seq, block_size)) is not None:
                    return failed(f"hand_off of the {what}: {wrong}")
                try:
                    adopted = pair.decode.engine.sequence(seq.request_id)
                except KeyError:
                    return failed(f"the decode side never adopted the {what}: commit its SequenceState "
                                  f"after the last layer")
                got = gather_pages(pair.decode.engine.kv_cache, adopted.block_table[:n])
                if not torch.equal(_bits(got), _bits(want)):
                    return failed(f"decode pool pages differ from the prefill pool's for the {what}: "
                                  f"{_first_difference(got, want, block_size)}")
                expected_bytes = pair.layout.request_nbytes(n)
                if sent != expected_bytes:
                    return failed(f"hand_off returned {sent} bytes for the {what}; its {n} blocks over "
                                  f"{pair.layout.num_layers} layers are {expected_bytes} bytes")
                pair.prefill.release_handed_off(seq)
                num_requests += 1
                num_bytes += sent
            got_tokens = _decode_all(pair, ids, prompts)
            for k, (got_t, want_t) in enumerate(zip(got_tokens, want_tokens)):
                if got_t != want_t:
                    return failed(f"after the hand-off, prompt {k} ({len(prompts[k])} tokens) decoded to {got_t}; "
                                  f"the colocated engine gives {want_t} ({where})")
            if (leak := _leaks(pair)) is not None:
                return failed(f"{leak} ({where})")
    return passed(f"{num_requests} random requests in {num_cases} cases over inproc and TCP (prompts that fill their "
                  f"blocks exactly and one-token prompts included), {num_bytes / 1e6:.2f} MB of pages equal bit for "
                  f"bit, tokens equal colocated, no blocks leaked")


def _decode_all(pair: DisaggPair, ids: list[str], prompts: list[list[int]]) -> list[Optional[list[int]]]:
    """Step the decode worker until it is idle; each request's final tokens (None if it never finished)."""
    for _ in range(10_000):
        if not pair.decode.step():
            break
    done = {o.request_id: o.token_ids for o in pair.outputs if o.finished}
    return [done.get(rid) for rid in ids]


@task_check("Lab 4, Task 2")
def task2(serve_prompts: ServePrompts, num_cases: int = 3, loaded: Optional[LoadedModel] = None,
          seed: Optional[int] = None, block_sizes: tuple[int, ...] = BLOCK_SIZES) -> CheckResult:
    """Serve random prompts with ``serve_prompts``; tokens must equal the colocated engine's, KV must cross."""
    seed = random.SystemRandom().randrange(1 << 30) if seed is None else seed
    rng = random.Random(seed)
    loaded = loaded or _tiny()
    num_prompts = num_tokens = 0
    for case in range(num_cases):
        block_size = rng.choice(block_sizes)
        transport = "inproc" if case % 2 == 0 else "socket"
        prompts = _random_prompts(rng, rng.randint(2, 6), block_size, loaded.config.vocab_size)
        # every third case stops at the first token: such requests finish on the prefill side
        max_tokens = 1 if case % 3 == 2 else rng.randint(2, 10)
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        where = f"case {case + 1} ({transport}, {len(prompts)} prompts, max_tokens {params.max_tokens}, seed {seed})"
        want = colocated_tokens(loaded, prompts, params, block_size)
        with make_pair(loaded, transport, block_size=block_size, num_blocks=NUM_BLOCKS) as pair:
            for worker in (pair.prefill, pair.decode):
                _limit_steps(worker, MAX_LOOP_STEPS)
            try:
                got = serve_prompts(pair, prompts, params, hand_off_kv_reference)
            except NotImplementedError as err:
                return not_implemented("Lab 4, Task 2", err)
            except LoopStuck as err:
                return failed(f"{err}: does serve_prompts stop once every request has finished? ({where})")
            except Exception as err:  # noqa: BLE001
                return failed(f"serve_prompts raised {type(err).__name__}: {err} ({where})")
            if not isinstance(got, list) or len(got) != len(prompts):
                return failed(f"serve_prompts must return one token list per prompt ({len(prompts)}), "
                              f"got {type(got).__name__} of length {len(got) if hasattr(got, '__len__') else '?'}")
            for k, (g, w) in enumerate(zip(got, want)):
                if list(g) != w:
                    return failed(f"prompt {k} ({len(prompts[k])} tokens) gave {list(g)}; the colocated engine "
                                  f"gives {w} ({where})")
            crossed = pair.sender.stats.num_transfers
            expected = len(prompts) if params.max_tokens > 1 else 0
            if crossed != expected:
                return failed(f"{crossed} of {len(prompts)} requests crossed the transport, expected {expected}: "
                              f"every request that needs more than one token must be decoded on the decode side "
                              f"({where})")
            if (leak := _leaks(pair)) is not None:
                return failed(f"{leak} ({where})")
        num_prompts += len(prompts)
        num_tokens += sum(len(t) for t in want)
    return passed(f"{num_prompts} random prompts in {num_cases} cases over inproc and TCP (one-token prompts, prompts "
                  f"that fill their blocks exactly and requests done at their first token included), {num_tokens} "
                  f"tokens equal to the colocated engine's, no blocks leaked")


class BrokenLink(WatchedSender):
    """A sender whose link fails at one layer's send (every call before it goes through)."""

    def __init__(self, inner: Any, fail_at_layer: int) -> None:
        super().__init__(inner)
        self.fail_at_layer = fail_at_layer

    def send_layer(self, transfer_id: str, layer: int, pages: torch.Tensor) -> None:
        """Send, except at ``fail_at_layer``, where the link breaks."""
        if layer == self.fail_at_layer:
            raise TransferError(f"link broke while sending layer {layer}")
        self._inner.send_layer(transfer_id, layer, pages)


def broken_link_case(hand_off: HandOff, loaded: LoadedModel, rng: random.Random) -> None:
    """A send that fails halfway: the hand-off must raise and leave no decode block reserved (FAIL raised otherwise)."""
    with make_pair(loaded, "inproc", block_size=8, num_blocks=NUM_BLOCKS) as pair:
        prompt = [rng.randrange(100, 1000) for _ in range(rng.randint(9, 40))]
        _, handed = _prefill_all(pair, [prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        layer = rng.randrange(1, loaded.config.num_layers)
        sender = BrokenLink(pair.sender, layer)
        try:
            hand_off(handed[0], pair.prefill.kv_cache, sender, "broken-link")
        except NotImplementedError as err:
            not_implemented("Lab 4, Task 1", err)
        except Exception:  # noqa: BLE001 - the failure must reach the caller; what it is does not matter
            pass
        else:
            failed(f"the link broke while sending layer {layer}, yet hand_off returned normally: its caller would "
                   f"believe the request crossed. Let the failure reach the caller")
        held = pair.decode.engine.blocks.num_blocks - pair.decode.engine.blocks.num_free_blocks
        if held:
            failed(f"the link broke while sending layer {layer} and {held} decode block(s) stayed reserved for a "
                   f"request that will never arrive: give the reservation back when a move fails")


def hidden_task1(hand_off: HandOff) -> CheckResult:
    """The grader's cases for Task 1: other block sizes and seeds over both transports, and a link that breaks."""
    result = task1.__wrapped__(hand_off, num_cases=2, block_sizes=HIDDEN_BLOCK_SIZES)  # type: ignore[attr-defined]
    broken_link_case(hand_off, _tiny(), random.Random())
    return passed(f"{result.detail}; a link broken halfway left nothing reserved")


def hidden_task2(serve_prompts: ServePrompts) -> CheckResult:
    """The grader's cases for Task 2: other block sizes and seeds, a request done at its first token included."""
    return task2.__wrapped__(serve_prompts, num_cases=3, block_sizes=HIDDEN_BLOCK_SIZES)  # type: ignore[attr-defined]


GRADING = LabGrading(
    lab=4,
    tasks=(
        GradedTask(task="Lab 4, Task 1", function="hand_off_kv", points=3, hidden=hidden_task1,
                   reference="minidisagg.course.handoff_lab:hand_off_kv_reference", design=True),
        GradedTask(task="Lab 4, Task 2", function="serve_prompts", points=3, hidden=hidden_task2,
                   reference="minidisagg.course.handoff_lab:serve_prompts_reference", design=True),
    ),
    predictions=("Lab 4, Q1", "Lab 4, Q2", "Lab 4, Q3", "Lab 4, Q4"),
    written=("W1", "W2", "W3"),
)
