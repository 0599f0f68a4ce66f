"""`tessera serve` as a real process on loopback, driven by a real HTTP client (httpx):
completions and chat, streaming and not, bad input answered with 4xx JSON, the API key,
metrics, and 32 concurrent requests each answered as if decoded alone."""
from __future__ import annotations

import json

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from serve_server import AUTH, expected_text, make_checkpoint, start  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory, char_tokenizer):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("serve"), char_tokenizer)
    proc, base = start(ckpt)
    yield base, ckpt
    proc.terminate()
    proc.wait(timeout=10)


def test_completion_and_stream_agree(server, char_tokenizer):
    base, ckpt = server
    body = {"prompt": "ROMEO:\nWhat", "max_tokens": 20, "temperature": 0}
    r = httpx.post(f"{base}/v1/completions", json=body, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and out["choices"][0]["finish_reason"] in ("length", "stop")
    assert out["choices"][0]["text"] == expected_text(ckpt, char_tokenizer, body["prompt"], 20)
    assert out["usage"]["prompt_tokens"] == len(char_tokenizer.encode(body["prompt"]))

    pieces, finish = [], None
    with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, headers=AUTH, timeout=30) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in s.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        choice = json.loads(line.removeprefix("data: "))["choices"][0]
        pieces.append(choice["text"])
        finish = choice["finish_reason"] or finish
    assert "".join(pieces) == out["choices"][0]["text"] and finish == out["choices"][0]["finish_reason"]


def test_chat_streaming_and_stop_string(server):
    base, _ = server
    body = {"messages": [{"role": "user", "content": "Say something"}], "max_tokens": 30, "temperature": 0}
    full = httpx.post(f"{base}/v1/chat/completions", json=body, headers=AUTH, timeout=30).json()
    content = full["choices"][0]["message"]["content"]
    assert full["object"] == "chat.completion" and full["choices"][0]["message"]["role"] == "assistant"
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True}, headers=AUTH, timeout=30) as s:
        chunks = [json.loads(x.removeprefix("data: ")) for x in s.iter_lines() if x and x != "data: [DONE]"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == content
    default = httpx.post(f"{base}/v1/chat/completions", json={**body, "max_tokens": None}, headers=AUTH, timeout=30).json()
    assert default["usage"]["completion_tokens"] <= 40  # the server's --max-tokens caps chat's default budget
    if len(content) > 4:
        stop = content[2:4]
        cut = httpx.post(f"{base}/v1/chat/completions", json={**body, "stop": [stop]}, headers=AUTH, timeout=30).json()
        assert cut["choices"][0]["message"]["content"] == content[:content.index(stop)]
        assert cut["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("payload,status,param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"prompt": "x" * 101}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "hi", "max_tokens": 41}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "hi", "temperature": 3}).encode(), 400, "temperature"),
    (json.dumps({"prompt": "hi", "top_p": 0}).encode(), 400, "top_p"),
    (json.dumps({"max_tokens": 3}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "", "max_tokens": 3}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "a" * (2 << 20)}).encode(), 413, None),
])
def test_bad_requests_get_4xx_json(server, payload, status, param):
    base, _ = server
    r = httpx.post(f"{base}/v1/completions", content=payload, headers={**AUTH, "content-type": "application/json"},
                   timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and (param is None or error["param"] == param)


def test_api_key_health_and_metrics(server):
    base, _ = server
    assert httpx.post(f"{base}/v1/completions", json={"prompt": "hi"}, timeout=10).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.post(f"{base}/v1/completions", json={"prompt": "hi"}, headers=wrong, timeout=10).status_code == 401
    assert httpx.get(f"{base}/health", timeout=10).json()["status"] == "ok"
    assert httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=AUTH, timeout=30).is_success
    text = httpx.get(f"{base}/metrics", headers=AUTH, timeout=10).text
    assert 'tessera_requests_total{endpoint="completions",status="200"}' in text
    assert "tessera_request_latency_seconds{quantile=\"0.99\"}" in text


def test_32_concurrent_requests_are_batched_and_correct(server, char_tokenizer, corpus_text):
    import asyncio

    base, ckpt = server
    prompts = [corpus_text[i * 97: i * 97 + 5 + (i * 7) % 40] for i in range(32)]
    lengths = [5 + (i % 4) * 5 for i in range(32)]

    async def run():
        async with httpx.AsyncClient(headers=AUTH, timeout=120) as client:
            replies = await asyncio.gather(*[
                client.post(f"{base}/v1/completions", json={"prompt": p, "max_tokens": n, "temperature": 0})
                for p, n in zip(prompts, lengths)])
            metrics = (await client.get(f"{base}/metrics")).text
        return replies, metrics

    replies, metrics = asyncio.run(run())
    assert all(r.status_code == 200 for r in replies)
    for reply, prompt, n in zip(replies, prompts, lengths):
        assert reply.json()["choices"][0]["text"] == expected_text(ckpt, char_tokenizer, prompt, n)
    values = {s.name: s.value for family in text_string_to_metric_families(metrics) for s in family.samples}
    shared = values["tessera_batched_requests_total"] + values["tessera_joined_requests_total"]
    assert shared > values["tessera_batches_total"]  # requests shared batches


def test_int8_checkpoint_is_served_in_process(tmp_path, server):
    from fastapi.testclient import TestClient

    from tessera.interop.quantize import quantize_int8
    from tessera.interop.serve import create_app, load_for_serving

    _, ckpt = server
    model, tokenizer, name = load_for_serving(quantize_int8(ckpt, tmp_path / "int8"), "cpu")
    with TestClient(create_app(model, tokenizer, model_name=name)) as client:
        r = client.post("/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 5, "temperature": 0.7, "seed": 1})
        assert r.status_code == 200 and r.json()["model"] == "int8"
        assert client.get("/v1/models").json()["data"][0]["id"] == "int8"
