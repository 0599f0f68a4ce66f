"""Distributed faults (issue 16 item 12): a process group that cannot form ends in one line
within TESSERA_DIST_TIMEOUT_S instead of hanging for torch's 30 minutes."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from datetime import timedelta

import pytest

from tessera.distributed.env import DEFAULT_TIMEOUT_S, group_timeout

JOIN = """
from tessera.distributed.env import init_distributed
try:
    init_distributed("cpu")
except Exception as e:
    print(type(e).__name__, "|", e)
"""


def test_the_group_timeout_is_short_by_default_and_configurable(monkeypatch):
    monkeypatch.delenv("TESSERA_DIST_TIMEOUT_S", raising=False)
    assert group_timeout() == timedelta(seconds=DEFAULT_TIMEOUT_S) <= timedelta(minutes=5)
    monkeypatch.setenv("TESSERA_DIST_TIMEOUT_S", "7.5")
    assert group_timeout() == timedelta(seconds=7.5) and group_timeout(2) == timedelta(seconds=2)
    for bad in ("abc", "0", "-3", "nan"):
        monkeypatch.setenv("TESSERA_DIST_TIMEOUT_S", bad)
        with pytest.raises(ValueError, match="TESSERA_DIST_TIMEOUT_S"):
            group_timeout()


def test_a_group_that_cannot_form_fails_in_one_line_within_the_timeout():
    """Rank 0 waits for a rank that never comes; rank 1 of another group finds no master."""
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", JOIN], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port), "TESSERA_DIST_TIMEOUT_S": "2"})
             for rank, port in zip((0, 1), ports)]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert time.monotonic() - start < 100  # imports on a busy machine, plus about 2 s of waiting each
    for rank, out in enumerate(outputs):
        kind, _, message = out.partition(" | ")
        assert kind == "DistributedTimeout", out
        assert message.startswith(f"rank {rank} of 2: the process group did not form within 2 s") and "\n" not in message
