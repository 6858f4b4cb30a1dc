"""Lab 5 checks: PASS for implementations built from the engine's framing and KVLayout, FAIL for subtly wrong ones."""

from __future__ import annotations

import json
import random
import socket
import threading

import numpy as np
import pytest
import torch

from minidisagg.course import check
from minidisagg.course.checking import CheckFailed
from minidisagg.transport.framing import PREFIX, WIRE_VERSION, FrameKind, payload_tensor, recv_frame, send_frame


def engine_pages_to_frames(pages, transfer_id):
    """Frames captured from the engine's own send_frame on a real socket."""
    frames = []
    for layer in range(pages.shape[0]):
        a, b = socket.socketpair()
        header = {"transfer_id": transfer_id, "layer": layer, "shape": list(pages.shape[1:]),
                  "dtype": str(pages.dtype).removeprefix("torch.")}
        sent = []
        reader = threading.Thread(target=lambda: sent.append(_read_all(b)))
        reader.start()
        send_frame(a, FrameKind.LAYER, header, pages[layer].contiguous())
        a.close()
        reader.join()
        b.close()
        frames.append(sent[0])
    return frames


def _read_all(sock):
    data = bytearray()
    while chunk := sock.recv(1 << 16):
        data += chunk
    return bytes(data)


def engine_frames_to_pages(frames):
    """The engine's recv_frame + payload_tensor over a socket, layers placed by their header."""
    layers = {}
    for data in frames:
        a, b = socket.socketpair()
        writer = threading.Thread(target=lambda: (a.sendall(data), a.close()))
        writer.start()
        try:
            frame = recv_frame(b, timeout_s=10)
        finally:
            writer.join()
            b.close()
        dtype = getattr(torch, frame.header["dtype"])
        layers[frame.header["layer"]] = payload_tensor(frame, dtype, frame.header["shape"]).clone()
    return torch.stack([layers[i] for i in range(len(layers))])


def frames_with_full_shape(pages, transfer_id):
    """Subtly wrong: the header's shape includes the layer dimension."""
    frames = engine_pages_to_frames(pages, transfer_id)
    out = []
    for layer, frame in enumerate(frames):
        _, _, _, _, header_len, payload_len = PREFIX.unpack_from(frame)
        header = json.loads(frame[PREFIX.size:PREFIX.size + header_len])
        header["shape"] = [1, *header["shape"]]
        head = json.dumps(header, separators=(",", ":")).encode()
        out.append(PREFIX.pack(b"MDKV", WIRE_VERSION, int(FrameKind.LAYER), 0, len(head), payload_len) + head
                   + frame[PREFIX.size + header_len:])
    return out


def frames_in_arrival_order(frames):
    """Subtly wrong: stacks layers in the order frames arrive, ignoring the header's layer index."""
    pages = engine_frames_to_pages(frames)
    order = []
    for data in frames:
        _, _, _, _, header_len, _ = PREFIX.unpack_from(data)
        order.append(json.loads(data[PREFIX.size:PREFIX.size + header_len])["layer"])
    return pages[order]


def break_even_brute_force(layout, prefill, link, max_len):
    """Every length checked with the engine's KVLayout byte count."""
    for n in range(1, max_len + 1):
        nbytes = layout.request_nbytes(-(-n // layout.block_size))
        if float(link.seconds(nbytes, layout.num_layers)) >= float(prefill.seconds(n)):
            return n
    return None


def break_even_exact_tokens(layout, prefill, link, max_len):
    """Subtly wrong: counts the prompt's tokens, not the whole blocks that cross the wire."""
    n = np.arange(1, max_len + 1)
    per_token = layout.request_nbytes(1) / layout.block_size
    hit = np.nonzero(link.seconds(n * per_token, layout.num_layers) >= prefill.seconds(n))[0]
    return int(n[hit[0]]) if hit.size else None


def not_done(*args, **kwargs):
    raise NotImplementedError("Lab 5: not done")


@pytest.mark.parametrize("seed", [0, 1])
def test_task1_passes_engine_frames(seed, capsys):
    assert check.lab5.task1(engine_pages_to_frames, cases=6, seed=seed)
    assert "PASS" in capsys.readouterr().out


def test_task1_names_the_wrong_header_field():
    with pytest.raises(CheckFailed, match="shape"):
        check.lab5.task1(frames_with_full_shape, cases=4, seed=0)


def test_task2_passes_engine_decoder():
    assert check.lab5.task2(engine_frames_to_pages, cases=6, seed=0)


def test_task2_catches_ignored_layer_index():
    with pytest.raises(CheckFailed, match="differ"):
        check.lab5.task2(frames_in_arrival_order, cases=12, seed=0)


def test_task3_passes_brute_force():
    assert check.lab5.task3(break_even_brute_force, cases=15, seed=0)


def test_task3_catches_tokens_instead_of_blocks():
    with pytest.raises(CheckFailed, match="whole blocks"):
        check.lab5.task3(break_even_exact_tokens, cases=40, seed=0)


@pytest.mark.parametrize("task", ["task1", "task2", "task3"])
def test_not_implemented_is_a_fail(task, capsys):
    with pytest.raises(CheckFailed, match="not implemented") as info:
        getattr(check.lab5, task)(not_done)
    assert capsys.readouterr().out == ""  # the raised FAIL line is all the learner sees
    assert str(info.value).startswith(f"FAIL  Lab 5, Task {task[-1]}: not implemented yet")


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


def frames_through_numpy(pages, transfer_id):
    """Plausible: bytes via numpy, which has no bfloat16 (the one-element bfloat16 case comes first)."""
    return check.lab5.engine_frames(pages, transfer_id, body_bytes=lambda body: body.numpy().tobytes())


def test_task1_names_the_case_a_learners_exception_came_from():
    with pytest.raises(CheckFailed) as info:
        check.lab5.task1(frames_through_numpy, seed=0)
    assert str(info.value).startswith("FAIL  Lab 5, Task 1: case 0 (pages (1, 2, 1, 1, 1, 1) bfloat16, "
                                      "transfer_id"), str(info.value)
    assert "pages_to_frames raised TypeError" in str(info.value)


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


@pytest.mark.parametrize("wrong, says", [
    (break_even_from_block_size, "case 0: .* got 16, expected 1 \\(a one-token prompt already ships slower"),
    (break_even_or_max_len, "case 1: .* got 512, expected None \\(no prompt up to max_len ships slower than it "
                            "prefills: return None\\)"),
])
def test_task3_fails_at_the_boundaries(wrong, says):
    with pytest.raises(CheckFailed, match=says):
        check.lab5.task3(wrong, seed=0)
