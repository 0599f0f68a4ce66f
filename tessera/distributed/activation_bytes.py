"""What autograd keeps of one transformer block in the forward, for the planner.

The counts follow `tessera.core.model.Block` as measured with saved-tensor hooks: the text model's
blocks, a vision tower's blocks (the same `Block`, causal mask off, which saves the same tensors)
and, with `trained=False`, the blocks of a frozen decoder that gradients still flow through to a
trained part below it (a VLM's projector): autograd then keeps no matmul inputs, only what the
input gradients need.
"""
from __future__ import annotations

from tessera.core.config import ModelConfig


def layer_activation_bytes(c: ModelConfig, tokens: float, ac: str, act_b: int, mm_every: int = 1,
                           trained: bool = True) -> float:
    """Bytes one layer saves for `tokens` tokens (ac "op": its input, the attention output and
    every `mm_every`-th matmul output, counted in forward order from the first)."""
    d, q, kv, f = c.d_model, c.n_heads * c.head_dim, c.kv_heads * c.head_dim, c.ffn_dim
    rms = c.norm == "rmsnorm"
    qkv_out = q + 2 * kv + q  # q, k, v (after RoPE) and the attention output (heads can be wider than d)
    if ac == "op":  # block input, attention output; q, k, v, wo, up (+gate) and down outputs
        matmuls = [q, kv, kv, d, *([f, f] if c.mlp == "swiglu" else [f]), d]
        return tokens * ((d + q + sum(matmuls[::mm_every])) * act_b + c.n_heads * 4)
    stats = (1 if rms else 2) * 2 + c.n_heads  # norm statistics and log-sum-exp, fp32
    masks = 2 * d if c.dropout > 0 else 0  # two one-byte residual dropout masks
    if not trained:  # the norms' inputs, q/k/v and attention output, the MLP activation's inputs
        return tokens * ((2 * d + qkv_out + (3 if c.mlp == "swiglu" else 1) * f) * act_b + stats * 4 + masks)
    norms = 2 * (d + (d if rms else 0))  # each norm's input (+ RMSNorm's normalized copy)
    mlp = (4 if c.mlp == "swiglu" else 2) * f
    return tokens * ((norms + 2 * d + qkv_out + mlp) * act_b + stats * 4 + masks)
