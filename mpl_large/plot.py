"""Training-accuracy curves like the paper's Figure 4: MPL teacher and student vs a supervised model.

    python -m mpl_large.plot RUN_DIR [RUN_DIR ...] --out accuracy.png

Each run directory holds the `metrics.jsonl` a training run writes. MPL runs contribute their teacher's
and student's accuracy on the labeled batch; supervised/UDA runs their model's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mpl_large.tracking import read_metrics  # noqa: E402

CURVES = {  # metric key -> legend suffix
    "teacher_accuracy": "teacher",
    "student_accuracy": "student",
    "accuracy": "model",
}


def smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_training_accuracy(run_dirs: list[str | Path], out: str | Path, window: int = 20) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for run_dir in run_dirs:
        records = [r for r in read_metrics(run_dir) if r.get("phase") == "train"]
        for key, role in CURVES.items():
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, smooth(list(values), window), label=f"{Path(run_dir).name} {role}")
    ax.set_xlabel("step")
    ax.set_ylabel("training accuracy (labeled batch)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories with metrics.jsonl")
    p.add_argument("--out", default="training_accuracy.png", help="the figure's path (PNG)")
    p.add_argument("--window", type=int, default=20, help="moving-average window in logged points")
    args = p.parse_args(argv)
    print(plot_training_accuracy(args.runs, args.out, args.window))


if __name__ == "__main__":
    main()
