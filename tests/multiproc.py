"""Launch a worker script as N real ranks (subprocesses, gloo), the way `torchrun` would."""

from __future__ import annotations

import sys
from pathlib import Path

from mpl_large.ranks import ROOT, free_port, run_local_ranks

WORKERS = Path(__file__).resolve().parent / "workers"
__all__ = ["ROOT", "WORKERS", "free_port", "launch"]


def launch(script: str, world_size: int, *args: str, timeout: float = 600) -> None:
    """Run tests/workers/`script` as `world_size` ranks, one thread each; raise with every rank's output if
    any fails."""
    try:
        run_local_ranks([sys.executable, str(WORKERS / script), *args], world_size,
                        env={"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}, timeout=timeout, what=script)
    except RuntimeError as e:
        raise AssertionError(str(e)) from None
