"""The seams of a run, as protocols: what the trainer and `build_trainer` ask of the pieces that
several packages implement.

`core` holds the single-process implementation of each (`LocalPlacement`, `LocalEngine`,
`Checkpointer`, `MetricsLogger`/`NullMetrics`, `StreamingLoader`, `LanguageModelingTask`);
`tessera.distributed` adds placements, engines and checkpointers for DDP/FSDP2/TP and DeepSpeed,
`tessera.alignment` (and the multimodal stages) add tasks. Every implementation conforms
(`tests/test_seams.py` checks each against these protocols at run time), so the trainer never
learns which one it was handed.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from tessera.core.config import Config
    from tessera.core.model import Transformer

InitWeights = Callable[["Transformer"], None]  # fills a new model's weights before it is spread


@runtime_checkable
class Engine(Protocol):
    """How one process turns a batch into gradients and an update (single process, FSDP/TP, ZeRO)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    objective: Callable
    metrics: dict[str, torch.Tensor]

    def forward_backward(self, batch: Any, scale: float = 1.0) -> torch.Tensor: ...
    def eval_loss(self, batch: Any) -> torch.Tensor: ...
    def clip_grad_norm(self, max_norm: float) -> torch.Tensor: ...
    def step(self) -> None: ...
    def zero_grad(self) -> None: ...
    def any_rank(self, flag: bool) -> bool: ...
    def max_over_ranks(self, value: float) -> float: ...


@runtime_checkable
class CheckpointStore(Protocol):
    """Step directories of a run: complete or absent, the newest few kept."""

    def save(self, step: int, engine: Engine, state: dict, run_config: str = "",
             companions: dict[str, Engine] | None = None) -> Path: ...
    def load(self, path: str | Path, engine: Engine, companions: dict[str, Engine] | None = None) -> dict: ...
    def latest(self) -> Path | None: ...
    def wait(self) -> None: ...


@runtime_checkable
class MetricsWriter(Protocol):
    """Where a run's numbers go (metrics.jsonl and TensorBoard on the first rank, nowhere elsewhere)."""

    def log(self, step: int, values: dict[str, float]) -> None: ...
    def close(self) -> None: ...


@runtime_checkable
class BatchLoader(Protocol):
    """Batches of one data-parallel rank, with a state small enough to checkpoint and replay."""

    epoch: int
    skipped: int

    def __iter__(self) -> Iterator: ...
    def reset(self) -> None: ...
    def state_dict(self) -> dict: ...
    def resumable_from(self, state: dict) -> bool: ...
    def load_state_dict(self, state: dict) -> None: ...


@runtime_checkable
class Placement(Protocol):
    """Where a run executes and how its models are spread over the ranks of the job."""

    device: torch.device
    rank: int
    dp_rank: int
    dp_size: int
    world_size: int

    def check(self, cfg: Config) -> None: ...
    def prepare(self, model: nn.Module, cfg: Config) -> nn.Module: ...
    def engine(self, model: nn.Module, cfg: Config) -> Engine: ...
    def checkpointer(self, directory: Path, keep_last: int, attachments: tuple[Path, ...]) -> CheckpointStore: ...
    def metrics(self, run_dir: Path, tensorboard: bool, resume_step: int | None) -> MetricsWriter: ...
    def dp_group(self) -> Any: ...
    def grad_norm(self, params: list[nn.Parameter]) -> torch.Tensor: ...


@runtime_checkable
class Update(Protocol):
    """A stage's own optimizer update (RL: roll out, then several clipped steps), in place of the
    trainer's gradient step; returns the step's metrics."""

    progress_keys: tuple[str, ...]  # shown beside the progress bar

    def __call__(self, step: int, batch: Any) -> dict[str, float]: ...


@runtime_checkable
class Task(Protocol):
    """What a run learns: its data, its models and its objective (pretraining, SFT, RM, DPO, PPO,
    GRPO, ...), handed to the one `build_trainer` and the one `Trainer.fit`."""

    vocab_size: int
    tokenizer_files: tuple[Path, ...]  # copied into every checkpoint
    val_perplexity: bool  # the validation loss is a per-token NLL
    baseline_eval: bool  # evaluate at step 0, before any update
    static_shapes: bool  # every batch has one shape (compile="auto" may compile)
    companions: dict[str, Engine]  # other trained models, checkpointed in the same step directory
    update: Update | None  # None: the trainer's gradient step on `objective`

    def check(self, cfg: Config, placement: Placement) -> None: ...
    def build_model(self, cfg: Config, device: torch.device, init_weights: InitWeights | None) -> nn.Module: ...
    def attach(self, placement: Placement, cfg: Config, engine: Engine, init_weights: InitWeights | None) -> None: ...
    def objective(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...
    def loaders(self, cfg: Config, dp_rank: int, dp_size: int) -> tuple[BatchLoader, BatchLoader | None]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict, step: int, same_layout: bool) -> None: ...
