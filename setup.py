"""Tessera: train your own language models, from a laptop CPU to hundreds of GPUs."""
from setuptools import find_packages, setup

# torch is pinned: an unpinned torch pulls a multi-GB CUDA build onto CPU-only machines.
TORCH = "torch==2.13.0"
TRITON = "triton==3.7.1; platform_system == 'Linux'"
DEEPSPEED = "deepspeed==0.19.8"
DJANGO = "Django==5.2.19"  # the multilingual recipe reads its translation catalogs; 5.2 is the LTS line for Python 3.10+
# tessera.interop: ONNX export (torch's exporter needs onnxscript) and checking, HTTP serving.
INTEROP = ["onnx>=1.17", "onnxscript>=0.2", "onnxruntime>=1.20", "fastapi>=0.110", "uvicorn>=0.30", "httpx>=0.27",
           "prometheus-client>=0.20"]
# tessera.multimodal: image decoding, scikit-learn for its bundled handwritten digits, nltk for METEOR.
VISION = ["pillow>=10.1,<14", "scikit-learn>=1.3,<2", "nltk>=3.9"]

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
        # Launchers: submitit for its SLURM backend, nvidia-ml-py for GPU telemetry.
        "launch": ["submitit>=1.5", "nvidia-ml-py>=12"],
        # ZeRO engine; on a CPU-only machine install with DS_BUILD_OPS=0 (scripts/env.sh does).
        "deepspeed": [DEEPSPEED],
        "interop": INTEROP,
        "vision": VISION,
        # Recipes: Django for the translation catalogs the multilingual recipe trains on (its data only).
        "recipes": [DJANGO],
        "test": ["pytest>=7", "hypothesis>=6", "transformers>=4.45", "pytest-timeout>=2", TRITON,
                 "submitit>=1.5", "nvidia-ml-py>=12", DEEPSPEED, "psutil>=5.9", "import-linter>=2.1",
                 "openai>=1.50,<2", *INTEROP, *VISION, DJANGO],
    },
    entry_points={"console_scripts": ["tessera=tessera.cli.main:main"]},
)
