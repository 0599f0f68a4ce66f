"""Parallelism applied from outside to the unmodified `Transformer`.

Order matters: tensor parallelism first (it turns block weights into DTensors on the "tp" mesh),
then activation checkpointing (hooks on the blocks), then FSDP2 per block and the root, so that
FSDP shards the TP shards (2-D) and gathers one block at a time. DDP is the composable
`replicate`, so the model keeps its type and, like every step here, its state-dict keys.

With `parallel.loss_parallel` the embedding and the LM head are sharded by vocabulary rows (the
same tensor when tied) and `kernels.linear_cross_entropy` computes the loss from the local logit
slices (`loss_parallel.py`); without it they stay replicated across TP ranks.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from torch.distributed._composable import replicate
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from tessera.core.config import ConfigError, ParallelConfig
from tessera.core.model import Transformer
from tessera.distributed import loss_parallel
from tessera.distributed.mesh import ParallelDims

_SAVE_OPS = {
    torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


def apply_vocab_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Embedding and LM head sharded by vocabulary rows; the lookup's partial rows are summed
    over the TP group, the head's logits are gathered only when asked for (generation); the loss
    then runs on the local logit slices (`loss_parallel`)."""
    loss_parallel.register()
    tied = model.lm_head.weight is model.tok_emb.weight
    parallelize_module(model, tp_mesh, {
        "tok_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "lm_head": ColwiseParallel(output_layouts=Replicate()),
    })
    if tied:  # each module got its own distributed copy; keep them one tensor
        model.lm_head.weight = model.tok_emb.weight


def place_feature_parameters(layer: nn.Module, tp_mesh: DeviceMesh, colwise: bool) -> None:
    """A TP'd linear layer's extra parameters (LoRA's adapters) laid out to match the layer.

    The layer names them in `feature_dims` (parameter -> ("in" | "out", dim)). A colwise layer
    shards the dim that runs along its output features, a rowwise one the dim along its input
    features, and the rest is replicated, so the extra branch adds no communication of its own
    (the parallel styles themselves shard every parameter like the weight, or leave it plain).
    """
    for name, (features, dim) in getattr(layer, "feature_dims", {}).items():
        param = getattr(layer, name)
        full = param.detach().full_tensor() if isinstance(param, DTensor) else param.detach()
        placement = Shard(dim) if (features == "out") == colwise else Replicate()
        layer.register_parameter(name, nn.Parameter(distribute_tensor(full, tp_mesh, [placement]),
                                                    requires_grad=param.requires_grad))


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Megatron-style TP of every block: q/k/v and up/gate by columns, wo and down by rows.

    With sequence parallelism the residual stream between blocks is a local tensor sharded
    along the sequence; norms run on that shard and each attention/MLP all-gathers its input.
    """
    tp = tp_mesh.size()
    for block in model.layers:
        attn = block.attn
        if attn.n_heads % tp or attn.n_kv_heads % tp:
            raise ConfigError(f"parallel.tp={tp} must divide model.n_heads={attn.n_heads} and the "
                              f"kv heads ({attn.n_kv_heads})")
        if block.mlp.up.out_features % tp:
            raise ConfigError(f"parallel.tp={tp} must divide the MLP width {block.mlp.up.out_features}")
        seq = Shard(1) if sequence_parallel else Replicate()
        plan = {
            "attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(), "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel(output_layouts=seq),
            "mlp.up": ColwiseParallel(), "mlp.down": RowwiseParallel(output_layouts=seq),
        }
        if block.mlp.gate is not None:
            plan["mlp.gate"] = ColwiseParallel()
        if sequence_parallel:
            plan.update({
                "attn_norm": SequenceParallel(), "mlp_norm": SequenceParallel(),
                # blocks and attention take the hidden states as their only positional argument
                "attn": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
                "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            })
        parallelize_module(block, tp_mesh, plan)
        for path, style in plan.items():
            if isinstance(style, (ColwiseParallel, RowwiseParallel)):
                place_feature_parameters(block.get_submodule(path), tp_mesh, isinstance(style, ColwiseParallel))
        attn.n_heads //= tp  # the attention reshapes with its local head counts
        attn.n_kv_heads //= tp
    if sequence_parallel:
        model.drop.register_forward_pre_hook(partial(_check_sequence_divides, tp))
        # The embeddings (token lookups, or whatever came in as `inputs_embeds`) are sharded along
        # the sequence as they leave the embedding dropout, before the first block or anything hooked
        # on one; the final norm gathers them back for the replicated LM head and loss.
        parallelize_module(model, tp_mesh, {
            "drop": PrepareModuleOutput(output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),),
                                        use_local_output=True),
            "norm": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                       use_local_output=True),
        })


def _check_sequence_divides(tp: int, module: nn.Module, args: tuple) -> None:
    """Uneven sequence shards make gloo abort the process; fail with a message instead."""
    if args[0].shape[1] % tp:
        raise ConfigError(f"sequence parallelism needs the sequence length ({args[0].shape[1]}) to be "
                          f"divisible by parallel.tp={tp}; or set parallel.sequence_parallel=false")


def gather_sequence_for(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Modules outside the decoder that are hooked onto its residual stream (their first positional
    argument, and what they return) and declare `whole_sequence = True` (the VLM's gated
    cross-attention) run replicated on the TP group. Under sequence parallelism each is handed the
    whole sequence, all-gathered, and hands back this rank's slice of its output; so it computes,
    and its parameters get, what they would in one process."""
    for module in model.modules():
        if getattr(module, "whole_sequence", False):
            module.register_forward_pre_hook(partial(_gather_sequence, tp_mesh))
            module.register_forward_hook(partial(_slice_sequence, tp_mesh))


def _gather_sequence(mesh: DeviceMesh, module: nn.Module, args: tuple) -> tuple:
    whole = DTensor.from_local(args[0], mesh, (Shard(1),), run_check=False).redistribute(mesh, (Replicate(),))
    return (whole.to_local(), *args[1:])


def _slice_sequence(mesh: DeviceMesh, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return DTensor.from_local(output, mesh, (Replicate(),), run_check=False).redistribute(mesh, (Shard(1),)).to_local()


def _save_matmuls(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_ac(model: nn.Module, mode: str, every: int = 2) -> None:
    """Activation checkpointing of blocks: all ("full"), every k-th ("selective"), or all with
    matmul and attention outputs kept and only the cheap element-wise ops recomputed ("op").

    A wrapper module rather than the composable `checkpoint` hooks, because only the wrapper
    works under torch.compile; its state-dict hooks keep the checkpoint keys unchanged.
    """
    if mode == "none":
        return
    for i, block in enumerate(model.layers):
        if mode == "selective" and i % every:
            continue
        if mode == "op":
            model.layers[i] = checkpoint_wrapper(
                block, context_fn=partial(create_selective_checkpoint_contexts, _save_matmuls))
        else:
            model.layers[i] = checkpoint_wrapper(block)


def apply_fsdp(model: nn.Module, body: Transformer, dp_mesh: DeviceMesh, cfg: ParallelConfig) -> None:
    """FSDP2 per block of `body` (one all-gather in flight per block), then the root for the rest.

    `offload_optimizer="cpu"` keeps the sharded parameters, their gradients and the optimizer in
    host memory (FSDP2's CPUOffloadPolicy): the accelerator holds only the gathered blocks in use,
    and the optimizer steps on the CPU."""
    mp = MixedPrecisionPolicy()
    if cfg.mixed_precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    offload = OffloadPolicy()
    if cfg.offload_optimizer == "cpu":  # pinned pages speed up host-device copies; there are none on CPU
        offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for i, block in enumerate(body.layers):
        # The last block's parameters are gathered again at once by backward: keep them.
        reshard = cfg.reshard_after_forward and i < len(body.layers) - 1
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard, offload_policy=offload)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward,
                offload_policy=offload)


def parallelize(model: nn.Module, cfg: ParallelConfig, dims: ParallelDims, mesh: DeviceMesh | None) -> nn.Module:
    """`model` with TP/SP, activation checkpointing and FSDP2/HSDP/DDP applied in place.

    `model` is a `Transformer`, or a module holding one (a reward model's body and head, an
    image-conditioned LM's decoder beside its vision tower): the blocks are found in the first
    Transformer, the root is the whole module. TP splits only that decoder; the root's other parts
    stay replicated on the TP group (plain parameters whose gradients every TP rank computes
    alike), sharded or replicated over data parallelism with the root.
    """
    body = next(m for m in model.modules() if isinstance(m, Transformer))
    if dims.tp > 1:
        frozen = {name for name, p in body.named_parameters() if not p.requires_grad}
        apply_tp(body, mesh["tp"], cfg.sequence_parallel)
        if cfg.sequence_parallel:
            gather_sequence_for(model, mesh["tp"])
        if cfg.loss_parallel:
            apply_vocab_parallel(body, mesh["tp"])
        for name, p in body.named_parameters():  # SequenceParallel re-registers the norms as trainable
            if name in frozen:
                p.requires_grad_(False)
    apply_ac(body, cfg.activation_checkpoint, cfg.checkpoint_every)
    if dims.fsdp:
        dp_dims = ("dp_replicate", "dp_shard") if dims.dp_replicate > 1 else ("dp_shard",)
        apply_fsdp(model, body, mesh[dp_dims], cfg)
    elif dims.ddp and any(p.requires_grad for p in model.parameters()):  # a frozen model has nothing to sync
        replicate(model, device_mesh=mesh["dp_replicate"])
    return model
