"""Lab 4 checks: each passes a correct hand-off / serving loop and fails a subtly wrong or missing one."""

from __future__ import annotations

import random
import re

import pytest

from minidisagg.course.checking import CheckFailed
from minidisagg.course.check import lab4
from minidisagg.course.handoff_lab import (
    hand_off_kv_reference,
    make_pair,
    serve_prompts_reference,
)
from minidisagg.engine.sampling import SamplingParams
from minidisagg.engine.sequence import SequenceState
from minidisagg.kv.pages import gather_layer


def _send(seq, cache, sender, transfer_id, block_ids, layers, num_tokens=None):
    """A hand-off that ships the given blocks' pages for the given layers (the wrong versions vary these)."""
    assert sender.reserve(transfer_id, seq.num_computed_tokens if num_tokens is None else num_tokens, 10.0)
    num_bytes = 0
    for layer in layers:
        pages = gather_layer(cache, layer, block_ids)
        sender.send_layer(transfer_id, layer, pages)
        num_bytes += pages.numel() * pages.element_size()
    sender.commit(transfer_id, SequenceState.of(seq), num_bytes, 10.0)
    return num_bytes


def skips_last_layer(seq, cache, sender, transfer_id):
    return _send(seq, cache, sender, transfer_id, seq.block_table, range(cache.model.num_layers - 1))


def pages_of_wrong_blocks(seq, cache, sender, transfer_id):
    """Ships blocks 0..n-1 of the pool instead of the request's own block table."""
    return _send(seq, cache, sender, transfer_id, list(range(len(seq.block_table))), range(cache.model.num_layers))


def reserves_prompt_and_output(seq, cache, sender, transfer_id):
    """Plausible: reserves every token the sequence holds, the first output token too, which has no KV yet.

    Right whenever the prompt leaves its last block partly filled; one block too many when it fills it exactly.
    """
    return _send(seq, cache, sender, transfer_id, seq.block_table, range(cache.model.num_layers),
                 num_tokens=len(seq.prompt_token_ids) + len(seq.output_token_ids))


def never_commits(seq, cache, sender, transfer_id):
    sender.reserve(transfer_id, seq.num_computed_tokens, 10.0)
    for layer in range(cache.model.num_layers):
        sender.send_layer(transfer_id, layer, gather_layer(cache, layer, seq.block_table))
    return 0


def not_done(*_args):
    raise NotImplementedError("Lab 4, Task 1: reserve, send every layer's pages, commit")


def test_task1_passes_the_engine_hand_off(tiny_loaded):
    result = lab4.task1(hand_off_kv_reference, loaded=tiny_loaded)
    assert result.passed and "bit for bit" in result.detail and "fill their blocks exactly" in result.detail


def test_every_case_holds_a_full_last_block_a_one_token_prompt_and_a_partial_one():
    rng = random.Random()
    for _ in range(50):
        block_size = rng.choice(lab4.BLOCK_SIZES)
        lengths = lab4.prompt_lengths(rng, rng.randint(2, 6), block_size)
        assert any(n % block_size == 0 for n in lengths) and 1 in lengths
        assert len(lengths) < 3 or any(n % block_size and n > 1 for n in lengths)


def test_task1_fails_a_reservation_of_prompt_plus_output(tiny_loaded):
    """The bug that used to pass: it shows only on a prompt that fills its last block, which every case has."""
    with pytest.raises(CheckFailed) as info:
        lab4.task1(reserves_prompt_and_output, loaded=tiny_loaded, num_cases=1)
    message = str(info.value)
    assert message.startswith("FAIL  Lab 4, Task 1: hand_off raised ValueError for the request of "), message
    match = re.search(r"it reserved (\d+) tokens \((\d+) blocks? of (\d+)\), but the prompt of (\d+) tokens has KV "
                      r"for (\d+) tokens \(seq.num_computed_tokens\) in (\d+) blocks?: the first output token has no "
                      r"KV yet", message)
    assert match, message
    reserved, reserved_blocks, block_size, prompt, computed, blocks = map(int, match.groups())
    assert reserved == prompt + 1 and computed == prompt and prompt % block_size == 0
    assert reserved_blocks == blocks + 1


@pytest.mark.parametrize("wrong, says", [
    (skips_last_layer, "layer(s) [1] differ"),
    (pages_of_wrong_blocks, "decode pool pages differ"),
    (never_commits, "never adopted"),
    (not_done, "not implemented"),
])
def test_task1_fails_a_wrong_hand_off(tiny_loaded, wrong, says):
    with pytest.raises(CheckFailed, match=re.escape(says)):
        lab4.task1(wrong, loaded=tiny_loaded, num_cases=2)


def serves_colocated(pair, prompts, params, hand_off):
    """Right tokens, wrong architecture: the prefill engine decodes everything itself."""
    ids = [pair.prefill.add_request({"prompt_token_ids": p}, params) for p in prompts]
    done = {}
    while pair.prefill.has_unfinished():
        done.update({o.request_id: o.token_ids for o in pair.prefill.step() if o.finished})
    return [done[i] for i in ids]


def forgets_to_free_prefill_blocks(pair, prompts, params, hand_off):
    """Hands every request off but keeps its prefill blocks."""
    handed = []
    pair.prefill.handoff = handed.append
    ids = [pair.prefill.add_request({"prompt_token_ids": p}, params) for p in prompts]
    done = {}
    while any(i not in done for i in ids):
        done.update({o.request_id: o.token_ids for o in pair.prefill.step() if o.finished})
        for seq in handed:
            hand_off(seq, pair.prefill.kv_cache, pair.sender, f"kv-{seq.request_id}")
        handed.clear()
        pair.decode.step()
        done.update({o.request_id: o.token_ids for o in pair.outputs if o.finished})
    return [done[i] for i in ids]


def never_stops(pair, prompts, params, hand_off):
    """Serves everything, then keeps stepping: it waits for outputs it already consumed."""
    serve_prompts_reference(pair, prompts, params, hand_off)
    while True:
        pair.prefill.step()
        pair.decode.step()


def drops_the_first_token(pair, prompts, params, hand_off):
    return [t[1:] if len(t) > 1 else t for t in serve_prompts_reference(pair, prompts, params, hand_off)]


def test_task2_passes_the_reference_loop(tiny_loaded):
    result = lab4.task2(serve_prompts_reference, loaded=tiny_loaded)
    assert result.passed and "equal to the colocated engine's" in result.detail


@pytest.mark.parametrize("wrong, says", [
    (serves_colocated, "crossed the transport"),
    (forgets_to_free_prefill_blocks, "prefill block"),
    (drops_the_first_token, "the colocated engine gives"),
    (never_stops, "does serve_prompts stop"),
    (lambda *a: (_ for _ in ()).throw(NotImplementedError("Lab 4, Task 2")), "not implemented"),
])
def test_task2_fails_a_wrong_loop(tiny_loaded, wrong, says):
    with pytest.raises(CheckFailed, match=says):
        lab4.task2(wrong, loaded=tiny_loaded, num_cases=2)


@pytest.mark.parametrize("transport", ["inproc", "socket"])
def test_pair_serves_like_the_colocated_engine(tiny_loaded, transport):
    """The helpers the lab builds on: both transports, random prompts, pools left empty."""
    import random

    rng = random.Random()
    prompts = [[rng.randrange(100, 49000) for _ in range(rng.randint(1, 40))] for _ in range(4)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with make_pair(tiny_loaded, transport, block_size=8, num_blocks=64) as pair:
        got = serve_prompts_reference(pair, prompts, params)
        assert got == lab4.colocated_tokens(tiny_loaded, prompts, params, 8)
        assert pair.prefill.blocks.num_free_blocks == 64 and pair.decode.num_free_blocks == 64


def test_make_pair_rejects_an_unknown_transport(tiny_loaded):
    with pytest.raises(ValueError, match="transport"):
        make_pair(tiny_loaded, "pigeon")


def never_cancels(seq, cache, sender, transfer_id):
    """Plausible: the four moves in order, but a failure after the reservation leaves it held."""
    assert sender.reserve(transfer_id, seq.num_computed_tokens, 10.0)
    num_bytes = 0
    for layer in range(cache.model.num_layers):
        pages = gather_layer(cache, layer, seq.block_table)
        sender.send_layer(transfer_id, layer, pages)
        num_bytes += pages.numel() * pages.element_size()
    sender.commit(transfer_id, SequenceState.of(seq), num_bytes, 10.0)
    return num_bytes


def swallows_the_failure(seq, cache, sender, transfer_id):
    """Plausible: cancels on failure, but hides it from the caller."""
    try:
        return hand_off_kv_reference(seq, cache, sender, transfer_id)
    except Exception:  # noqa: BLE001
        return 0


def test_hidden_checks_pass_the_references_quietly(capsys):
    assert lab4.GRADING.task("Lab 4, Task 1").hidden(hand_off_kv_reference).passed
    assert lab4.GRADING.task("Lab 4, Task 2").hidden(serve_prompts_reference).passed
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("wrong, says", [
    (never_cancels, "stayed reserved for a request that will never arrive"),
    (swallows_the_failure, "yet hand_off returned normally"),
    (reserves_prompt_and_output, "the first output token has no KV yet"),
    (not_done, "not implemented"),
])
def test_hidden_task1_names_the_mistake(wrong, says):
    with pytest.raises(CheckFailed, match=says):
        lab4.GRADING.task("Lab 4, Task 1").hidden(wrong)


@pytest.mark.parametrize("wrong, says", [
    (forgets_to_free_prefill_blocks, "prefill block"),
    (serves_colocated, "crossed the transport"),
    (lambda *a: (_ for _ in ()).throw(NotImplementedError("Lab 4, Task 2")), "not implemented"),
])
def test_hidden_task2_names_the_mistake(wrong, says):
    with pytest.raises(CheckFailed, match=says):
        lab4.GRADING.task("Lab 4, Task 2").hidden(wrong)


def test_grading_declares_two_tasks_four_predictions_and_three_written_questions():
    grading = lab4.GRADING
    assert [t.function for t in grading.tasks] == ["hand_off_kv", "serve_prompts"]
    assert all(t.design for t in grading.tasks)
    assert grading.predictions == ("Lab 4, Q1", "Lab 4, Q2", "Lab 4, Q3", "Lab 4, Q4") and grading.written == ("W1", "W2", "W3")
    assert grading.task("Lab 4, Task 1").load_reference() is hand_off_kv_reference
    assert grading.task("Lab 4, Task 2").load_reference() is serve_prompts_reference
