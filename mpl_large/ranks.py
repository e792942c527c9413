"""Run a command as N local ranks (subprocesses over gloo, the environment torchrun would set), for tests,
memory measurements and benchmarks."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local_ranks(command: list[str], world_size: int, env: dict[str, str] | None = None,
                    drop_env: tuple[str, ...] = (), timeout: float = 900, what: str = "run") -> list[str]:
    """`command` (with `{rank}` in an argument replaced per rank) as `world_size` ranks from the repository
    root; returns each rank's output, or raises with every rank's output if one fails or times out."""
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        rank_env = {**os.environ, **(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank),
                    "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        for name in drop_env:
            rank_env.pop(name, None)
        procs.append(subprocess.Popen([arg.replace("{rank}", str(rank)) for arg in command], env=rank_env,
                                      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs, failed = [], False
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            out, _ = proc.communicate()
            failed = True
        outputs.append(out)
        failed |= proc.returncode != 0
    if failed:
        logs = "\n".join(f"--- rank {r} (exit {p.returncode}) ---\n{o[-4000:]}"
                         for r, (p, o) in enumerate(zip(procs, outputs)))
        raise RuntimeError(f"{what} at world size {world_size} failed:\n{logs}")
    return outputs
