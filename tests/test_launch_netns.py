"""Two nodes on a real network: two network namespaces joined by a veth pair, one torchrun node
in each (the torchrun backend's per-node commands), c10d rendezvous, FSDP across the two.

The test creates its namespaces, its veth pair and its two addresses (10.213.7.1 and .2), uses
no other address, and removes the namespaces at the end, also on failure. It needs root.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from tests.conftest import ROOT

ADDRESSES = ("10.213.7.1", "10.213.7.2")
IFNAME = "tess0"  # the same name in both namespaces, so one GLOO_SOCKET_IFNAME serves both nodes


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def two_nodes():
    """Two namespaces with one end of a veth pair each; yields their names."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    tag = uuid.uuid4().hex[:6]
    names = (f"tess-a-{tag}", f"tess-b-{tag}")
    try:
        for name in names:
            ip("netns", "add", name)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        pytest.skip(f"cannot create network namespaces here: {getattr(e, 'stderr', e)}")
    try:
        ip("link", "add", f"tva{tag}", "type", "veth", "peer", "name", f"tvb{tag}")
        for name, end, address in zip(names, (f"tva{tag}", f"tvb{tag}"), ADDRESSES):
            ip("link", "set", end, "netns", name)
            ip("-n", name, "link", "set", end, "name", IFNAME)
            ip("-n", name, "addr", "add", f"{address}/24", "dev", IFNAME)
            ip("-n", name, "link", "set", IFNAME, "up")
            ip("-n", name, "link", "set", "lo", "up")
        yield names
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_fsdp_across_two_namespaced_nodes(two_nodes, tmp_path, corpus_text, char_tokenizer):
    from tessera.core.data import prepare

    (tmp_path / "corpus.txt").write_text(corpus_text)
    data = prepare([str(tmp_path / "corpus.txt")], char_tokenizer, tmp_path / "data", shard_tokens=3000).root
    common = [str(ROOT / "configs" / "launch" / "tiny-local.toml"), "--job.backend=torchrun", "--job.nodes=2",
              f"--job.hosts={json.dumps(list(ADDRESSES))}", "--job.port=29411",
              f'--job.env={{GLOO_SOCKET_IFNAME = "{IFNAME}"}}', f"--data.path={data}",
              f"--train.run_dir={tmp_path / 'run'}", "--train.steps=10", "--eval.every=0", "--checkpoint.every=10",
              "--parallel.dp_shard=2"]
    nodes = [subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "tessera", "launch", *common,
                               f"--job.node_rank={rank}", f"--job.output_dir={tmp_path / f'jobs{rank}'}"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank, ns in enumerate(two_nodes)]
    try:
        outputs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert [node.returncode for node in nodes] == [0, 0], "\n----\n".join(outputs)
    assert "trained steps 0..10" in outputs[0], outputs[0]
    assert (tmp_path / "run" / "checkpoints" / "step_000010").is_dir()
