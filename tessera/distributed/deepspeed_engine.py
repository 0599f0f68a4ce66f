"""DeepSpeed ZeRO 1/2/3 as an alternative engine (`parallel.engine = "deepspeed"`), same trainer.

DeepSpeed owns more of the step than FSDP does: it scales the loss by its accumulation count,
and its `step()` computes the gradient norm, clips, skips the update when the norm is not finite
and zeroes the gradients, all in one call. The trainer's order (micro-batch backwards, then
`clip_grad_norm`, then `step` if the norm is finite) maps onto that as follows: micro-batches
before the last call DeepSpeed's `step()` only to advance its accumulation counter;
`clip_grad_norm` runs the real step and returns the norm DeepSpeed measured (inf when it
skipped); `step` is then a no-op. Precision follows `train.precision` through autocast, with
fp32 weights and optimizer state in ZeRO's partitions, like the FSDP path without mixed precision.

DeepSpeed is an optional extra (`pip install tessera[deepspeed]`); importing this module without
it raises an error that says so.

At the end, `close()` releases what DeepSpeed keeps of the engine: its hooks, ZeRO-3's module
stack (a module-level list that otherwise keeps the model, the engine, the optimizer and through
them the process groups alive until interpreter shutdown, whose gloo/NCCL threads were then torn
down in arbitrary order: "terminate called without an active exception" now and then) and the
attributes ZeRO-3 puts on parameters. Engines not closed by their owner are closed at exit.
"""
from __future__ import annotations

import atexit
import gc
import logging
import os
import socket
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file, save_model

from tessera.core.checkpoint import Checkpointer, publish, write_run_files
from tessera.core.config import Config, ConfigError, OptimConfig
from tessera.core.engine import LocalEngine
from tessera.core.model import Transformer
from tessera.core.optim import build_optimizer, param_groups
from tessera.core.placement import LocalPlacement
from tessera.distributed.engine import world_max, world_mean
from tessera.distributed.env import DistributedEnv, init_distributed
from tessera.distributed.layout import check_layout
from tessera.distributed.mesh import ParallelDims

try:
    import deepspeed
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ConfigError("parallel.engine='deepspeed' needs DeepSpeed: pip install 'tessera[deepspeed]' "
                      "(on a CPU-only machine: DS_BUILD_OPS=0 pip install ...)") from e

TAG = "deepspeed"  # the subdirectory DeepSpeed's own files go to inside a step directory


def deepspeed_config(cfg: Config, dp_size: int) -> dict:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * dp_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero_optimization(cfg),
        "zero_allow_untested_optimizer": True,  # the project's own AdamW and its param groups
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def zero_optimization(cfg: Config) -> dict:
    """ZeRO's section: the stage, and with parallel.offload_optimizer="cpu" ZeRO-Offload (the fp32
    partitions and the optimizer state in host memory, the step on the CPU)."""
    zero: dict = {"stage": cfg.parallel.zero_stage}
    if cfg.parallel.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return zero


def offload_optimizer(model: Transformer, optim: OptimConfig) -> torch.optim.Optimizer:
    """ZeRO-Offload's optimizer: DeepSpeed's CPU Adam (vectorised C++, compiled on first use) over
    the same parameter groups and hyperparameters as `build_optimizer`'s AdamW."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(param_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas,
                                eps=optim.eps, adamw_mode=True)
    except Exception as e:  # the op build fails with whatever the compiler or loader raised
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"parallel.offload_optimizer='cpu' on deepspeed needs DeepSpeed's CPU Adam, which could not "
                          f"be built here ({type(e).__name__}: {first_line}); it needs a C++ compiler and ninja, or a "
                          "DeepSpeed installed with DS_BUILD_CPU_ADAM=1") from e


class DeepSpeedEngine(LocalEngine):
    """The engine interface over a `deepspeed.DeepSpeedEngine`; `model` is the plain module."""

    def __init__(self, ds_engine, device: torch.device, precision: str, **kwargs):
        self.ds = ds_engine
        super().__init__(ds_engine.module, ds_engine.optimizer, device, precision, **kwargs)
        self._forward = ds_engine
        self._stepped_norm: float | None = None

    def forward_backward(self, batch, scale: float = 1.0) -> torch.Tensor:
        """Global mean loss; DeepSpeed applies the 1/grad_accum scale itself (set from train.grad_accum)."""
        self._mode(training=True)
        with self.autocast():
            loss, metrics = self.objective(self.ds, batch)
        self.ds.backward(loss)
        if not self.ds.is_gradient_accumulation_boundary():
            self.ds.step()  # advances the micro-step counter only
        self.metrics = {k: world_mean(v.detach().float()) for k, v in metrics.items()}
        return world_mean(loss.detach())

    @torch.no_grad()
    def eval_loss(self, batch) -> torch.Tensor:
        self._mode(training=False)
        with self.autocast():
            loss, metrics = self.objective(self.ds, batch)
        self.metrics = {k: world_mean(v.float()) for k, v in metrics.items()}
        return world_mean(loss.float())

    def _mode(self, training: bool) -> None:
        """DeepSpeed's train()/eval() set the wrapped module's mode but not the engine's own `training`,
        which an objective handed the engine reads (CLIP's retrieval metrics are computed in evaluation)."""
        self.ds.train(training)
        self.ds.training = training

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Runs DeepSpeed's step (norm, clip at the configured value, skip if not finite) and returns
        the norm it measured before clipping."""
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        return torch.tensor(float("inf") if norm is None else float(norm))

    def step(self) -> None:
        """Done in `clip_grad_norm`: DeepSpeed's step is one call."""

    def zero_grad(self) -> None:
        """DeepSpeed zeroes gradients inside its step."""

    def any_rank(self, flag: bool) -> bool:
        return world_max(float(flag)) > 0

    def close(self) -> None:
        """Release DeepSpeed's references to the model, so that the engine, its optimizer and the
        process groups they hold are freed now (their threads joined) rather than at interpreter shutdown."""
        from deepspeed.runtime.zero import parameter_offload

        if self.ds is None:
            return
        stage3 = self.ds.zero_optimization_stage() == 3
        self.ds.destroy()
        parameter_offload.FWD_MODULE_STACK.clear()
        for module in self.model.modules():
            for hooks in (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
                          module._backward_pre_hooks):
                hooks.clear()
        if stage3:  # ZeRO-3's ds_* tensors and bound methods on every parameter reach its groups
            for p in self.model.parameters():
                p.__dict__.clear()
        self.ds = self._forward = self.optimizer = None
        gc.collect()

    def max_over_ranks(self, value: float) -> float:
        return world_max(value)


class DeepSpeedCheckpointer(Checkpointer):
    """DeepSpeed's own checkpoint (ZeRO partitions and optimizer) plus, from the first rank, the
    consolidated `model.safetensors` and run files, so generation and export read it like any other."""

    def save(self, step: int, engine: DeepSpeedEngine, state: dict, run_config: str = "",
             companions: dict | None = None) -> Path:
        _refuse_companions(companions)
        final = self.directory / f"step_{step:06d}"
        tmp = self.directory / f".step_{step:06d}.tmp"
        rank = dist.get_rank()
        if rank == 0:
            tmp.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        engine.ds.save_checkpoint(str(tmp), tag=TAG, save_latest=False)
        torch.save(state, tmp / f"rank{rank}.pt")
        params = list(engine.model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=engine.ds.zero_optimization_stage() == 3):
            if rank == 0:
                save_file(_full_weights(engine.model), str(tmp / "model.safetensors"))
        if rank == 0:
            write_run_files(tmp, engine.model.cfg, run_config, self.attachments)
        dist.barrier()
        if rank == 0:
            publish(tmp, final)
            self.prune()
        dist.barrier()
        return final

    def load(self, path: str | Path, engine: DeepSpeedEngine, companions: dict | None = None) -> dict:
        _refuse_companions(companions)
        path = Path(path)
        if not (path / TAG).is_dir():
            raise ConfigError(f"{path} is not a DeepSpeed checkpoint; with parallel.engine='deepspeed' resume "
                              "from one, or convert: model.init_from")
        saved_world = len(list(path.glob("rank*.pt")))
        if saved_world != dist.get_world_size():
            raise ConfigError(f"{path} was saved by {saved_world} DeepSpeed ranks and this run has "
                              f"{dist.get_world_size()}; resume at the same world size")
        engine.ds.load_checkpoint(str(path), tag=TAG, load_lr_scheduler_states=False)
        return torch.load(path / f"rank{dist.get_rank()}.pt", weights_only=True)


def _refuse_companions(companions: dict | None) -> None:
    if companions:
        raise ConfigError(f"a second trained model ({', '.join(companions)}) is not checkpointed by "
                          "parallel.engine='deepspeed'; valid: parallel.engine='fsdp'")


def _close_at_exit(engine: weakref.ref) -> None:
    """atexit runs while the interpreter is whole: the last moment to free an engine's groups in order."""
    if (alive := engine()) is not None:
        alive.close()


def _full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights as standalone tensors: ZeRO keeps them as views into flat buffers, which safetensors
    refuses, and a tensor held under two names (tied embeddings, wherever the decoder sits in the
    model) is stored once, under its first name, as `save_model` would."""
    unique = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in unique}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DeepSpeedPlacement(LocalPlacement):
    """ZeRO over all ranks. DeepSpeed needs a process group even for one process, so a single
    process gets a one-rank group on a free local port."""

    def __init__(self, env: DistributedEnv, dims: ParallelDims):
        if env.world_size == 1 and not dist.is_initialized():
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
            env = init_distributed(env.device.type)
        super().__init__(env.device)
        self.dims = dims
        self.rank, self.world_size = env.rank, env.world_size
        self.dp_rank, self.dp_size = env.rank, env.world_size
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

    def check(self, cfg: Config) -> None:
        check_layout(cfg, self.dims)

    def engine(self, model: Transformer, cfg: Config):
        if cfg.parallel.offload_optimizer == "cpu":
            optimizer = offload_optimizer(model, cfg.optim)
        else:
            optimizer = build_optimizer(model, cfg.optim, self.device)
        ds_engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                             config=deepspeed_config(cfg, self.dp_size))
        engine = DeepSpeedEngine(ds_engine, self.device, cfg.train.precision)
        atexit.register(_close_at_exit, weakref.ref(engine))
        return engine

    def checkpointer(self, directory: Path, keep_last: int, attachments: tuple[Path, ...]) -> Checkpointer:
        return DeepSpeedCheckpointer(directory, keep_last, attachments)


def export_deepspeed(path: str | Path, model_cfg, out_dir: str | Path) -> Path:
    """Full fp32 weights from the ZeRO partitions of a checkpoint, offline, as `model.safetensors`."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=TAG)
    model = Transformer(model_cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight" or not model_cfg.tie_embeddings]:
        raise ValueError(f"{path}: DeepSpeed state does not match the model (missing {missing}, unexpected {unexpected})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out_dir / "model.safetensors"))
    write_run_files(out_dir, model_cfg, "", ())
    return out_dir
