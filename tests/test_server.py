"""The OpenAI-compatible HTTP front, driven by the official ``openai`` client and plain HTTP.

One server (the ``tiny`` random-weight preset on CPU, batch-invariant kernels) serves every test;
the reference outputs come from a second ``LLM`` over the same weights.
"""

from __future__ import annotations

import re
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from minidisagg.engine.sampling import SamplingParams  # noqa: E402
from minidisagg.llm import LLM  # noqa: E402
from minidisagg.server.launch import start_in_thread  # noqa: E402

API_KEY = "sk-test-key"
TIMEOUT_S = 180.0  # every wait below is bounded by this (a busy 2-core CPU is slow, never this slow)
NUM_KV_BLOCKS = 256
PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away,"]
NUM_CLIENTS = 32
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def tiny_llm() -> LLM:
    """The served model and the reference share these settings."""
    return LLM("tiny", device="cpu", dtype="float32", batch_invariant=True, num_kv_blocks=NUM_KV_BLOCKS)


@pytest.fixture(scope="module")
def served():
    llm = tiny_llm()
    handle = start_in_thread(llm, "tiny", api_key=API_KEY)
    yield llm, handle
    handle.stop()


@pytest.fixture(scope="module")
def reference():
    return tiny_llm()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[1].url + "/v1", api_key=API_KEY, timeout=TIMEOUT_S, max_retries=0)


def metric(url: str, name: str, labels: str = "") -> float:
    """One sample of the server's /metrics (0 when absent)."""
    text = httpx.get(url + "/metrics", timeout=TIMEOUT_S).text
    found = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def wait_for(predicate, what: str, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def finished_total(url: str) -> float:
    return sum(metric(url, "minidisagg_requests_finished_total", f'{{finish_reason="{r}"}}')
               for r in ("stop", "length", "abort", "error", "timeout"))


def test_completions_match_generate_token_for_token(client, reference):
    for prompt in PROMPTS:
        want = reference.generate(prompt, SamplingParams(temperature=0, max_tokens=12))[0]
        got = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        assert got.choices[0].text == want.text
        assert got.choices[0].finish_reason == want.finish_reason
        assert got.usage.completion_tokens == len(want.token_ids)
        assert got.usage.prompt_tokens == len(want.prompt_token_ids)
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
        assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    # token ids in, and a list of prompts (one choice each)
    ids = reference.get_tokenizer().encode(PROMPTS[0])
    want = reference.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=6))[0]
    got = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert got.choices[0].text == want.text
    both = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=6, temperature=0)
    wants = reference.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6))
    assert [c.text for c in sorted(both.choices, key=lambda c: c.index)] == [w.text for w in wants]


def test_chat_matches_llm_chat_token_for_token(client, reference):
    want = reference.chat(CHAT, SamplingParams(temperature=0, max_tokens=16))[0]
    got = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, temperature=0)
    assert got.choices[0].message.content == want.text and got.choices[0].message.role == "assistant"
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    stream = client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=16, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason


def test_a_stop_string_ends_the_text_where_generate_does(client, reference):
    free = reference.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=12))[0].text
    stop = free.split()[2]  # a word from the middle of the greedy text
    want = reference.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=12, stop=[stop]))[0]
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want.text and stop not in want.text


def test_concurrent_streams_join_one_batch_and_metrics_agree(served):
    llm, handle = served
    aclient_usage: list = [None] * NUM_CLIENTS
    before = {name: metric(handle.url, name) for name in ("minidisagg_generation_tokens_total",
                                                          "minidisagg_prompt_tokens_total",
                                                          "minidisagg_time_to_first_token_seconds_count")}
    finished_before = finished_total(handle.url)
    steps_before = len(llm.engine.stats.steps)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            c = openai.OpenAI(base_url=handle.url + "/v1", api_key=API_KEY, timeout=TIMEOUT_S, max_retries=0)
            chunks = list(c.completions.create(model="tiny", prompt=f"Request number {i} says", max_tokens=4 + i % 7,
                                               temperature=0.8, seed=i, stream=True,
                                               stream_options={"include_usage": True}))
            aclient_usage[i] = chunks[-1].usage
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(NUM_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    assert not errors and all(u is not None for u in aclient_usage), errors
    generated = sum(u.completion_tokens for u in aclient_usage)
    prompt_tokens = sum(u.prompt_tokens for u in aclient_usage)
    assert metric(handle.url, "minidisagg_generation_tokens_total") - before["minidisagg_generation_tokens_total"] \
        == generated
    assert metric(handle.url, "minidisagg_prompt_tokens_total") - before["minidisagg_prompt_tokens_total"] \
        == prompt_tokens
    assert metric(handle.url, "minidisagg_time_to_first_token_seconds_count") \
        - before["minidisagg_time_to_first_token_seconds_count"] == NUM_CLIENTS
    assert finished_total(handle.url) - finished_before == NUM_CLIENTS
    # continuous batching across HTTP requests: some decode step ran several of them together
    assert max(s.num_seqs for s in llm.engine.stats.steps[steps_before:] if s.stage == "decode") >= 2


def test_a_client_leaving_mid_stream_frees_its_kv_blocks(served):
    llm, handle = served
    aborts = metric(handle.url, "minidisagg_requests_finished_total", '{finish_reason="abort"}')
    body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 1500, "ignore_eos": True, "temperature": 0,
            "stream": True}
    with httpx.Client(timeout=TIMEOUT_S) as http:
        with http.stream("POST", handle.url + "/v1/completions", json=body,
                         headers={"Authorization": f"Bearer {API_KEY}"}) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            got = [next(lines) for _ in range(6)]  # a few chunks: the request is decoding
            assert any(line.startswith("data: {") for line in got)
            wait_for(lambda: llm.engine.blocks.num_free_blocks < NUM_KV_BLOCKS, "the request to hold KV blocks")
    wait_for(lambda: metric(handle.url, "minidisagg_requests_finished_total", '{finish_reason="abort"}') == aborts + 1,
             "the abort to be counted")
    wait_for(lambda: metric(handle.url, "minidisagg_kv_free_blocks", '{worker="engine"}') == NUM_KV_BLOCKS,
             "every KV block to be free again")
    assert llm.engine.blocks.num_free_blocks == NUM_KV_BLOCKS and not llm.engine.has_unfinished()


def test_a_client_leaving_a_non_streaming_request_aborts_it(served):
    llm, handle = served
    aborts = metric(handle.url, "minidisagg_requests_finished_total", '{finish_reason="abort"}')
    body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 1500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(handle.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                   timeout=httpx.Timeout(TIMEOUT_S, read=3.0))
    wait_for(lambda: metric(handle.url, "minidisagg_requests_finished_total", '{finish_reason="abort"}') == aborts + 1,
             "the abort to be counted")
    wait_for(lambda: llm.engine.blocks.num_free_blocks == NUM_KV_BLOCKS, "every KV block to be free again")


def assert_error(response, status: int, param=None, code=None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error


def assert_still_serving(client) -> None:
    out = client.completions.create(model="tiny", prompt="Still there?", max_tokens=3, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length") and out.usage.completion_tokens >= 1


def test_every_error_gets_its_status_and_openai_body_and_the_server_keeps_serving(served, client):
    llm, handle = served
    url, auth = handle.url + "/v1/completions", {"Authorization": f"Bearer {API_KEY}"}
    ok = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}
    cases = [
        ({"content": b"{not json", "headers": {**auth, "content-type": "application/json"}}, 400, None, None),
        ({"json": {**ok, "frobnicate": 1}, "headers": auth}, 400, "frobnicate", "unsupported_field"),
        ({"json": {**ok, "n": 2}, "headers": auth}, 400, "n", "unsupported_field"),
        ({"json": {**ok, "logprobs": 3}, "headers": auth}, 400, "logprobs", "unsupported_field"),
        ({"json": {**ok, "temperature": -1}, "headers": auth}, 400, "temperature", None),
        ({"json": {**ok, "max_tokens": 0}, "headers": auth}, 400, "max_tokens", None),
        ({"json": {**ok, "prompt": [70000]}, "headers": auth}, 400, "prompt", None),
        ({"json": {k: v for k, v in ok.items() if k != "prompt"}, "headers": auth}, 400, "prompt", None),
        ({"json": {**ok, "prompt": [5] * 2048}, "headers": auth}, 400, "prompt", "context_length_exceeded"),
        ({"json": ok}, 401, None, "invalid_api_key"),
        ({"json": ok, "headers": {"Authorization": "Bearer wrong"}}, 401, None, "invalid_api_key"),
        ({"json": {**ok, "model": "gpt-5"}, "headers": auth}, 404, "model", "model_not_found"),
    ]
    with httpx.Client(timeout=TIMEOUT_S) as http:
        for kwargs, status, param, code in cases:
            assert_error(http.post(url, **kwargs), status, param, code)
            assert_still_serving(client)
        chat = {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}
        assert_error(http.post(handle.url + "/v1/chat/completions", json=chat, headers=auth), 400)
        assert_still_serving(client)

        handle.engine_loop.max_pending = 0  # the queue is full
        try:
            assert_error(http.post(url, json=ok, headers=auth), 503, None, "queue_full")
        finally:
            handle.engine_loop.max_pending = 256
        assert_still_serving(client)

        handle.engine_loop.request_timeout_s = 0.5  # every request's deadline
        try:
            late = http.post(url, json={**ok, "max_tokens": 1500, "ignore_eos": True}, headers=auth)
        finally:
            handle.engine_loop.request_timeout_s = 600.0
        assert_error(late, 500, None, "request_timeout")
        assert "deadline" in late.json()["error"]["message"]
        assert_still_serving(client)

        real_step = llm.engine.step
        def broken_step():  # noqa: E306 - fails once, as a dying worker would
            llm.engine.step = real_step
            raise RuntimeError("the device fell off the bus")
        llm.engine.step = broken_step
        failed = http.post(url, json=ok, headers=auth)
        assert_error(failed, 500, None, "worker_failure")
        assert "fell off the bus" in failed.json()["error"]["message"]
        assert_still_serving(client)
        wait_for(lambda: llm.engine.blocks.num_free_blocks == NUM_KV_BLOCKS, "the failed request's blocks")


def test_models_health_and_metrics(served):
    _, handle = served
    with httpx.Client(timeout=TIMEOUT_S) as http:
        models = http.get(handle.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
        assert [m["id"] for m in models["data"]] == ["tiny"] and models["object"] == "list"
        assert http.get(handle.url + "/health").json()["status"] == "ok"
        text = http.get(handle.url + "/metrics").text
    for name in ("minidisagg_time_to_first_token_seconds_bucket", "minidisagg_inter_token_latency_seconds_bucket",
                 "minidisagg_e2e_request_latency_seconds_bucket", "minidisagg_num_requests_waiting",
                 "minidisagg_kv_free_blocks", "minidisagg_http_requests_total"):
        assert name in text, name


def test_serve_flags_reach_the_engine_prefix_caching_and_threads():
    """``minidisagg serve --enable-prefix-caching --threads N --routing-load-weight W``: the engine caches
    prefixes, torch uses N threads, the disaggregated router weighs load by W on both sides."""
    import torch

    from minidisagg.cli import build_parser
    from minidisagg.server.launch import llm_from_args

    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    llms = []
    try:
        for mode in ("colocated", "disagg"):
            args = build_parser().parse_args(["serve", "tiny", "--device", "cpu", "--dtype", "float32", "--mode", mode,
                                              "--transport", "socket", "--enable-prefix-caching", "--routing",
                                              "cache_aware", "--threads", str(want), "--num-kv-blocks", "64",
                                              "--routing-load-weight", "0.25"])
            llms.append(llm_from_args(args))
            assert llms[-1].config.cache.enable_prefix_caching and torch.get_num_threads() == want
            if mode == "disagg":
                router = llms[-1].engine.router
                assert router.cache_index.load_weight == router.decode_index.load_weight == 0.25
        prompt = list(range(100, 140))  # two full blocks of 16, then a tail
        for llm in llms:
            params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
            first, second = (llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0] for _ in range(2))
            assert first.num_cached_tokens == 0 and second.num_cached_tokens == 32, llm.mode
            assert second.token_ids == first.token_ids
    finally:
        for llm in llms:
            llm.shutdown()
        torch.set_num_threads(before)


def test_a_load_weight_without_cache_aware_routing_is_refused():
    from minidisagg.cli import build_parser
    from minidisagg.server.launch import llm_from_args

    args = build_parser().parse_args(["serve", "tiny", "--device", "cpu", "--dtype", "float32", "--mode", "disagg",
                                      "--routing", "round_robin", "--routing-load-weight", "0.5"])
    with pytest.raises(ValueError, match="weighs load in routing='cache_aware' only"):
        llm_from_args(args)
