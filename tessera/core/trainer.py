"""The training loop, the one every stage runs. It is handed an engine, loaders, a checkpointer,
a logger and the task from outside, and knows nothing of how many processes run it or who
launched them. A step is the gradient step on the task's objective, or the task's own update
(RL: roll out, then several clipped steps); everything around it (schedule, logging,
evaluation, checkpoints with companions, resume, a requested stop) is the same."""
from __future__ import annotations

import itertools
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from tessera.core.config import Config, schedule_changes, to_toml
from tessera.core.metrics import memory_gb
from tessera.core.optim import lr_at, set_lr
from tessera.core.seams import BatchLoader, CheckpointStore, Engine, MetricsWriter, Task


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses; the last good checkpoint is left as it was."""


@dataclass
class TrainerParts:
    engine: Engine
    task: Task
    train_loader: BatchLoader
    val_loader: BatchLoader | None
    checkpointer: CheckpointStore
    metrics: MetricsWriter  # a NullMetrics on every rank but the first
    device: torch.device
    flops_per_token: Callable[[int], float] | None = None  # of the trained body, at a window length
    peak_flops: float | None = None  # of one device
    dp_size: int = 1  # data-parallel ranks, each reading its own batches
    devices: int = 1  # all ranks, for MFU
    console: bool = True  # progress bar and messages (the first rank only)
    telemetry: object | None = None  # anything with sample() -> dict[str, float], logged with the metrics


def to_device(batch, device: torch.device):
    """A batch (tensor, tuple or dict of tensors) on `device`; other leaves (an image batch's keys
    and texts) as they are."""
    if isinstance(batch, (str, bytes, int, float)):
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return type(batch)(to_device(v, device) for v in batch)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    def __init__(self, cfg: Config, parts: TrainerParts):
        self.cfg, self.parts = cfg, parts
        self.engine = parts.engine
        self.step = 0
        self.bad_in_row = 0
        self.skipped_steps = 0
        self.stop_requested = False
        self.stopped_early = False
        self.task = parts.task
        self.optimizers = [self.engine.optimizer, *(e.optimizer for e in self.task.companions.values())]

    def tokens_in_step(self, step: int) -> int:
        """Tokens the gradient step after `step` steps reads over all ranks (its window length under a
        progressive schedule); 0 for a task's own update, which reports its own."""
        t = self.cfg.train
        return t.batch_size * t.seq_len_at(step) * t.grad_accum * self.parts.dp_size if self.task.update is None else 0

    def batches_at_length(self, batches: Iterator) -> Iterator:
        """The batch stream, re-opened at the next step's window length when the progressive schedule
        (train.seq_len_schedule) changes it; the loader's state carries the length, so a resumed run
        crosses a phase boundary exactly as an uninterrupted one."""
        loader = self.parts.train_loader
        length = self.cfg.train.seq_len_at(self.step)
        if getattr(loader, "seq_len", length) == length:
            return batches
        close = getattr(batches, "close", None)
        if close is not None:
            close()
        loader.set_seq_len(length)
        return iter(loader)

    def state_dict(self) -> dict:
        """This rank's run state; the checkpointer adds models and optimizers."""
        return {
            "step": self.step,
            "loader": self.parts.train_loader.state_dict(),
            "rng": rng_state(),
            "skipped_steps": self.skipped_steps,
            "task": self.task.state_dict(),
        }

    def resume(self, ckpt: str | Path) -> None:
        """Continue from `ckpt`. Saved under another data-parallel layout, the data order cannot be
        replayed: the stream restarts at the next epoch, with a warning."""
        state = self.parts.checkpointer.load(ckpt, self.engine, self.task.companions)
        self.step = state["step"]
        self.skipped_steps = state["skipped_steps"]
        loader = self.parts.train_loader
        same_layout = loader.resumable_from(state["loader"])
        if same_layout:
            loader.load_state_dict(state["loader"])
        else:
            loader.epoch = state["loader"]["epoch"] + 1
            warnings.warn(f"{ckpt} was saved under another data-parallel layout: models and optimizers are "
                          f"restored, the data stream restarts at epoch {loader.epoch}", stacklevel=2)
        if "rng" in state:
            set_rng_state(state["rng"])
        self.task.load_state_dict(state.get("task", {}), self.step, same_layout)
        if self.parts.console:
            saved = Path(ckpt) / "run_config.toml"
            changes = schedule_changes(saved.read_text(), self.cfg) if saved.exists() else []
            print(f"resumed from step {self.step} ({ckpt})"
                  + (f"; changed since that checkpoint: {', '.join(changes)}" if changes else ""))

    def save(self) -> Path:
        return self.parts.checkpointer.save(self.step, self.engine, self.state_dict(), to_toml(self.cfg),
                                            self.task.companions)

    def request_stop(self) -> None:
        """Ask `fit` to checkpoint after the current step and return (preemption, SIGTERM).
        Safe to call from a signal handler."""
        self.stop_requested = True

    def evaluate(self) -> dict:
        """Mean loss (and the objective's metrics) over `eval.batches` validation batches."""
        loader = self.parts.val_loader
        if loader is None:
            return {}
        loader.reset()
        losses, metrics = [], {}
        for batch in itertools.islice(loader, self.cfg.eval.batches):
            losses.append(self.engine.eval_loss(to_device(batch, self.parts.device)))
            for k, v in self.engine.metrics.items():
                metrics.setdefault(f"val_{k}", []).append(v)
        if not losses:
            raise ValueError("the validation split yields no full batch: lower train.batch_size or add data")
        loss = torch.stack(losses).mean().item()
        out = {"val_loss": loss, **{k: torch.stack(v).mean().item() for k, v in metrics.items()}}
        if self.task.val_perplexity:
            out["val_ppl"] = math.exp(min(loss, 50.0))
        return out

    def train_step(self, batches: Iterator) -> dict[str, float]:
        """One step at this step's learning rate: the task's own update, or the gradient step."""
        lr = lr_at(self.step, self.cfg.optim, self.cfg.train.steps)
        for optimizer in self.optimizers:
            set_lr(optimizer, lr)
        update = self.task.update
        if update is None:
            metrics = self.gradient_step(batches)
        else:
            metrics = update(self.step + 1, next(batches))
            self.account(metrics.get("skipped", 0.0) == 0.0)  # its optimizer steps skip non-finite gradients
        self.step += 1
        return {**metrics, "lr": lr}

    def account(self, finite: bool) -> None:
        """Count a step whose update was skipped for a non-finite loss or gradient; `train.max_bad_steps`
        of them in a row stop the run (the last good checkpoint is left as it was)."""
        if finite:
            self.bad_in_row = 0
            return
        self.bad_in_row += 1
        self.skipped_steps += 1
        if self.bad_in_row >= self.cfg.train.max_bad_steps:
            raise TrainingDiverged(f"{self.bad_in_row} non-finite losses in a row at step {self.step}; "
                                   f"last good checkpoint: {self.parts.checkpointer.latest()}")

    def gradient_step(self, batches: Iterator) -> dict[str, float]:
        """Accumulated micro-batches, clipping, and the optimizer step; a non-finite loss or norm
        skips the update (`account`)."""
        t = self.cfg.train
        loss = torch.zeros((), device=self.parts.device)
        metrics: dict[str, torch.Tensor] = {}
        for _ in range(t.grad_accum):
            loss += self.engine.forward_backward(to_device(next(batches), self.parts.device), scale=1.0 / t.grad_accum)
            for k, v in self.engine.metrics.items():
                metrics[k] = metrics.get(k, 0.0) + v / t.grad_accum
        loss /= t.grad_accum
        norm = self.engine.clip_grad_norm(self.cfg.optim.grad_clip)
        loss_value, norm_value = loss.item(), float(norm)
        finite = math.isfinite(loss_value) and math.isfinite(norm_value)
        if finite:
            self.engine.step()
        self.engine.zero_grad()
        self.account(finite)
        return {"loss": loss_value, "grad_norm": norm_value, **{k: float(v) for k, v in metrics.items()}}

    def log_eval(self, bar) -> dict:
        """Evaluate, log and show the validation numbers of this step."""
        val = self.evaluate()
        if val:
            self.parts.metrics.log(self.step, val)
            if self.parts.console:
                bar.write(f"step {self.step}: val_loss {val['val_loss']:.4f}")
        return val

    def fit(self, stop_at: int | None = None) -> dict:
        """Train to `train.steps` (or stop after step `stop_at`, with a checkpoint); returns the last metrics."""
        cfg, parts = self.cfg, self.parts
        end = min(cfg.train.steps, stop_at) if stop_at is not None else cfg.train.steps
        if self.step >= cfg.train.steps and parts.console:
            print(f"the run is already finished: step {self.step} of train.steps={cfg.train.steps}; nothing to train")
        batches = iter(parts.train_loader)
        update = self.task.update
        shown = update.progress_keys if update is not None else ("loss", "lr")
        bar = tqdm(total=cfg.train.steps, initial=self.step, desc="train", unit="step",
                   disable=not (cfg.log.progress and parts.console), mininterval=1.0, dynamic_ncols=True)
        train_time, window_tokens, window_flops = 0.0, 0, 0.0
        last: dict = {}
        if self.step == 0 < end and self.task.baseline_eval:
            self.log_eval(bar)
        while self.step < end:
            batches = self.batches_at_length(batches)
            tokens, length = self.tokens_in_step(self.step), cfg.train.seq_len_at(self.step)
            started = time.perf_counter()
            metrics = self.train_step(batches)
            train_time += time.perf_counter() - started
            window_tokens += tokens
            window_flops += tokens * parts.flops_per_token(length) if parts.flops_per_token else 0.0
            bar.update(1)
            stopping = self.engine.any_rank(self.stop_requested)
            done = self.step == end or stopping
            if self.step % cfg.log.every == 0 or done:
                last = {**metrics, "mem_gb": self.engine.max_over_ranks(memory_gb(parts.device)),
                        "skipped_steps": self.skipped_steps, "data_skipped": parts.train_loader.skipped}
                if cfg.train.seq_len_schedule:
                    last["seq_len"] = float(length)
                if window_tokens:
                    last["tokens_per_s"] = window_tokens / train_time
                    if parts.peak_flops and window_flops:
                        last["mfu"] = window_flops / train_time / (parts.peak_flops * parts.devices)
                if parts.telemetry is not None:
                    last.update(parts.telemetry.sample())
                parts.metrics.log(self.step, last)
                bar.set_postfix({k: f"{last[k]:.4g}" for k in shown if k in last}, refresh=False)
                train_time, window_tokens, window_flops = 0.0, 0, 0.0
            if not stopping and ((cfg.eval.every and self.step % cfg.eval.every == 0) or self.step == cfg.train.steps):
                last.update(self.log_eval(bar))
            periodic = cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0
            if (periodic or done) and self.bad_in_row == 0:  # never checkpoint in the middle of a bad streak
                self.save()
            if stopping:
                self.stopped_early = True
                if parts.console:
                    bar.write(f"stop requested: checkpointed step {self.step} and stopping")
                break
        parts.checkpointer.wait()
        bar.close()
        return last
