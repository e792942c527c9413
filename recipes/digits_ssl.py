"""Digits SSL: Supervised vs UDA vs MPL vs MPL + finetune on scikit-learn's real 8x8 digits, 100 labeled.

    time .venv/bin/python recipes/digits_ssl.py --seeds 5 --out runs/digits_ssl

Writes config.json, results.json, table.txt and one run directory per (method, seed) to --out. The split,
step budget and hyper-parameters are documented in `mpl_large.experiments.digits`; 5 seeds take about
8 minutes on 2 CPU cores.
"""

import argparse

from mpl_large.experiments.digits import DigitsConfig, DigitsReport, run_digits


def digits_ssl(seeds: int = 5, out: str = "runs/digits_ssl", steps: int | None = None,
               finetune_steps: int | None = None, workers: int = 2, equal_total: bool = False) -> DigitsConfig:
    lengths = {k: v for k, v in (("steps", steps), ("finetune_steps", finetune_steps)) if v is not None}
    return DigitsConfig(seeds=seeds, out_dir=out, workers=workers, equal_total=equal_total, **lengths)


def main(argv: list[str] | None = None) -> DigitsReport:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (labeled split + init)")
    parser.add_argument("--out", default="runs/digits_ssl", help="output directory")
    parser.add_argument("--steps", type=int, help="main-phase steps of every method")
    parser.add_argument("--finetune-steps", type=int, help="MPL student's finetune steps (0: none)")
    parser.add_argument("--equal-total", action="store_true",
                        help="train Supervised and UDA for steps + finetune steps too")
    parser.add_argument("--workers", type=int, default=2, help="processes running (method, seed) in parallel")
    args = parser.parse_args(argv)
    return run_digits(digits_ssl(args.seeds, args.out, args.steps, args.finetune_steps, args.workers,
                                 args.equal_total))


if __name__ == "__main__":
    main()
