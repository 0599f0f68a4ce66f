"""Tessera: train your own language models, from a laptop CPU to hundreds of GPUs."""
from setuptools import find_packages, setup

# torch is pinned: an unpinned torch pulls a multi-GB CUDA build onto CPU-only machines.
TORCH = "torch==2.13.0"
TRITON = "triton==3.7.1; platform_system == 'Linux'"

setup(
    name="tessera",
    version="0.1.0",
    description="Train your own large language models, from a laptop CPU to hundreds of GPUs.",
    python_requires=">=3.10",
    packages=find_packages(include=["tessera", "tessera.*"]),
    package_data={"tessera": ["py.typed"]},
    install_requires=[
        TORCH,
        "numpy>=1.24",
        "webdataset==1.0.2",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "tensorboard>=2.14",
        "matplotlib>=3.7",
        "sacrebleu>=2.3",
        "rouge-score>=0.1.2",
        "tomli>=2.0; python_version < '3.11'",
    ],
    extras_require={
        # The triton that the CUDA build of torch 2.13.0 pins; its interpreter needs numpy.
        "triton": [TRITON],
        "flash-attn": ["flash-attn>=2.6"],
        "test": ["pytest>=7", "hypothesis>=6", "transformers>=4.45", "pytest-timeout>=2", TRITON],
    },
    entry_points={"console_scripts": ["tessera=tessera.core.cli:main"]},
)
