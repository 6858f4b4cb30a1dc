"""``minidisagg serve --mode disagg``: the HTTP front over one prefill and one decode worker process (socket, dist).

Greedy text equals the colocated engine's, a client leaving mid-stream leaves every worker's KV pool
whole, and SIGTERM leaves no process behind.
"""

from __future__ import annotations

import re
import signal
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from minidisagg.engine.sampling import SamplingParams  # noqa: E402
from minidisagg.engine.text_decoder import REPLACEMENT_CHAR, TextDecoder  # noqa: E402
from minidisagg.llm import LLM  # noqa: E402
from serve_process import STOP_TIMEOUT_S, child_pids, running, serve_process  # noqa: E402

TIMEOUT_S = 180.0
NUM_KV_BLOCKS = 256
MODEL_ARGS = ["--device", "cpu", "--dtype", "float32", "--batch-invariant", "--num-kv-blocks", str(NUM_KV_BLOCKS)]
PROMPT = "The quick brown fox"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module", params=["socket", "dist"])
def server(request, tmp_path_factory):
    ready = tmp_path_factory.mktemp("serve") / "port"
    yield from serve_process(["tiny", "--mode", "disagg", "--transport", request.param, "--num-prefill", "1",
                              "--num-decode", "1", *MODEL_ARGS], ready)


@pytest.fixture(scope="module")
def reference():
    return LLM("tiny", device="cpu", dtype="float32", batch_invariant=True, num_kv_blocks=NUM_KV_BLOCKS)


def pools(url: str) -> dict[str, tuple[float, float]]:
    """Each worker's (free, total) KV blocks from /metrics."""
    text = httpx.get(url + "/metrics", timeout=TIMEOUT_S).text
    free = dict(re.findall(r'^minidisagg_kv_free_blocks\{worker="(\w+)"\} (\S+)$', text, re.M))
    total = dict(re.findall(r'^minidisagg_kv_total_blocks\{worker="(\w+)"\} (\S+)$', text, re.M))
    return {w: (float(free[w]), float(total[w])) for w in free}


def wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_greedy_text_equals_the_colocated_engine(server, reference):
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
    want = reference.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12))[0]
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert got.choices[0].text == want.text and got.usage.completion_tokens == len(want.token_ids)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want.text
    want_chat = reference.chat(CHAT, SamplingParams(temperature=0, max_tokens=12))[0]
    stream = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want_chat.text
    text = httpx.get(url + "/metrics", timeout=TIMEOUT_S).text
    moved = float(re.search(r"^minidisagg_kv_transfer_bytes_total (\S+)$", text, re.M).group(1))
    assert moved > 0  # every request's KV crossed from the prefill worker to the decode worker


def test_streaming_sends_a_chunk_per_token_as_colocated(server, reference):
    """Decode workers stream token by token: each token that completes a character gets a chunk of its own."""
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
    want = reference.generate(PROMPT, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0]
    decoder = TextDecoder(reference.get_tokenizer())
    texts = [decoder.text(want.token_ids[:k]).rstrip(REPLACEMENT_CHAR) for k in range(1, len(want.token_ids))]
    texts.append(want.text)
    expected = sum(1 for before, after in zip([""] + texts, texts) if len(after) > len(before))
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = [c.choices[0].text for c in stream if c.choices and c.choices[0].text]
    assert "".join(chunks) == want.text
    assert len(chunks) == expected and expected >= len(want.token_ids) // 2, (len(chunks), expected, want.token_ids)


def test_a_client_leaving_mid_stream_leaves_every_pool_whole(server):
    url, _ = server
    wait_for(lambda: set(pools(url)) == {"p0", "d0"}, "both workers' pools in /metrics")
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=TIMEOUT_S) as http:
        with http.stream("POST", url + "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            for _ in range(6):
                next(lines)
            wait_for(lambda: pools(url)["d0"][0] < NUM_KV_BLOCKS, "the decode worker to hold the request's KV")
    wait_for(lambda: all(free == total for free, total in pools(url).values()), "every worker's KV pool to be whole")


def test_a_client_leaving_during_prefill_leaves_every_pool_whole(server):
    """The client hangs up once the response starts, while its long prompt is still on the prefill worker."""
    url, _ = server
    wait_for(lambda: set(pools(url)) == {"p0", "d0"}, "both workers' pools in /metrics")
    prompt = [(7919 * i) % 40000 + 100 for i in range(1900)]  # about the whole context: a long prefill
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 140, "ignore_eos": True, "stream": True}
    for _ in range(3):
        with httpx.Client(timeout=TIMEOUT_S) as http:
            with http.stream("POST", url + "/v1/completions", json=body) as response:
                assert response.status_code == 200
    left_s = time.monotonic()
    wait_for(lambda: all(free == total for free, total in pools(url).values()), "every worker's KV pool to be whole")
    assert time.monotonic() - left_s < 15.0, "the abandoned requests' KV blocks were held long after their clients left"


def test_sigterm_leaves_no_process_behind(server):
    url, proc = server
    workers = child_pids(proc.pid)
    assert len([p for p in workers if running(p)]) >= 2, "the prefill and decode workers run as child processes"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(STOP_TIMEOUT_S) == 0
    wait_for(lambda: not any(running(p) for p in workers), "the worker processes to exit")
