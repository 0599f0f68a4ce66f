"""`tessera ppo | grpo` as a task of the one trainer: the PPO and GRPO trainers of `ppo.py` and
`grpo.py` supply the step (roll out, then several clipped updates); `build_trainer` and
`Trainer.fit` supply everything else (placement, schedule, logging, checkpoints, resume, signals).

Every data-parallel rank takes its own prompts (data.path: `{"prompt": ...}` lines) and samples
and scores their rollouts; the rows are then gathered (`rows.RankRows`), so every rank computes
the advantages of the whole batch and steps on its slice of every mini-batch. The placement
spreads policy, reference, value and reward models (FSDP2 shards, DDP replicas) and averages the
gradients over the ranks. Decoding stops at a different token on each rank while a sharded
forward needs every rank, so the policy's full weights are gathered for the rollout phase
(`gathered`). Metrics are averaged over ranks (ratio extremes: min and max). PPO's value model is
the run's companion: checkpointed in the same step directory, resumed with it.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule

from tessera.alignment.grpo import GRPOTrainer, check_group_size
from tessera.alignment.ppo import SHUFFLE_STREAM, PPOTrainer, ValueModel
from tessera.alignment.reward import RewardModel
from tessera.alignment.rollout import RewardError, RewardFn, merge_history
from tessera.alignment.rows import LocalRows, RankRows
from tessera.alignment.sft_data import render
from tessera.alignment.stage import SampleLoader, StageTask
from tessera.core.checkpoint import find_checkpoint, load_weights, read_model_config
from tessera.core.config import Config, ConfigError
from tessera.core.data.jsonl import read_records
from tessera.core.model import Transformer
from tessera.core.seams import Engine, Placement
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


def load_reward_model(path: str, tokenizer: Tokenizer) -> RewardModel:
    """A frozen `RewardModel` (on the CPU) from a checkpoint (or run directory) of `tessera rm`."""
    try:
        ckpt = find_checkpoint(path)
    except FileNotFoundError:
        raise ConfigError(f"rl.reward_model={path!r} is not a checkpoint or run directory of `tessera rm`") from None
    model = RewardModel(Transformer(read_model_config(ckpt)))
    try:
        load_weights(model, ckpt)
    except (RuntimeError, KeyError) as e:
        raise ConfigError(f"rl.reward_model={path!r}: {ckpt} holds no reward model (keys body.*, value_head.*): "
                          f"{str(e).splitlines()[0]}") from None
    if (ckpt / "tokenizer.json").exists() and load_tokenizer(ckpt).hash != tokenizer.hash:
        raise ConfigError(f"rl.reward_model={path!r} was trained with another tokenizer than the policy's")
    return model.requires_grad_(False)


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


class RLUpdate:
    """The step of `tessera ppo | grpo`: rollouts on gathered policy weights, the clipped updates,
    metrics over ranks, then (PPO) the KL coefficient moved by the KL of all ranks' rollouts."""

    progress_keys = ("reward", "kl")

    def __init__(self, trainer: PPOTrainer | GRPOTrainer, cfg: Config, device: torch.device):
        self.trainer, self.cfg, self.device = trainer, cfg, device

    def __call__(self, step: int, batch: list[tuple[int, list[int]]]) -> dict[str, float]:
        cfg, trainer = self.cfg, self.trainer
        seeds = [prompt_seed(cfg.train.seed, step, i) for i, _ in batch] if cfg.rl.seed_per_prompt else None
        start = time.perf_counter()
        try:
            with gathered(trainer.policy, cfg.parallel.reshard_after_forward):
                rollout, metrics = trainer.collect([p for _, p in batch], seeds)
        except RewardError as e:  # name the prompt of the data, not the rollout row
            group = cfg.rl.group_size if isinstance(trainer, GRPOTrainer) else 1
            raise RewardError(f"{e} (on prompt {batch[e.row // group][0]} of {cfg.data.path}, step {step})",
                              e.row) from None
        metrics["rollout_s"] = time.perf_counter() - start
        metrics = merge_history(metrics, trainer.update(rollout))
        metrics["step_s"] = time.perf_counter() - start
        metrics = reduce_metrics(metrics, self.device)
        if isinstance(trainer, PPOTrainer):
            trainer.kl_ctl.update(metrics["kl"], cfg.rl.rollout_batch)
        return metrics


class RLTask(StageTask):
    """`tessera ppo | grpo`: prompts in, a policy (with a frozen reference, a reward, and for PPO a
    value model) trained by rollouts; state of its own: the KL coefficient and the sampling and
    mini-batch generators."""

    val_perplexity = False

    def __init__(self, command: str, cfg: Config):
        super().__init__(cfg)  # tokenizer and chat template from data.tokenizer or model.init_from
        rl = cfg.rl
        if bool(rl.reward_model) == bool(rl.reward_fn):
            raise ConfigError("set exactly one of rl.reward_model (a `tessera rm` checkpoint) and rl.reward_fn "
                              "('module:function')")
        if rl.max_new_tokens >= cfg.model.max_seq_len:
            raise ConfigError(f"rl.max_new_tokens={rl.max_new_tokens} leaves no room for a prompt in "
                              f"model.max_seq_len={cfg.model.max_seq_len}")
        self.command = command
        self.prompts, self.skipped = read_prompts(cfg.data.path, self.tokenizer,
                                                  self.template if rl.chat_template else None,
                                                  cfg.model.max_seq_len - rl.max_new_tokens, cfg.data.on_error)
        if len(self.prompts) < rl.rollout_batch:
            raise ConfigError(f"{cfg.data.path} holds {len(self.prompts)} usable prompts, fewer than "
                              f"rl.rollout_batch={rl.rollout_batch}")
        # loaded before the run seeds its models, so the reward moves no random stream
        self.reward: RewardModel | RewardFn = (load_reward_fn(rl.reward_fn) if rl.reward_fn
                                               else load_reward_model(rl.reward_model, self.tokenizer))

    def check(self, cfg: Config, placement: Placement) -> None:
        rl, p, dp = cfg.rl, cfg.parallel, placement.dp_size
        grouped = self.command == "grpo"
        if grouped:
            check_group_size(rl)
        mini = rl.mini_batch(grouped)
        if rl.rollout_batch % dp or mini % dp:
            raise ConfigError(f"rl.rollout_batch={rl.rollout_batch} prompts ({rl.rows(grouped)} rows) and "
                              f"rl.mini_batch_size={mini} must split evenly over {dp} data-parallel rank(s)")
        if p.engine != "fsdp":
            raise ConfigError("tessera ppo | grpo run on FSDP2/HSDP/DDP/TP ranks, not parallel.engine='deepspeed' (not "
                              "yet: the rollouts decode on weights gathered by FSDP2, and ZeRO's gather is not wired in)")
        if p.tp > 1 and p.sequence_parallel:
            raise ConfigError(f"parallel.sequence_parallel with parallel.tp={p.tp}: decoding feeds one token at a time, "
                              "which cannot be split along the sequence; valid: sequence_parallel = false")

    def build_model(self, cfg: Config, device: torch.device, init_weights) -> nn.Module:
        """The policy; its frozen reference and (PPO) the value model are copies taken before LoRA."""
        policy = self.new_transformer(cfg, device, init_weights)
        self.reference = copy.deepcopy(policy).requires_grad_(False)
        self.value_model = None
        if self.command == "ppo":
            self.value_model = (ValueModel.from_reward_model(self.reward) if isinstance(self.reward, RewardModel)
                                else ValueModel(copy.deepcopy(policy))).to(device)
        return self.adapt(policy, cfg)  # LoRA: only the policy's adapters train (the value model fully)

    def attach(self, placement: Placement, cfg: Config, engine: Engine, init_weights) -> None:
        reference = placement.prepare(self.reference, cfg)
        reward = self.reward
        if isinstance(reward, RewardModel):
            reward = placement.prepare(reward.to(placement.device), cfg)
        rows = RankRows(placement.dp_group()) if placement.dp_size > 1 else LocalRows()
        common = dict(eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id, rows=rows,
                      grad_norm=placement.grad_norm, max_grad_norm=cfg.optim.grad_clip or None, seed=cfg.train.seed)
        if self.value_model is not None:
            value_engine = placement.engine(placement.prepare(self.value_model, cfg), cfg)
            self.companions["value_model"] = value_engine
            trainer = PPOTrainer(engine.model, reference, value_engine.model, reward,
                                 [engine.optimizer, value_engine.optimizer], cfg.rl, **common)
        else:
            trainer = GRPOTrainer(engine.model, reference, reward, [engine.optimizer], cfg.rl, **common)
        self.dp_rank = placement.dp_rank
        self.update = RLUpdate(trainer, cfg, placement.device)

    def loaders(self, cfg: Config, dp_rank: int, dp_size: int):
        train = SampleLoader(list(enumerate(self.prompts)), list, cfg.rl.rollout_batch // dp_size, dp_rank, dp_size,
                             seed=cfg.train.seed, skipped=self.skipped)
        return train, None

    def state_dict(self) -> dict:
        trainer = self.update.trainer
        state = {"sampling": trainer.generator.get_state(), "shuffle": trainer.shuffle.get_state()}
        if isinstance(trainer, PPOTrainer):
            state["kl_coef"] = trainer.kl_ctl.value
        return state

    def load_state_dict(self, state: dict, step: int, same_layout: bool) -> None:
        """The KL coefficient, and the generators' states; under another data-parallel layout the
        sampling streams cannot be replayed and are seeded afresh from the step."""
        trainer = self.update.trainer
        if isinstance(trainer, PPOTrainer):
            trainer.kl_ctl.value = state["kl_coef"]
        if same_layout:
            trainer.generator.set_state(state["sampling"])
            trainer.shuffle.set_state(state["shuffle"])
            return
        seed = prompt_seed(self.update.cfg.train.seed, step, 0)
        trainer.generator.manual_seed(seed + self.dp_rank)
        trainer.shuffle.manual_seed(seed ^ SHUFFLE_STREAM)
