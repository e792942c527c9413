"""Throughput of one Meta Pseudo Labels step, and its overhead over the passes it cannot avoid.

For each feedback mode (dot, cosine, taylor) the script times `MPLStep` (UDA on, so the teacher sees
x_l, x_u and x_u_aug in one pass) and, interleaved with it, the passes the step needs, each alone:

    teacher   forward + backward on cat(x_l, x_u, x_u_aug)
    student   forward + backward on x_u_aug, and its optimizer step
    probe     dot / cosine: student forward + backward on x_l at theta_S'
              taylor: two student no-grad forwards on x_l (before and after the update)
    teacher   optimizer step

ratio = median step time / sum of the median pass times; the target is <= 1.05. Images per step count
the labeled batch and both unlabeled views: B + 2 mu B (x_u and x_u_aug are two views of the same
images, each a pass's worth of input).

The teacher and student are built as the trainer builds them (the CIFAR-10-4K recipe's config through
`mpl_large.build.assemble`), so layout and compilation are the trainer's defaults for the device unless
--channels-last / --compile say otherwise; on the CPU the process keeps freed memory as the trainer does.

Example (WRN-28-2 on CIFAR-10 as in the paper, B = 16, mu = 7):

    .venv/bin/python benchmarks/mpl_step.py
    .venv/bin/python benchmarks/mpl_step.py --compare-layouts   # eager/compiled x NCHW/channels_last
    .venv/bin/python benchmarks/mpl_step.py --device cuda --labeled-batch 64 --matrix   # eager/compiled x fp32/bf16

On CUDA the tables add MFU: the step's FLOPs (counted once, eager, with torch.utils.flop_counter) per second
over the GPU's dense peak for the precision (`PEAKS`; `--peak-tflops` for a GPU not listed). fp32 is measured
against the TF32 peak: PyTorch runs fp32 convolutions on TF32 tensor cores by default (cudnn.allow_tf32).

PyTorch's CPU allocator can back large allocations with transparent huge pages when the environment
variable THP_MEM_ALLOC_ENABLE=1 is set before torch is imported; on a 2-core CPU machine it nearly
halved the step time at large batch. The script re-executes itself with it set unless --no-thp, and
with OMP_WAIT_POLICY=PASSIVE unless --no-omp-passive: on a machine shared with other busy processes,
spinning OpenMP threads slow every parallel op down by an order of magnitude or more.
"""

from __future__ import annotations

import argparse
import os
import sys

THP_VAR = "THP_MEM_ALLOC_ENABLE"
OMP_VAR = "OMP_WAIT_POLICY"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("workload")
    g.add_argument("--model", default="wrn_28_2", help="timm model name (teacher and student alike)")
    g.add_argument("--image-size", type=int, default=32, help="square input resolution")
    g.add_argument("--labeled-batch", "-B", type=int, default=16, help="labeled batch B")
    g.add_argument("--mu", type=int, default=7, help="unlabeled batch = mu * B (per view)")
    g.add_argument("--num-classes", type=int, default=10)
    g.add_argument("--modes", nargs="+", default=["dot", "cosine", "taylor"], choices=["dot", "cosine", "taylor"],
                   help="feedback modes to time")
    g = p.add_argument_group("execution")
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    g.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: the CPU cores this process may use)")
    # Default (neither flag): the trainer's own choice for the device (`mpl_large.build.CHANNELS_LAST`,
    # `ModelConfig.compile`), so the figures are the trainer's step.
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last inputs (default: the trainer's layout for the device)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the teacher and the student (default: the trainer's, off; needs a C++ "
                        "compiler on CPU)")
    g.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU: malloc keeps freed memory for the next step (`mpl_large.device.keep_freed_host_memory`), "
                        "as the trainer does")
    g.add_argument("--thp", action=argparse.BooleanOptionalAction, default=True,
                   help=f"re-execute with {THP_VAR}=1 (transparent huge pages in the CPU allocator) if unset")
    # Measured on the shared 2-core machine: with one other busy process, 2 spinning (ACTIVE) OpenMP threads
    # ran a forward ~50x slower than 1 thread; PASSIVE threads ran it as fast as 1 thread.
    g.add_argument("--omp-passive", action=argparse.BooleanOptionalAction, default=True,
                   help=f"re-execute with {OMP_VAR}=PASSIVE if unset (CPU only)")
    g = p.add_argument_group("timing")
    g.add_argument("--warmup", type=int, default=3, help="untimed iterations per mode (compilation happens here)")
    g.add_argument("--iters", type=int, default=10, help="timed iterations per mode; medians are reported")
    g.add_argument("--compare-layouts", action="store_true",
                   help="time the cosine step in eager/compiled x contiguous/channels_last and exit")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: forwards under torch.autocast, as the trainer's precision=bf16")
    g.add_argument("--matrix", action="store_true",
                   help="time the cosine step in eager/compiled x fp32/bf16 and exit")
    g.add_argument("--peak-tflops", type=float, nargs=2, default=None, metavar=("BF16", "TF32"),
                   help="dense peak TFLOP/s of the GPU for bf16 and tf32 (default: from its name, `PEAKS`)")
    return p.parse_args(argv)


# Dense (no sparsity) tensor-core peaks in TFLOP/s, (bf16, tf32), from NVIDIA's data sheets: H100/H200 SXM,
# H100 PCIe, A100 (SXM and PCIe alike), L40S, L4, A10. Matched against torch.cuda.get_device_name in order.
PEAKS = [("H100 PCIe", (756.0, 378.0)), ("H100", (989.4, 494.7)), ("H200", (989.4, 494.7)), ("GH200", (989.4, 494.7)),
         ("A100", (312.0, 156.0)), ("L40S", (362.1, 183.0)), ("L4", (121.0, 60.0)), ("A10", (125.0, 62.5))]


def ensure_env(args: argparse.Namespace) -> None:
    """Re-execute with the environment the CPU runtime reads once, at import or OpenMP start-up."""
    wanted = {}
    if args.thp and sys.platform == "linux":
        wanted[THP_VAR] = "1"
    if args.omp_passive and args.device == "cpu":
        wanted[OMP_VAR] = "PASSIVE"
    missing = {k: v for k, v in wanted.items() if k not in os.environ}  # an explicit setting wins
    if not missing:
        return
    print(f"note: re-executing with {' '.join(f'{k}={v}' for k, v in missing.items())}: {THP_VAR}=1 backs large "
          f"CPU allocations with transparent huge pages (it must be set before torch is imported); "
          f"{OMP_VAR}=PASSIVE keeps OpenMP threads from spinning against other busy processes. Set them "
          f"yourself, or pass --no-thp / --no-omp-passive, to measure otherwise.", file=sys.stderr)
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **missing})


# Everything below runs with the final environment.

def _imports():
    global torch, timm, statistics, time
    import statistics
    import time

    import timm
    import torch

    import mpl_large.models  # noqa: F401  (registers wrn_28_*)

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> tuple[float, float]:
    """Wall-clock and CPU seconds (this process, all threads) of one call."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


class Bench:
    """One teacher/student pair, built as the trainer builds it, a fixed synthetic batch, the step and its
    standalone passes.

    The pair comes from the CIFAR-10-4K recipe's config (`recipes/cifar10_4k.py`: WRN-28-2, its dropout, Nesterov
    SGD, label smoothing, UDA) with this script's model, batch and device, through `mpl_large.build.assemble`:
    the trainer's own assembly, so the layout and compilation are the trainer's defaults unless
    `channels_last` / `compile_` (None: the default) say otherwise."""

    def __init__(self, args: argparse.Namespace, mode: str, channels_last: bool | None, compile_: bool | None,
                 precision: str = "fp32") -> None:
        import dataclasses

        from cifar10_4k import config as cifar_config

        from mpl_large.build import assemble
        from mpl_large.steps import MPLStep

        self.device = device = torch.device(args.device)
        torch.manual_seed(args.seed)
        # Teacher and student share forward's code object, hence one dynamo cache: start each benchmark
        # from an empty one.
        torch._dynamo.reset()

        cfg = cifar_config(steps=1000)
        cfg.device, cfg.precision, cfg.batch_size, cfg.mu = args.device, precision, args.labeled_batch, args.mu
        for model in (cfg.teacher, cfg.student):
            model.name, model.num_classes = args.model, args.num_classes
            if channels_last is not None:
                model.channels_last = channels_last
            if compile_ is not None:
                model.compile = compile_
        b, u, s = args.labeled_batch, args.mu * args.labeled_batch, args.image_size
        self.teacher = assemble(cfg, cfg.teacher, cfg.teacher_optim, b)
        self.student = assemble(cfg, cfg.student, cfg.student_optim, u)
        self.config = dataclasses.replace(cfg.mpl, feedback=mode)
        self.step_fn = MPLStep(self.teacher, self.student, self.config)
        self.mode = mode
        self.num_classes = args.num_classes

        img = lambda n: torch.randn(n, 3, s, s, device=device)  # noqa: E731  (contiguous, as the pipeline's)
        self.x_l, self.x_u, self.x_u_aug = img(b), img(u), img(u)
        self.y_l = torch.randint(args.num_classes, (b,), device=device)
        self.t = 0

    # The full step.
    def step(self) -> None:
        self.step_fn(self.x_l, self.y_l, self.x_u, self.x_u_aug, self.t)
        self.t += 1

    # The passes it cannot avoid, each alone, on the same learners.
    def teacher_fwd_bwd(self) -> None:
        from mpl_large.losses import cross_entropy, sample_pseudo_labels, uda_loss

        views = [self.x_l, self.x_u, self.x_u_aug]
        t_l, t_u, t_ua = self.teacher(torch.cat(views)).split([len(v) for v in views])
        y_hat = sample_pseudo_labels(t_ua)
        uda, _ = uda_loss(t_u, t_ua, 1.0, 0.0)
        (cross_entropy(t_l, self.y_l) + uda + 0.1 * cross_entropy(t_ua, y_hat)).backward()

    def student_fwd_bwd_opt(self) -> None:
        from mpl_large.losses import cross_entropy

        y_hat = torch.randint(self.num_classes, (len(self.x_u_aug),), device=self.device)
        cross_entropy(self.student(self.x_u_aug), y_hat).backward()
        self._opt_step(self.student)

    def probe(self) -> None:
        from mpl_large.losses import cross_entropy

        if self.mode == "taylor":
            with torch.no_grad():
                self.student(self.x_l)
                self.student(self.x_l)
        else:
            torch.autograd.grad(cross_entropy(self.student(self.x_l), self.y_l), self.student.params)

    def teacher_opt(self) -> None:
        self._opt_step(self.teacher)

    @staticmethod
    def _opt_step(learner) -> None:
        learner.optimizer.step()
        learner.optimizer.zero_grad(set_to_none=True)
        if learner.scheduler is not None:
            learner.scheduler.step()

    def passes(self) -> dict[str, callable]:
        # The teacher's backward leaves gradients in .grad, so its optimizer step is timed right after.
        return {
            "teacher f+b": self.teacher_fwd_bwd,
            "teacher opt": self.teacher_opt,
            "student f+b+opt": self.student_fwd_bwd_opt,
            "probe" if self.mode != "taylor" else "2 no-grad fwd": self.probe,
        }

    def run(self, warmup: int, iters: int) -> dict[str, tuple[float, float]]:
        """Median (wall, CPU) seconds of the step and of each pass. Step and passes alternate every
        iteration, so a change in machine load hits both sides of the ratio alike."""
        passes = self.passes()
        for _ in range(warmup):
            self.step()
            for fn in passes.values():
                fn()
        times: dict[str, list[tuple[float, float]]] = {"step": [], **{k: [] for k in passes}}
        for _ in range(iters):
            times["step"].append(_timed(self.step, self.device))
            for name, fn in passes.items():
                times[name].append(_timed(fn, self.device))
        return {k: tuple(statistics.median(t[i] for t in v) for i in (0, 1)) for k, v in times.items()}


def gpu_peak(args: argparse.Namespace) -> tuple[float, float] | None:
    """(bf16, tf32) dense peak TFLOP/s of this GPU: `--peak-tflops`, else `PEAKS` by device name."""
    if args.peak_tflops:
        return tuple(args.peak_tflops)
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAKS if key in name), None)


def step_flops(args: argparse.Namespace, mode: str) -> float:
    """FLOPs of one MPL step (forwards, backwards, the probe; optimizer steps are not matmuls and are left out),
    counted on an eager fp32 pair: the same arithmetic whatever the kernels or the precision."""
    from torch.utils.flop_counter import FlopCounterMode

    bench = Bench(args, mode, False, False)
    bench.step()  # the first step's extra work (lazy state) is not counted
    with FlopCounterMode(display=False) as counter:
        bench.step()
    return float(counter.get_total_flops())


def mfu(flops: float | None, step_s: float, peak: tuple[float, float] | None, precision: str) -> str:
    """Achieved FLOP/s over the dense peak of `precision` (fp32 against tf32, see the module docstring)."""
    if not flops or not peak:
        return "n/a"
    return f"{flops / step_s / (peak[0 if precision == 'bf16' else 1] * 1e12):.1%}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ensure_env(args)
    _imports()
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=170)  # piped output: do not squeeze the table into 80 columns
    if args.device == "cpu" and args.keep_freed_memory:
        from mpl_large.device import keep_freed_host_memory

        keep_freed_host_memory()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(args.threads or cores)
    if args.device == "cpu" and hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5:
        console.print(f"[yellow]warning: load average {os.getloadavg()[0]:.2f} before start: other processes are "
                      f"busy and the wall-clock figures will be noisy; trust the CPU-time ratio more[/yellow]")

    images = args.labeled_batch + 2 * args.mu * args.labeled_batch
    console.print(
        f"[bold]{args.model}[/bold] {args.image_size}x{args.image_size}, {args.num_classes} classes, B={args.labeled_batch}, "
        f"mu={args.mu} (unlabeled {args.mu * args.labeled_batch} per view), UDA on | device {args.device}, "
        f"{torch.get_num_threads()} threads, {THP_VAR}={os.environ.get(THP_VAR, 'unset')}, "
        f"{OMP_VAR}={os.environ.get(OMP_VAR, 'unset')}, freed memory kept: {args.device == 'cpu' and args.keep_freed_memory}, "
        f"torch {torch.__version__}"
    )
    console.print(f"images/s counts B + 2 mu B = {images} images per step (x_l, x_u, x_u_aug); medians of "
                  f"{args.iters} iterations after {args.warmup} warm-up")

    peak = gpu_peak(args) if args.device.startswith("cuda") else None
    if args.device.startswith("cuda"):
        console.print(f"GPU {torch.cuda.get_device_name()}, dense peak (bf16, tf32) TFLOP/s: {peak or 'unknown'}")

    if args.matrix:
        table = Table(title=f"cosine MPL step on {args.device}: compilation x precision")
        for col in ("compile", "precision", "step ms", "images/s", "passes ms", "ratio", "TFLOP/step", "MFU"):
            table.add_column(col, justify="right")
        flops = step_flops(args, "cosine")
        for precision in ("fp32", "bf16"):
            for compile_ in (False, True):
                r = Bench(args, "cosine", args.channels_last, compile_, precision).run(args.warmup, args.iters)
                step = r["step"][0]
                passes = sum(v[0] for k, v in r.items() if k != "step")
                table.add_row(str(compile_), precision, f"{step * 1e3:.1f}", f"{images / step:.0f}",
                              f"{passes * 1e3:.1f}", f"{step / passes:.3f}", f"{flops / 1e12:.3f}",
                              mfu(flops, step, peak, precision))
                console.log(f"compile={compile_} {precision}: step {step * 1e3:.1f} ms")
        console.print(table)
        return

    if args.compare_layouts:
        table = Table(title="cosine MPL step: memory format x compilation")
        for col in ("compile", "channels_last", "step ms", "step CPU ms", "images/s", "passes ms", "ratio"):
            table.add_column(col, justify="right")
        for compile_ in (False, True):
            for cl in (False, True):
                r = Bench(args, "cosine", cl, compile_).run(args.warmup, args.iters)
                step = r["step"][0]
                passes = sum(v[0] for k, v in r.items() if k != "step")
                row = (str(compile_), str(cl), f"{step * 1e3:.1f}", f"{r['step'][1] * 1e3:.1f}",
                       f"{images / step:.0f}", f"{passes * 1e3:.1f}", f"{step / passes:.3f}")
                console.log("compile={} channels_last={}: step {} ms".format(*row[:3]))
                table.add_row(*row)
        console.print(table)
        return

    from mpl_large.build import channels_last
    from mpl_large.config import ModelConfig

    layout = channels_last(ModelConfig(channels_last=args.channels_last), torch.device(args.device).type)
    table = Table(title=f"MPL step as the trainer runs it ({'compiled' if args.compile else 'eager'}, {args.precision}, "
                        f"{'channels_last' if layout else 'contiguous'})")
    cols = ["feedback", "step ms", "images/s", "teacher f+b", "teacher opt", "student f+b+opt",
            "probe (taylor: 2 fwd)", "passes ms", "overhead ms", "ratio", "ratio (CPU time)", "MFU"]
    for col in cols:
        table.add_column(col, justify="right")
    for mode in args.modes:
        r = Bench(args, mode, args.channels_last, args.compile, args.precision).run(args.warmup, args.iters)
        step, step_cpu = r.pop("step")
        flops = step_flops(args, mode) if peak else None
        console.log(f"{mode}: step {step * 1e3:.1f} ms")
        total = sum(v[0] for v in r.values())
        ratio, ratio_cpu = step / total, step_cpu / sum(v[1] for v in r.values())
        style = "green" if ratio <= 1.05 else "red"
        table.add_row(
            mode, f"{step * 1e3:.1f}", f"{images / step:.0f}", *(f"{v[0] * 1e3:.1f}" for v in r.values()),
            f"{total * 1e3:.1f}", f"{(step - total) * 1e3:.1f}", f"[{style}]{ratio:.3f}[/{style}]", f"{ratio_cpu:.3f}",
            mfu(flops, step, peak, args.precision),
        )
    console.print(table)
    console.print("ratio = step / sum of the necessary passes timed alone (target <= 1.05), wall clock; pass columns "
                  "are wall-clock ms. The CPU-time ratio (process time, all threads) is the one to trust when other "
                  "processes share the cores.")
    if args.device == "cpu" and hasattr(os, "getloadavg"):
        console.print(f"load average at the end: {os.getloadavg()[0]:.2f} (this benchmark alone accounts for about "
                      f"{torch.get_num_threads()})")


if __name__ == "__main__":
    main()
