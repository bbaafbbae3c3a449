"""A process started without torchrun is a world of one and rendezvous in-process: many runs
started side by side on one machine (the experiment runner) must not race for a TCP port."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.distributed.conftest import REPO

SCRIPT = r"""
import os
import torch
import torch.distributed as dist
from sessa_pt.parallel.topology import init_distributed

init_distributed()
t = torch.ones(3)
dist.all_reduce(t)
group = dist.new_group([0])          # megatron-core builds its parallel groups like this
dist.all_reduce(t, group=group)
print("world", dist.get_world_size(), "sum", t.tolist(), "port", os.environ.get("MASTER_PORT"))
"""


def _run(env: dict) -> str:
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True,
                         text=True, timeout=300, check=False, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_a_single_process_rendezvous_needs_no_port() -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    assert "world 1 sum [1.0, 1.0, 1.0] port None" in _run(env)
    # a port given (torchrun --nproc_per_node 1 sets WORLD_SIZE=1 and one) is used as given
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    assert f"world 1 sum [1.0, 1.0, 1.0] port {port}" in _run({**env, "WORLD_SIZE": "1",
                                                               "MASTER_PORT": port})
