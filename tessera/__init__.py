"""Tessera: train your own language models, from a laptop CPU to hundreds of GPUs."""

__version__ = "0.1.0"
