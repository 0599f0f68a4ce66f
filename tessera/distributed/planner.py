"""Memory and step-time planner: will a layout fit, and which layout is fastest?

Everything is per GPU and per optimizer step of one micro-batch (no gradient accumulation).
The estimate follows what tessera's code actually allocates, so that it can be checked against a
real CPU run (tests/test_planner.py trains four small models; the estimates are within 3% of
their measured peaks, the test allows 15%). Assumptions:

- Parameters are counted exactly from `Transformer(cfg)` built on the meta device.
- Images (`vision`: a VLM or CLIP, `vision_plan.py`; tests/test_planner_vision.py measures VLM and
  CLIP steps, within 1%): the vision tower, projector and cross-attention layers are sharded by
  FSDP/ZeRO like the rest (in the root's unit) and replicated under TP, every TP rank running all
  of them for its micro-batch (tessera vlm itself runs without TP). Frozen parts have no gradients
  or optimizer state; a frozen tower keeps no activations, a frozen decoder no matmul inputs.
  Prefix fusion's image tokens lengthen the decoder's sequence (activations, loss, flops); CLIP
  has no vocabulary loss, and an untied LM head of its text tower no gradient.
- Ranks are laid out tp innermost, then dp_shard, then dp_replicate; a group is intra-node (NVLink
  bandwidth) when it fits within `gpus_per_node` consecutive ranks, else inter-node.
- TP (Megatron-style, sequence parallel, vocab-parallel head and loss) shards every matrix,
  the embedding and the LM head over tp; norms are replicated; activations are divided by tp.
- Precision "bf16": FSDP2 keeps fp32 sharded parameters (they are the master copy), all-gathers
  bf16 and reduces gradients in fp32; DeepSpeed keeps bf16 parameters and gradients plus an fp32
  master copy in the optimizer. Both: AdamW with two fp32 moments. "fp32": 4 + 4 + 8 bytes.
- FSDP2 shards parameters, gradients and optimizer state over dp_shard (HSDP replicates over
  dp_replicate). DeepSpeed ZeRO partitions over dp_shard: stage 1 optimizer state, stage 2 also
  gradients, stage 3 also parameters.
- Activations are the tensors autograd saves in `tessera.core.model` (measured with saved-tensor
  hooks): per layer the block input, norm inputs (plus RMSNorm's normalized copy) and outputs,
  q/k/v after RoPE, the attention output and log-sum-exp (flash/SDPA: no S x S scores), the
  residual stream, the MLP (GELU: up and GELU outputs = 2 d_ff; SwiGLU: gate, silu(gate), up and
  their product = 4 d_ff) and, with dropout, one-byte masks (attention-probability dropout is not
  counted). Norm statistics and log-sum-exp are fp32. Checkpointing: "full" keeps each block's
  input and recomputes one block at a time; "selective" checkpoints every k-th block; "op" keeps
  the block input and matmul/attention outputs and recomputes norms and activation functions.
- Loss: unfused, fp32 log-softmax tokens x vocab is saved and backward holds two more of those
  (three with tp > 1: loss parallel's DTensor log-softmax backward materialises exp and a sum);
  fused (the torch path above 2^24 logits, Triton on GPU) saves d(hidden) and d(weight) and
  walks 2^24-logit chunks.
- Peak = parameters + optimizer state + the larger of (activations + the head's gradient + the
  larger of the loss buffers and one recomputed block with two MLP-wide gradient tensors) at the
  start of backward and all gradients at its end (saved activations are freed as gradients
  accumulate), + temporaries: FSDP/ZeRO-3 all-gathers of two units (current and prefetched)
  and one unit's unsharded fp32 gradient for the reduce-scatter.
  With tp > 1 and sequence parallel, the column-parallel matmuls' all-gathered (full-sequence)
  inputs are saved by every layer that keeps its activations, and a recomputed block holds two of
  them plus the gradient of one before its reduce-scatter.
  On CUDA a fixed `runtime_gb` (context, cuBLAS/NCCL workspaces) is added and the sum is scaled by
  `1 + fragmentation`: the caching allocator reserves more than the live tensors (what
  `torch.cuda.max_memory_reserved` and torchtitan's "Memory(GiB)" report); on CPU neither, since
  the CPU allocator has no cache.
- Checked against torchtitan's published H100 rows (tests/test_planner.py carries them with their
  source): within 15% for Llama 3.1 8B on 8 and 128 GPUs and 70B on FSDP 32 x TP 8.
- Time = compute + communication with no overlap (an upper bound). Compute = flops_per_token
  (6N without embeddings + 12 L d S attention; 4N for a frozen decoder) x tokens / tp, +2N per
  recomputed block, + the image side (6 per parameter per token plus attention, a frozen tower's
  forward a third of that), at `mfu` x peak (fp32 at half the bf16 peak). Communication per GPU:
  FSDP/ZeRO-3 all-gather in forward and backward plus a gradient reduce-scatter, (n-1)/n of the
  bytes each; ZeRO-1/2 and DDP a reduce-scatter + all-gather (as an all-reduce); HSDP an extra
  all-reduce of the shard over dp_replicate; TP four all-reduces of the layer activations per
  layer (six with full recompute).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import torch

from tessera.core.config import ModelConfig
from tessera.distributed.activation_bytes import layer_activation_bytes
from tessera.distributed.vision_plan import ImageSide, Vision, image_side

GIB = 1 << 30
CHUNK_LOGITS = 1 << 24  # as tessera.kernels.cross_entropy_torch
AC_MODES = ("none", "full", "selective", "op")


@dataclass(frozen=True)
class Layout:
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    ac: str = "none"  # none | full | selective | op
    ac_every: int = 2  # selective: checkpoint every k-th block
    precision: str = "bf16"  # bf16 (params + fp32 master) | fp32
    engine: str = "fsdp"  # fsdp | deepspeed
    zero_stage: int = 3  # deepspeed only
    ac_mm_every: int = 1  # ac "op": keep every k-th matmul output (1: all, as apply_ac; torchtitan's op SAC: 2)

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp

    def describe(self) -> str:
        eng = "fsdp" if self.engine == "fsdp" else f"zero{self.zero_stage}"
        ac = {"selective": f"sel/{self.ac_every}", "op": f"op/{self.ac_mm_every}"}.get(self.ac, self.ac)
        return f"{eng} r{self.dp_replicate} s{self.dp_shard} tp{self.tp} ac={ac} {self.precision}"


@dataclass(frozen=True)
class Hardware:
    device: str = "cuda"  # cuda | cpu (cpu: no runtime overhead)
    peak_tflops: float = 989.0  # dense bf16 (H100 SXM); fp32 runs at half
    mfu: float = 0.40
    intra_gbps: float = 400.0  # per-GPU bandwidth within a node (NVLink)
    inter_gbps: float = 50.0  # per-GPU bandwidth between nodes
    gpus_per_node: int = 8
    runtime_gb: float = 1.5  # CUDA context, cuBLAS and NCCL workspaces
    fragmentation: float = 0.10  # caching allocator: reserved / allocated - 1
    mem_gb: float = 80.0  # GiB per GPU, the default --gpu-mem

    def describe(self) -> str:
        """The assumptions every estimate rests on, for `tessera plan` to print above its table."""
        return (f"assuming {self.peak_tflops:g} TFLOP/s bf16 at {self.mfu:.0%} MFU, {self.intra_gbps:g} GB/s within "
                f"a node of {self.gpus_per_node} and {self.inter_gbps:g} GB/s between nodes, {self.mem_gb:g} GiB per GPU, "
                f"{self.runtime_gb:g} GiB runtime, {self.fragmentation:.0%} allocator fragmentation")


# Vendor peak dense bf16 TFLOP/s, memory, NVLink and per-GPU network bandwidth (SXM parts, 400 Gb/s
# InfiniBand for H100/H200, 200 Gb/s for A100).
GPUS = {
    "h100": Hardware(peak_tflops=989.0, intra_gbps=400.0, inter_gbps=50.0, mem_gb=80.0),
    "h200": Hardware(peak_tflops=989.0, intra_gbps=400.0, inter_gbps=50.0, mem_gb=141.0),
    "a100": Hardware(peak_tflops=312.0, intra_gbps=250.0, inter_gbps=25.0, mem_gb=80.0),
}


def hardware(gpu: str = "h100", mfu: float = 0.0, intra_gbps: float = 0.0, inter_gbps: float = 0.0,
             gpus_per_node: int = 0) -> Hardware:
    """A GPU of `GPUS` with any of its assumptions replaced (0: keep); ValueError naming the valid ones."""
    if gpu not in GPUS:
        raise ValueError(f"gpu={gpu!r} is not known; valid: {', '.join(GPUS)}")
    if not 0 <= mfu <= 1 or min(intra_gbps, inter_gbps, gpus_per_node) < 0:
        raise ValueError(f"mfu={mfu} must be in (0, 1] and bandwidths and gpus_per_node >= 0")
    base = GPUS[gpu]
    return dataclasses.replace(base, mfu=mfu or base.mfu, intra_gbps=intra_gbps or base.intra_gbps,
                               inter_gbps=inter_gbps or base.inter_gbps, gpus_per_node=gpus_per_node or base.gpus_per_node)


@dataclass
class Estimate:
    layout: Layout
    params: int
    grads: int
    optimizer: int
    activations: int  # saved by the forward, with the layout's checkpointing
    activations_no_ac: int
    loss_buffers: int
    temporaries: int
    runtime: int
    total: int  # modelled peak
    fits: bool
    compute_s: float
    comm_s: float
    step_s: float
    tokens_per_s: float  # all GPUs together
    notes: list[str] = field(default_factory=list)


@functools.lru_cache(maxsize=64)
def count_params(model_cfg: ModelConfig) -> dict[str, int]:
    """Exact counts from the real module on the meta device, split by how TP shards them."""
    from tessera.core.model import Transformer

    with torch.device("meta"):
        model = Transformer(model_cfg)
    block = sum(p.numel() for p in model.layers[0].parameters())
    block_1d = sum(p.numel() for p in model.layers[0].parameters() if p.dim() == 1)
    total = model.num_params()
    head = total - block * model_cfg.n_layers
    head_1d = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 1 and not n.startswith("layers."))
    return {"total": total, "block": block, "block_1d": block_1d, "head": head, "head_1d": head_1d,
            "non_embedding": model.num_params(exclude_embeddings=True)}


def _check(c: ModelConfig, gpus: int, lay: Layout) -> None:
    if min(lay.dp_replicate, lay.dp_shard, lay.tp, gpus) < 1:
        raise ValueError(f"dp_replicate, dp_shard, tp and gpus must be >= 1, got {lay}")
    if lay.world != gpus:
        raise ValueError(f"gpus={gpus} must equal dp_replicate x dp_shard x tp = "
                         f"{lay.dp_replicate} x {lay.dp_shard} x {lay.tp} = {lay.world}")
    if c.n_heads % lay.tp or c.kv_heads % lay.tp:
        raise ValueError(f"tp={lay.tp} must divide n_heads={c.n_heads} and n_kv_heads={c.kv_heads}")
    if c.ffn_dim % lay.tp:
        raise ValueError(f"tp={lay.tp} must divide the MLP width d_ff={c.ffn_dim}")
    if lay.ac not in AC_MODES:
        raise ValueError(f"ac={lay.ac!r} is not valid; valid: {', '.join(AC_MODES)}")
    if lay.ac_every < 1 or lay.ac_mm_every < 1:
        raise ValueError(f"ac_every={lay.ac_every} and ac_mm_every={lay.ac_mm_every} must be >= 1")
    if lay.precision not in ("bf16", "fp32"):
        raise ValueError(f"precision={lay.precision!r} is not valid; valid: bf16, fp32")
    if lay.engine not in ("fsdp", "deepspeed"):
        raise ValueError(f"engine={lay.engine!r} is not valid; valid: fsdp, deepspeed")
    if lay.engine == "deepspeed" and lay.zero_stage not in (1, 2, 3):
        raise ValueError(f"zero_stage={lay.zero_stage} is not valid; valid: 1, 2, 3")


def plan(model_cfg: ModelConfig, gpus: int, gpu_mem_gb: float, seq_len: int, micro_batch: int,
         layout: Layout, hw: Hardware = Hardware(), fused_loss: bool | None = None,
         vision: Vision | None = None) -> Estimate:
    """Per-GPU memory (gpu_mem_gb in GiB) and step time of one layout; ValueError if impossible.
    `vision`: the image side of a VLM or CLIP; `seq_len` is then the text's positions, and prefix
    fusion's image tokens lengthen the decoder's sequence."""
    c, lay = model_cfg, layout
    _check(c, gpus, lay)
    if seq_len < 1 or micro_batch < 1:
        raise ValueError(f"seq_len and micro_batch must be >= 1, got {seq_len}, {micro_batch}")
    n = count_params(c)
    tp, shard = lay.tp, lay.dp_shard
    bf16 = lay.precision == "bf16"
    act_b = 2 if bf16 else 4
    seq = seq_len + (vision.prefix_tokens if vision else 0)  # the decoder's positions
    img = image_side(vision, c, micro_batch, seq, lay.ac, lay.ac_every, act_b) if vision else ImageSide()
    # Parameters of one TP rank: matrices and embeddings split, norms and the image side replicated.
    per_tp = (n["total"] - n["block_1d"] * c.n_layers - n["head_1d"]) / tp + n["block_1d"] * c.n_layers + n["head_1d"]
    unused_head = 0 if img.lm_loss or c.tie_embeddings else c.vocab_size * c.d_model / tp  # CLIP reads no LM head
    held = per_tp + img.params
    trained = (per_tp - unused_head if img.lm_trained else 0) + img.trained
    fsdp = lay.engine == "fsdp"
    stage = 3 if fsdp else lay.zero_stage
    if fsdp:
        p_b, g_b, o_b = (4, 4, 8)  # fp32 shards are the master copy
    else:
        p_b, g_b, o_b = (2, 2, 12) if bf16 else (4, 4, 8)
    params = held * p_b / (shard if stage == 3 else 1)
    grads = trained * g_b / (shard if stage >= 2 else 1)
    optimizer = trained * o_b / shard

    tokens = micro_batch * seq / tp  # sequence parallel: activations split over tp
    L, d, V = c.n_layers, c.d_model, c.vocab_size / tp
    layer_full = layer_activation_bytes(c, tokens, "none", act_b, trained=img.lm_trained)
    boundary = tokens * d * act_b  # a checkpointed block keeps only its input
    if lay.ac == "none":
        saved_layers, recompute = L * layer_full, 0.0
    elif lay.ac == "full":
        saved_layers, recompute = L * boundary, layer_full
    elif lay.ac == "selective":
        k = -(-L // lay.ac_every)  # blocks 0, k, 2k, ... as parallelize.apply_ac
        saved_layers, recompute = k * boundary + (L - k) * layer_full, layer_full if k else 0.0
    else:
        saved_layers, recompute = L * layer_activation_bytes(c, tokens, "op", act_b, lay.ac_mm_every), layer_full
    # Sequence parallel: the column-parallel matmuls' inputs are all-gathered to the full sequence.
    gathered = 2 * micro_batch * seq * d * act_b * (1 - 1 / tp)
    saved_layers += gathered * {"none": L, "selective": L - -(-L // lay.ac_every)}.get(lay.ac, 0)
    rope = 2 * micro_batch * seq * c.head_dim * 4 if c.pos == "rope" else 0
    rms = c.norm == "rmsnorm"
    head_acts = tokens * (8 + (2 + rms) * d * act_b + 8) + rope  # ids, final norm in/out, stats
    activations = saved_layers + head_acts + img.activations
    activations_no_ac = L * layer_full + head_acts + img.activations_no_ac

    logits = micro_batch * seq * V if img.lm_loss else 0  # vocab-parallel: each rank holds its vocab slice
    fused = logits > CHUNK_LOGITS if fused_loss is None else fused_loss
    head_grad = V * d * g_b if img.lm_loss and img.lm_trained else 0  # the LM head's gradient, first in backward
    if not img.lm_loss:
        loss_buffers = 0.0  # CLIP: batch x global-batch similarities
    elif fused:
        loss_buffers = tokens * d * act_b + V * d * 4 + 2 * min(logits, CHUNK_LOGITS) * 4 + V * d * 4
    else:
        loss_buffers = (4 if tp > 1 else 3) * logits * 4  # loss parallel's DTensor decomposition holds one more
    sharded_units = stage == 3 and shard > 1
    # FSDP units: each block, and the root: embeddings, head and the whole image side.
    unit = max(n["block"] / tp, n["head"] / (1 if c.tie_embeddings else 2) / tp + img.params)
    temporaries = unit * (2 * (2 if bf16 else 4) + 4) if sharded_units else 0.0
    runtime = hw.runtime_gb * GIB if hw.device == "cuda" else 0.0
    # Backward runs the loss first, then each block (recomputed when checkpointed) while two
    # activation-gradient tensors of MLP width are live.
    working = recompute + 2 * tokens * max(c.ffn_dim / tp, d) * act_b + (1.5 * gathered if lay.ac != "none" else 0.0)
    start_bwd = activations + head_grad / (shard if stage >= 2 else 1) + max(loss_buffers, working)
    total = params + optimizer + max(start_bwd, grads) + temporaries + runtime
    total *= 1 + (hw.fragmentation if hw.device == "cuda" else 0.0)

    # Step time.
    tok_global = micro_batch * seq * lay.dp_replicate * shard
    head_matmul = 0 if img.lm_loss else c.vocab_size * d
    per_param = 6 if img.lm_trained else 4  # a frozen decoder passes input gradients only
    attention = 12 * L * c.n_heads * c.head_dim * seq
    per_token = per_param * (n["non_embedding"] - head_matmul) + attention  # as Transformer.flops_per_token
    flops = per_token * micro_batch * seq / tp + img.flops  # the image side is replicated: each TP rank runs all of it
    recomputed = {"none": 0.0, "full": 1.0, "selective": -(-L // lay.ac_every) / L, "op": 0.0}[lay.ac]
    flops += 2 * (n["total"] - n["head"]) * micro_batch * seq / tp * recomputed
    peak = hw.peak_tflops * 1e12 / (1 if bf16 else 2)
    compute_s = flops / (peak * hw.mfu)
    bw = lambda span: (hw.intra_gbps if span <= hw.gpus_per_node else hw.inter_gbps) * 1e9  # noqa: E731
    comm = 0.0
    frac = (shard - 1) / shard
    if shard > 1 and stage == 3:
        reduce_b = 4 if fsdp else g_b  # FSDP2 reduces gradients in fp32
        comm += (2 * held * (2 if bf16 else 4) + trained * reduce_b) * frac / bw(tp * shard)
    elif shard > 1:
        comm += 2 * trained * g_b * frac / bw(tp * shard)
    r = lay.dp_replicate
    if r > 1:
        comm += 2 * (r - 1) / r * grads / bw(lay.world)
    if tp > 1:
        collectives = L * (4 + 2 * recomputed)
        comm += collectives * 2 * (tp - 1) / tp * micro_batch * seq * d * act_b / bw(tp)
    step_s = compute_s + comm
    notes = []
    if lay.engine == "deepspeed" and lay.dp_replicate > 1:
        notes.append("deepspeed: ZeRO partitions over dp_shard, replicates over dp_replicate")
    if vision and tp > 1:
        notes.append(f"the image side ({img.params / 1e6:.1f}M parameters) is replicated on every TP rank")
    return Estimate(layout=lay, params=int(params), grads=int(grads), optimizer=int(optimizer),
                    activations=int(activations), activations_no_ac=int(activations_no_ac),
                    loss_buffers=int(loss_buffers), temporaries=int(temporaries), runtime=int(runtime),
                    total=int(total), fits=total <= gpu_mem_gb * GIB, compute_s=compute_s, comm_s=comm,
                    step_s=step_s, tokens_per_s=tok_global / step_s, notes=notes)


def checkpoint_bytes(model_cfg: ModelConfig, layout: Layout = Layout()) -> int:
    """Bytes of one full checkpoint (all ranks together): the parameters as the engine keeps them
    plus AdamW's state; FSDP/fp32: 4 + 8 per parameter, DeepSpeed bf16: 2 + 12 (fp32 master)."""
    per_param = 14 if layout.engine == "deepspeed" and layout.precision == "bf16" else 12
    return count_params(model_cfg)["total"] * per_param


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def rank_layouts(model_cfg: ModelConfig, gpus: int, gpu_mem_gb: float, seq_len: int, micro_batch: int,
                 hw: Hardware = Hardware(), precision: str = "bf16", engine: str = "fsdp",
                 zero_stage: int = 3, fused_loss: bool | None = None, vision: Vision | None = None) -> list[Estimate]:
    """Every fitting layout (tp within a node, dp_shard x dp_replicate, each AC mode), fastest
    first. Ranked by tokens/s, which is step time at an equal global batch: a layout with more
    data-parallel ranks takes more tokens per step."""
    out = []
    for tp in _divisors(gpus):
        if tp > hw.gpus_per_node or model_cfg.n_heads % tp or model_cfg.kv_heads % tp or model_cfg.ffn_dim % tp:
            continue
        for shard in _divisors(gpus // tp):
            for ac in AC_MODES:
                lay = Layout(dp_replicate=gpus // tp // shard, dp_shard=shard, tp=tp, ac=ac,
                             precision=precision, engine=engine, zero_stage=zero_stage)
                est = plan(model_cfg, gpus, gpu_mem_gb, seq_len, micro_batch, lay, hw, fused_loss, vision)
                if est.fits:
                    out.append(est)
    return sorted(out, key=lambda e: (-e.tokens_per_s, e.total))


def format_table(estimates: list[Estimate]) -> str:
    """One row per estimate, memory in GiB, for `tessera plan`."""
    cols = ("layout", "params", "grads", "optim", "acts", "acts/noAC", "loss", "temp", "total", "fits",
            "step_s", "comm_s", "tok/s")
    rows = [cols]
    for e in estimates:
        g = lambda b: f"{b / GIB:.2f}"  # noqa: E731
        rows.append((e.layout.describe(), g(e.params), g(e.grads), g(e.optimizer), g(e.activations),
                     g(e.activations_no_ac), g(e.loss_buffers), g(e.temporaries), g(e.total),
                     "yes" if e.fits else "NO", f"{e.step_s:.3f}", f"{e.comm_s:.3f}", f"{e.tokens_per_s:,.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
