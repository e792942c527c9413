"""Input pipeline throughput vs data-loader workers, and the trainer's data wait next to its step time.

Part 1, the pipeline alone (no model): images per second out of the run's own streams (`Streams`, i.e.
decode, augmentation, normalisation, collation) for `data.workers` = 0, 1, 2 (per stream here), on generated
data:
    32 px   CIFAR op set: 32x32 PNGs; labeled = weak view; unlabeled = weak + RandAugment views.
    224 px  ImageNet op set: 500x375 JPEGs decoded, random-resized-cropped to 224; same views.
An unlabeled image counts once (its two views are one image's work). The first batch (workers starting) is
not timed. Beside the wall-clock rate, CPU milliseconds per image (this process and its workers, psutil)
do not depend on how loaded the machine is. Target: 2 workers >= 1.8x 1 worker.

Part 2, the trainer (`--trainer`): the WRN-28-2 CIFAR-10-4K recipe (recipes/cifar10_4k.py) on generated 32 px
images for a few steps with `data.workers` 0 and the default, reading `data_wait` (time blocked on the next
batch) and `step_time` per step from metrics.jsonl, first logging window (worker start-up) left out. Target:
with prefetch, data wait <= 5 % of the step time.

    .venv/bin/python benchmarks/input_pipeline.py                   # part 1, both sizes
    .venv/bin/python benchmarks/input_pipeline.py --trainer         # part 2 (add --batch-size 128 for the recipe's)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def generate(root: Path, n: int, size: tuple[int, int], fmt: str, classes: int = 10) -> Path:
    """`n` smooth random images (low-frequency noise plus grain, so JPEGs compress like photos) in class folders."""
    rng = np.random.default_rng(0)
    w, h = size
    for i in range(n):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.random((max(h // 32, 2), max(w // 32, 2), 3)) * 255
        img = Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BICUBIC)
        pixels = np.asarray(img, np.int16) + rng.integers(-12, 13, (h, w, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.{fmt}", quality=90)
    return root


def cpu_seconds() -> float:
    """CPU time of this process and its live children (the workers, which run ahead by the same prefetch at
    the start and the end of the timed batches)."""
    me = psutil.Process()
    return sum(t.user + t.system for t in [me.cpu_times()] + [c.cpu_times() for c in me.children()])


def pipeline_rates(data: Path, augment: str, image_size: int, batch: int, batches: int, workers: int) -> dict:
    import timm

    import mpl_large.models  # noqa: F401  (registers wrn_28_2)

    from mpl_large.data.pipeline import Streams
    from mpl_large.data.sources import load_images

    ds = load_images(data)
    cfg = timm.models.get_pretrained_cfg("wrn_28_2" if augment == "cifar10" else "efficientnet_b0")
    streams = Streams(ds, ds, None, augment=augment, image_size=image_size, mean=cfg.mean, std=cfg.std,
                      batch_size=batch, unlabeled_batch_size=batch, seed=0, workers=workers)
    out = {}
    for name, stream in (("labeled weak", streams.labeled_only().streams["labeled"]),
                         ("unlabeled weak+strong", streams.mixed().streams["unlabeled"])):
        stream.workers = workers  # this stream alone gets them all
        next(stream)
        wall, cpu = time.perf_counter(), cpu_seconds()
        for _ in range(batches):
            next(stream)
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        stream.close()
        images = batch * batches
        out[name] = {"images_per_s": images / wall, "cpu_ms_per_image": 1000 * cpu / images}
    return out


def part1(args) -> None:
    import datasets

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        for size, augment, image_size, shape, fmt, n in ((32, "cifar10", 32, (32, 32), "png", 512),
                                                         (224, "imagenet", 224, (500, 375), "jpg", 192)):
            if args.image_size and size not in args.image_size:
                continue
            data = generate(Path(tmp) / f"{size}", n, shape, fmt)
            batch = args.batch_size or (64 if size == 32 else 16)
            batches = args.batches or (8 if size == 32 else 6)
            print(f"\n{size} px ({augment} op set, {fmt} {shape[0]}x{shape[1]}), batch {batch}, {batches} batches timed")
            rates = {w: pipeline_rates(data, augment, image_size, batch, batches, w) for w in args.workers}
            for view in rates[args.workers[0]]:
                cells = "  ".join(f"w={w}: {r[view]['images_per_s']:7.1f} img/s ({r[view]['cpu_ms_per_image']:.1f} "
                                  f"CPU ms/img)" for w, r in rates.items())
                line = f"  {view:22s} {cells}"
                if 1 in rates and 2 in rates:
                    line += f"  2w/1w = {rates[2][view]['images_per_s'] / rates[1][view]['images_per_s']:.2f}x"
                print(line)


def part2(args) -> None:
    batch_size = args.batch_size or 32
    with tempfile.TemporaryDirectory() as tmp:
        data = generate(Path(tmp) / "data", 512, (32, 32), "png")
        for workers in ("0", "-1"):
            out = Path(tmp) / f"run{workers}"
            cmd = [sys.executable, str(ROOT / "recipes" / "cifar10_4k.py"), "--data", str(data), "--unlabeled",
                   str(data), "--out", str(out), "--steps", str(args.steps), "--finetune-steps", "0", "--no-progress",
                   "--set", "data.split=none", "--set", f"data.workers={workers}", "--set", f"batch_size={batch_size}",
                   "--set", f"log_every={args.log_every}"]
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            train = [r for r in records if r["phase"] == "train"][1:]
            wait = sum(r["data_wait"] for r in train) / len(train)
            step = sum(r["step_time"] for r in train) / len(train)
            print(f"data.workers={workers:>2}: data wait {1000 * wait:8.1f} ms/step, step {1000 * step:8.1f} ms/step, "
                  f"wait = {100 * wait / step:.1f} % of the step (batch {batch_size}, steps "
                  f"{args.log_every + 1}-{args.steps})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--image-size", type=int, nargs="+", choices=[32, 224], help="default: both")
    p.add_argument("--batches", type=int, help="part 1 batches timed (default 8 at 32 px, 6 at 224 px)")
    p.add_argument("--trainer", action="store_true", help="part 2: the trainer's data wait vs step time")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int,
                   help="labeled batch (default: 64 at 32 px, 16 at 224 px; with --trainer 32, the recipe's is 128)")
    p.add_argument("--log-every", type=int, default=2)
    args = p.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    part2(args) if args.trainer else part1(args)


if __name__ == "__main__":
    main()
