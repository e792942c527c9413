"""Console entry points (`pyproject.toml`'s `[project.scripts]`): each parses its arguments with
`mpl_large.cli`'s parser before importing the module that does the work, so `--help` and usage errors answer
without loading torch, timm or datasets. `python -m mpl_large.<module>` runs the same code. The console
functions return None (a console script exits with its return value as the status); `train_main` and
`recipe_main` return the run's results."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable

from mpl_large.cli import (eval_parser, export_parser, folder_config, plan_parser, print_config, recipe_parser,
                           run_config, select_parser)
from mpl_large.config import ConfigError, TrainConfig

__all__ = ["evaluate", "export", "plan", "recipe_main", "select", "train", "train_main"]


def train_main(argv: list[str] | None = None) -> dict | None:
    """`mpl-train`: Meta Pseudo Labels on your own image folder (or any config file)."""
    p = recipe_parser(
        "Train Meta Pseudo Labels on your own data. The classes and their names come from --data (one\n"
        "subfolder per class); without --eval a tenth of each class is held out for evaluation, without\n"
        "--unlabeled the labeled images double as unlabeled ones (data.split=auto).\n\n"
        "  mpl-train --data photos/ --out runs/photos\n"
        "  accelerate launch --multi_gpu --num_processes 8 -m mpl_large.commands --data photos/ --deepspeed zero3\n",
        prog="mpl-train")
    args = p.parse_args(argv)
    try:
        cfg = run_config(folder_config, args, infer_classes=True)
    except (ConfigError, ValueError, FileNotFoundError) as e:  # DataError is a ValueError
        p.error(str(e))
    if args.print_config:
        print_config(cfg)
        return None
    from mpl_large.trainer import train

    return train(cfg)


def recipe_main(config: Callable[..., TrainConfig], doc: str, argv: list[str] | None = None) -> dict | None:
    """A paper recipe's command: its config with the shared flags applied, then training."""
    p = recipe_parser(doc)
    args = p.parse_args(argv)
    try:
        cfg = run_config(config, args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        p.error(str(e))
    if args.print_config:
        print_config(cfg)
        return None
    from mpl_large.trainer import train

    return train(cfg)



def train(argv: list[str] | None = None) -> None:
    """`mpl-train`: MPL on your own image folder, or on any config file."""
    train_main(argv)


def plan(argv: list[str] | None = None) -> None:
    """`mpl-plan`: the memory planner."""
    args = plan_parser().parse_args(argv)
    from mpl_large.memory.plan import run

    run(args)


def select(argv: list[str] | None = None) -> None:
    """`mpl-select`: score unlabeled images with a teacher, keep the top K per class."""
    select_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from mpl_large.select import main

    main(argv)


def export(argv: list[str] | None = None) -> None:
    """`mpl-export`: a run's model as a timm/Hub folder."""
    export_parser().parse_args(argv)
    from mpl_large.export import main

    main(argv)


def evaluate(argv: list[str] | None = None) -> None:
    """`mpl-eval`: top-1/top-5/ReaL of a run's or an export's model on a labeled set."""
    p = eval_parser()
    args = p.parse_args(argv)
    from mpl_large.evaluation import EvalError, evaluate_path

    try:
        scores = evaluate_path(args.model, args.data, split=args.split, weights=args.weights,
                               real_labels=args.real_labels, batch_size=args.batch_size)
    except (EvalError, ValueError, FileNotFoundError) as e:  # DataError is a ValueError
        p.error(str(e))
    if args.json:
        print(json.dumps(scores))
    else:
        print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items()))


if __name__ == "__main__":  # `accelerate launch -m mpl_large.commands ...` is `mpl-train ...` on every rank
    train_main(sys.argv[1:])
