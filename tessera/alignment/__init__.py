"""Alignment stages (SFT, LoRA, reward models, DPO) on the same model, kernels and parallel backend."""
