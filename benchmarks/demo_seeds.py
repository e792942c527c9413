"""`make demo` over several seeds: the student's top-1 after MPL and after finetuning, mean ± std.

    .venv/bin/python benchmarks/demo_seeds.py --seeds 0 1 2 --out runs/demo_seeds           # the README's figures
    .venv/bin/python benchmarks/demo_seeds.py --seeds 100 101 --tuning --out runs/demo_tune  # how they were chosen

Each seed is the demo's own command (2 CPU ranks under `accelerate launch`, one thread each) with `--seed`
(model init, pseudo-label sampling, batch order, augmentation; the labeled split is the demo's fixed one)
and its own `--out`. `--tuning` scores on the unlabeled images' true labels instead of the test set, so
settings are chosen without looking at the test set. `--set` passes overrides to every run. Prints one row
per seed (top-1, wall time) and the mean ± sample std; writes `summary.json` to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "efficientnet_l2_jft.py"
PHASES = (("main", "MPL"), ("finetune", "+ finetune"))


def demo_command(seed: int, out: Path, eval_set: Path | None, lengths: list[str], overrides: list[str]) -> list[str]:
    """`make demo`'s launch with a seed and run directory (and a tuning evaluation set)."""
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(RECIPE), "--preset", "demo",
           "--seed", str(seed), "--out", str(out), "--no-progress"]
    if eval_set is not None:
        cmd += ["--eval", str(eval_set)]
    return cmd + lengths + [a for o in overrides for a in ("--set", o)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run, one demo each")
    parser.add_argument("--out", default="runs/demo_seeds", help="one run directory per seed goes here")
    parser.add_argument("--tuning", action="store_true",
                        help="score on the unlabeled images' true labels, not the test set")
    parser.add_argument("--steps", type=int, help="MPL steps (the demo's lengths rescale with it)")
    parser.add_argument("--finetune-steps", type=int, help="finetune steps")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override passed to every run")
    args = parser.parse_args(argv)
    out = Path(args.out)
    eval_set = None
    if args.tuning:
        sys.path.insert(0, str(RECIPE.parent))
        from efficientnet_l2_jft import write_digits

        eval_set = Path(write_digits(out / "data", tuning=True)["unlabeled_truth"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "THP_MEM_ALLOC_ENABLE": "1"}
    lengths = [a for flag, v in (("--steps", args.steps), ("--finetune-steps", args.finetune_steps)) if v is not None
               for a in (flag, str(v))]
    rows = []
    for seed in args.seeds:
        run = out / f"seed{seed}"
        start = time.perf_counter()
        subprocess.run(demo_command(seed, run, eval_set, lengths, args.set), env=env, check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        results = json.loads((run / "results.json").read_text())
        row = {"seed": seed, "seconds": time.perf_counter() - start,
               **{phase: results[phase]["eval_top1"] for phase, _ in PHASES if phase in results}}
        rows.append(row)
        print(f"seed {seed}: " + ", ".join(f"{name} {100 * row[p]:.1f} %" for p, name in PHASES if p in row)
              + f" ({row['seconds']:.0f} s)", flush=True)
    summary = {"scored_on": "unlabeled images (tuning)" if args.tuning else "test set", "lengths": lengths,
               "overrides": args.set,
               "runs": rows}
    for phase, name in PHASES:
        values = [r[phase] for r in rows if phase in r]
        if values:
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[phase] = {"mean": statistics.fmean(values), "std": std, "min": min(values)}
            print(f"{name}: {100 * summary[phase]['mean']:.1f} ± {100 * std:.1f} % "
                  f"(min {100 * min(values):.1f} %) over {len(values)} seeds, {summary['scored_on']}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
