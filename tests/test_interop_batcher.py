"""Continuous batching: requests joining a running batch at staggered times (longer prompts than
the batch's columns, cache compaction, cancellation) each decode exactly as they would alone."""
from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from tessera import kernels
from tessera.core.config import ModelConfig
from tessera.core.generate import Sampling, generate_tokens
from tessera.core.model import Transformer
from tessera.interop.batcher import Batcher, Job


@pytest.fixture(autouse=True)
def torch_kernels():
    kernels.configure("torch")


class Collector:
    def __init__(self):
        self.tokens: list[int] = []
        self.finish: str | None = None
        self.done = threading.Event()

    def __call__(self, kind, value):
        if kind == "token":
            self.tokens.append(value)
        else:
            self.finish = value if kind == "done" else f"error: {value}"
            self.done.set()


@pytest.mark.parametrize("pos,int8", [("rope", False), ("learned", False), ("rope", True)],
                         ids=["rope", "learned", "rope-int8"])
def test_staggered_requests_decode_as_alone(pos, int8):
    """int8 too: activations are quantized per token, so a row's logits never depend on its batch."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, max_seq_len=32, pos=pos,
                      norm="rmsnorm", mlp="swiglu", init_std=0.3)
    model = Transformer(cfg).eval()
    if int8:
        from tessera.interop.quantize import quantize_model

        model = quantize_model(model)
    rng = random.Random(0)
    batcher = Batcher(model, max_batch=4, batch_wait_s=0.0)
    batcher.start()
    jobs, collectors = [], []
    try:
        for i in range(14):  # a 1-token prompt first, so that longer ones joining must shift the cache
            prompt = [rng.randrange(1, 50) for _ in range(1 if i == 0 else rng.randint(1, 20))]
            budget = rng.randint(min(12, 32 - len(prompt)), 32 - len(prompt))
            collectors.append(Collector())
            jobs.append(Job(prompt, budget, Sampling(temperature=0), collectors[-1], stop_ids=frozenset({0})))
            batcher.submit(jobs[-1])
            deadline = time.time() + 10
            while jobs[-1].generated < 2 and not collectors[-1].done.is_set() and time.time() < deadline:
                time.sleep(0.001)
        cancelled = Job([1, 2, 3], 20, Sampling(temperature=0), Collector())
        batcher.submit(cancelled)
        cancelled.cancelled = True
        assert all(c.done.wait(30) for c in collectors)
    finally:
        batcher.stop()
    assert batcher.stats["joined_requests"] > 5
    for job, got in zip(jobs, collectors):
        alone = generate_tokens(model, [job.prompt], job.max_new_tokens, sampling=Sampling(temperature=0), stop_ids=[0])[0]
        assert got.finish == ("stop" if alone[-1] == 0 else "length"), (got.finish, got.tokens, alone)
        assert got.tokens == [t for t in alone if t != 0]


def test_seeded_sampling_is_reproducible_in_a_batch():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=40, n_layers=1, n_heads=2, d_model=16, max_seq_len=24)).eval()
    batcher = Batcher(model, max_batch=8)
    batcher.start()
    try:
        runs = []
        for _ in range(2):
            collectors = [Collector() for _ in range(3)]
            for c, prompt in zip(collectors, ([1, 2], [3], [4, 5, 6])):
                batcher.submit(Job(prompt, 10, Sampling(temperature=1.0, top_k=5), c, seed=7))
            assert all(c.done.wait(30) for c in collectors)
            runs.append([c.tokens for c in collectors])
    finally:
        batcher.stop()
    assert runs[0] == runs[1]


def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=40, n_layers=1, n_heads=2, d_model=16, max_seq_len=24)).eval()
    batcher = Batcher(model)
    batcher.start()
    try:
        bad, good = Collector(), Collector()
        batcher.submit(Job([99], 5, Sampling(temperature=0), bad))  # id beyond the vocabulary
        assert bad.done.wait(30) and bad.finish.startswith("error")
        batcher.submit(Job([1, 2], 5, Sampling(temperature=0), good))
        assert good.done.wait(30) and good.finish == "length" and len(good.tokens) == 5
    finally:
        batcher.stop()


def test_one_bad_request_never_fails_the_others():
    """A seed the generator refuses (>= 2**64) and a client whose callback raises end their own
    request only; every other request in the running batch decodes as it would alone."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=40, n_layers=1, n_heads=2, d_model=16, max_seq_len=32)).eval()
    batcher = Batcher(model, max_batch=8, batch_wait_s=0.05)
    good = [Collector() for _ in range(3)]
    prompts = ([1, 2, 3], [4], [5, 6])

    def broken(kind, value):
        raise RuntimeError("client went away")

    batcher.start()
    try:
        batcher.submit(Job(list(prompts[0]), 20, Sampling(temperature=0), good[0]))
        for seed in (1 << 64, -(1 << 63) - 1):
            bad = Collector()
            batcher.submit(Job([7, 8], 20, Sampling(temperature=0.8), bad, seed=seed))
            assert bad.done.wait(30) and bad.finish.startswith("error") and "seed" in bad.finish
        broken_job = Job([9, 10], 20, Sampling(temperature=0), broken)
        batcher.submit(broken_job)
        for c, prompt in zip(good[1:], prompts[1:]):
            batcher.submit(Job(list(prompt), 20, Sampling(temperature=0), c))
        assert all(c.done.wait(30) for c in good)
    finally:
        batcher.stop()
    assert broken_job.cancelled
    for c, prompt in zip(good, prompts):
        alone = generate_tokens(model, [list(prompt)], 20, sampling=Sampling(temperature=0))[0]
        assert c.finish == "length" and c.tokens == alone


def test_stop_answers_every_request_still_waiting_or_running():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=40, n_layers=1, n_heads=2, d_model=16, max_seq_len=64)).eval()
    batcher = Batcher(model, max_batch=2, batch_wait_s=0.0)
    collectors = [Collector() for _ in range(6)]
    batcher.start()
    for c in collectors:
        batcher.submit(Job([1, 2], 60, Sampling(temperature=0), c))
    batcher.stop()
    assert all(c.done.wait(5) for c in collectors)
    assert any(c.finish == "error: server shutting down" for c in collectors)
