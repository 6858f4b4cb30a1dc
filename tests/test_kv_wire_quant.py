"""KV pages quantised for the wire (``kv_wire_dtype``): error bounds, bytes, corrupt frames, and whole runs."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from conftest import token_prompts
from minidisagg import LLM, SamplingParams
from minidisagg.config import CacheConfig, EngineConfig, LinkConfig
from minidisagg.disagg.serve import DecodeServer
from minidisagg.engine.sequence import SequenceState
from minidisagg.kv.wire_quant import (QMAX, WireFormatError, WireMessage, channel_scales, check_wire_dtype, value_scales,
                                      wire_nbytes)
from minidisagg.transport.framing import FrameKind, recv_frame, send_frame
from minidisagg.transport.socket import SocketSender, make_hello

POOL_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HALF_ULP = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # relative rounding
SHAPES = [(2, 3, 16, 2, 32), (4, 2, 3, 8, 3, 64), (3, 5, 2, 16, 1, 16)]  # one layer; stacked layers; block first
WAIT_S = 30.0


def random_pages(shape, dtype, gen) -> torch.Tensor:
    """Normal pages whose magnitude differs per (…, block, head) by orders of magnitude, with a few outliers."""
    x = torch.randn(shape, generator=gen)
    x = x * torch.exp(2 * torch.randn((*shape[:-3], 1, shape[-2], 1), generator=gen))
    outliers = torch.rand(shape, generator=gen) < 1e-3
    return torch.where(outliers, x * 20, x).to(dtype)


def reference_scales(pages: torch.Tensor, wire_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(head scales [..., heads], channel scales [..., heads, head_dim]) by another route, in float64:
    head absmax / qmax, and the smallest head_scale * 2 ** (-k / 32), k in 0..255, at or above each
    channel's absmax / qmax (k = 255 for a channel quieter than that)."""
    x = pages.double().abs().transpose(-3, -2).transpose(-2, -1)  # [..., heads, head_dim, block_size]
    channel = x.max(dim=-1).values / QMAX[wire_dtype]
    head = channel.max(dim=-1).values
    levels = head.unsqueeze(-1).unsqueeze(-1) * 2.0 ** (-torch.arange(256, dtype=torch.float64) / 32)
    k = (levels >= channel.unsqueeze(-1)).sum(-1).clamp(1, 256) - 1  # levels fall with k: count those high enough
    return head, levels.expand(*k.shape, 256).gather(-1, k.unsqueeze(-1)).squeeze(-1)


def check_scales(message: WireMessage, pages: torch.Tensor, wire_dtype: str, seed: int) -> torch.Tensor:
    """The message's scales against ``reference_scales`` (float32 rounding apart), and its token codes against
    the same rule for each token's values over their channel scales; the per-value scales."""
    _, head_scales, codes, token_codes = message.parts()
    head, channel = reference_scales(pages, wire_dtype)
    assert torch.equal(head_scales, (pages.float().abs().amax(dim=(-3, -1)) / QMAX[wire_dtype])), f"seed {seed}"
    assert torch.allclose(head_scales.double(), head, rtol=2.0**-23, atol=0), f"seed {seed}"
    scales = channel_scales(head_scales, codes).double()
    exact = torch.isclose(scales, channel, rtol=2.0**-21, atol=0)
    assert float(exact.double().mean()) > 0.99, f"seed {seed}: codes other than the smallest step that fits"
    # where float32 rounding decided otherwise, one level coarser at most, and never too fine for the channel
    assert bool((scales <= channel * 2.0 ** (1 / 32) * (1 + 2.0**-20)).all()), f"seed {seed}"
    amax = pages.double().abs().amax(dim=-3) / QMAX[wire_dtype]
    assert bool((scales >= amax * (1 - 2.0**-22)).all()), f"seed {seed}: a channel's step too small for it"
    fitted = scales.float().unsqueeze(-3)
    token_amax = (pages.float() / torch.where(fitted > 0, fitted, 1.0)).abs().amax(dim=-1).double() / QMAX[wire_dtype]
    token_step = 2.0 ** (-token_codes.double() / 32)
    assert bool((token_step >= token_amax * (1 - 2.0**-22)).all()), f"seed {seed}: a token's step too small for it"
    assert bool(((token_step <= token_amax * 2.0 ** (1 / 32) * (1 + 2.0**-20)) | (token_codes == 255)).all()), \
        f"seed {seed}: a token's step coarser than it needs"
    return value_scales(head_scales, codes, token_codes)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", POOL_DTYPES)
def test_int8_round_trip_is_within_half_a_step(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    pages = random_pages(shape, dtype, gen)
    message = WireMessage.encode(pages, "int8")
    values, _, codes, token_codes = message.parts()
    assert values.dtype == torch.int8 and tuple(values.shape) == shape and codes.dtype == token_codes.dtype == torch.uint8
    scales = check_scales(message, pages, "int8", seed)
    assert int(values.abs().max()) == 127, f"seed {seed}: the largest value of each block-head maps to 127"
    used = values.abs().amax(dim=-1)[token_codes < 255]  # each token of each head spends (nearly) all of int8
    assert int(used.min()) >= 124, f"seed {seed}"
    out = message.decode(dtype)
    assert out.dtype == dtype and out.shape == pages.shape
    x, got = pages.float(), out.float()
    bound = scales / 2 + got.abs() * HALF_ULP[dtype] + x.abs() * 2.0**-21
    assert bool(((got - x).abs() <= bound).all()), f"seed {seed}: {float(((got - x).abs() - bound).max())} over"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", POOL_DTYPES)
def test_fp8_round_trip_is_within_its_relative_bound(shape, dtype, seed):
    """e4m3 keeps 3 mantissa bits: 2**-4 relative, or half its subnormal step (2**-10 of the scale) near zero."""
    gen = torch.Generator().manual_seed(seed)
    pages = random_pages(shape, dtype, gen)
    message = WireMessage.encode(pages, "fp8_e4m3")
    values = message.parts()[0]
    assert values.dtype == torch.float8_e4m3fn
    scales = check_scales(message, pages, "fp8_e4m3", seed)
    assert float(values.float().abs().max()) == 448.0, f"seed {seed}: absmax maps to 448"
    x, got = pages.float(), message.decode(dtype).float()
    bound = x.abs() * 2.0**-4 + scales * 2.0**-10 + got.abs() * HALF_ULP[dtype] + x.abs() * 2.0**-20
    assert bool(((got - x).abs() <= bound).all()), f"seed {seed}"
    # the largest magnitude of every block-head comes back (its value's scale is the head's; 448 is exact in e4m3)
    amax = x.transpose(-3, -2).flatten(-2).abs().max(-1).values
    back = got.transpose(-3, -2).flatten(-2).abs().max(-1).values
    assert torch.allclose(back, amax, rtol=HALF_ULP[dtype] * 2 + 2.0**-20, atol=0), f"seed {seed}"


@pytest.mark.parametrize("wire_dtype", ["int8", "fp8_e4m3"])
def test_loud_channels_leave_the_quiet_ones_their_precision(wire_dtype, seed):
    """RoPE'd keys: a few channels ~30x louder in every token. Each channel's error stays within its own step,
    about 1/30 of what one scale per block-head (the loud channels' step) would allow."""
    gen = torch.Generator().manual_seed(seed)
    shape = (4, 2, 3, 16, 3, 64)
    pages = torch.randn(shape, generator=gen)
    loud = torch.rand(shape[-1], generator=gen).argsort()[:4]  # 4 of 64 channels
    pages[..., loud] *= 30 * (1 + torch.rand(shape[-1], generator=gen)[loud])
    message = WireMessage.encode(pages, wire_dtype)
    got = message.decode(torch.float32)
    quiet = torch.ones(shape[-1], dtype=torch.bool)
    quiet[loud] = False
    channel_amax = pages.abs().amax(dim=-3, keepdim=True)
    head_step = pages.abs().amax(dim=(-3, -1), keepdim=True) / QMAX[wire_dtype]
    relative = 2.0**-4 if wire_dtype == "fp8_e4m3" else 0.0
    own_bound = (channel_amax / QMAX[wire_dtype] * 2.0 ** (1 / 32) * (0.5 if wire_dtype == "int8" else 2.0**-10)
                 + pages.abs() * relative) * (1 + 2.0**-20)
    error = (got - pages).abs()
    assert bool((error <= own_bound).all()), f"seed {seed}: {float((error - own_bound).max())} over"
    if wire_dtype == "int8":  # one scale per block-head: errors up to head_step / 2 in the quiet channels too
        per_head = (pages / head_step).round() * head_step
        assert float((per_head - pages).abs()[..., quiet].max()) > 8 * float(error[..., quiet].max()), f"seed {seed}"


@pytest.mark.parametrize("wire_dtype", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("dtype", POOL_DTYPES)
def test_zero_blocks_get_scale_zero_and_come_back_zero(wire_dtype, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    pages = random_pages((2, 4, 16, 3, 32), dtype, gen)
    pages[0, 1] = 0  # a whole block of K
    pages[1, 2, :, 1] = 0  # one head of one block of V
    message = WireMessage.encode(pages, wire_dtype)
    _, scales, codes, token_codes = message.parts()
    assert bool((scales[0, 1] == 0).all()) and float(scales[1, 2, 1]) == 0.0 and bool((scales[0, 0] > 0).all())
    assert bool((codes[0, 1] == 255).all()) and bool((codes[1, 2, 1] == 255).all())
    assert bool((token_codes[0, 1] == 255).all()) and bool((token_codes[1, 2, :, 1] == 255).all())
    out = message.decode(dtype)
    assert bool(torch.isfinite(out).all())
    assert bool((out[0, 1] == 0).all()) and bool((out[1, 2, :, 1] == 0).all())
    zeros = torch.zeros(2, 1, 16, 3, 32, dtype=dtype)
    assert torch.equal(WireMessage.encode(zeros, wire_dtype).decode(dtype), zeros)


def test_bytes_on_the_wire_match_the_formula():
    # smollm2-135m: 30 layers, 3 KV heads, head dim 64, blocks of 16 tokens; a 10-block request
    shape = (30, 2, 10, 16, 3, 64)
    numel = 30 * 2 * 10 * 16 * 3 * 64
    scales = 30 * 2 * 10 * 3  # one per (layer, K/V, block, head), float32
    codes = scales * (64 + 16)  # one per (layer, K/V, block, head, channel) and per (..., token, head), uint8
    for wire in ("int8", "fp8_e4m3"):
        message = WireMessage.encode(torch.randn(shape), wire)
        assert message.nbytes == wire_nbytes(shape, wire, torch.float32) == numel + 4 * scales + codes
        assert message.nbytes / (numel * 4) == pytest.approx((1024 + 84) / 4096) and message.nbytes / (numel * 4) <= 0.30
        assert message.nbytes / (numel * 2) == pytest.approx((1024 + 84) / 2048) and message.nbytes / (numel * 2) <= 0.55
    assert wire_nbytes(shape, "auto", torch.bfloat16) == numel * 2


def test_malformed_messages_are_rejected_clearly():
    pages = torch.randn(2, 3, 16, 2, 32)
    good = WireMessage.encode(pages, "int8")
    with pytest.raises(WireFormatError, match="expected"):  # a byte short
        WireMessage(good.data[:-1].clone(), good.shape, "int8").decode(torch.float32)
    with pytest.raises(WireFormatError, match="expected"):  # the size of other pages
        WireMessage(good.data.clone(), (2, 4, 16, 2, 32), "int8").decode(torch.float32)
    for bad_scale in (float("nan"), float("inf"), -1.0):
        broken = WireMessage(good.data.clone(), good.shape, "int8")
        broken.parts()[1][1, 2, 0] = bad_scale
        with pytest.raises(WireFormatError, match="scales"):
            broken.decode(torch.float32)
    broken = WireMessage(good.data.clone(), good.shape, "int8")
    broken.parts()[0].view(torch.uint8)[0, 0, 3, 1, 7] = 0x80  # -128: never written
    with pytest.raises(WireFormatError, match="-128"):
        broken.decode(torch.float32)
    fp8 = WireMessage.encode(pages, "fp8_e4m3")
    fp8.parts()[0].view(torch.uint8)[1, 2, 0, 0, 0] = 0xFF  # NaN in e4m3fn
    with pytest.raises(WireFormatError, match="NaN"):
        fp8.decode(torch.float32)
    with pytest.raises(ValueError, match="inf or NaN"):
        WireMessage.encode(torch.full((2, 1, 16, 2, 32), float("inf")), "int8")
    with pytest.raises(ValueError, match="kv_wire_dtype must be one of"):
        check_wire_dtype("int4")
    with pytest.raises(ValueError, match="kv_wire_dtype"):
        LinkConfig(kv_wire_dtype="fp16")
    with pytest.raises(ValueError, match="mode='disagg'"):
        LLM("tiny", device="cpu", kv_wire_dtype="int8")


@pytest.fixture
def int8_decode_server(tiny_loaded):
    server = DecodeServer(tiny_loaded, EngineConfig(cache=CacheConfig(num_blocks=32),
                                                    link=LinkConfig(kv_wire_dtype="int8")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.stop()


def _all_free(server, timeout_s=5.0) -> bool:
    blocks = server.worker.engine.blocks
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if blocks.num_free_blocks == blocks.num_blocks:
            return True
        time.sleep(0.05)
    return False


def test_socket_link_lands_dequantised_pages_and_refuses_mismatched_or_corrupt_frames(tiny_loaded, int8_decode_server,
                                                                                       seed):
    worker = int8_decode_server.worker
    layout = worker.layout
    hello = make_hello("prefill", tiny_loaded.config.fingerprint(), layout)
    sender = SocketSender("127.0.0.1", int8_decode_server.port, hello, wire_dtype="int8")
    assert sender.reserve("a", 40, timeout_s=WAIT_S)
    gen = torch.Generator().manual_seed(seed)
    pages = random_pages((layout.num_layers, *layout.layer_shape(3)), layout.dtype, gen)
    sender.send_layers("a", 0, pages)
    assert sender.reserve("z", 1, timeout_s=WAIT_S)  # a round trip: the LAYER frame was handled
    landed = worker.engine.kv_cache.kv[:, :, worker._reserved["a"]]
    assert torch.equal(landed, WireMessage.encode(pages, "int8").decode(layout.dtype)), f"seed {seed}"
    assert sender.stats.bytes_sent == wire_nbytes(pages.shape, "int8", layout.dtype) < pages.nbytes * 0.28
    sender.commit("a", SequenceState("ra", [1] * 40, [2], {"max_tokens": 1}, {"arrival_s": 0.0}),
                  sender.stats.bytes_sent, WAIT_S)
    sender.cancel("z")
    for wire in ("auto", "fp8_e4m3"):  # the decode worker expects int8: the link is dropped, saying why
        other = SocketSender("127.0.0.1", int8_decode_server.port, hello, wire_dtype=wire)
        assert other.reserve("m", 20, timeout_s=WAIT_S)
        other.send_layer("m", 0, pages[0, :, :2])
        reply = recv_frame(other.sock, WAIT_S)
        assert reply.kind == FrameKind.ERROR and "wire_dtype" in reply.header["message"], reply
        assert repr(wire) in reply.header["message"] and "'int8'" in reply.header["message"]
        other.sock.close()
    corrupt = SocketSender("127.0.0.1", int8_decode_server.port, hello, wire_dtype="int8")
    assert corrupt.reserve("c", 20, timeout_s=WAIT_S)
    message = WireMessage.encode(pages[0, :, :2].contiguous(), "int8")
    message.parts()[1][0, 1, 0] = float("nan")
    send_frame(corrupt.sock, FrameKind.LAYER, corrupt._layer_header("c", 0, pages[0, :, :2], False), message.data)
    reply = recv_frame(corrupt.sock, WAIT_S)
    assert reply.kind == FrameKind.ERROR and "corrupt" in reply.header["message"], reply
    corrupt.sock.close()
    sender.close()
    assert _all_free(int8_decode_server), "a reservation leaked"


def test_every_transport_carries_the_same_quantised_pages(seed):
    """inproc, socket and dist (gloo) quantise alike: the same tokens, the same bytes, ~0.28 of float32 pages."""
    prompts = token_prompts(seed, 3)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    results = {}
    for transport in ("inproc", "socket", "dist"):
        with LLM("tiny", device="cpu", batch_invariant=True, seed=seed, mode="disagg", transport=transport,
                 kv_wire_dtype="int8", request_timeout_s=120) as llm:
            outs = llm.generate(prompts, params, use_tqdm=False)
        assert [o.error for o in outs if o.finish_reason == "error"] == [], f"{transport}, seed {seed}"
        results[transport] = ([o.token_ids for o in outs], [o.metrics.kv_transfer_bytes for o in outs])
    assert results["socket"] == results["inproc"] == results["dist"], f"seed {seed}"
    for prompt, nbytes in zip(prompts, results["inproc"][1]):
        blocks = -(-len(prompt["prompt_token_ids"]) // 16)
        fp32_bytes = 2 * 2 * blocks * 16 * 2 * 32 * 4  # layers, K/V, blocks, block_size, kv_heads, head_dim, float32
        assert nbytes == fp32_bytes // 4 + 2 * 2 * blocks * 2 * (4 + 32 + 16), f"seed {seed}"  # + scales, codes


def test_int8_wire_keeps_smollm2_greedy_output_over_the_socket(smollm2_gguf):
    """1P1D over TCP with the real model: int8 pages give (mostly) the uncompressed tokens at ~1/4 of the bytes."""
    questions = ["What is the capital of France?", "Why is the sky blue?", "Write a haiku about the sea.",
                 "How do bees make honey?"]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    reference = LLM("smollm2-135m", device="cpu", dtype="float32", batch_invariant=True)
    tokenizer = reference.get_tokenizer()
    prompts = [{"prompt_token_ids": tokenizer.apply_chat_template([{"role": "user", "content": q}])} for q in questions]
    expected = [o.token_ids for o in reference.generate(prompts, params, use_tqdm=False)]
    with LLM("smollm2-135m", device="cpu", dtype="float32", batch_invariant=True, mode="disagg", transport="socket",
             kv_wire_dtype="int8", request_timeout_s=600) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.error for o in outs if o.finish_reason == "error"] == []
    equal = sum(a == b for o, ref in zip(outs, expected) for a, b in zip(o.token_ids, ref))
    assert equal / sum(map(len, expected)) >= 0.75, [o.token_ids for o in outs]
    assert tokenizer.decode(outs[0].token_ids).startswith("The capital of France is Paris")
    for o, p in zip(outs, prompts):
        blocks = -(-len(p["prompt_token_ids"]) // 16)
        fp32_bytes = 30 * 2 * blocks * 16 * 3 * 64 * 4
        assert o.metrics.kv_transfer_bytes == fp32_bytes // 4 + 30 * 2 * blocks * 3 * (4 + 64 + 16)
        assert o.metrics.kv_transfer_bytes / fp32_bytes <= 0.28
