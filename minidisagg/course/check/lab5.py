"""Checks of lab 5 (KV transfer): frames in the engine's wire format, and the break-even prompt length."""

from __future__ import annotations

import random
import socket
import threading
from typing import Any, Callable, Optional, Sequence

import torch

from minidisagg.course.checking import CheckResult, failed, not_implemented, passed, task_check
from minidisagg.course.transfer_lab import LinkModel, PrefillCostModel
from minidisagg.kv.pages import KVLayout
from minidisagg.transport.framing import FrameKind, encode_head, payload_tensor, recv_frame, tensor_memoryview

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def random_pages(rng: random.Random) -> torch.Tensor:
    """Pages [layers, 2, blocks, block_size, kv_heads, head_dim] of odd shapes and random bits (NaNs included)."""
    dtype = rng.choice(DTYPES)
    shape = (rng.randint(1, 5), 2, rng.randint(1, 4), rng.choice((1, 3, 16)), rng.randint(1, 3), rng.choice((1, 5, 64)))
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (torch.Size(shape).numel() * itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).view(shape)


def boundary_pages() -> torch.Tensor:
    """The smallest pages there are: one layer, one block of one token, one head of one bfloat16 element."""
    return torch.tensor([-0.0, 1.5], dtype=torch.bfloat16).view(1, 2, 1, 1, 1, 1)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN payloads included)."""
    return (a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape)
            and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


def engine_frames(pages: torch.Tensor, transfer_id: str,
                  body_bytes: Callable[[torch.Tensor], bytes] = lambda body: bytes(tensor_memoryview(body))) -> list[bytes]:
    """The engine's own LAYER frames for ``pages`` (the header fields the socket transport sends).

    ``body_bytes`` turns one layer's contiguous pages into the payload; the engine's is the tensor's raw memory.
    """
    frames = []
    for layer in range(pages.shape[0]):
        body = pages[layer].contiguous()
        header = {"transfer_id": transfer_id, "layer": layer, "shape": list(body.shape),
                  "dtype": str(body.dtype).removeprefix("torch.")}
        frames.append(encode_head(FrameKind.LAYER, header, body.numel() * body.element_size()) + body_bytes(body))
    return frames


def receive_frames(data: bytes, count: int) -> tuple[list[Any], int]:
    """Feed ``data`` through a real socket into the engine's ``recv_frame`` ``count`` times; (frames, bytes left)."""
    a, b = socket.socketpair()
    writer = threading.Thread(target=lambda: (a.sendall(data), a.shutdown(socket.SHUT_WR)), daemon=True)
    writer.start()
    try:
        frames = [recv_frame(b, timeout_s=10.0) for _ in range(count)]
        leftover = 0
        while chunk := b.recv(1 << 16):
            leftover += len(chunk)
        return frames, leftover
    finally:
        writer.join(10)
        a.close()
        b.close()


def _describe(pages: torch.Tensor) -> str:
    return f"pages {tuple(pages.shape)} {str(pages.dtype).removeprefix('torch.')}"


@task_check("Lab 5, Task 1")
def task1(pages_to_frames: Callable[[torch.Tensor, str], Sequence[bytes]], cases: int = 12, seed: Optional[int] = None) -> CheckResult:
    """``pages_to_frames(pages, transfer_id)``: one LAYER frame per layer that the engine's ``recv_frame`` reads back."""
    rng = random.Random(seed)
    total_bytes = 0
    for case in range(cases):
        pages, tid = random_pages(rng), f"req-{rng.randrange(10**6)}"
        pages = boundary_pages() if case == 0 else pages
        where = f"case {case} ({_describe(pages)}, transfer_id {tid!r})"
        try:
            frames = list(pages_to_frames(pages.clone(), tid))
        except NotImplementedError as err:
            return not_implemented("Lab 5, Task 1", err)
        except Exception as err:  # noqa: BLE001 - the learner sees which pages broke their function
            return failed(f"{where}: pages_to_frames raised {type(err).__name__}: {err}")
        if len(frames) != pages.shape[0]:
            return failed(f"{where}: got {len(frames)} frames, expected one per layer ({pages.shape[0]})")
        try:
            data = b"".join(bytes(f) for f in frames)
            got, leftover = receive_frames(data, len(frames))
        except (ValueError, ConnectionError, TimeoutError, TypeError) as exc:
            return failed(f"{where}: the engine's recv_frame rejects these frames: {exc}")
        if leftover:
            return failed(f"{where}: {leftover} bytes left over after {len(frames)} frames (lengths in the prefix wrong?)")
        for layer, frame in enumerate(got):
            want_header = {"transfer_id": tid, "layer": layer, "shape": list(pages.shape[1:]),
                           "dtype": str(pages.dtype).removeprefix("torch.")}
            if frame.kind != FrameKind.LAYER:
                return failed(f"{where}, frame {layer}: kind {frame.kind.name}, expected LAYER")
            wrong = {k: frame.header.get(k) for k, v in want_header.items() if frame.header.get(k) != v}
            if wrong:
                return failed(f"{where}, frame {layer}: header has {wrong}, expected "
                              f"{ {k: want_header[k] for k in wrong} }")
            try:
                tensor = payload_tensor(frame, pages.dtype, pages.shape[1:])
            except ValueError as exc:
                return failed(f"{where}, frame {layer}: payload does not fit the header: {exc}")
            if not same_bits(tensor, pages[layer]):
                return failed(f"{where}, frame {layer}: payload bytes differ from layer {layer}'s pages")
        total_bytes += len(data)
    return passed(f"{cases} page sets (float32/bfloat16/float16, odd shapes, one layer of one element included), "
                  f"{total_bytes} bytes decoded by "
                  f"the engine's recv_frame + payload_tensor, bit-exact")


@task_check("Lab 5, Task 2")
def task2(frames_to_pages: Callable[[Sequence[bytes]], torch.Tensor], cases: int = 12, seed: Optional[int] = None) -> CheckResult:
    """``frames_to_pages(frames)``: the engine's LAYER frames (in any order) back to the pages, bit-exact."""
    rng = random.Random(seed)
    for case in range(cases):
        pages, tid = random_pages(rng), f"req-{rng.randrange(10**6)}"
        pages = boundary_pages() if case == 0 else pages
        frames = engine_frames(pages, tid)
        order = list(range(len(frames)))
        rng.shuffle(order)
        where = f"case {case} ({_describe(pages)}, frames in order {order})"
        try:
            got = frames_to_pages([frames[i] for i in order])
        except NotImplementedError as err:
            return not_implemented("Lab 5, Task 2", err)
        except Exception as err:  # noqa: BLE001
            return failed(f"{where}: frames_to_pages raised {type(err).__name__}: {err}")
        if not isinstance(got, torch.Tensor):
            return failed(f"{where}: returned {type(got).__name__}, expected a tensor")
        if got.dtype != pages.dtype or tuple(got.shape) != tuple(pages.shape):
            return failed(f"{where}: got {_describe(got)}, expected {_describe(pages)}")
        if not same_bits(got, pages):
            bad = [layer for layer in range(pages.shape[0]) if not same_bits(got[layer], pages[layer])]
            return failed(f"{where}: layers {bad} differ from the pages sent (bit for bit)")
    corrupt = bytearray(engine_frames(random_pages(rng), "bad")[0])
    corrupt[:4] = b"XXXX"
    try:
        frames_to_pages([bytes(corrupt)])
    except NotImplementedError as err:
        return not_implemented("Lab 5, Task 2", err)
    except ValueError:
        pass
    else:
        return failed("a frame with bad magic b'XXXX' was accepted; it must raise ValueError")
    return passed(f"{cases} page sets from the engine's framing (a single frame included), frames shuffled, bit-exact; "
                  f"bad magic rejected")


def reference_break_even(layout: KVLayout, prefill: PrefillCostModel, link: LinkModel, max_len: int) -> Optional[int]:
    """First prompt length whose KV (whole blocks, ``KVLayout.request_nbytes``) takes >= its prefill to ship.

    Transfer time is constant within a block and prefill time grows with n, so only each block's
    first token can be the first to qualify.
    """
    for blocks in range(1, -(-max_len // layout.block_size) + 1):
        n = (blocks - 1) * layout.block_size + 1
        if float(link.seconds(layout.request_nbytes(blocks), layout.num_layers)) >= float(prefill.seconds(n)):
            return n
    return None


def _random_break_even_case(rng: random.Random) -> tuple[KVLayout, PrefillCostModel, LinkModel, int]:
    def draw(low: float, high: float) -> float:
        return low * (high / low) ** rng.random()

    layout = KVLayout(rng.randint(1, 40), rng.choice((1, 2, 3, 8)), rng.choice((16, 64, 128)), rng.choice((8, 16, 32)),
                      rng.choice(DTYPES))
    prefill = PrefillCostModel(draw(1e-5, 1e-1), draw(1e-7, 1e-3), rng.choice((0.0, draw(1e-12, 1e-7))))
    link = LinkModel("random", draw(0.01, 500.0), rng.choice((0.0, draw(1e-7, 1e-4))))
    return layout, prefill, link, rng.choice((512, 4096, 16384))


def _boundary_break_even_case(case: int) -> tuple[KVLayout, PrefillCostModel, LinkModel, int]:
    """Case 0: a link so slow that one token already pays (answer 1); case 1: so fast that none does (None)."""
    layout = KVLayout(2, 2, 64, 16, torch.bfloat16)
    if case == 0:
        return layout, PrefillCostModel(1e-5, 1e-6), LinkModel("slow", 0.001), 512
    return layout, PrefillCostModel(1e-2, 1e-4), LinkModel("fast", 1e4), 512


@task_check("Lab 5, Task 3")
def task3(break_even_prompt_len: Callable[..., Optional[int]], cases: int = 40, seed: Optional[int] = None) -> CheckResult:
    """``break_even_prompt_len(layout, prefill, link, max_len)`` against a block-by-block search with ``KVLayout``."""
    rng = random.Random(seed)
    found = 0
    for case in range(cases):
        layout, prefill, link, max_len = _random_break_even_case(rng)
        if case < 2:
            layout, prefill, link, max_len = _boundary_break_even_case(case)
        want = reference_break_even(layout, prefill, link, max_len)
        try:
            got = break_even_prompt_len(layout, prefill, link, max_len)
        except NotImplementedError as err:
            return not_implemented("Lab 5, Task 3", err)
        except Exception as err:  # noqa: BLE001
            return failed(f"case {case}: {layout}, {prefill}, {link}, max_len={max_len}: "
                          f"break_even_prompt_len raised {type(err).__name__}: {err}")
        if got != want:
            why = ("no prompt up to max_len ships slower than it prefills: return None" if want is None else
                   "a one-token prompt already ships slower than it prefills" if want == 1 else
                   f"KV crosses in whole blocks of {layout.block_size} tokens")
            return failed(f"case {case}: {layout}, {prefill}, {link}, max_len={max_len}: got {got}, expected {want} "
                          f"({why})")
        found += want is not None
    return passed(f"{cases} shapes, prefill costs and links ({found} with a break-even, one at a single token; "
                  f"{cases - found} without), exact match")
