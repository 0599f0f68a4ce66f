"""`tessera serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over a Tessera checkpoint.

`/v1/completions` and `/v1/chat/completions` (JSON or server-sent events with `"stream": true`),
`/v1/models`, `/health`, and `/metrics` (prometheus_client: requests, tokens, latency quantiles,
batching). Handlers only parse, tokenize and format; decoding happens in the `Batcher` thread,
which batches concurrent requests. Binds 127.0.0.1 unless told otherwise; with an API key every
route but /health wants `Authorization: Bearer <key>` (the scheme in any case, as RFC 7235 says).
Every error, a route that does not exist or a bug included, is a JSON body in OpenAI's shape;
shutdown waits a bounded time for requests in flight, then answers the rest with an error.

Images: chat content parts `{"type": "image_url", "image_url": {"url": "data:image/...;base64,..."}}`
go to a `PromptEmbedder` the caller hands in (the CLI wires an image-conditioned LM's; interop
knows no vision model): the transcript's text and image bytes in order in, the prompt's token ids
and input embeddings out, which the batcher prefills in place of the lookup. Remote URLs, images
over the limits and images that do not decode are a 400.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.exceptions import HTTPException

from tessera.core.generate import Sampling
from tessera.core.text_stream import TextStream
from tessera.core.tokenizer import Tokenizer
from tessera.interop.batcher import Batcher, Job, QueueFull
from tessera.interop.serve_schema import (
    ApiError, ChatRequest, CompletionRequest, ServeLimits, check_lengths, image_bytes, parse_request,
)

PromptEmbedder = Callable[[list[str | bytes]], tuple[list[int], torch.Tensor]]  # ValueError/RuntimeError: bad image


class Metrics:
    """The server's Prometheus metrics in a registry of its own (one per app): counters kept by
    prometheus_client, and a collector for what is read at scrape time (latency quantiles over the
    last 10,000 requests, the queue, the batcher's counts)."""

    STATS = {"batches": "batches started", "batched_requests": "requests that started a batch",
             "joined_requests": "requests that joined a running batch", "decode_steps": "decode steps of the batch"}

    def __init__(self, batcher: Batcher):
        self.batcher = batcher
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter("tessera_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("tessera_prompt_tokens", "Prompt tokens admitted", registry=self.registry)
        self.completion_tokens = Counter("tessera_completion_tokens", "Tokens generated", registry=self.registry)
        self.latencies: deque[float] = deque(maxlen=10_000)
        self.latency_sum, self.latency_count = 0.0, 0
        self.registry.register(self)

    def observe(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if seconds is not None:
            self.latencies.append(seconds)
            self.latency_sum += seconds
            self.latency_count += 1

    def collect(self):
        latency = Metric("tessera_request_latency_seconds", "Latency of successful requests", "summary")
        ordered = sorted(self.latencies)
        for q in (0.5, 0.9, 0.99):
            value = ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0
            latency.add_sample(latency.name, {"quantile": str(q)}, value)
        latency.add_sample(f"{latency.name}_sum", {}, self.latency_sum)
        latency.add_sample(f"{latency.name}_count", {}, self.latency_count)
        yield latency
        yield GaugeMetricFamily("tessera_queue_depth", "Requests waiting for the batcher", value=self.batcher.queue.qsize())
        for key, value in self.batcher.stats.items():
            yield CounterMetricFamily(f"tessera_{key}", self.STATS.get(key, key), value=value)

    def render(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(model: torch.nn.Module, tokenizer: Tokenizer, limits: ServeLimits = ServeLimits(),
               api_key: str | None = None, model_name: str = "tessera", embedder: PromptEmbedder | None = None) -> FastAPI:
    """The FastAPI app; the batcher thread starts and stops with the app's lifespan. With `embedder`,
    chat messages may hold images."""
    batcher = Batcher(model, limits.max_batch, limits.max_queue, limits.batch_wait_s)
    metrics = Metrics(batcher)
    context = model.cfg.max_seq_len

    async def lifespan(_app):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="Tessera", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, e: HTTPException):  # unknown route, wrong method
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def bug(_request: Request, e: Exception):
        error = ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")
        return JSONResponse(error.body(), status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                           kind="invalid_request_error", code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limits.max_request_bytes:
            raise ApiError(413, f"request body of {length} bytes exceeds {limits.max_request_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_request_bytes:
                raise ApiError(413, f"request body exceeds {limits.max_request_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def events(job: Job, queue: asyncio.Queue, stream: TextStream) -> AsyncIterator[tuple[str, str | None]]:
        """(text delta, finish_reason) pairs of one job, the last with its finish reason."""
        try:
            while True:
                kind, value = await queue.get()
                if kind == "token":
                    delta, stopped = stream.push(value)
                    metrics.completion_tokens.inc()
                    if stopped:
                        job.cancelled = True
                        yield delta, "stop"
                        return
                    if delta:
                        yield delta, None
                elif kind == "done":
                    yield stream.finish(), value
                    return
                else:
                    raise ApiError(500, f"decoding failed: {value}", kind="server_error")
        finally:
            job.cancelled = True

    async def encode(req) -> tuple[list[int], torch.Tensor | None]:
        """The prompt's token ids, and its input embeddings when it holds images."""
        if not isinstance(req, ChatRequest) or embedder is None:
            return tokenizer.encode(req.prompt_text()), None
        pieces = req.prompt_pieces()
        images = [p for p in pieces if not isinstance(p, str)]
        if not images:
            return tokenizer.encode("".join(pieces)), None
        if len(images) > limits.max_images:
            raise ApiError(400, f"messages: {len(images)} images exceed the limit of {limits.max_images}", "messages")
        parts = [p if isinstance(p, str) else image_bytes(p, limits) for p in pieces]
        try:
            return await asyncio.to_thread(embedder, parts)
        except (ValueError, RuntimeError) as e:
            raise ApiError(400, f"image_url: {e}", "image_url") from None

    async def admit(request: Request, cls: type) -> tuple:
        """Check, tokenize and queue a request; its deltas arrive through the returned iterator."""
        authorize(request)
        req = parse_request(await read_body(request), cls, limits)
        if req.model not in (None, model_name):
            raise ApiError(404, f"The model '{req.model}' does not exist (this server serves '{model_name}')",
                           "model", code="model_not_found")
        prompt, embeds = await encode(req)
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if max_tokens is None:  # OpenAI's defaults: 16 for completions, the rest of the context for chat
            max_tokens = min(limits.max_new_tokens, context - len(prompt) if cls is ChatRequest else 16)
        check_lengths(len(prompt), max_tokens, limits, context)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(prompt, max_tokens, Sampling(req.temperature, req.top_k, req.top_p),
                  emit=lambda kind, value: loop.call_soon_threadsafe(queue.put_nowait, (kind, value)),
                  stop_ids=frozenset({tokenizer.eos_id}), seed=req.seed, embeds=embeds)
        try:
            batcher.submit(job)
        except QueueFull as e:
            raise ApiError(503, f"server busy: {e}", kind="server_error") from None
        metrics.prompt_tokens.inc(len(prompt))
        stream = TextStream(tokenizer, req.stop_strings())
        return req, len(prompt), stream, events(job, queue, stream)

    async def handle(request: Request, cls: type, endpoint: str):
        start = time.perf_counter()
        chat = cls is ChatRequest
        try:
            req, n_prompt, stream, deltas = await admit(request, cls)
            head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                    "object": "chat.completion" if chat else "text_completion",
                    "created": int(time.time()), "model": req.model or model_name}
            if req.stream:
                return StreamingResponse(sse(deltas, head, chat, endpoint, start), media_type="text/event-stream")
            pieces, finish = [], None
            async for delta, finish in deltas:
                pieces.append(delta)
        except ApiError as e:
            metrics.observe(endpoint, e.status)
            raise
        text, n = "".join(pieces), len(stream.ids)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                  if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
        metrics.observe(endpoint, 200, time.perf_counter() - start)
        return {**head, "choices": [choice], "usage": {"prompt_tokens": n_prompt, "completion_tokens": n,
                                                       "total_tokens": n_prompt + n}}

    async def sse(deltas: AsyncIterator[tuple[str, str | None]], head: dict, chat: bool, endpoint: str, start: float):
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(delta: dict | str, finish: str | None) -> str:
            choice = {"index": 0, "delta": delta} if chat else {"index": 0, "text": delta, "logprobs": None}
            return f"data: {json.dumps({**head, 'choices': [{**choice, 'finish_reason': finish}]})}\n\n"

        if chat:
            yield chunk({"role": "assistant", "content": ""}, None)
        try:
            async for delta, finish in deltas:
                if delta or finish:
                    yield chunk({"content": delta} if chat and delta else ({} if chat else delta), finish)
        except ApiError as e:
            metrics.observe(endpoint, e.status)
            yield f"data: {json.dumps(e.body())}\n\n"
            return
        metrics.observe(endpoint, 200, time.perf_counter() - start)
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, CompletionRequest, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, ChatRequest, "chat")

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "tessera"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "queue": batcher.queue.qsize()}

    @app.get("/metrics")
    async def metrics_route(request: Request):
        authorize(request)
        return metrics.render()

    return app


def load_for_serving(ckpt: str | Path, device: str = "auto") -> tuple[torch.nn.Module, Tokenizer, str]:
    """The model (int8 checkpoints on CPU), its tokenizer and a model name for the responses."""
    from tessera.core.checkpoint import find_checkpoint
    from tessera.core.tokenizer import load_tokenizer
    from tessera.interop.quantize import is_quantized, load_for_inference

    ckpt = find_checkpoint(ckpt)
    if device == "auto":
        device = "cpu" if is_quantized(ckpt) or not torch.cuda.is_available() else "cuda"
    model = load_for_inference(ckpt, device)
    tokenizer = load_tokenizer(ckpt)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"tokenizer vocab {tokenizer.vocab_size} exceeds the model's {model.cfg.vocab_size}")
    return model, tokenizer, ckpt.name


def serve(ckpt: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: ServeLimits = ServeLimits(), device: str = "auto", grace_s: float = 10.0,
          loaded: tuple[torch.nn.Module, Tokenizer, str, PromptEmbedder] | None = None) -> None:
    """Load the checkpoint (or take the decoder, tokenizer, name and prompt embedder `loaded`, for a
    model with images) and serve it until interrupted (SIGINT/SIGTERM): requests in flight get
    `grace_s` seconds to finish, then the rest are answered with an error and the server exits."""
    import uvicorn

    model, tokenizer, name, embedder = loaded or (*load_for_serving(ckpt, device), None)
    app = create_app(model, tokenizer, limits, api_key, name, embedder)
    print(f"serving {name} on http://{host}:{port} (API key {'required' if api_key else 'off'})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=grace_s)


@contextlib.contextmanager
def serving(app: FastAPI, timeout_s: float = 60.0) -> Iterator[str]:
    """`app` served on a free loopback port by a uvicorn thread while the block runs; yields its base URL
    (`http://127.0.0.1:PORT/v1`, what an OpenAI client takes). For a recipe or a test that talks to a
    model over HTTP in the same process."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        server.should_exit = True
        raise RuntimeError(f"the server did not start on 127.0.0.1:{port} within {timeout_s:.0f} s")
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
