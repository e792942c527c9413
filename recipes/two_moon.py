"""TwoMoon (paper §3.1): Supervised vs Pseudo Labels vs Meta Pseudo Labels over many seeds.

    .venv/bin/python recipes/two_moon.py --seeds 20 --out runs/two_moon

Writes config.json, results.json, table.txt and two_moon.png (Figure 2's layout) to --out. The paper's fixed
settings (2-8-8-2 sigmoid MLP, U[-0.1, 0.1] init, SGD lr 0.1, no regularization) are not flags here.
"""

import argparse

from mpl_large.cli import HelpFormatter
from mpl_large.experiments.two_moon import TwoMoonConfig, TwoMoonReport, run_two_moon

DEFAULTS = TwoMoonConfig()


def main(argv: list[str] | None = None) -> TwoMoonReport:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--seeds", type=int, default=DEFAULTS.seeds, help="seeds (datasets + initialisations)")
    parser.add_argument("--out", default=DEFAULTS.out_dir, help="output directory")
    parser.add_argument("--steps", type=int, default=DEFAULTS.steps, help="SGD steps of every network")
    parser.add_argument("--feedback", default=DEFAULTS.feedback, choices=["cosine", "dot", "taylor"],
                        help="MPL feedback h")
    parser.add_argument("--workers", type=int, default=DEFAULTS.workers, help="processes running seeds")
    args = parser.parse_args(argv)
    return run_two_moon(TwoMoonConfig(seeds=args.seeds, out_dir=args.out, steps=args.steps,
                                      feedback=args.feedback, workers=args.workers))


if __name__ == "__main__":
    main()
