"""What a run reports: `metrics.jsonl`, and TensorBoard through Accelerate's tracker (the progress bar and the
plain progress lines are `mpl_large.progress`).

Only the main process (rank 0) writes; other ranks get a `RunLog` that does nothing. Non-finite values stay
visible: JSON has no NaN or infinity, so `metrics.jsonl` and `results.json` hold them as the strings "nan",
"inf" and "-inf" (`json_safe`); TensorBoard gets them as they are (it stores NaN and inf scalars).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from accelerate.tracking import TensorBoardTracker


class RunLog:
    """Appends one JSON record per logged step (`{"step", "phase", ...}`) and mirrors it to TensorBoard."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._file = None
        self._tracker = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a")
            if tensorboard:
                self._tracker = TensorBoardTracker("tensorboard", Path(out_dir))
                self._tracker.start()

    def log(self, step: int, phase: str, values: dict[str, float | int | bool]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "phase": phase, **values}
        self._file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self._file.flush()
        if self._tracker is not None:
            scalars = {f"{phase}/{k}": float(v) for k, v in values.items() if isinstance(v, (int, float, bool))}
            self._tracker.log(scalars, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tracker is not None:
            self._tracker.finish()


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
