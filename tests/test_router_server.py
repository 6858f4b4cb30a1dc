"""The standalone router: decode, prefill and router run as separate processes; clients speak JSON lines over TCP."""

from __future__ import annotations

import json
import socket
import time

import pytest

from minidisagg import LLM, SamplingParams
from minidisagg.disagg.launch import spawn_worker, stop_processes
from minidisagg.disagg.router_protocol import MAX_LINE_BYTES, BadRequest, parse_request, stream_request
from minidisagg.disagg.router_server import parse_router_peers

MODEL_ARGS = ["--model", "tiny", "--device", "cpu", "--dtype", "float32", "--random-weights", "--batch-invariant"]
TIMEOUT_S = 30.0
PROMPTS = [[1, 17, 230, 5001], [9, 8, 7, 6, 5, 4, 3, 2, 1, 4000, 12], [42] * 20, [300, 301], [77, 78, 79, 80, 81, 82]]


@pytest.fixture(scope="module")
def routers(tmp_path_factory, smollm2_gguf):
    """One decode and one prefill server, and two routers over them: r0 shares the workers' clock origin, r1 not."""
    log_dir = tmp_path_factory.mktemp("router")
    origin = ["--clock-origin", repr(time.perf_counter())]
    procs = []
    try:
        d0 = spawn_worker("decode", "d0", [*MODEL_ARGS, *origin], log_dir)
        procs.append(d0)
        p0 = spawn_worker("prefill", "p0", [*MODEL_ARGS, *origin, "--peers", f"d0=127.0.0.1:{d0.port}"], log_dir)
        procs.append(p0)
        peers = ["--peers", f"prefill=p0@127.0.0.1:{p0.port};decode=d0@127.0.0.1:{d0.port}"]
        procs.append(spawn_worker("router", "r0", [*MODEL_ARGS, *origin, *peers], log_dir))
        procs.append(spawn_worker("router", "r1", [*MODEL_ARGS, *peers], log_dir))
        yield procs[2], procs[3]
    finally:
        stop_processes(procs[2:], timeout_s=20)  # routers first: they are the workers' clients
        stop_processes(procs[:2], timeout_s=20)
        assert all(p.proc.returncode is not None for p in procs)
    for r in procs[2:]:
        assert r.proc.returncode == 0, r.log_tail()  # SIGTERM is a clean shutdown


@pytest.fixture(scope="module")
def router(routers):
    """The router that shares the workers' clock origin."""
    return routers[0]


@pytest.fixture(scope="module")
def reference():
    """The colocated engine on the same random weights: the oracle."""
    return LLM("tiny", device="cpu", batch_invariant=True)


def greedy(max_tokens: int, **extra) -> dict:
    """Sampling fields of a greedy request that runs to ``max_tokens``."""
    return {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **extra}


def expected(reference, prompt, max_tokens: int, **extra):
    """What the colocated engine produces for the same request."""
    return reference.generate(prompt, SamplingParams(**greedy(max_tokens, **extra)), use_tqdm=False)[0]


class LineClient:
    """A raw JSON-lines connection: several requests in flight, replies read as they come."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
        self.reader = self.sock.makefile("rb")

    def send(self, request: dict | bytes) -> None:
        self.sock.sendall(request if isinstance(request, bytes) else json.dumps(request).encode() + b"\n")

    def read(self) -> dict:
        line = self.reader.readline()
        assert line, "the router closed the connection"
        return json.loads(line)

    def collect(self, ids: set[str]) -> dict[str, list[dict]]:
        """Every line of the requests ``ids``, until each has its final line."""
        lines: dict[str, list[dict]] = {i: [] for i in ids}
        while any(not got or not got[-1]["finished"] for got in lines.values()):
            message = self.read()
            lines[message["id"]].append(message)
        return lines

    def close(self) -> None:
        self.sock.close()


def check_stream(lines: list[dict], want) -> dict:
    """The stream's deltas add up to its final line, which matches the reference output."""
    *deltas, final = lines
    assert "error" not in final, final
    assert all(not d["finished"] for d in deltas)
    assert [t for d in deltas for t in d["token_ids"]] == final["token_ids"] == want.token_ids
    assert "".join(d["text"] for d in deltas) == final["text"]
    assert final["finish_reason"] == want.finish_reason
    return final


def test_parse_router_peers():
    prefill, decode = parse_router_peers("prefill=p0@127.0.0.1:7001,10.0.0.2:7002; decode=dx@[::1]:7101")
    assert prefill == {"p0": ("127.0.0.1", 7001), "p1": ("10.0.0.2", 7002)}
    assert decode == {"dx": ("::1", 7101)}
    for bad, why in [("", "lacks prefill and decode"), ("prefill=a@h:1", "lacks decode"), ("decode=d@h:x;prefill=h:1",
                     "name@host:port"), ("prefill=h:1;prefill=h:2;decode=h:3", "two prefill"),
                     ("prefill=a@h:1,a@h:2;decode=h:3", "twice"), ("router=h:1", "sections are")]:
        with pytest.raises(ValueError, match=why):
            parse_router_peers(bad)


@pytest.mark.parametrize("line, request_id, words", [
    (b"[1, 2]", "#7", "JSON object"), (b"\xff\xfe", "#7", "not a JSON"), (b'{"id": 3, "prompt": "x"}', "#7", "id must"),
    (b'{"prompt_token_ids": [1], "max_tokens": 2.5}', "#7", "max_tokens"),
    (b'{"id": "q", "prompt_token_ids": [1], "ignore_eos": 1}', "q", "ignore_eos"),
    (b'{"prompt_token_ids": [1], "top_p": NaN}', "#7", "NaN"), (b'{"prompt_token_ids": [1, true]}', "#7", "integers"),
    (b'{"prompt_token_ids": [1], "prompt": "x"}', "#7", "exactly one"), (b'{"prompt": "x"}', "#7", "no tokenizer"),
])
def test_parse_request_rejects_with_the_reason(line, request_id, words):
    with pytest.raises(BadRequest, match=words) as info:
        parse_request(line, "#7", tokenizer=None)
    assert info.value.request_id == request_id


def test_concurrent_requests_on_two_connections_match_colocated(router, reference):
    a, b = LineClient(router.port), LineClient(router.port)
    try:
        jobs = {f"a{i}": (a, PROMPTS[i], 6 + 2 * i) for i in range(3)} | {f"b{i}": (b, PROMPTS[3 + i], 9 - i)
                                                                            for i in range(2)}
        for rid, (client, prompt, n) in jobs.items():
            client.send({"id": rid, "prompt_token_ids": prompt, **greedy(n)})
        got = a.collect({"a0", "a1", "a2"}) | b.collect({"b0", "b1"})
    finally:
        a.close()
        b.close()
    for rid, (_, prompt, n) in jobs.items():
        final = check_stream(got[rid], expected(reference, prompt, n))
        m = final["metrics"]
        assert m["num_output_tokens"] == n and 0 < m["ttft_s"] <= m["e2e_s"] and m["tpot_s"] >= 0
        assert m["kv_transfer_bytes"] > 0 and m["kv_transfer_s"] >= 0 and m["prefill_s"] > 0


def test_malformed_lines_get_errors_and_the_connection_survives(router, reference):
    client = LineClient(router.port)
    try:
        client.send(b"this is not json\n")
        client.send({"prompt_token_ids": [1, 2], "bogus": 1})
        client.send({"prompt_token_ids": [1, 2], "temperature": -1})
        client.send({"id": "empty", "prompt_token_ids": []})
        client.send(b'{"prompt": "' + b"x" * MAX_LINE_BYTES + b'"}\n')
        client.send({"id": "ok", "prompt_token_ids": PROMPTS[0], **greedy(5)})
        errors = [client.read() for _ in range(5)]
        assert [e["id"] for e in errors] == ["#1", "#2", "#3", "empty", "#5"]
        assert all(e["finished"] and e["finish_reason"] == "error" for e in errors)
        for error, words in zip(errors, ["not a JSON", "unknown field", "temperature", "empty", "longer than"]):
            assert words in error["error"], error
        check_stream(client.collect({"ok"})["ok"], expected(reference, PROMPTS[0], 5))
    finally:
        client.close()


def test_a_client_leaving_mid_stream_does_not_disturb_others(router, reference):
    leaver = stream_request("127.0.0.1", router.port, {"id": "long", "prompt_token_ids": PROMPTS[1], **greedy(400)},
                            TIMEOUT_S)
    first = next(leaver)
    assert first["id"] == "long" and not first["finished"]
    stayer = LineClient(router.port)
    try:
        stayer.send({"id": "stay", "prompt_token_ids": PROMPTS[2], **greedy(12)})
        leaver.close()  # closes the socket mid-stream
        check_stream(stayer.collect({"stay"})["stay"], expected(reference, PROMPTS[2], 12))
    finally:
        stayer.close()
    deadline = time.monotonic() + 10
    while "aborted 1 request(s)" not in router.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "aborted 1 request(s)" in router.log_path.read_text(), router.log_tail()


def test_text_prompts_chat_and_stop_strings(router, reference):
    want = expected(reference, "Hello", 10)
    lines = list(stream_request("127.0.0.1", router.port, {"prompt": "Hello", **greedy(10)}, TIMEOUT_S))
    assert check_stream(lines, want)["text"] == want.text and want.text
    stop = want.text[len(want.text) // 2:][:2]
    want_stop = expected(reference, "Hello", 10, stop=[stop])
    lines = list(stream_request("127.0.0.1", router.port, {"prompt": "Hello", **greedy(10, stop=stop)}, TIMEOUT_S))
    assert check_stream(lines, want_stop)["text"] == want_stop.text and stop not in want_stop.text
    chat = [{"role": "user", "content": "Hi there"}]
    want_chat = reference.chat(chat, SamplingParams(**greedy(6)), use_tqdm=False)[0]
    lines = list(stream_request("127.0.0.1", router.port, {"messages": chat, **greedy(6)}, TIMEOUT_S))
    assert check_stream(lines, want_chat)["text"] == want_chat.text


def test_a_second_router_without_a_shared_clock(routers, reference):
    lines = list(stream_request("127.0.0.1", routers[1].port, {"prompt_token_ids": PROMPTS[3], **greedy(7)}, TIMEOUT_S))
    metrics = check_stream(lines, expected(reference, PROMPTS[3], 7))["metrics"]
    assert metrics["kv_transfer_s"] is None and metrics["kv_transfer_bytes"] > 0 and metrics["ttft_s"] > 0
