"""Digits SSL: Supervised vs UDA vs MPL vs MPL + finetune on scikit-learn's real 8x8 digits, 100 labeled.

    time .venv/bin/python recipes/digits_ssl.py --seeds 5 --out runs/digits_ssl

Writes config.json, results.json, table.txt and one run directory per (method, seed) to --out; 5 seeds take
about 7 minutes on 2 idle CPU cores. Split, step budget and hyper-parameters: `mpl_large.experiments.digits`.
`--set` changes any `DigitsConfig` field, e.g. the tuning protocol (seeds 100-101, scored on the unlabeled
images, never on the test set): `--seeds 2 --set first_seed=100 --set eval_on=unlabeled`.
"""

import argparse

from mpl_large.cli import HelpFormatter
from mpl_large.config import apply_override
from mpl_large.experiments.digits import DigitsConfig, DigitsReport, run_digits


def digits_ssl(seeds: int = 5, out: str = "runs/digits_ssl", steps: int | None = None,
               finetune_steps: int | None = None, workers: int = 2, equal_total: bool = False) -> DigitsConfig:
    lengths = {k: v for k, v in (("steps", steps), ("finetune_steps", finetune_steps)) if v is not None}
    return DigitsConfig(seeds=seeds, out_dir=out, workers=workers, equal_total=equal_total, **lengths)


def main(argv: list[str] | None = None) -> DigitsReport:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (labeled split + init)")
    parser.add_argument("--out", default="runs/digits_ssl", help="output directory")
    parser.add_argument("--steps", type=int, help="main-phase steps of every method")
    parser.add_argument("--finetune-steps", type=int, help="MPL student's finetune steps (0: none)")
    parser.add_argument("--equal-total", action="store_true",
                        help="train Supervised and UDA for steps + finetune steps too")
    parser.add_argument("--workers", type=int, default=2, help="processes running (method, seed) in parallel")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a DigitsConfig field, e.g. --set feedback=taylor")
    args = parser.parse_args(argv)
    cfg = digits_ssl(args.seeds, args.out, args.steps, args.finetune_steps, args.workers, args.equal_total)
    for assignment in args.set:
        apply_override(cfg, assignment)
    return run_digits(cfg)


if __name__ == "__main__":
    main()
