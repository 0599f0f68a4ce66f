"""Continuous batching for the server: one thread decodes every running request together.

The running batch shares one KV cache whose columns all rows advance through; each row masks
the columns that are not its own. A request that arrives while others decode joins at the next
step: its prompt is prefilled on its own and its keys and values copied into the last columns
of a new row (the cache shifts right first when the prompt is longer than the columns so far),
so it never waits for the batch to finish. Finished rows leave at once; columns no row uses any
more are dropped from the front when room is needed. Every request fits the context alone, so
twice the context is enough columns for any batch that starts together. Each row keeps its own positions,
sampling, token budget and stop tokens, so a request decodes as it would alone.

A request's own failure (a seed the generator refuses, sampling that fails, a caller whose
callback raises) ends that request alone; only a failure of the model step fails the batch.
`stop` answers every request still queued or running, so no caller waits forever.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tessera.core.generate import Sampling, sample_next
from tessera.core.kv_cache import KVCache


@dataclass
class Job:
    """One request's decoding: its prompt, limits, and where its tokens go.

    `emit(kind, value)` is called from the worker thread with ("token", id), then once with
    ("done", finish_reason) or ("error", message). `cancelled` may be set by the caller at any time.
    """

    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling
    emit: Callable[[str, object], None]
    stop_ids: frozenset[int] = frozenset()
    seed: int | None = None
    cancelled: bool = False
    generated: int = 0
    generator: torch.Generator | None = None
    embeds: torch.Tensor | None = None  # (len(prompt), d_model) input embeddings in place of the prompt's lookup (images)

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - self.generated


class QueueFull(Exception):
    """More requests are waiting than the server accepts; the client should retry later."""


class Batcher:
    """Owns the model and the running batch; `submit` is thread-safe and returns at once."""

    def __init__(self, model: torch.nn.Module, max_batch: int = 32, max_queue: int = 256, batch_wait_s: float = 0.005):
        self.model = model.eval()
        self.cfg = model.cfg
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s
        self.columns = 2 * self.cfg.max_seq_len  # room for the longest prompt plus the longest budget
        self.queue: queue.Queue[Job] = queue.Queue(max_queue)
        self.stats = {"batches": 0, "batched_requests": 0, "joined_requests": 0, "decode_steps": 0}
        self._thread = threading.Thread(target=self._run, name="tessera-batcher", daemon=True)
        self._stop = threading.Event()
        self._held: Job | None = None  # the next request, waiting for room in the cache
        self._incoming: list[Job] = []  # taken from the queue, not yet rows of the batch
        self.jobs: list[Job] = []
        self.cache: KVCache | None = None
        self.mask = self.positions = self.last = None  # (B, columns) bool; (B,) next position; (B,) last token

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop decoding and fail every request not yet finished, so that no caller waits on it."""
        self._stop.set()
        self._thread.join(timeout=5)
        pending = self.jobs + self._incoming + ([self._held] if self._held else [])
        while True:
            try:
                pending.append(self.queue.get_nowait())
            except queue.Empty:
                break
        for job in pending:
            _send(job, "error", "server shutting down")
        self.jobs, self._incoming, self._held = [], [], None

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self.queue.maxsize} requests are already waiting") from None

    def _next_job(self, timeout: float | None) -> Job | None:
        """The held request, else the queue's next live one (waiting up to `timeout`; None: no wait)."""
        if self._held is not None:
            job, self._held = self._held, None
            return job
        while True:
            try:
                job = self.queue.get(timeout=timeout) if timeout else self.queue.get_nowait()
            except queue.Empty:
                return None
            if job.cancelled:
                continue
            try:
                job.generator = torch.Generator(self.device).manual_seed(job.seed) if job.seed is not None else None
            except (ValueError, RuntimeError, TypeError) as e:
                _send(job, "error", f"seed {job.seed}: {e}")
                continue
            return job

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            try:
                if self.jobs:
                    self._admit()
                    self._step()
                else:
                    self._start_batch()
            except Exception as e:  # a failed model step fails its batch, never the server
                for job in self.jobs + self._incoming:
                    _send(job, "error", f"{type(e).__name__}: {e}")
                self.jobs, self._incoming, self.cache = [], [], None

    def _start_batch(self) -> None:
        first = self._next_job(timeout=0.1)
        if first is None:
            return
        jobs, deadline = [first], time.perf_counter() + self.batch_wait_s
        while len(jobs) < self.max_batch and (job := self._next_job(max(1e-4, deadline - time.perf_counter()))):
            jobs.append(job)
        self.stats["batches"] += 1
        self.stats["batched_requests"] += len(jobs)
        self._incoming = jobs
        self.cache = KVCache(self.cfg.n_layers, len(jobs), self.cfg.kv_heads, self.cfg.head_dim, self.columns,
                             self.device, self.dtype)
        logits, self.mask = self._prefill(jobs, self.cache)
        self.jobs, self._incoming = jobs, []
        self.positions = torch.tensor([len(j.prompt) for j in jobs], device=self.device)
        self._sample_and_emit(logits)

    def _prefill(self, jobs: list[Job], cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompts through the model into `cache`: last logits and the key mask."""
        longest = max(len(j.prompt) for j in jobs)
        tokens = torch.zeros((len(jobs), longest), dtype=torch.long, device=self.device)
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        for i, job in enumerate(jobs):
            tokens[i, longest - len(job.prompt):] = torch.tensor(job.prompt, device=self.device)
            mask[i, longest - len(job.prompt):] = True
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        inputs = {}
        if any(j.embeds is not None for j in jobs):  # prompts with images: embeddings in, the rest looked up
            embeds = self.model.tok_emb(tokens)
            for i, job in enumerate(jobs):
                if job.embeds is not None:
                    embeds[i, longest - len(job.prompt):] = job.embeds.to(embeds.dtype)
            tokens, inputs = None, {"inputs_embeds": embeds}
        logits = self.model(tokens, positions=positions, key_padding_mask=None if mask.all() else mask, cache=cache,
                            **inputs)
        return logits[:, -1], mask

    def _admit(self) -> None:
        """Prefill requests that arrived meanwhile and append them as rows, while there is room."""
        joining: list[Job] = []
        while len(self.jobs) + len(joining) < self.max_batch and (job := self._next_job(None)):
            if not self._make_room(joining + [job]):
                self._held = job
                break
            joining.append(job)
        if not joining:
            return
        self.stats["joined_requests"] += len(joining)
        self._incoming = joining
        longest = max(len(j.prompt) for j in joining)
        self._shift_right(max(0, longest - self.cache.length))
        fresh = KVCache(self.cfg.n_layers, len(joining), self.cfg.kv_heads, self.cfg.head_dim, longest, self.device, self.dtype)
        logits, fresh_mask = self._prefill(joining, fresh)
        end = self.cache.length
        mask = torch.zeros((len(joining), end), dtype=torch.bool, device=self.device)
        mask[:, end - longest:] = fresh_mask
        for layer in range(self.cfg.n_layers):
            for ours, theirs in ((self.cache.k, fresh.k), (self.cache.v, fresh.v)):
                block = torch.zeros((len(joining), *ours[layer].shape[1:]), dtype=self.dtype, device=self.device)
                block[:, :, end - longest:end] = theirs[layer]
                ours[layer] = torch.cat([ours[layer], block])
        self.mask = torch.cat([self.mask, mask])
        self.positions = torch.cat([self.positions, torch.tensor([len(j.prompt) for j in joining], device=self.device)])
        start = len(self.jobs)
        self.jobs, self._incoming = self.jobs + joining, []
        self._sample_and_emit(logits, first_row=start)

    def _make_room(self, joining: list[Job]) -> bool:
        """Whether the running rows plus `joining` fit the cache, dropping unused front columns if needed."""
        def fits() -> bool:
            columns = max(self.cache.length, max(len(j.prompt) for j in joining))
            return columns + max(j.remaining for j in self.jobs + joining) <= self.cache.max_len

        if fits():
            return True
        unused = int(self.mask.any(dim=0).float().argmax()) if self.mask.any() else self.cache.length
        if unused:
            for buffers in (self.cache.k, self.cache.v):
                for layer, buf in enumerate(buffers):
                    buffers[layer] = torch.cat([buf[:, :, unused:], torch.zeros_like(buf[:, :, :unused])], dim=2)
            self.cache.length -= unused
            self.mask = self.mask[:, unused:]
        return fits()

    def _shift_right(self, n: int) -> None:
        """Make `n` more columns at the front (masked for the running rows)."""
        if not n:
            return
        for buffers in (self.cache.k, self.cache.v):
            for layer, buf in enumerate(buffers):
                buffers[layer] = torch.cat([torch.zeros_like(buf[:, :, :n]), buf[:, :, :-n]], dim=2)
        self.cache.length += n
        self.mask = torch.cat([self.mask.new_zeros((self.mask.shape[0], n)), self.mask], dim=1)

    def _step(self) -> None:
        self.stats["decode_steps"] += 1
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        logits = self.model(self.last[:, None], positions=self.positions[:, None],
                            key_padding_mask=None if self.mask.all() else self.mask, cache=self.cache)[:, -1]
        self.positions = self.positions + 1
        self._sample_and_emit(logits)

    def _sample_and_emit(self, logits: torch.Tensor, first_row: int = 0) -> None:
        """Sample the next token of rows first_row.. from their `logits`, send it, and drop finished rows."""
        rows = self.jobs[first_row:]
        nxt = logits.argmax(dim=-1)
        for i, job in enumerate(rows):
            if job.sampling.temperature > 0:
                try:
                    nxt[i] = sample_next(logits[i : i + 1], job.sampling, job.generator)[0]
                except (ValueError, RuntimeError) as e:  # this row's sampling alone failed: end it alone
                    _send(job, "error", f"sampling failed: {e}")
        self.last = nxt if first_row == 0 else torch.cat([self.last, nxt])
        keep = [True] * first_row
        for job, token in zip(rows, nxt.tolist()):
            keep.append(self._emit(job, token))
        if not all(keep):
            index = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.long, device=self.device)
            self.jobs = [j for j, k in zip(self.jobs, keep) if k]
            for buffers in (self.cache.k, self.cache.v):
                for layer, buf in enumerate(buffers):
                    buffers[layer] = buf.index_select(0, index)
            self.mask, self.positions, self.last = self.mask[index], self.positions[index], self.last[index]

    @staticmethod
    def _emit(job: Job, token: int) -> bool:
        """Send `token` to `job`; whether the job goes on."""
        if job.cancelled:
            return False
        job.generated += 1
        if token in job.stop_ids:
            _send(job, "done", "stop")
            return False
        _send(job, "token", token)
        if job.remaining <= 0:
            _send(job, "done", "length")
            return False
        return not job.cancelled


def _send(job: Job, kind: str, value: object) -> None:
    """`job.emit(kind, value)`; a callback that raises (its client gone) cancels that job, nothing else.
    After an error the job is cancelled, so it leaves the batch at its next token."""
    try:
        job.emit(kind, value)
    except Exception:  # the caller's callback: whatever it raises must not reach the batch
        job.cancelled = True
    if kind == "error":
        job.cancelled = True
