"""What a run reports: `metrics.jsonl`, and Accelerate's trackers (`TrainConfig.trackers`: TensorBoard by default
into OUT/tensorboard; `wandb`, `mlflow`, ... when their packages are installed). The progress bar and the plain
progress lines are `mpl_large.progress`.

Only the main process (rank 0) writes; other ranks get a `RunLog` that does nothing. Non-finite values stay
visible: JSON has no NaN or infinity, so `metrics.jsonl` and `results.json` hold them as the strings "nan",
"inf" and "-inf" (`json_safe`); TensorBoard gets them as they are (it stores NaN and inf scalars).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from accelerate.tracking import LOGGER_TYPE_TO_CLASS, TensorBoardTracker, get_available_trackers

from mpl_large.run_dir import flatten


class RunLog:
    """Appends one JSON record per logged step (`{"step", "phase", ...}`) and mirrors its numbers to the
    trackers (`phase/key` scalars). `config`: the resolved run config, stored as hyperparameters by the
    trackers that keep them (not TensorBoard: config.json lies beside its files)."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, trackers: list[str] | tuple[str, ...] = ("tensorboard",),
                 name: str = "run", config: dict | None = None) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._file = None
        self._trackers = []
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a")
            self._trackers = [start_tracker(t, name, Path(out_dir), config) for t in trackers]

    def log(self, step: int, phase: str, values: dict[str, float | int | bool]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "phase": phase, **values}
        self._file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self._file.flush()
        if self._trackers:
            scalars = {f"{phase}/{k}": float(v) for k, v in values.items() if isinstance(v, (int, float, bool))}
            for tracker in self._trackers:
                tracker.log(scalars, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        for tracker in self._trackers:
            tracker.finish()


class TrackerError(ValueError):
    """A tracker in `trackers` is unknown or its package is not installed."""


def start_tracker(name: str, run_name: str, out_dir: Path, config: dict | None = None):
    """Accelerate's tracker `name`, started: TensorBoard writes into OUT/tensorboard, mlflow into OUT/mlflow,
    the others where their own settings say (e.g. WANDB_PROJECT, WANDB_MODE=offline)."""
    check_trackers([name])
    if name == "tensorboard":
        tracker = TensorBoardTracker("tensorboard", out_dir)
    elif name == "mlflow":
        tracker = LOGGER_TYPE_TO_CLASS[name](experiment_name=run_name, logging_dir=str(out_dir / "mlflow"))
    else:
        tracker = LOGGER_TYPE_TO_CLASS[name](run_name)
    tracker.start()
    if config is not None and name != "tensorboard":
        tracker.store_init_configuration(flat_config(config))
    return tracker


def flat_config(config: dict) -> dict:
    """`{"teacher.name": ..., ...}`: dotted keys and scalar values (lists as text), how trackers take
    hyperparameters."""
    return {k: v if isinstance(v, (bool, int, float, str)) or v is None else str(v) for k, v in flatten(config).items()}


def check_trackers(names) -> None:
    """Raise `TrackerError` for a tracker Accelerate does not know or whose package is missing (before any
    compute, on every rank: only rank 0 starts them)."""
    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise TrackerError(f"trackers: unknown tracker {name!r}; Accelerate has {sorted(LOGGER_TYPE_TO_CLASS)}")
        if name not in available:
            raise TrackerError(f"trackers: {name!r} is not installed (pip install {name}), or drop it from trackers")


def json_safe(value):
    """`value` with every non-finite float replaced by "nan", "inf" or "-inf" (strict JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Drop records after `step` (a resumed run repeats them), atomically."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
