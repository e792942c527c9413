"""How good the demo's teacher is within the demo's budget: `demo_config` in one process, teacher and student
top-1 on the unlabeled images' true labels every `--every` steps (never the test set).

    .venv/bin/python benchmarks/demo_teacher_probe.py --seed 100 --set student_optim.wait_steps=100 \\
        --set teacher_optim.lr=0.005 --set student_optim.lr=0.005 --out runs/demo_probe

The same models, data, batches and schedules as `make demo` without DeepSpeed (the recipe's one-process
path with plain learners: the same steps, other round-off), so one core explores settings while the real
2-rank path confirms them (`benchmarks/demo_seeds.py --tuning`). `student_bn` scores the student with its
BatchNorm statistics re-estimated on the clean unlabeled images: how much its strong-view statistics cost.
`--set method=uda` trains the teacher alone (supervised + UDA: what the MPL teacher is during a student wait),
at about half an MPL step's cost. Prints one JSON row per evaluation (with CPU seconds so far) and writes
them to OUT/probe.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from mpl_large.data.pipeline import Streams
from mpl_large.metrics import evaluate
from mpl_large.trainer import build_main_phase

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from efficientnet_l2_jft import tuning_config  # noqa: E402


def bn_reestimated(model: torch.nn.Module, streams: Streams, prepare) -> torch.nn.Module:
    """A copy of `model` whose BatchNorm statistics are the plain average over the evaluation images."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for x, _, _ in streams.eval_batches():
            model(prepare(x))
    return model


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="MPL steps (the demo's lengths rescale with it)")
    parser.add_argument("--seed", type=int, default=100, help="init, sampling and augmentation seed")
    parser.add_argument("--every", type=int, default=50, help="evaluate every N steps")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    parser.add_argument("--out", default="runs/demo_probe")
    args = parser.parse_args(argv)
    out = Path(args.out)
    cfg, _ = tuning_config(out, args.seed, args.set, args.steps)
    torch.manual_seed(cfg.seed)
    streams = Streams.from_config(cfg, shard=(0, 1))
    phase = build_main_phase(cfg, streams)
    teacher, student = phase.saved["teacher"], phase.saved.get("student")  # no student: --set method=uda
    def score(model, learner) -> float:
        return evaluate(model, streams.eval_batches(), None, learner.prepare)["top1"]

    rows, start = [], time.process_time()
    for t in range(args.steps):
        result = phase.step(next(phase.batches), t)
        if (t + 1) % args.every == 0 or t + 1 == args.steps:
            rows.append({"step": t + 1, "teacher": score(teacher.model, teacher),
                         **({"student": score(student.model, student),
                             "student_bn": score(bn_reestimated(student.model, streams, student.prepare), student)}
                            if student is not None else {}),
                         "teacher_batch_accuracy": result.accuracy if student is None else result.teacher_accuracy,
                         "uda_mask_rate": result.uda_mask_rate, "cpu_s": time.process_time() - start})
            print(json.dumps(rows[-1]), flush=True)
    summary = {"overrides": args.set, "seed": args.seed, "rows": rows}
    (out / "probe.json").write_text(json.dumps(summary, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
