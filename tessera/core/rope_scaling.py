"""RoPE frequencies, plain and context-extended (linear, Llama 3.1's `llama3`, YaRN).

A model pretrained on `rope_original_max_seq_len` tokens runs on longer contexts when its slow
(long-wavelength) rotations are stretched by `rope_factor` while its fast ones, which encode
local order, stay as trained. The variants differ in how they blend the two:
- linear: every frequency divided by the factor (position interpolation);
- llama3: wavelengths above original/low_freq_factor divided, below original/high_freq_factor
  kept, a linear blend in 1/wavelength between;
- yarn: a ramp over dimensions between the rotation counts beta_fast and beta_slow, plus an
  attention factor (0.1 ln(factor) + 1 unless given) that scales cos and sin.
The formulas follow the published methods; transformers' `modeling_rope_utils` computes the same
values, which tests/test_rope_scaling.py checks.
"""
from __future__ import annotations

import math

import torch

from tessera.core.config import ModelConfig


def _plain_inv_freq(dim: int, theta: float, device=None) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, dim, 2, device=device).float() / dim)


def _llama3(inv_freq: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    original = cfg.rope_original_max_seq_len
    wavelen = 2 * math.pi / inv_freq
    long_wave, short_wave = original / cfg.rope_low_freq_factor, original / cfg.rope_high_freq_factor
    blend = (original / wavelen - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    blended = (1 - blend) * inv_freq / cfg.rope_factor + blend * inv_freq
    out = torch.where(wavelen > long_wave, inv_freq / cfg.rope_factor, inv_freq)
    between = (wavelen >= short_wave) & (wavelen <= long_wave)
    return torch.where(between, blended, out)


def _yarn_dim(rotations: float, dim: int, theta: float, original: int) -> float:
    """The dimension whose frequency turns `rotations` times over the original context."""
    return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def _yarn(inv_freq: torch.Tensor, cfg: ModelConfig, dim: int) -> torch.Tensor:
    original = cfg.rope_original_max_seq_len
    low = max(math.floor(_yarn_dim(cfg.rope_beta_fast, dim, cfg.rope_theta, original)), 0)
    high = min(math.ceil(_yarn_dim(cfg.rope_beta_slow, dim, cfg.rope_theta, original)), dim - 1)
    width = (high - low) or 0.001  # a zero-width ramp is a step
    ramp = ((torch.arange(dim // 2, device=inv_freq.device).float() - low) / width).clamp(0, 1)
    return inv_freq / cfg.rope_factor * ramp + inv_freq * (1 - ramp)


def attention_factor(cfg: ModelConfig) -> float:
    """The factor cos and sin are multiplied by (YaRN's temperature; 1 otherwise)."""
    if cfg.rope_scaling != "yarn":
        return 1.0
    if cfg.rope_attention_factor:
        return cfg.rope_attention_factor
    return 0.1 * math.log(cfg.rope_factor) + 1.0 if cfg.rope_factor > 1 else 1.0


def inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,) of the model's RoPE, scaled as `cfg.rope_scaling` says."""
    dim = cfg.head_dim
    base = _plain_inv_freq(dim, cfg.rope_theta, device)
    if cfg.rope_scaling == "linear":
        return base / cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        return _llama3(base, cfg)
    if cfg.rope_scaling == "yarn":
        return _yarn(base, cfg, dim)
    return base


def rope_tables(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (B, 1, S, head_dim) for absolute `positions` (B, S), fp32."""
    angles = positions.float()[..., None] * inv_freq(cfg, positions.device)
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    scale = attention_factor(cfg)
    return angles.cos() * scale, angles.sin() * scale
