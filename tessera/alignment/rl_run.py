"""`tessera ppo | grpo`: the RL trainers of `ppo.py` and `grpo.py` run from a config on a placement.

Every data-parallel rank takes its own prompts (data.path: `{"prompt": ...}` lines) and samples
and scores their rollouts; the rows are then gathered (`rows.RankRows`), so every rank computes
the advantages of the whole batch and steps on its slice of every mini-batch. The placement
spreads policy, reference, value and reward models (FSDP2 shards, DDP replicas) and averages the
gradients over the ranks. Decoding stops at a different token on each rank while a sharded
forward needs every rank, so the policy's full weights are gathered for the rollout phase
(`gathered`). Metrics are averaged over ranks (ratio extremes: min and max) and written by the
first. Checkpoints go through the placement's checkpointer, so `tessera generate --ckpt RUN_DIR`
reads the policy, and `checkpoint.resume` continues a run.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule
from tqdm import tqdm

from tessera import kernels
from tessera.alignment.grpo import GRPOConfig, GRPOTrainer
from tessera.alignment.ppo import SHUFFLE_STREAM, PPOConfig, PPOTrainer, ValueModel
from tessera.alignment.reward import RewardModel
from tessera.alignment.rollout import RewardFn
from tessera.alignment.rows import LocalRows, RankRows
from tessera.alignment.sft_data import render
from tessera.alignment.stage import SampleLoader, StageTask
from tessera.core.build import resume_path, with_vocab
from tessera.core.checkpoint import find_checkpoint, load_weights, read_model_config
from tessera.core.config import Config, ConfigError, RLConfig, to_toml
from tessera.core.data.jsonl import read_records
from tessera.core.model import Transformer
from tessera.core.optim import lr_at, set_lr
from tessera.core.tokenizer import Tokenizer, load_tokenizer


def read_prompts(path: str | Path, tokenizer: Tokenizer, template: str | None, max_prompt_tokens: int,
                 on_error: str = "raise") -> tuple[list[list[int]], int]:
    """Encoded prompts of a JSONL file (rendered as a user turn when `template` is given) and the
    count of skipped lines; errors name file and line."""

    def parse(record: dict) -> list[int]:
        if not isinstance(record.get("prompt"), str) or not record["prompt"]:
            raise ValueError("a line must hold a JSON object with a non-empty string 'prompt'")
        text = record["prompt"]
        if template is not None:
            text = render(template, [{"role": "user", "content": text}], add_generation_prompt=True)
        ids = tokenizer.encode(text)
        if len(ids) > max_prompt_tokens:
            raise ValueError(f"the prompt is {len(ids)} tokens; with rl.max_new_tokens it must be at most "
                             f"{max_prompt_tokens} to fit model.max_seq_len")
        return ids

    return read_records(path, parse, on_error, "prompts")


def load_reward_fn(spec: str) -> RewardFn:
    """`rl.reward_fn = "module:function"`, imported from the Python path."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ConfigError(f"rl.reward_fn={spec!r} must look like 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any failure to import is the config's problem to report
        raise ConfigError(f"rl.reward_fn={spec!r}: cannot import {module_name!r} ({type(e).__name__}: {e}); "
                          "is its directory on PYTHONPATH?") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"rl.reward_fn={spec!r}: module {module_name!r} has no function {name!r}")
    return fn


def load_reward_model(path: str, tokenizer: Tokenizer, device: torch.device) -> RewardModel:
    """A frozen `RewardModel` from a checkpoint (or run directory) of `tessera rm`."""
    try:
        ckpt = find_checkpoint(path)
    except FileNotFoundError:
        raise ConfigError(f"rl.reward_model={path!r} is not a checkpoint or run directory of `tessera rm`") from None
    model = RewardModel(Transformer(read_model_config(ckpt))).to(device)
    try:
        load_weights(model, ckpt)
    except (RuntimeError, KeyError) as e:
        raise ConfigError(f"rl.reward_model={path!r}: {ckpt} holds no reward model (keys body.*, value_head.*): "
                          f"{str(e).splitlines()[0]}") from None
    if (ckpt / "tokenizer.json").exists() and load_tokenizer(ckpt).hash != tokenizer.hash:
        raise ConfigError(f"rl.reward_model={path!r} was trained with another tokenizer than the policy's")
    return model.requires_grad_(False)


def check_rl(command: str, cfg: Config, dp_size: int) -> None:
    """The [rl] keys this command reads, with the rank count: ConfigError naming the key."""
    rl = cfg.rl
    if bool(rl.reward_model) == bool(rl.reward_fn):
        raise ConfigError("set exactly one of rl.reward_model (a `tessera rm` checkpoint) and rl.reward_fn "
                          "('module:function')")
    for key in ("rollout_batch", "epochs", "max_new_tokens", "kl_horizon"):
        if getattr(rl, key) < 1:
            raise ConfigError(f"rl.{key}={getattr(rl, key)} must be >= 1")
    if rl.clip <= 0 or rl.value_clip <= 0 or rl.temperature <= 0:
        raise ConfigError(f"rl.clip={rl.clip}, rl.value_clip={rl.value_clip} and rl.temperature={rl.temperature} "
                          "must be > 0")
    if rl.kl_coef < 0 or rl.kl_target < 0 or rl.mini_batch_size < 0:
        raise ConfigError(f"rl.kl_coef={rl.kl_coef}, rl.kl_target={rl.kl_target} and "
                          f"rl.mini_batch_size={rl.mini_batch_size} must be >= 0")
    if not (0 <= rl.gamma <= 1 and 0 <= rl.lam <= 1):
        raise ConfigError(f"rl.gamma={rl.gamma} and rl.lam={rl.lam} must be in [0, 1]")
    if rl.max_new_tokens >= cfg.model.max_seq_len:
        raise ConfigError(f"rl.max_new_tokens={rl.max_new_tokens} leaves no room for a prompt in "
                          f"model.max_seq_len={cfg.model.max_seq_len}")
    if command == "grpo" and rl.group_size < 2:
        raise ConfigError(f"rl.group_size={rl.group_size} must be >= 2: GRPO's advantages are relative to the group")
    rows = rl.rollout_batch * (rl.group_size if command == "grpo" else 1)
    mini = rl.mini_batch_size or rows
    if rl.rollout_batch % dp_size or mini % dp_size or rows % mini:
        raise ConfigError(f"rl.rollout_batch={rl.rollout_batch} prompts ({rows} rows) and rl.mini_batch_size={mini} "
                          f"must split evenly: the rows into mini-batches, and both over {dp_size} data-parallel "
                          "rank(s)")
    p = cfg.parallel
    if p.engine != "fsdp":
        raise ConfigError("tessera ppo | grpo run on FSDP2/HSDP/DDP/TP ranks, not parallel.engine='deepspeed' (not "
                          "yet: the rollouts decode on weights gathered by FSDP2, and ZeRO's gather is not wired in)")
    if p.tp > 1 and p.sequence_parallel:
        raise ConfigError(f"parallel.sequence_parallel with parallel.tp={p.tp}: decoding feeds one token at a time, "
                          "which cannot be split along the sequence; valid: sequence_parallel = false")


def trainer_config(command: str, rl: RLConfig, cfg: Config) -> PPOConfig | GRPOConfig:
    """The [rl] section in the library trainers' terms (batch sizes over all ranks)."""
    grad_clip = cfg.optim.grad_clip or None
    if command == "ppo":
        return PPOConfig(rollout_batch=rl.rollout_batch, mini_batch_size=rl.mini_batch_size or rl.rollout_batch,
                         ppo_epochs=rl.epochs, clip=rl.clip, value_clip=rl.value_clip, gamma=rl.gamma, lam=rl.lam,
                         kl_coef=rl.kl_coef, kl_target=rl.kl_target or None, kl_horizon=rl.kl_horizon,
                         whiten_advantages=rl.whiten_advantages, vf_coef=rl.vf_coef, max_grad_norm=grad_clip,
                         max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, seed=cfg.train.seed)
    return GRPOConfig(group_size=rl.group_size, mini_batch_size=rl.mini_batch_size, epochs=rl.epochs,
                      clip=rl.clip, kl_coef=rl.kl_coef, max_grad_norm=grad_clip, max_new_tokens=rl.max_new_tokens,
                      temperature=rl.temperature, seed=cfg.train.seed)


@contextlib.contextmanager
def gathered(model: nn.Module, reshard_after_forward: bool):
    """An FSDP2 model's full weights held on every rank (no collectives in its forwards) until exit;
    then resharded, with `reshard_after_forward` back to the run's (the root: off)."""
    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in fsdp:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in fsdp:
            m.reshard()
            m.set_reshard_after_forward(reshard_after_forward and m is not model, recurse=False)


def prompt_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of the prompt at `index` of the data in `step` (`rl.seed_per_prompt`)."""
    return ((seed * 1_000_003 + step) * 1_000_003 + index) % 2**62


def reduce_metrics(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """Means over all ranks (every rank holds as many rows), `ratio_min`/`ratio_max` as min/max."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    sums, lows, highs = values.clone(), values.clone(), values.clone()
    dist.all_reduce(sums)
    dist.all_reduce(lows, op=dist.ReduceOp.MIN)
    dist.all_reduce(highs, op=dist.ReduceOp.MAX)
    world = dist.get_world_size()
    return {k: (lows[i] if k == "ratio_min" else highs[i] if k == "ratio_max" else sums[i] / world).item()
            for i, k in enumerate(keys)}


def rl_step(trainer: PPOTrainer | GRPOTrainer, prompts: list[list[int]], seeds: list[int] | None,
            reshard_after_forward: bool, device: torch.device) -> dict[str, float]:
    """One iteration: rollouts on gathered policy weights, the clipped updates, metrics over ranks,
    then (PPO) the KL coefficient moved by the KL of all ranks' rollouts."""
    start = time.perf_counter()
    with gathered(trainer.policy, reshard_after_forward):
        batch, metrics = trainer.collect(prompts, seeds)
    metrics["rollout_s"] = time.perf_counter() - start
    history = trainer.update(batch)
    for key in history[0]:
        if key not in ("ratio_min", "ratio_max"):
            metrics[key] = sum(h[key] for h in history) / len(history)
    metrics["ratio_min"] = min(h["ratio_min"] for h in history)
    metrics["ratio_max"] = max(h["ratio_max"] for h in history)
    metrics["step_s"] = time.perf_counter() - start
    metrics = reduce_metrics(metrics, device)
    if isinstance(trainer, PPOTrainer):
        trainer.kl_ctl.update(metrics["kl"], trainer.cfg.rollout_batch)
    return metrics


class RLRun:
    """`tessera ppo | grpo` on a placement: the models spread, the trainer, the prompt stream, and
    checkpoints that resume. A checkpoint holds the policy as the trainers' checkpoints do (so
    `tessera generate` reads it), PPO's value model beside it as a companion, and the prompt
    stream's position, the KL coefficient and the sampling and mini-batch generators' states."""

    def __init__(self, command: str, cfg: Config, placement, init_weights=None):
        placement.check(cfg)
        check_rl(command, cfg, placement.dp_size)
        kernels.configure(cfg.kernels.backend, **cfg.kernels.overrides())
        rl, device = cfg.rl, placement.device
        task = StageTask(cfg)  # tokenizer and chat template from data.tokenizer or model.init_from
        self.cfg = cfg = with_vocab(cfg, task.vocab_size)
        self.command, self.placement = command, placement
        tok = task.tokenizer
        prompts, self.skipped = read_prompts(cfg.data.path, tok, task.template if rl.chat_template else None,
                                             cfg.model.max_seq_len - rl.max_new_tokens, cfg.data.on_error)
        if len(prompts) < rl.rollout_batch:
            raise ConfigError(f"{cfg.data.path} holds {len(prompts)} usable prompts, fewer than "
                              f"rl.rollout_batch={rl.rollout_batch}")
        reward = load_reward_fn(rl.reward_fn) if rl.reward_fn else load_reward_model(rl.reward_model, tok, device)
        torch.manual_seed(cfg.train.seed)  # every rank builds the same initial weights
        policy = task.new_transformer(cfg, device, init_weights)
        reference = copy.deepcopy(policy).requires_grad_(False)
        value_model = None
        if command == "ppo":
            value_model = (ValueModel.from_reward_model(reward) if isinstance(reward, RewardModel)
                           else ValueModel(copy.deepcopy(policy))).to(device)
        policy = task.adapt(policy, cfg)  # LoRA: only the policy's adapters train (the value model fully)
        policy, reference = placement.prepare(policy, cfg), placement.prepare(reference, cfg)
        if isinstance(reward, RewardModel):
            reward = placement.prepare(reward, cfg)
        self.engine = placement.engine(policy, cfg)
        optimizers, self.companions = [self.engine.optimizer], {}
        rows = RankRows(placement.dp_group()) if placement.dp_size > 1 else LocalRows()
        tcfg = trainer_config(command, rl, cfg)
        if value_model is not None:
            value_engine = placement.engine(placement.prepare(value_model, cfg), cfg)
            optimizers.append(value_engine.optimizer)
            self.companions["value_model"] = value_engine
            self.trainer = PPOTrainer(policy, reference, value_engine.model, reward, optimizers, tcfg,
                                      eos_id=tok.eos_id, pad_id=tok.pad_id, rows=rows, grad_norm=placement.grad_norm)
        else:
            self.trainer = GRPOTrainer(policy, reference, reward, optimizers, tcfg, eos_id=tok.eos_id,
                                       pad_id=tok.pad_id, rows=rows, grad_norm=placement.grad_norm)
        self.optimizers = optimizers
        self.loader = SampleLoader(list(enumerate(prompts)), list, rl.rollout_batch // placement.dp_size,
                                   placement.dp_rank, placement.dp_size, seed=cfg.train.seed)
        self.run_dir = Path(cfg.train.run_dir)
        if placement.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(to_toml(cfg))
        self.checkpointer = placement.checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep_last,
                                                   task.tokenizer_files)
        self.step = 0
        self.stop_requested = self.stopped_early = False
        ckpt = resume_path(cfg.checkpoint.resume, self.checkpointer)
        if ckpt is not None:
            self.resume(ckpt)

    def state_dict(self) -> dict:
        """This rank's run state; the checkpointer adds the models and optimizers."""
        state = {"step": self.step, "loader": self.loader.state_dict(),
                 "rng": {"sampling": self.trainer.generator.get_state(), "shuffle": self.trainer.shuffle.get_state()}}
        if isinstance(self.trainer, PPOTrainer):
            state["kl_coef"] = self.trainer.kl_ctl.value
        return state

    def resume(self, ckpt: Path) -> None:
        """Continue from `ckpt`. Saved under another data-parallel layout, the prompt order and the
        sampling streams cannot be replayed: the prompts restart at the next epoch and the
        generators are seeded afresh from the step, with a warning."""
        state = self.checkpointer.load(ckpt, self.engine, self.companions)
        self.step = state["step"]
        if isinstance(self.trainer, PPOTrainer):
            self.trainer.kl_ctl.value = state["kl_coef"]
        if self.loader.resumable_from(state["loader"]) and "rng" in state:
            self.loader.load_state_dict(state["loader"])
            self.trainer.generator.set_state(state["rng"]["sampling"])
            self.trainer.shuffle.set_state(state["rng"]["shuffle"])
            return
        self.loader.epoch = state["loader"]["epoch"] + 1
        seed = prompt_seed(self.cfg.train.seed, self.step, 0)
        self.trainer.generator.manual_seed(seed + self.placement.dp_rank)
        self.trainer.shuffle.manual_seed(seed ^ SHUFFLE_STREAM)
        warnings.warn(f"{ckpt} was saved under another data-parallel layout: models, optimizers and the KL "
                      f"coefficient are restored, the prompts restart at epoch {self.loader.epoch}", stacklevel=2)

    def save(self) -> Path:
        return self.checkpointer.save(self.step, self.engine, self.state_dict(), to_toml(self.cfg), self.companions)

    def request_stop(self) -> None:
        """Checkpoint after the current step and return (preemption, SIGTERM); signal-handler safe."""
        self.stop_requested = True

    def fit(self) -> dict[str, float]:
        """Iterate to train.steps (or a requested stop, every rank at the same step), checkpointing
        on checkpoint.every and at the end; the last step's metrics."""
        cfg, rl, placement = self.cfg, self.cfg.rl, self.placement
        logger = placement.metrics(self.run_dir, cfg.log.tensorboard, self.step or None)  # resumed: keeps records
        bar = tqdm(total=cfg.train.steps, initial=self.step, desc=self.command, unit="step", mininterval=1.0,
                   dynamic_ncols=True, disable=not (cfg.log.progress and placement.rank == 0))
        batches, metrics = iter(self.loader), {}  # empty when a resumed run had nothing left to do
        while self.step < cfg.train.steps:
            lr = lr_at(self.step, cfg.optim, cfg.train.steps)
            for opt in self.optimizers:
                set_lr(opt, lr)
            self.step += 1
            batch = next(batches)
            seeds = [prompt_seed(cfg.train.seed, self.step, i) for i, _ in batch] if rl.seed_per_prompt else None
            metrics = {**rl_step(self.trainer, [p for _, p in batch], seeds, cfg.parallel.reshard_after_forward,
                                 placement.device), "lr": lr, "data_skipped": self.skipped}
            stopping = self.engine.any_rank(self.stop_requested)
            if self.step % cfg.log.every == 0 or self.step == cfg.train.steps or stopping:
                logger.log(self.step, metrics)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl']:.2f}", refresh=False)
            bar.update()
            if stopping:
                self.stopped_early = True
                break
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < cfg.train.steps:
                self.save()
        bar.close()
        if metrics:
            self.save()
        self.checkpointer.wait()
        logger.close()
        return metrics
