"""The server under hostile input (issue 16): every bad request is a 4xx JSON error in OpenAI's
shape while the requests decoding beside it are answered exactly as if decoded alone; random
JSON bodies never get a 500; the API key scheme; Prometheus exposition; SIGTERM with requests
in flight ends the process in bounded time without a traceback."""
from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from serve_server import AUTH, KEY, expected_text, make_checkpoint, start  # noqa: E402

NESTED = b'{"prompt": "hi", "extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
BAD = [  # (path, body, status, param, code)
    ("/v1/completions", {"prompt": "hi", "seed": 1 << 64}, 400, "seed", None),
    ("/v1/completions", {"prompt": "hi", "seed": -(1 << 63) - 1, "temperature": 0.5}, 400, "seed", None),
    ("/v1/completions", {"prompt": "a\ud800b"}, 400, "prompt", None),
    ("/v1/completions", {"prompt": "hi", "stop": ["\udfff"]}, 400, "stop", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, 400, "messages.0.content", None),
    ("/v1/completions", NESTED, 400, None, None),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream", None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens", None),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model", "model_not_found"),
    ("/v1/nowhere", {"prompt": "hi"}, 404, None, None),
]


def _openai_error(reply: httpx.Response) -> dict:
    assert reply.headers["content-type"].startswith("application/json"), reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


@pytest.fixture(scope="module")
def server(tmp_path_factory, char_tokenizer):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("serve-faults"), char_tokenizer)
    proc, base = start(ckpt)
    yield base, ckpt
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=30)[0]
    assert "Traceback" not in output, output


def test_bad_requests_fail_alone_while_others_decode(server, char_tokenizer, corpus_text):
    base, ckpt = server
    prompts = [corpus_text[i * 131: i * 131 + 3 + 5 * i] for i in range(8)]

    async def run():
        async with httpx.AsyncClient(headers=AUTH, timeout=120) as client:
            good = [client.post(f"{base}/v1/completions", json={"prompt": p, "max_tokens": 30, "temperature": 0})
                    for p in prompts]
            bad = [client.post(f"{base}{path}", content=body if isinstance(body, bytes) else json.dumps(body),
                               headers={"content-type": "application/json"}) for path, body, *_ in BAD]
            return await asyncio.gather(*good), await asyncio.gather(*bad)

    good, bad = asyncio.run(run())
    for reply, (_, _, status, param, code) in zip(bad, BAD):
        assert reply.status_code == status, reply.text
        error = _openai_error(reply)
        assert error["param"] == param and error["code"] == code, error
    for reply, prompt in zip(good, prompts):
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == expected_text(ckpt, char_tokenizer, prompt, 30)


def test_authorization_scheme_and_metrics_format(server):
    base, _ = server
    body = {"prompt": "hi", "max_tokens": 1}
    for header, status in ((f"bearer {KEY}", 200), (f"BEARER  {KEY}", 200), (KEY, 401), (f"Basic {KEY}", 401),
                           ("Bearer", 401)):
        reply = httpx.post(f"{base}/v1/completions", json=body, headers={"Authorization": header}, timeout=30)
        assert reply.status_code == status, (header, reply.text)
        if status == 401:
            assert _openai_error(reply)["code"] == "invalid_api_key"
    reply = httpx.get(f"{base}/metrics", headers=AUTH, timeout=10)
    assert reply.headers["content-type"].startswith("text/plain; version=")
    assert "# HELP tessera_requests_total " in reply.text and "# TYPE tessera_requests_total counter" in reply.text
    families = {f.name: f for f in text_string_to_metric_families(reply.text)}
    assert families["tessera_request_latency_seconds"].type == "summary"
    assert families["tessera_queue_depth"].type == "gauge"
    answered = {tuple(s.labels.values()): s.value for s in families["tessera_requests"].samples
                if s.name == "tessera_requests_total"}
    assert answered[("completions", "401")] >= 3 and answered[("completions", "200")] >= 2


FLOATS = st.floats(allow_nan=False, allow_infinity=False)  # what JSON can carry
JSON = st.recursive(st.none() | st.booleans() | st.integers() | FLOATS | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=8)
FIELDS = {"prompt": st.text(max_size=12) | st.lists(st.text(max_size=6), max_size=2) | JSON,
          "max_tokens": st.integers(-2, 50) | JSON, "temperature": st.floats(-1, 3) | JSON,
          "top_p": st.floats(-0.5, 1.5) | JSON, "top_k": st.integers(-1, 100) | JSON,
          "seed": st.integers(-(1 << 70), 1 << 70) | JSON, "stream": st.booleans() | JSON,
          "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=6) | JSON,
          "model": st.sampled_from([None, "step_000001", "other"]) | JSON, "n": st.integers(0, 3)}


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.fixed_dictionaries({}, optional=FIELDS) | JSON)
def test_random_request_bodies_never_fail_the_server(server, body):
    base, _ = server
    reply = httpx.post(f"{base}/v1/completions", json=body, headers=AUTH, timeout=60)
    assert reply.status_code in (200, 400, 404), reply.text
    if reply.status_code != 200:
        _openai_error(reply)
    elif reply.headers["content-type"].startswith("text/event-stream"):
        assert reply.text.rstrip().endswith("data: [DONE]"), reply.text
    else:
        assert reply.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_sigterm_with_requests_in_flight_stops_the_server(tmp_path, char_tokenizer):
    proc, base = start(make_checkpoint(tmp_path, char_tokenizer), "--max-tokens", "120")
    replies, started = [], threading.Barrier(5)

    def stream():
        started.wait()
        try:
            with httpx.stream("POST", f"{base}/v1/completions", headers=AUTH, timeout=60,
                              json={"prompt": "x", "max_tokens": 120, "temperature": 1.0, "stream": True}) as s:
                replies.append([line for line in s.iter_lines() if line])
        except httpx.TransportError as e:  # the connection closed by the stopping server
            replies.append(e)

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(0.3)
    begin = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=30)[0]
    assert time.monotonic() - begin < 25 and proc.returncode in (0, -signal.SIGTERM), output  # uvicorn re-raises it
    assert "Traceback" not in output, output
    for t in threads:
        t.join(timeout=30)
    assert len(replies) == 4
    for reply in replies:  # finished, answered with an error event, or cut off: never left waiting
        assert isinstance(reply, httpx.TransportError) or reply[-1] == "data: [DONE]" or '"error"' in reply[-1], reply
