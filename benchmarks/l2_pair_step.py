"""One full MPL step of an EfficientNet-L2 teacher and an EfficientNet-L2 student (2 x 480 M parameters)
on 2 ranks with ZeRO-3, on a 24 GiB CPU machine: per-rank peak memory and step time, measured, beside the
planner's prediction, and the planner's verdict per strategy.

    .venv/bin/python benchmarks/l2_pair_step.py             # checks free memory first; minutes
    .venv/bin/python benchmarks/l2_pair_step.py --plan-only # the planner's side alone, in seconds

What fits (fp32, per rank of 2): each model's ZeRO-3 partitions of parameters, fp32 master weights,
gradients and one optimizer state are 4 x 240 M x 4 bytes = 3.6 GiB, so the pair holds 7.2 GiB before
the step's own memory (the student's stashed gradient partition for the feedback, the flat fp32 gradient
the optimizer steps on, activations, reduce buckets). Hence SGD with heavy-ball momentum and no weight
decay (one state, updated in place; Nesterov or weight decay would add a gradient-sized temporary, and
RMSprop, the paper's optimizer for EfficientNets, a second state and temporaries: 2 x 0.9 GiB more per
rank). Plain data parallel holds every parameter, gradient and momentum on every rank: it does not fit.

Workload: 64x64 images (EfficientNet-L2 downsamples 32x; at 32x32 its last BatchNorm would see one value
per channel from a single image), one labeled and one unlabeled image (and its augmented view) per rank,
cosine feedback (stash + probe backward), UDA on (the teacher's forward sees all three batches). Two MPL
steps run (the optimizer states appear at the first); the peak is over both, the time is the second's.

ZeRO-3 settings: the repository's ds_configs/zero3.json with small buckets, prefetch limits and optimizer
sub-groups (`ZERO3_OVERRIDES`). With DeepSpeed's defaults (stage3_max_live_parameters and
stage3_max_reuse_distance 1e9, reduce_bucket_size 5e8, sub_group_size 1e9) every rank keeps each model's
whole parameters gathered from its forward to its backward, a whole-model reduce bucket and a whole fp32
gradient partition in the step: 2 x 1.8 + 0.9 GiB more per rank, which does not fit.
"""

from __future__ import annotations

import argparse
import os
import time

ZERO3_OVERRIDES = {
    "reduce_bucket_size": 10**7,
    "stage3_prefetch_bucket_size": 10**7,
    "stage3_max_live_parameters": 10**7,
    "stage3_max_reuse_distance": 0,
    "sub_group_size": 10**7,
}
"""zero_optimization keys merged into ds_configs/zero3.json: buckets, gathered parameters and the
optimizer's step groups of 10 M elements (40 MB) instead of whole models."""

PROCESS_GIB = 0.9
"""Resident memory of a rank before it builds a model (interpreter, torch, DeepSpeed): ~0.8 GiB measured."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet_l2", help="timm name of teacher and student")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--labeled-batch", type=int, default=1, help="per rank")
    p.add_argument("--unlabeled-batch", type=int, default=1, help="per rank and view")
    p.add_argument("--optimizer", default="sgd_heavy_ball", help="as in mpl_large.memory.measure.MEASURED_OPTIMIZERS")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--budget-gib", type=float, default=11.0,
                   help="memory per rank for the verdicts (24 GiB machine, 2 ranks, ~1 GiB each for the process)")
    p.add_argument("--plan-only", action="store_true", help="print the planner's side and exit")
    p.add_argument("--force", action="store_true", help="run even if MemAvailable looks too small")
    return p.parse_args(argv)


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    from mpl_large.memory.measure import StepSpec, run_ranks
    from mpl_large.memory.plan import GiB, ZeroSettings, plan, strategies

    console = Console(width=140)
    spec = StepSpec(teacher=args.model, student=args.model, num_classes=1000, image_size=args.image_size,
                    labeled_batch=args.labeled_batch, unlabeled_batch=args.unlabeled_batch, ds_config="zero3",
                    ds_overrides=ZERO3_OVERRIDES, teacher_optimizer=args.optimizer, student_optimizer=args.optimizer, feedback="cosine", uda=True, steps=2)
    planned = plan(spec, ZeroSettings.from_ds_config(spec.deepspeed_config()), args.world_size)
    budget = int(args.budget_gib * GiB)
    gib = lambda n: f"{n / GiB:.2f}"  # noqa: E731

    console.print(f"[bold]{args.model} -> {args.model}[/bold], {args.image_size}px, per rank B_l={args.labeled_batch} "
                  f"B_u={args.unlabeled_batch}, {args.world_size} ranks, ZeRO-3 fp32, {args.optimizer}, cosine "
                  f"feedback, UDA; zero3.json + {ZERO3_OVERRIDES}")
    table = Table(title=f"planner verdict per strategy (budget {args.budget_gib:g} GiB per rank; ZeRO configs "
                        f"with the same bucket settings)")
    for col in ("strategy", "model state GiB", "peak GiB", "host GiB", "fits"):
        table.add_column(col, justify="right")
    for name, sp in strategies(spec, args.world_size, zero_overrides=ZERO3_OVERRIDES).items():
        table.add_row(name, gib(sp.state), gib(sp.peak), gib(sp.host),
                      "[green]yes[/green]" if sp.fits(budget) else "[red]no[/red]")
    console.print(table)
    console.print("ZeRO-3+offload moves master weights, optimizer states and parameter partitions to host memory: on "
                  "a GPU that frees accelerator memory; on this CPU-only machine host memory is the same RAM.")
    if args.plan_only:
        return

    need = args.world_size * (planned.peak + PROCESS_GIB * GiB)
    available = mem_available()
    console.print(f"planned need {gib(need)} GiB ({args.world_size} x (peak {gib(planned.peak)} + process "
                  f"{PROCESS_GIB} GiB)); MemAvailable {gib(available)} GiB; load average {os.getloadavg()[0]:.1f}")
    if need > 0.95 * available and not args.force:
        raise SystemExit("not enough free memory for the run now (other processes?); retry later or pass --force")

    # Should memory run out after all, the kernel's OOM killer takes these ranks (inherited), not other work.
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")
    start = time.perf_counter()
    ranks = run_ranks([spec], args.world_size, timeout=3600)[0]
    console.log(f"{args.world_size} ranks done in {time.perf_counter() - start:.0f} s (model building included)")

    table = Table(title="per rank, GiB above the rank's resident set before the models were built")
    for col in ("phase", "planned level", "planned peak", *(f"rank {r['rank']} level / peak" for r in ranks)):
        table.add_column(col, justify="right")
    steady = {k.split(":", 1)[1]: k for k in ranks[0]["phases"] if k.startswith("1:")}
    for ph in planned.phases:
        key = steady.get(ph.name) or steady.get(ph.name.replace("forwards (no grad)", "forward"))
        cells = [f"{gib(r['phases'][key][0])} / {gib(r['phases'][key][1])}" if key else "" for r in ranks]
        table.add_row(ph.name, gib(ph.level), gib(ph.peak), *cells)
    console.print(table)

    table = Table(title="EfficientNet-L2 pair, one MPL step")
    for col in ("rank", "peak GiB (measured)", "peak GiB (planned)", "measured / planned", "state GiB (measured)",
                "state GiB (planned)", "process peak GiB", "step s"):
        table.add_column(col, justify="right")
    for r in ranks:
        table.add_row(str(r["rank"]), gib(r["peak"]), gib(planned.peak), f"{r['peak'] / planned.peak:.3f}",
                      gib(r["state"]), gib(planned.state), gib(r["baseline"] + r["peak"]), f"{r['step_seconds']:.1f}")
    console.print(table)
    console.print(f"parameters: teacher {ranks[0]['teacher_params'] / 1e6:.1f} M, student "
                  f"{ranks[0]['student_params'] / 1e6:.1f} M. Process peak = the rank's whole resident set at its "
                  f"peak (interpreter and libraries included).")


if __name__ == "__main__":
    main()
