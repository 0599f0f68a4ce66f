"""Shared fixtures: a small slice of the bundled corpus, its char tokenizer and prepared shards.

DeepSpeed's compiled ops go to .cache/torch_extensions in the project, so they are built once.
Without CUDA, Triton kernels run on CPU tensors under Triton's interpreter, which must be
switched on before triton is first imported (importing torch does not import it).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET could be set"
    os.environ["TRITON_INTERPRET"] = "1"

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "tinyshakespeare.txt"
# DeepSpeed compiles its CPU shared-memory op (~95 s) on first use; keep it between runs.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))

torch.set_num_threads(2)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; run with --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Tiny models spend their time in synchronisation with two threads on shared cores: ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def corpus_text() -> str:
    return CORPUS.read_text()[:60_000]


@pytest.fixture(scope="session")
def char_tokenizer(corpus_text):
    from tessera.core.tokenizer import train_char  # imported here so kernel-only runs need no data stack

    return train_char([corpus_text])


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, corpus_text, char_tokenizer):
    """60k characters as 6 train shards of 9,000 tokens and 1 val shard."""
    from tessera.core.data import prepare

    root = tmp_path_factory.mktemp("data")
    (root / "corpus.txt").write_text(corpus_text)
    return prepare([str(root / "corpus.txt")], char_tokenizer, root / "prepared", val_fraction=0.1,
                   shard_tokens=9_000, sample_tokens=1000)
