"""Alignment on the same model, kernels, trainer and parallel backend: SFT, LoRA continued
pretraining (adapters from core.lora), reward models, DPO (trainer tasks for `tessera sft | rm |
dpo`), and PPO and GRPO (library trainers, run on a placement by `tessera ppo | grpo`).
"""
