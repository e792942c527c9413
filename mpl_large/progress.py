"""How far a phase is: a rich bar in a terminal, one plain line every `log_every` steps anywhere else (Slurm,
nohup, CI logs), and the step timings that go into the logged metrics.

`StepTimer` measures, per logging window, the time the loop spent blocked on the next batch (`data_wait`),
the wall time per step (`step_time`) and the images per second (`images_per_s`, every view counted, summed
over data-parallel replicas). With prefetching workers `data_wait` is near zero; when it is a sizeable part
of `step_time`, the input pipeline is the bottleneck (more `data.workers`).
"""

from __future__ import annotations

import datetime
import sys
import time
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Column
from rich.text import Text

TIMING_KEYS = ("data_wait", "step_time", "images_per_s")
"""The logged metrics that are wall-clock measurements: they differ between runs that are otherwise equal."""

SUMMARY_KEYS = ("h", "teacher_accuracy", "student_accuracy", "accuracy", "uda_mask_rate")
"""The step results a progress report shows (all of them go to the metrics)."""


class StepTimer:
    """Per-window averages of the time blocked on data and the time per step, and the image rate."""

    def __init__(self, images_per_step: int) -> None:
        self.images_per_step = images_per_step
        self._wait = self._total = 0.0
        self._steps = 0
        self._mark = time.perf_counter()

    def start(self) -> None:
        """Call just before asking for the next batch."""
        self._mark = time.perf_counter()

    def got_batch(self) -> None:
        """Call as the batch arrives."""
        self._wait += time.perf_counter() - self._mark

    def step_done(self) -> None:
        self._total += time.perf_counter() - self._mark
        self._steps += 1

    def window(self) -> dict[str, float]:
        """{data_wait, step_time, images_per_s} over the steps since the last call; starts a new window."""
        steps = max(self._steps, 1)
        out = {"data_wait": self._wait / steps, "step_time": self._total / steps,
               "images_per_s": self.images_per_step * self._steps / self._total if self._total > 0 else 0.0}
        self._wait = self._total = 0.0
        self._steps = 0
        return out


def summary(metrics: dict) -> str:
    """h, accuracies and learning rates, shortly: `h=0.0012 student_accuracy=0.41 lr=0.05`."""
    keys = [k for k in SUMMARY_KEYS if k in metrics] + [k for k in metrics if k == "lr" or k.endswith("_lr")]
    return " ".join(f"{k}={metrics[k]:.3g}" for k in keys)


class _StepRate(ProgressColumn):
    def render(self, task) -> Text:
        return Text("-- step/s" if not task.speed else f"{task.speed:.3g} step/s", style="progress.data.speed")


def progress_columns() -> tuple[ProgressColumn, ...]:
    """Name, a short bar, count, rate, ETA, then the latest metrics: only the metrics column shrinks (cut
    with an ellipsis), so count, rate and ETA stay whole in an 80-column terminal."""
    fixed = dict(no_wrap=True)
    return (
        TextColumn("[bold]{task.description}", table_column=Column(**fixed)),
        BarColumn(bar_width=12),
        MofNCompleteColumn(table_column=Column(**fixed)),
        _StepRate(table_column=Column(**fixed)),
        TextColumn("ETA", table_column=Column(**fixed)),
        TimeRemainingColumn(table_column=Column(**fixed)),
        TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1,
                                                              min_width=0)),
    )


class PhaseProgress:
    """Reports one phase: `update(step, metrics)` after each step (`metrics`: the logged values at a logging
    step, else None). A rich bar when `bar` and the console is a terminal; otherwise, when `enabled`, one line
    per logging step: phase, step/total, images/s, ETA, h, accuracies, learning rates."""

    def __init__(self, name: str, total: int, start: int, *, enabled: bool, bar: bool = True,
                 console: Console | None = None, stream: TextIO | None = None) -> None:
        self.name, self.total, self.start = name, total, start
        self.console = console or Console()
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.bar = enabled and bar and self.console.is_terminal
        self._progress = Progress(*progress_columns(), console=self.console, disable=not self.bar, expand=True)
        self._task = self._progress.add_task(name, total=total, completed=start, info="")
        self._began = time.perf_counter()

    def __enter__(self) -> PhaseProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def update(self, step: int, metrics: dict | None) -> None:
        """`step`: steps done in this phase (1-based)."""
        if not self.enabled:
            return
        if self.bar:
            self._progress.update(self._task, completed=step, **({"info": summary(metrics)} if metrics else {}))
        elif metrics is not None:
            print(self.line(step, metrics), file=self.stream, flush=True)

    def line(self, step: int, metrics: dict) -> str:
        done = step - self.start
        elapsed = time.perf_counter() - self._began
        eta = (datetime.timedelta(seconds=round(elapsed / done * (self.total - step))) if done > 0
               else "--")
        rate = metrics.get("images_per_s")
        rate_text = f"{rate:.1f} img/s" if rate is not None else "-- img/s"
        return f"{self.name} {step}/{self.total} | {rate_text} | ETA {eta} | {summary(metrics)}"
