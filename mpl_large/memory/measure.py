"""Per-rank peak memory of MPL steps on DeepSpeed engines, measured on CPU, and real multi-rank runs.

A GPU reports `torch.cuda.max_memory_allocated`; a CPU has no allocator counter, so `MemoryTracker` reads
the kernel's: the resident set's high-water mark (`VmHWM` in /proc/self/status, restarted by writing 5
to /proc/self/clear_refs) less the resident set when tracking began. It therefore includes every page the
process touched while tracking: tensors (parameters, gradients, optimizer states, DeepSpeed's flat
buffers, partitions and buckets, activations, the feedback stash), gloo's communication buffers, Python
objects and allocator slack. It leaves out what was resident before (the interpreter, libraries,
DeepSpeed's lazily loaded modules: `measure_mpl_step` runs a warm-up engine pair before tracking so that
those are in the baseline) and pages of a tensor that were allocated but never written.

For the resident set to follow the live tensors rather than the allocator's history, glibc must return
freed blocks to the OS at once. By default it raises its mmap threshold after each large free, after which
large tensors come from the heap and freed ones stay resident. A fixed threshold (`MALLOC_MMAP_THRESHOLD_`,
read when the process starts) turns that off: every block above it is its own mapping, unmapped when the
tensor is freed. `run_ranks` sets it (`MEASURE_ENV`). What remains beyond the tensors is small and about
constant per rank (~20-40 MB for ResNet pairs: Python objects, gloo, allocator slack).

The PyTorch profiler's allocation events (`profile_memory=True`) would count tensors alone, but they are
recorded per thread and gloo frees tensors on its own threads: their running sum drifts upwards in
multi-rank runs (seen: +1.3 gradient partitions after `deepspeed.initialize`, on rank 0 only).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import timm
import torch
import torch.distributed as dist
from torch import nn

import mpl_large.models  # noqa: F401  (registers our models with timm)
from mpl_large.config import MPLConfig, OptimConfig
from mpl_large.ds_config import load_ds_config
from mpl_large.memory.plan import Workload
from mpl_large.ranks import run_local_ranks
from mpl_large.steps import MPLStep
from mpl_large.zero import ZeroLearner, cast_for_engine, init_distributed

_PROC_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"

MEASURED_OPTIMIZERS = ("sgd", "sgd_heavy_ball", "rmsprop", "lars")
"""Optimizers a measured model can have, named as in `plan.OPTIMIZERS`: `sgd` (Nesterov momentum),
`sgd_heavy_ball`, `rmsprop`, `lars` (momentum 0.9, no weight decay)."""

MEASURE_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(128 * 1024),
    "OMP_NUM_THREADS": "1",
    "OMP_WAIT_POLICY": "PASSIVE",
}
"""Environment of a measured rank: a fixed mmap threshold (see the module docstring), and OpenMP threads
that do not spin against the other ranks on a shared CPU."""


def _status_kib(key: str) -> int:
    with open(_PROC_STATUS) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{_PROC_STATUS} has no {key} line")


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return _status_kib("VmRSS") * 1024


def reset_rss_peak() -> None:
    """Restart the resident-set high-water mark (`VmHWM`) from the current resident set."""
    with open(_CLEAR_REFS, "w") as f:
        f.write("5")


def rss_peak_bytes() -> int:
    """Resident-set high-water mark since the last `reset_rss_peak` (or process start)."""
    return _status_kib("VmHWM") * 1024


class MemoryTracker:
    """Peak resident memory of the code it encloses, above the level at entry, overall and per phase.

        with MemoryTracker() as mem:
            build()
            mem.mark("step")
            step()
        mem.peak, mem.phases["step"]
    """

    def __init__(self, first: str = "start") -> None:
        self.phases: dict[str, tuple[int, int]] = {}
        """Per phase (from one `mark` to the next, or to the end): (bytes at its end, peak bytes in it)."""
        self.baseline = 0
        """The resident set at entry."""
        self._name = first

    @property
    def peak(self) -> int:
        return max(p for _, p in self.phases.values())

    def __enter__(self) -> MemoryTracker:
        gc.collect()
        self.baseline = rss_bytes()
        reset_rss_peak()
        return self

    def mark(self, name: str) -> None:
        """Close the current phase and start one named `name`."""
        self.phases[self._name] = (rss_bytes() - self.baseline, rss_peak_bytes() - self.baseline)
        reset_rss_peak()
        self._name = name

    def __exit__(self, *exc) -> None:
        self.mark("")


class _Marked:
    """A learner whose calls open named phases of a `MemoryTracker` (the step code stays untouched); a
    `LearnerInterface` too, forwarding what it does not mark."""

    def __init__(self, learner, role: str, mem: MemoryTracker, step: list[int]) -> None:
        self._learner, self._role, self._mem, self._step = learner, role, mem, step
        engine_step = learner.engine.step

        def marked_step(*args, **kwargs):
            self._phase("step")
            return engine_step(*args, **kwargs)

        learner.engine.step = marked_step

    def _phase(self, what: str) -> None:
        self._mem.mark(f"{self._step[0]}:{self._role} {what}")

    def __call__(self, x):
        self._phase("forward")
        return self._learner(x)

    def update(self, loss, stash_grad=False):
        self._phase("backward")
        return self._learner.update(loss, stash_grad)

    def probe_logits(self, x):
        self._phase("probe forward")
        return self._learner.probe_logits(x)

    def grad_dots(self, loss):
        self._phase("probe backward")
        return self._learner.grad_dots(loss)

    def __getattr__(self, name):
        return getattr(self._learner, name)


@dataclass
class StepSpec(Workload):
    """One measured MPL workload: the planner's `Workload` (teacher/student pair, images per rank, optimizers,
    feedback, UDA, checkpointing) in DeepSpeed engines on synthetic images, and how it is measured."""

    ds_config: str = "zero3"
    """DeepSpeed config, by path or by name in ds_configs/."""
    ds_overrides: dict = field(default_factory=dict)
    """Keys merged into the config's `zero_optimization` section (bucket sizes, ...)."""
    bf16: bool = False
    """Turn the config's bf16 on."""
    steps: int = 2
    """MPL steps (optimizer states appear at the first; the peak is over all)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for role in ("teacher", "student"):
            if getattr(self, f"{role}_optimizer") not in MEASURED_OPTIMIZERS:
                raise ValueError(f"{role}_optimizer: the measurement runs {sorted(MEASURED_OPTIMIZERS)}")
        if self.spatial != 1:
            raise ValueError("spatial: the measurement runs whole images (benchmarks/spatial_memory.py splits them)")

    def deepspeed_config(self) -> dict:
        """The DeepSpeed config dict the engines get."""
        config = load_ds_config(self.ds_config)
        config["zero_optimization"] = {**config["zero_optimization"], **self.ds_overrides}
        if self.bf16:
            config["bf16"] = {"enabled": True}
        return config

    def build(self, name: str):
        """A fresh model `name` (teacher or student) on the CPU."""
        model = timm.create_model(name, num_classes=self.num_classes)
        if self.checkpointing:
            model.set_grad_checkpointing(True)
        return model


def _learner(spec: StepSpec, model, optimizer: str):
    name = "sgd" if optimizer.startswith("sgd") else optimizer
    optim = OptimConfig(name=name, lr=0.05, momentum=0.9, nesterov=optimizer == "sgd")
    config = spec.deepspeed_config()
    return ZeroLearner(cast_for_engine(model, config), optim, config, spec.unlabeled_batch)


def _mpl_config(spec: StepSpec):
    return MPLConfig(feedback=spec.feedback, uda_factor=1.0 if spec.uda else 0.0)


def warm_up(spec: StepSpec) -> None:
    """One MPL step of two tiny engines with `spec`'s config: DeepSpeed imports modules and builds ops
    lazily, at the first engine and step of a kind; this puts them in the baseline of a measurement."""
    def tiny() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, spec.num_classes))

    spec = replace(spec, unlabeled_batch=2)
    x = torch.randn(2, 3, 8, 8)
    step = MPLStep(_learner(spec, tiny(), spec.teacher_optimizer), _learner(spec, tiny(), spec.student_optimizer),
                   _mpl_config(spec))
    step(x, torch.zeros(2, dtype=torch.long), x, x, 0)


def measure_mpl_step(spec: StepSpec) -> dict:
    """Run `spec.steps` MPL steps on this rank (the process group must exist; `warm_up` first) and return
    its memory: bytes above the level before the models were built: `peak`, `phases` ({name: (level at
    its end, peak in it)}), `state` (the level after the last step, less the batches: what persists
    between steps), the parameter counts and the seconds of the last step; and `baseline`, the resident
    set the bytes are counted from.
    """
    torch.manual_seed(dist.get_rank())
    step_no = [0]
    with MemoryTracker("teacher engine") as mem:
        teacher = _learner(spec, spec.build(spec.teacher), spec.teacher_optimizer)
        mem.mark("student engine")
        student = _learner(spec, spec.build(spec.student), spec.student_optimizer)
        step = MPLStep(_Marked(teacher, "teacher", mem, step_no), _Marked(student, "student", mem, step_no),
                       _mpl_config(spec))
        x_l, x_u, x_u_aug = (torch.randn(n, 3, spec.image_size, spec.image_size) for n in
                             (spec.labeled_batch, spec.unlabeled_batch, spec.unlabeled_batch))
        y_l = torch.randint(spec.num_classes, (spec.labeled_batch,))
        for t in range(spec.steps):
            step_no[0] = t
            start = time.perf_counter()
            step(x_l, y_l, x_u, x_u_aug, t)
            seconds = time.perf_counter() - start
        mem.mark("end")
    result = {
        "rank": dist.get_rank(), "peak": mem.peak, "phases": mem.phases, "baseline": mem.baseline,
        "state": mem.phases["end"][0] - _input_bytes(spec),
        "teacher_params": _numel(teacher), "student_params": _numel(student), "step_seconds": seconds,
    }
    del step, teacher, student
    gc.collect()
    return result


def _numel(learner) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in learner.params)


def _input_bytes(spec: StepSpec) -> int:
    return 4 * 3 * spec.image_size ** 2 * (spec.labeled_batch + 2 * spec.unlabeled_batch)


def run_ranks(specs: list[StepSpec], world_size: int, timeout: float = 900) -> list[list[dict]]:
    """`measure_mpl_step` of each spec, one after the other in the same `world_size` real ranks
    (subprocesses, gloo, `MEASURE_ENV`): result[spec][rank]. Raises with every rank's output if one fails."""
    with tempfile.TemporaryDirectory() as out:
        # Measure the allocator the planner models: no transparent-huge-page rounding.
        run_local_ranks([sys.executable, "-m", "mpl_large.memory.measure", "--specs", json.dumps([asdict(s) for s in specs]),
                         "--out", str(Path(out) / "rank{rank}.json")], world_size, env=MEASURE_ENV,
                        drop_env=("THP_MEM_ALLOC_ENABLE",), timeout=timeout, what="memory measurement")
        per_rank = [json.loads((Path(out) / f"rank{rank}.json").read_text()) for rank in range(world_size)]
    return [[per_rank[rank][i] for rank in range(world_size)] for i in range(len(specs))]


def main(argv: list[str] | None = None) -> None:
    """One rank of `run_ranks` (RANK, WORLD_SIZE, MASTER_ADDR/PORT from the environment)."""
    p = argparse.ArgumentParser(description="Measure one rank's memory of MPL steps (see run_ranks).")
    p.add_argument("--specs", required=True, help="a JSON list of StepSpec")
    p.add_argument("--out", required=True, help="where to write this rank's results (JSON)")
    args = p.parse_args(argv)
    init_distributed()
    specs = [StepSpec(**s) for s in json.loads(args.specs)]
    for spec in {(s.ds_config, s.bf16): s for s in specs}.values():
        warm_up(spec)
    Path(args.out).write_text(json.dumps([measure_mpl_step(spec) for spec in specs]))


if __name__ == "__main__":
    main()
