"""Launch a worker script as N real ranks (subprocesses, gloo), the way `torchrun` would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

WORKERS = Path(__file__).resolve().parent / "workers"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, world_size: int, *args: str, timeout: float = 600) -> None:
    """Run tests/workers/`script` as `world_size` ranks; raise with every rank's output if any fails."""
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
               "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen([sys.executable, str(WORKERS / script), *args], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs, failed = [], False
    for rank, proc in enumerate(procs):
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            out, _ = proc.communicate()
            failed = True
        outputs.append(f"--- rank {rank} (exit {proc.returncode}) ---\n{out[-6000:]}")
        failed |= proc.returncode != 0
    if failed:
        raise AssertionError(f"{script} at world size {world_size} failed:\n" + "\n".join(outputs))
