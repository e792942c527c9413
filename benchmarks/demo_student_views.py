"""Why the demo's MPL student learns slowly: how good the teacher's pseudo labels are on the views the student
sees, and how fast a fresh student learns from those views even with the true labels.

    .venv/bin/python benchmarks/demo_student_views.py --seed 100 --out runs/demo_views [--set data.cutout=false]

`demo_config` in one process, one thread, on the tuning data (`write_digits(tuning=True)`: the unlabeled
images' true labels, never the test set). First the teacher trains alone (supervised + UDA, `--teacher-steps`);
then its labels on unlabeled batches are scored against the truth: argmax and sampled (the student's labels,
`mpl.pseudo_labels=sample`) on the strong view, argmax on the weak view. Then fresh students (the same seed
each) train `--student-steps` on the unlabeled images: weak view + true labels, strong view + true labels,
strong view + the teacher's sampled labels; each scored on the clean images every `--every` steps. Prints
one JSON row per measurement and writes them to OUT/views.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import datasets
import torch

from mpl_large.build import assemble
from mpl_large.data.pipeline import Streams
from mpl_large.losses import cross_entropy, sample_pseudo_labels
from mpl_large.metrics import evaluate
from mpl_large.trainer import build_main_phase

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from efficientnet_l2_jft import tuning_config  # noqa: E402

LABEL_BATCHES = 5
"""Unlabeled batches the teacher's labels are scored on."""


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=100, help="init, sampling and augmentation seed")
    parser.add_argument("--teacher-steps", type=int, default=200, help="the teacher's supervised + UDA steps")
    parser.add_argument("--student-steps", type=int, default=150, help="steps of each fresh student")
    parser.add_argument("--every", type=int, default=50, help="score the students every N steps")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    parser.add_argument("--out", default="runs/demo_views")
    args = parser.parse_args(argv)
    out = Path(args.out)
    cfg, paths = tuning_config(out, args.seed, ["method=uda", *args.set])
    truth = torch.tensor(datasets.load_from_disk(paths["unlabeled_truth"])["label"])  # rows of `unlabeled`, in order
    torch.manual_seed(cfg.seed)
    streams = Streams.from_config(cfg, shard=(0, 1))
    rows = []

    def report(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    def score(learner) -> float:
        return evaluate(learner.model, streams.eval_batches(), None, learner.prepare)["top1"]

    phase = build_main_phase(cfg, streams)
    teacher = phase.saved["teacher"]
    for t in range(args.teacher_steps):
        phase.step(next(phase.batches), t)
    teacher_top1 = score(teacher)  # before the label passes below, which update its BN statistics as a step does
    batches = streams.mixed()

    def teacher_labels(b) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's logits on the weak and strong views, from one pass as in the MPL step."""
        with torch.no_grad():
            logits = teacher(torch.cat([b.x_l, b.x_u, b.x_u_aug]))[len(b.x_l):]
        return logits.split(len(b.x_u))

    hits = {"strong_argmax": 0.0, "strong_sampled": 0.0, "weak_argmax": 0.0}
    for _ in range(LABEL_BATCHES):
        b = next(batches)
        y, (weak, strong) = truth[b.u_index], teacher_labels(b)
        hits["strong_argmax"] += (strong.argmax(1) == y).float().mean().item() / LABEL_BATCHES
        hits["strong_sampled"] += (sample_pseudo_labels(strong, "sample") == y).float().mean().item() / LABEL_BATCHES
        hits["weak_argmax"] += (weak.argmax(1) == y).float().mean().item() / LABEL_BATCHES
    report({"teacher_steps": args.teacher_steps, "teacher_clean_top1": teacher_top1, "label_accuracy": hits})

    for view, labels in (("weak", "true"), ("strong", "true"), ("strong", "teacher_sampled")):
        torch.manual_seed(cfg.seed + 1)
        student = assemble(cfg, cfg.student, cfg.student_optim, streams.unlabeled_batch_size)
        for t in range(args.student_steps):
            b = next(batches)
            y = truth[b.u_index] if labels == "true" else sample_pseudo_labels(teacher_labels(b)[1], "sample")
            student.update(cross_entropy(student(b.x_u if view == "weak" else b.x_u_aug), y, cfg.mpl.label_smoothing))
            if (t + 1) % args.every == 0 or t + 1 == args.student_steps:
                report({"view": view, "labels": labels, "step": t + 1, "student_clean_top1": score(student)})
    summary = {"overrides": args.set, "seed": args.seed, "rows": rows}
    (out / "views.json").write_text(json.dumps(summary, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
