"""The command line every paper recipe shares: data paths, run length and `--set` overrides."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from mpl_large.config import OptimConfig, TrainConfig, apply_override
from mpl_large.trainer import train


def nesterov_cosine(lr: float, weight_decay: float, warmup_steps: int, steps: int) -> OptimConfig:
    """C.4's optimizer for WRN/ResNet: SGD, Nesterov momentum 0.9, cosine decay after linear warm-up.
    A run shortened with --steps keeps its warm-up to at most a tenth of its length."""
    return OptimConfig(name="sgd", lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay,
                       schedule="cosine", warmup_steps=min(warmup_steps, steps // 10), total_steps=steps)


def rmsprop_exponential(lr: float, weight_decay: float, warmup_steps: int, steps: int, decay_steps: int,
                        decay_rate: float = 0.97) -> OptimConfig:
    """C.4's optimizer for EfficientNets: TF RMSProp (decay 0.9, momentum 0.9, epsilon 1e-3) and exponential
    decay after linear warm-up (EfficientNet: x0.97 every 2.4 epochs). A run shortened with --steps keeps its
    warm-up to at most a tenth of its length."""
    return OptimConfig(name="rmsprop", lr=lr, momentum=0.9, weight_decay=weight_decay, schedule="exponential",
                       warmup_steps=min(warmup_steps, steps // 10), total_steps=steps, decay_rate=decay_rate,
                       decay_steps=decay_steps)


def recipe_parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="labeled training data (image folder, parquet/Arrow files, saved dataset)")
    p.add_argument("--unlabeled", help="unlabeled data (default: per the recipe's split of --data)")
    p.add_argument("--eval", help="held-out evaluation set")
    p.add_argument("--real-labels", help="ImageNet-ReaL real.json, for ReaL precision@1")
    p.add_argument("--out", help="run directory")
    p.add_argument("--steps", type=int, help="main-phase steps (shortens the recipe's schedule too)")
    p.add_argument("--finetune-steps", type=int, help="finetune steps (0 skips finetuning)")
    p.add_argument("--method", choices=["mpl", "uda", "supervised", "reduced_mpl", "noisy_student"],
                   help="run a baseline instead of the recipe's method")
    p.add_argument("--distributions", help="Reduced MPL: the large teacher's stored distributions "
                                           "(python -m mpl_large.reduced precompute --out DIR)")
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-every", type=int, metavar="N", help="save a resumable checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous run's files in --out (a fresh run refuses a non-empty --out)")
    p.add_argument("--deepspeed", metavar="CONFIG",
                   help="DeepSpeed config for both models: ddp, zero2, zero3, zero3_offload, zero3_bf16 or a path "
                        "(launch with `accelerate launch --multi_gpu --num_processes N`)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config field, e.g. --set batch_size=8 --set data.image_size=64")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    return p


def paper_recipe_main(config: Callable[..., TrainConfig], doc: str, argv: list[str] | None = None) -> dict:
    return train(recipe_config(config, recipe_parser(doc).parse_args(argv)))


def recipe_config(config: Callable[..., TrainConfig], args: argparse.Namespace) -> TrainConfig:
    """The recipe's `TrainConfig` with the command line (`recipe_parser`'s arguments) applied."""
    lengths = {k: v for k, v in (("steps", args.steps), ("finetune_steps", args.finetune_steps)) if v is not None}
    cfg = config(**lengths)
    for field, value in (("labeled", args.data), ("unlabeled", args.unlabeled), ("eval", args.eval),
                         ("real_labels", args.real_labels)):
        if value is not None:
            setattr(cfg.data, field, value)
    cfg.out_dir = args.out or f"runs/{cfg.name}"
    if args.method:
        cfg.method = args.method
    if args.seed is not None:
        cfg.seed = args.seed
    if args.distributions is not None:
        cfg.reduced.distributions = args.distributions
    if args.deepspeed:
        cfg.parallel.deepspeed = args.deepspeed
    if args.checkpoint_every is not None:
        cfg.checkpoint_every = args.checkpoint_every
    cfg.resume = cfg.resume or args.resume
    cfg.overwrite = cfg.overwrite or args.overwrite
    cfg.progress = not args.no_progress
    for assignment in args.set:
        apply_override(cfg, assignment)
    return cfg
