"""Reduced MPL vs full MPL for the same student: per-rank peak memory and step time (paper Appendix E).

    .venv/bin/python benchmarks/reduced_vs_full.py [--student efficientnet_b0] \
        [--teachers efficientnet_b0 efficientnet_b4] [--image-size 64] [--world-size 2] [--deepspeed zero3]

Full MPL (`MPLStep`) keeps an image teacher in its own DeepSpeed engine beside the student: the teacher
takes x_l, x_u and x_u_aug in one pass (UDA on), both models train. Reduced MPL (`ReducedMPLStep`) keeps
only the student and Appendix E's 5-layer MLP teacher (hidden 128) over the large teacher's stored
distributions, which arrive as a (batch x classes) tensor: no image teacher, no weak view. The student,
its optimizer (TF RMSProp, C.4), the batches and the DeepSpeed config are the same in every row; the image
teacher uses RMSProp too, the MLP teacher SGD with momentum (the Reduced MPL recipes' choice).

Each case runs on `--world-size` real processes (gloo). Memory is `mpl_large.memory.measure.MemoryTracker`'s: the
resident-set high-water mark above the level before the engines were built, so it counts parameters,
gradients, optimizer states, DeepSpeed's buffers, activations and gloo's buffers, and not the interpreter
or libraries. `state` is what stays resident after the last step. Step time is the median of the steps
after the first (which allocates the optimizer states); on a shared CPU it is noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

NUM_CLASSES = 10
MIB = 2**20


@dataclass
class Case:
    """One measured row."""

    method: str
    """`mpl` (image teacher) or `reduced_mpl` (MLP teacher over stored distributions)."""
    teacher: str
    """timm name of the image teacher (`mpl`); `mlp` for Reduced MPL."""
    student: str
    image_size: int
    labeled_batch: int
    """Labeled images per rank."""
    unlabeled_batch: int
    """Unlabeled images per rank (per view)."""
    deepspeed: str
    steps: int
    hidden: int = 128
    """Reduced teacher's hidden units (Appendix E: 128 for CIFAR-10)."""


def measure(case: Case) -> dict:
    """This rank's peak and persistent memory (bytes above the baseline) and median step seconds."""
    import timm
    import torch.distributed as dist
    from torch import nn

    import mpl_large.models  # noqa: F401  (our architectures, by timm name)
    from mpl_large.config import MPLConfig, OptimConfig
    from mpl_large.memory.measure import MemoryTracker
    from mpl_large.reduced import ReducedMPLStep, ReducedTeacher
    from mpl_large.steps import MPLStep
    from mpl_large.ds_config import load_ds_config
    from mpl_large.zero import ZeroLearner, cast_for_engine

    config = load_ds_config(case.deepspeed)
    rmsprop = OptimConfig(name="rmsprop", lr=1e-3, momentum=0.9, weight_decay=1e-5)
    sgd = OptimConfig(name="sgd", lr=1e-2, momentum=0.9, weight_decay=5e-4)
    rank = dist.get_rank()

    def engine(model: nn.Module, optim: OptimConfig, micro_batch: int) -> ZeroLearner:
        return ZeroLearner(cast_for_engine(model, config), optim, config, micro_batch)

    def images(n: int) -> torch.Tensor:
        return torch.randn(n, 3, case.image_size, case.image_size)

    def tiny() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, NUM_CLASSES))

    # DeepSpeed imports and builds parts of itself lazily: a tiny step of each kind first puts that in the
    # baseline.
    x, y, p = torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), torch.full((2, NUM_CLASSES), 0.1)
    MPLStep(engine(tiny(), sgd, 2), engine(tiny(), sgd, 2),
            MPLConfig(uda_factor=1.0))(x, y, x, x, 0)
    ReducedMPLStep(engine(ReducedTeacher(NUM_CLASSES, 4, 2), sgd, 2), engine(tiny(), sgd, 2),
                   MPLConfig())(x, y, p, x, 0)

    torch.manual_seed(rank)
    seconds = []
    with MemoryTracker() as mem:
        student = engine(timm.create_model(case.student, num_classes=NUM_CLASSES), rmsprop, case.unlabeled_batch)
        x_l, y_l = images(case.labeled_batch), torch.randint(NUM_CLASSES, (case.labeled_batch,))
        x_u_aug = images(case.unlabeled_batch)
        if case.method == "mpl":
            teacher = engine(timm.create_model(case.teacher, num_classes=NUM_CLASSES), rmsprop, case.labeled_batch)
            step = MPLStep(teacher, student, MPLConfig(uda_factor=1.0, uda_temperature=0.7, uda_threshold=0.6))
            x_u = images(case.unlabeled_batch)

            def run(t: int) -> None:
                step(x_l, y_l, x_u, x_u_aug, t)
        else:
            teacher = engine(ReducedTeacher(NUM_CLASSES, case.hidden), sgd, case.unlabeled_batch)
            step = ReducedMPLStep(teacher, student, MPLConfig())
            p_u = torch.distributions.Dirichlet(torch.full((NUM_CLASSES,), 0.3)).sample((case.unlabeled_batch,))

            def run(t: int) -> None:
                step(x_l, y_l, p_u, x_u_aug, t)
        mem.mark("steps")
        for t in range(case.steps):
            start = time.perf_counter()
            run(t)
            seconds.append(time.perf_counter() - start)
        mem.mark("end")
    return {"rank": rank, "peak": mem.peak, "state": mem.phases["end"][0],
            "teacher_params": sum(getattr(p, "ds_numel", p.numel()) for p in teacher.params),
            "student_params": sum(getattr(p, "ds_numel", p.numel()) for p in student.params),
            "step_seconds": statistics.median(seconds[1:] or seconds)}


def run_case(case: Case, ranks: int, timeout: float = 1800) -> list[dict]:
    """`measure(case)` on `ranks` real processes; one result per rank."""
    from mpl_large.memory.measure import MEASURE_ENV
    from mpl_large.ranks import run_local_ranks

    with tempfile.TemporaryDirectory() as out:
        # Huge-page rounding would blur small tensors' pages.
        run_local_ranks([sys.executable, __file__, "--worker", json.dumps(asdict(case)), "--result",
                         f"{out}/{{rank}}.json"], ranks, env=MEASURE_ENV, drop_env=("THP_MEM_ALLOC_ENABLE",),
                        timeout=timeout, what=f"{case.method} with teacher {case.teacher}")
        return [json.loads(Path(f"{out}/{rank}.json").read_text()) for rank in range(ranks)]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="efficientnet_b0")
    p.add_argument("--teachers", nargs="+", default=["efficientnet_b0", "efficientnet_b4"],
                   help="image teachers of the full-MPL rows")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--labeled-batch", type=int, default=8, help="labeled images per rank")
    p.add_argument("--unlabeled-batch", type=int, default=16, help="unlabeled images per rank, per view")
    p.add_argument("--world-size", type=int, default=2, help="ranks of each case")
    p.add_argument("--deepspeed", default="zero3", help="DeepSpeed config of both models")
    p.add_argument("--steps", type=int, default=4, help="steps per case (the first is not timed)")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:  # one rank of run_case
        from mpl_large.zero import init_distributed

        init_distributed()
        torch.set_num_threads(1)
        Path(args.result).write_text(json.dumps(measure(Case(**json.loads(args.worker)))))
        return []

    shape = dict(student=args.student, image_size=args.image_size, labeled_batch=args.labeled_batch,
                 unlabeled_batch=args.unlabeled_batch, deepspeed=args.deepspeed, steps=args.steps)
    cases = [Case("mpl", teacher, **shape) for teacher in args.teachers] + [Case("reduced_mpl", "mlp", **shape)]
    rows = []
    for case in cases:
        per_rank = run_case(case, args.world_size)
        rows.append({"method": case.method, "teacher": case.teacher, "student": case.student,
                     "teacher_params": per_rank[0]["teacher_params"], "student_params": per_rank[0]["student_params"],
                     "peak_mib": max(r["peak"] for r in per_rank) / MIB,
                     "state_mib": max(r["state"] for r in per_rank) / MIB,
                     "step_ms": 1000 * max(r["step_seconds"] for r in per_rank)})
        print(json.dumps(rows[-1]), file=sys.stderr)
    print_table(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    return rows


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Reduced vs full MPL: student {args.student}, {args.image_size}x{args.image_size}, per rank "
                        f"{args.labeled_batch} labeled + {args.unlabeled_batch} unlabeled, {args.world_size} ranks, "
                        f"{args.deepspeed}",
                  caption="peak / state: the worst rank's resident memory above the pre-engine baseline; "
                          "step: the slowest rank's median")
    for column in ("method", "teacher", "teacher params", "student params", "peak MiB", "state MiB", "step ms"):
        table.add_column(column, justify="left" if column in ("method", "teacher") else "right")
    full_peak = {r["teacher"]: r["peak_mib"] for r in rows if r["method"] == "mpl"}
    for r in rows:
        table.add_row(r["method"], r["teacher"], f"{r['teacher_params']:,}", f"{r['student_params']:,}",
                      f"{r['peak_mib']:.0f}", f"{r['state_mib']:.0f}", f"{r['step_ms']:.0f}")
    Console(width=140).print(table)
    reduced = next(r for r in rows if r["method"] == "reduced_mpl")
    for teacher, peak in full_peak.items():
        print(f"Reduced MPL peak / full MPL with {teacher}: {reduced['peak_mib'] / peak:.2f}")


if __name__ == "__main__":
    main()
