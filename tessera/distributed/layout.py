"""Which `[parallel]` layouts a run can take: the rules between the layout, the engine and the
precision, in one place (`check_layout`, asked by every distributed placement before it builds
anything). What a rule needs of one model (TP dividing its heads) is checked where that model
is spread (`parallelize`); what a task needs of the layout (RL decodes token by token) by the
task's own `check`."""
from __future__ import annotations

from tessera.core.config import Config, ConfigError
from tessera.distributed.mesh import ParallelDims


def check_layout(cfg: Config, dims: ParallelDims) -> None:
    """ConfigError naming the keys of a layout that cannot run, and what would."""
    p = cfg.parallel
    if p.engine == "deepspeed":
        if dims.tp > 1 or dims.dp_replicate > 1:
            raise ConfigError(f"parallel.engine='deepspeed' shards over all ranks with ZeRO: set parallel.tp=1 and "
                              f"parallel.dp_replicate=1 (got tp={dims.tp}, dp_replicate={dims.dp_replicate}); "
                              "for TP or HSDP use parallel.engine='fsdp'")
        if p.activation_checkpoint != "none" or p.mixed_precision != "none":
            raise ConfigError("parallel.activation_checkpoint and parallel.mixed_precision belong to the fsdp "
                              "engine; with deepspeed set them to 'none' (use train.precision='bf16')")
        if cfg.train.compile is True:
            raise ConfigError("train.compile is not supported with parallel.engine='deepspeed'; valid: false, auto")
        return
    if p.offload_optimizer != "none" and (not dims.fsdp or dims.tp > 1):
        raise ConfigError(f"parallel.offload_optimizer={p.offload_optimizer!r} needs sharded data parallelism "
                          f"without TP: FSDP2 (parallel.dp_shard > 1, parallel.tp=1; got dp_shard={dims.dp_shard}, "
                          f"tp={dims.tp}) or parallel.engine='deepspeed'; one process or DDP keep the optimizer "
                          "where the model is: set it to 'none'")
    if dims.tp > 1 and p.sequence_parallel:
        odd = [length for length in cfg.train.seq_lens if length % dims.tp]
        if odd:
            raise ConfigError(f"sequence parallelism splits each window over parallel.tp={dims.tp} ranks: window "
                              f"length {odd[0]} (train.seq_len / train.seq_len_schedule) must be a multiple of it, "
                              "or set parallel.sequence_parallel=false")
    if p.mixed_precision != "none" and not dims.fsdp:
        raise ConfigError("parallel.mixed_precision='bf16' is FSDP2's policy and needs parallel.dp_shard > 1; "
                          "for one process or DDP use train.precision='bf16'")
    if p.mixed_precision != "none" and cfg.train.precision == "bf16":
        raise ConfigError("parallel.mixed_precision and train.precision='bf16' both cast to bf16; "
                          "valid: one of them")
    if dims.tp > 1 and dims.ddp:
        raise ConfigError(f"parallel.dp_replicate={dims.dp_replicate} with parallel.tp={dims.tp} needs "
                          "parallel.dp_shard > 1 (HSDP); DDP does not take DTensor parameters")
