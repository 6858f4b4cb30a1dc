"""Lab 5 checks: PASS for the references, FAIL with the mistake named for plausible wrong answers."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from minidisagg.course import check
from minidisagg.course.admission_lab import first_fit_in_order, random_handoffs, replay_admission
from minidisagg.course.checking import CheckFailed
from minidisagg.course.grouping_lab import LayerPipeline, fastest_group_size
from minidisagg.course.transfer_lab import LinkModel

GRADING = check.lab5.GRADING


def not_done(*args, **kwargs):
    raise NotImplementedError("Lab 5: not done")


# ---------------------------------------------------------------- Task 1


def one_per_layer(num_layers, layer_compute_s, layer_bytes, link):
    """Plausible: always what kv_overlap=True does, whatever the per-message cost."""
    return 1


def all_after_prefill(num_layers, layer_compute_s, layer_bytes, link):
    """Plausible: one message, the fewest latencies paid."""
    return num_layers


def latency_over_compute(num_layers, layer_compute_s, layer_bytes, link):
    """Plausible: as many layers as their compute covers one latency, ignoring the bytes."""
    return max(1, min(num_layers, math.ceil(link.latency_s / layer_compute_s)))


def test_tail_model_by_hand():
    pipe = LayerPipeline(4, 1.0, 1e9)  # 4 layers of 1 s, 1 GB each, over 1 GB/s
    link = LinkModel("1 GB/s, 2 s per message", 1.0, 2.0)
    assert pipe.tail_s(1, link) == pytest.approx(9.0)  # sends of 3 s from 1 s on, back to back: end 13, prefill 4
    assert pipe.tail_s(2, link) == pytest.approx(6.0)  # 2 -> 6, 6 -> 10
    assert pipe.tail_s(3, link) == pytest.approx(7.0)  # 3 -> 8, 8 -> 11 (the last group holds one layer)
    assert pipe.tail_s(4, link) == pytest.approx(6.0)  # one message of 4 s + 2 s after the prefill
    assert fastest_group_size(4, 1.0, 1e9, link) == 2  # the smallest of the tied best
    with pytest.raises(ValueError, match="group_layers"):
        pipe.tail_s(5, link)


def test_task1_reference_passes_check_and_hidden(capsys):
    assert check.lab5.task1(GRADING.task("Lab 5, Task 1").load_reference(), seed=3)
    assert GRADING.task("Lab 5, Task 1").hidden(fastest_group_size)
    assert capsys.readouterr().out.count("PASS") == 1  # the hidden check does not print


@pytest.mark.parametrize("wrong, says", [
    (one_per_layer, "pay the per-message latency .* too many times"),
    (all_after_prefill, "sending every layer after the prefill hides nothing"),
    (latency_over_compute, "g=4 lands the last byte .* g=8"),
])
def test_task1_wrong_answers_name_the_mistake(wrong, says):
    with pytest.raises(CheckFailed, match=says):
        check.lab5.task1(wrong, seed=0)
    with pytest.raises(CheckFailed, match="Lab 5, Task 1"):
        GRADING.task("Lab 5, Task 1").hidden(wrong)


def test_task1_rejects_a_size_out_of_range():
    with pytest.raises(CheckFailed, match="a whole number of layers"):
        check.lab5.task1(lambda n, c, b, link: 0, seed=0)


# ---------------------------------------------------------------- Task 2


def break_even_brute_force(layout, prefill, link, max_len):
    """Every length checked with the engine's KVLayout byte count."""
    for n in range(1, max_len + 1):
        nbytes = layout.request_nbytes(-(-n // layout.block_size))
        if float(link.seconds(nbytes, layout.num_layers)) >= float(prefill.seconds(n)):
            return n
    return None


def break_even_exact_tokens(layout, prefill, link, max_len):
    """Plausible: counts the prompt's tokens, not the whole blocks that cross the wire."""
    n = np.arange(1, max_len + 1)
    per_token = layout.request_nbytes(1) / layout.block_size
    hit = np.nonzero(link.seconds(n * per_token, layout.num_layers) >= prefill.seconds(n))[0]
    return int(n[hit[0]]) if hit.size else None


def break_even_from_block_size(layout, prefill, link, max_len):
    """Plausible: starts the search at one full block, so it never answers 1."""
    for n in range(layout.block_size, max_len + 1):
        blocks = -(-n // layout.block_size)
        if link.seconds(layout.request_nbytes(blocks), layout.num_layers) >= prefill.seconds(n):
            return n
    return None


def break_even_or_max_len(layout, prefill, link, max_len):
    """Plausible: says max_len when nothing breaks even, instead of None."""
    found = check.lab5.reference_break_even(layout, prefill, link, max_len)
    return max_len if found is None else found


def test_task2_brute_force_passes_check_and_hidden():
    assert check.lab5.task2(break_even_brute_force, cases=15, seed=0)
    assert GRADING.task("Lab 5, Task 2").hidden(GRADING.task("Lab 5, Task 2").load_reference())


@pytest.mark.parametrize("wrong, says", [
    (break_even_exact_tokens, "whole blocks"),
    (break_even_from_block_size, "case 0: .* got 16, expected 1 \\(a one-token prompt already ships slower"),
    (break_even_or_max_len, "case 1: .* got 512, expected None \\(no prompt up to max_len ships slower than it "
                            "prefills: return None\\)"),
])
def test_task2_wrong_answers_name_the_mistake(wrong, says):
    with pytest.raises(CheckFailed, match=says):
        check.lab5.task2(wrong, seed=0)


# ---------------------------------------------------------------- Task 3


def head_of_line(needs_blocks, free_blocks, reserve_blocks):
    """Plausible: stops at the first request that does not fit."""
    spare, out = free_blocks - reserve_blocks, []
    for i, need in enumerate(needs_blocks):
        if need > spare:
            break
        out.append(i)
        spare -= need
    return out


def ignores_reserve(needs_blocks, free_blocks, reserve_blocks):
    """Plausible: fills every free block, leaving the running batch nothing to grow into."""
    return first_fit_in_order(needs_blocks, free_blocks, 0)


def largest_first(needs_blocks, free_blocks, reserve_blocks):
    """Plausible: packs the biggest requests first (fewer, fuller admissions), passing older ones over."""
    spare, out = free_blocks - reserve_blocks, []
    for i in sorted(range(len(needs_blocks)), key=lambda i: -needs_blocks[i]):
        if needs_blocks[i] <= spare:
            out.append(i)
            spare -= needs_blocks[i]
    return out


def test_task3_reference_passes_check_and_hidden():
    assert check.lab5.task3(GRADING.task("Lab 5, Task 3").load_reference(), seed=1)
    assert GRADING.task("Lab 5, Task 3").hidden(first_fit_in_order)


@pytest.mark.parametrize("wrong, says", [
    (head_of_line, "blocks sit idle while a request fits"),
    (ignores_reserve, "eating into the .* reserved for the running batch"),
    (largest_first, "an older request that fits is never passed over"),
])
def test_task3_wrong_answers_name_the_mistake(wrong, says):
    with pytest.raises(CheckFailed, match=says):
        check.lab5.task3(wrong, seed=0)
    with pytest.raises(CheckFailed, match=says):
        GRADING.task("Lab 5, Task 3").hidden(wrong)


def test_replay_counts_preemptions_and_never_overfills():
    handoffs = random_handoffs(60, seed=random.SystemRandom().randrange(1000))
    kept = replay_admission(first_fit_in_order, handoffs, pool_blocks=200)
    assert len(kept.waits) >= 60 and kept.steps > 0
    with pytest.raises(ValueError, match="more blocks than are free"):
        replay_admission(lambda needs, free, reserve: list(range(len(needs))), handoffs, pool_blocks=70)


# ---------------------------------------------------------------- every task


@pytest.mark.parametrize("task", ["task1", "task2", "task3"])
def test_not_implemented_is_a_fail(task, capsys):
    with pytest.raises(CheckFailed, match="not implemented") as info:
        getattr(check.lab5, task)(not_done)
    assert capsys.readouterr().out == ""  # the raised FAIL line is all the learner sees
    assert str(info.value).startswith(f"FAIL  Lab 5, Task {task[-1]}: not implemented yet")
    with pytest.raises(CheckFailed, match="not implemented"):
        GRADING.task(f"Lab 5, Task {task[-1]}").hidden(not_done)


def test_grading_lists_two_design_tasks_four_predictions_two_written():
    assert sum(t.design for t in GRADING.tasks) == 2 and len(GRADING.tasks) == 3
    assert GRADING.predictions == ("Lab 5, Q1", "Lab 5, Q2", "Lab 5, Q3", "Lab 5, Q4") and GRADING.written == ("W1", "W2")


def test_layout_copies_are_measured_and_the_block_major_pool_skips_them():
    from minidisagg.config import TINY
    from minidisagg.course.transfer_lab import measure_layout_copies
    from minidisagg.kv.pages import KVLayout

    prompt_len = random.SystemRandom().randrange(1, 400)
    copies = measure_layout_copies(TINY, torch.float32, "cpu", prompt_len, repeats=2)
    layout = KVLayout(TINY.num_layers, TINY.num_kv_heads, TINY.head_dim, 16, torch.float32)
    assert [c.layout for c in copies] == ["layer_major", "block_major"]
    assert [c.in_place for c in copies] == [False, True]
    assert all(c.num_bytes == layout.request_nbytes(-(-prompt_len // 16)) for c in copies), prompt_len
    assert all(c.gather_s > 0 and c.scatter_s > 0 for c in copies)
    with pytest.raises(ValueError, match="prompt_len"):
        measure_layout_copies(TINY, torch.float32, "cpu", 0)
