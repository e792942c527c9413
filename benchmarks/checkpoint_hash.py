"""What the SHA-256 of every checkpoint file costs, next to writing the checkpoint.

Builds the L2 demo's MPL state (recipes/efficientnet_l2_jft.py --preset demo: `efficientnet_l2_demo`
teacher and student, RMSProp with its two state tensors per weight, after one update so the state exists)
in one process, saves it with `save_checkpoint` (write + fsync + hash) `--repeat` times, and times the
hashing alone on the written files. Prints bytes, median save and hash times, and the hash's share.

    .venv/bin/python benchmarks/checkpoint_hash.py
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mpl_large.checkpoint import save_checkpoint, sha256
from mpl_large.optim import build_learner

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "efficientnet_l2_jft.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("l2", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    cfg = recipe.demo_config()
    learners = {}
    for role, model_cfg, optim in (("teacher", cfg.teacher, cfg.teacher_optim),
                                   ("student", cfg.student, cfg.student_optim)):
        learner = build_learner(model_cfg.build(), optim)
        learner.update(learner(torch.randn(2, 3, 32, 32)).logsumexp(-1).mean())
        learners[role] = learner
    saves, hashes = [], []
    with tempfile.TemporaryDirectory() as root:
        for i in range(args.repeat):
            start = time.perf_counter()
            path = save_checkpoint(Path(root), i + 1, "train", learners, {}, {}, {}, keep=1)
            saves.append(time.perf_counter() - start)
            files = [p for p in path.rglob("*") if p.is_file() and p.name != "checkpoint.json"]
            start = time.perf_counter()
            for p in files:
                sha256(p)
            hashes.append(time.perf_counter() - start)
        size = sum(p.stat().st_size for p in files)
    save, digest = statistics.median(saves), statistics.median(hashes)
    print(f"L2-demo MPL state: {size / 2**20:.1f} MiB in {len(files)} files")
    print(f"save_checkpoint (write, fsync, hash): median {save:.3f} s over {args.repeat}")
    print(f"SHA-256 of the files alone:          median {digest:.3f} s ({size / 2**20 / digest:.0f} MiB/s), "
          f"{100 * digest / save:.0f}% of the save")


if __name__ == "__main__":
    main()
