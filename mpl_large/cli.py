"""The command lines: `mpl-train`, `mpl-plan`, `mpl-select`, `mpl-export`, `mpl-eval`, and the flags every
paper recipe shares.

One vocabulary for all of them: `--data`, `--eval`, `--out`, `--image-size`, `--num-classes`, `--world-size`,
`--labeled-batch`/`--unlabeled-batch` (images per replica), `--deepspeed` (a DeepSpeed config: a name in
ds_configs/ or a path), `--config` (a run config file), `--set SECTION.KEY=VALUE`. Parsers are built here
without importing torch, timm or datasets, so `--help` answers at once; a command imports its module only
after its arguments parsed.

A run's configuration is layered: the command's base config (a recipe's, or `folder_config` for
`mpl-train`), then `--config FILE` replacing it whole (YAML or JSON with `config.json`'s schema: a saved
run's config re-runs it), then the named flags, then every `--set` in order. `--print-config` prints the
result as JSON and exits.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from mpl_large.config import ConfigError, TrainConfig, apply_override, load_config, validate
from mpl_large.recipe import nesterov_cosine

METHODS = ["mpl", "uda", "supervised", "reduced_mpl", "noisy_student"]
PLAN_OPTIMIZERS = ["adam", "adamw", "lars", "rmsprop", "sgd", "sgd_heavy_ball"]
"""`mpl_large.memory.plan.OPTIMIZERS`' names (a test keeps them equal; that module imports torch)."""
PROBS_DTYPES = ["bfloat16", "float16", "float32"]
"""`mpl_large.selection_store.PROBS_DTYPES`' names (a test keeps them equal)."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every flag's help ends with its default (when it has one worth showing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)


# ---------------------------------------------------------------------------------------- training


def add_run_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The training flags of `mpl-train` and every paper recipe; unset flags leave the config as it is."""
    g = p.add_argument_group("configuration")
    g.add_argument("--config", metavar="FILE",
                   help="run config, YAML or JSON with config.json's schema (a saved run's config.json re-runs it); "
                        "replaces the base config; the flags below and --set apply on top")
    g.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config field, applied last and in order, e.g. --set batch_size=8 "
                        "--set data.image_size=64 --set trackers='[\"wandb\"]'")
    g.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="labeled training data: an image folder (one subfolder per class), "
                                  "parquet/Arrow files or a saved dataset")
    g.add_argument("--unlabeled", help="unlabeled data (default: as data.split says: the labeled images for "
                                       "split=auto, the rest of --data for split=paper)")
    g.add_argument("--eval", help="held-out evaluation set (default: split=auto holds out "
                                  "data.holdout_fraction of --data)")
    g.add_argument("--real-labels", help="ImageNet-ReaL real.json, for ReaL precision@1")
    g.add_argument("--image-size", type=int, help="training and evaluation resolution (data.image_size)")
    g.add_argument("--num-classes", type=int,
                   help="classes of teacher and student; default: the number of classes in --data "
                        "(an image folder's subfolders); a mismatch with the data is an error")
    g = p.add_argument_group("run")
    g.add_argument("--out", help="run directory (default: runs/NAME)")
    g.add_argument("--steps", type=int, help="main-phase steps (a recipe's schedule is shortened to match)")
    g.add_argument("--finetune-steps", type=int, help="finetune steps (0 skips finetuning)")
    g.add_argument("--method", choices=METHODS, help="run a baseline instead of the configured method")
    g.add_argument("--distributions", help="Reduced MPL: the large teacher's stored distributions "
                                           "(mpl-select / python -m mpl_large.reduced precompute --out DIR)")
    g.add_argument("--seed", type=int, help="seed of model init, pseudo-label sampling and data order")
    g.add_argument("--checkpoint-every", type=int, metavar="N", help="save a resumable checkpoint every N steps")
    g.add_argument("--eval-every", type=int, metavar="N",
                   help="evaluate every N steps (and keep the best model as best.safetensors)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in --out (--steps may lengthen the run)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a previous run's files in --out (a fresh run refuses a non-empty --out)")
    g.add_argument("--deepspeed", metavar="CONFIG",
                   help="DeepSpeed config for both models: ddp, zero2, zero3, zero3_blocks, zero3_offload, "
                        "zero3_bf16 or a path "
                        "(launch with `accelerate launch --multi_gpu --num_processes N`)")
    g.add_argument("--ema-decay", type=float, metavar="DECAY",
                   help="keep and evaluate a moving average of the student's weights, e.g. 0.999 (ema.safetensors)")
    g.add_argument("--trackers", nargs="*", metavar="NAME",
                   help="Accelerate trackers for the metrics: tensorboard (the default), wandb, mlflow, ... "
                        "(none: only metrics.jsonl)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    return p


def recipe_parser(doc: str, prog: str | None = None) -> argparse.ArgumentParser:
    return add_run_flags(parser(prog, doc))


def run_config(base: Callable[..., TrainConfig], args: argparse.Namespace, infer_classes: bool = False) -> TrainConfig:
    """The config of a run: `base(steps=, finetune_steps=)` (or `--config`), the flags, then `--set`.

    `infer_classes`: teacher and student get as many classes as `--data` has, unless the number was given
    (`--num-classes`, `--config`, or `--set ...num_classes`); a given number must match the data. Class names
    are kept in `data.class_names` either way."""
    lengths = {k: v for k, v in (("steps", args.steps), ("finetune_steps", args.finetune_steps)) if v is not None}
    if args.config:
        cfg = load_config(args.config)
        if args.steps is not None:  # schedules that spanned the run span the new length
            for optim in (cfg.teacher_optim, cfg.student_optim):
                if optim.total_steps == cfg.steps:
                    optim.total_steps = args.steps
            cfg.steps = args.steps
        if args.finetune_steps is not None:
            cfg.finetune.steps = args.finetune_steps
    else:
        cfg = base(**lengths)
    for section, name, value in (
            ("data", "labeled", args.data), ("data", "unlabeled", args.unlabeled), ("data", "eval", args.eval),
            ("data", "real_labels", args.real_labels), ("data", "image_size", args.image_size),
            (None, "method", args.method), (None, "seed", args.seed), ("reduced", "distributions", args.distributions),
            ("parallel", "deepspeed", args.deepspeed), (None, "checkpoint_every", args.checkpoint_every),
            (None, "eval_every", args.eval_every), (None, "trackers", args.trackers),
            (None, "ema_decay", args.ema_decay)):
        if value is not None:
            setattr(getattr(cfg, section) if section else cfg, name, value)
    if args.num_classes is not None:
        cfg.teacher.num_classes = cfg.student.num_classes = args.num_classes
    if args.out or not args.config:
        cfg.out_dir = args.out or f"runs/{cfg.name}"
    cfg.resume = cfg.resume or args.resume
    cfg.overwrite = cfg.overwrite or args.overwrite
    cfg.progress = cfg.progress and not args.no_progress
    for assignment in args.set:
        apply_override(cfg, assignment)
    given = (not infer_classes or args.config or args.num_classes is not None
             or any(a.partition("=")[0].strip().endswith("num_classes") for a in args.set))
    resolve_classes(cfg, infer=not given)
    validate(cfg)  # the flags set fields directly: check them before --print-config shows them
    return cfg


def resolve_classes(cfg: TrainConfig, infer: bool) -> None:
    """Read `data.labeled`'s class names (when it names them: an image folder, a `ClassLabel` column) into
    `data.class_names`; `infer`: also set the models' `num_classes` to their count, else check it."""
    if not cfg.data.labeled or not Path(cfg.data.labeled).exists():
        return  # a glob, or a missing path the trainer names
    from mpl_large.data.sources import class_names  # imports datasets: only once a run is configured

    names = class_names(cfg.data.labeled)
    if names is None:
        return  # bare integer labels: the trainer checks every id against num_classes
    # The models that learn these classes: MPL's two, the baselines' one, Reduced MPL's student.
    trained = {"mpl": ["teacher", "student"], "uda": ["teacher"], "supervised": ["teacher"]}.get(cfg.method, ["student"])
    for role in ["teacher", "student"] if infer else trained:
        model = getattr(cfg, role)
        if infer:
            model.num_classes = len(names)
        elif model.num_classes != len(names):
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ConfigError(f"{role}.num_classes: {model.num_classes}, but {cfg.data.labeled} has {len(names)} "
                              f"classes ({shown}); drop --num-classes to take them from the data")
    if cfg.data.class_names and cfg.data.class_names != names:
        raise ConfigError(f"data.class_names: {cfg.data.class_names[:8]} differ from the classes of "
                          f"{cfg.data.labeled}: {names[:8]}")
    cfg.data.class_names = names


def print_config(cfg: TrainConfig) -> None:
    import dataclasses

    print(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))


def folder_config(steps: int = 10_000, finetune_steps: int = 0) -> TrainConfig:
    """`mpl-train`'s base: MPL with WRN-28-2 teacher and student on your own images at 32x32, CIFAR-10-4K's
    optimizer and MPL settings (Table 8), `data.split=auto`. Scale the models and resolution with
    `--set teacher.name=... --set student.name=... --image-size ...`."""
    from mpl_large.config import DataConfig, FinetuneConfig, MPLConfig, ModelConfig

    return TrainConfig(
        name="mpl", method="mpl", steps=steps, batch_size=64,
        teacher=ModelConfig("wrn_28_2", drop_rate=0.5), student=ModelConfig("wrn_28_2", drop_rate=0.35),
        teacher_optim=nesterov_cosine(0.125, 5e-4, 2000, steps), student_optim=nesterov_cosine(0.3, 5e-4, 2000, steps),
        mpl=MPLConfig(label_smoothing=0.1, uda_factor=1.0, uda_temperature=0.8, uda_threshold=0.95,
                      uda_ramp_steps=min(5000, steps)),
        data=DataConfig(split="auto", augment="cifar10", image_size=32, eval_batch_size=256),
        finetune=FinetuneConfig(steps=finetune_steps, batch_size=64), eval_every=max(1, steps // 10),
    )


# ------------------------------------------------------------------------------------ other commands


def plan_parser() -> argparse.ArgumentParser:
    p = parser("mpl-plan", "Memory planner: per-rank bytes of one Meta Pseudo Labels step under DDP and "
                           "DeepSpeed ZeRO, and a verdict per strategy against a memory budget "
                           "(mpl_large.memory.plan).")
    p.add_argument("--teacher", required=True, help="timm model name")
    p.add_argument("--student", required=True, help="timm model name")
    p.add_argument("--num-classes", type=int, default=1000, help="classes of both models")
    p.add_argument("--image-size", type=int, required=True, help="square input resolution R")
    p.add_argument("--labeled-batch", type=int, required=True, help="labeled images per replica")
    p.add_argument("--unlabeled-batch", type=int, required=True, help="unlabeled images per replica and view")
    p.add_argument("--world-size", type=int, required=True, help="ranks N (ZeRO partitions over all of them)")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], required=True, help="ZeRO stage of both models")
    p.add_argument("--offload", action="store_true", help="offload optimizer (and ZeRO-3 parameters) to host")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="training precision")
    p.add_argument("--spatial", type=int, default=1, help="spatial-partition degree S")
    p.add_argument("--checkpointing", action="store_true", help="per-block activation checkpointing")
    p.add_argument("--budget-gib", type=float, required=True, help="memory per rank, GiB")
    p.add_argument("--teacher-optimizer", default="sgd", choices=PLAN_OPTIMIZERS, help="the teacher's optimizer")
    p.add_argument("--student-optimizer", default="sgd", choices=PLAN_OPTIMIZERS, help="the student's optimizer")
    p.add_argument("--feedback", default="cosine", choices=["cosine", "dot", "taylor"], help="MPL feedback h")
    p.add_argument("--no-uda", action="store_true", help="the teacher sees x_l and x_u_aug only")
    p.add_argument("--deepspeed", default=None, metavar="CONFIG",
                   help="DeepSpeed config whose bucket settings (ZERO_KEYS) apply, also to the verdict table "
                        "(path or ds_configs/ name; default: the repository's config of the chosen stage)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: add the CUDA context and NCCL buffers (outside PyTorch's allocator) to each rank")
    return p


def select_parser() -> argparse.ArgumentParser:
    import os

    p = parser("mpl-select", "Score unlabeled images with a trained teacher and keep the K most confident per "
                             "class (paper §3.3, Appendix E).")
    p.add_argument("--model", required=True, help="timm model name of the teacher")
    p.add_argument("--weights", help="teacher weights (.safetensors); default: random init (tests only)")
    p.add_argument("--num-classes", type=int, required=True, help="the teacher's classes")
    p.add_argument("--data", required=True,
                   help="image folder, parquet/arrow file(s) or save_to_disk folder (mpl_large.data.sources)")
    p.add_argument("--split", default="train", help="split of a multi-split --data")
    p.add_argument("--image-size", type=int, required=True, help="center-crop size fed to the teacher")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward")
    p.add_argument("--top-k", type=int, required=True, help="images kept per class (12800 for ImageNet)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--shard-size", type=int, default=100_000, help="examples per probability shard/checkpoint")
    p.add_argument("--probs-dtype", choices=PROBS_DTYPES, default="float16", help="stored probabilities' dtype")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image decoding processes")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--cache-dir", help="datasets cache directory")
    return p


def export_parser() -> argparse.ArgumentParser:
    p = parser("mpl-export", "Export a training run's model as model.safetensors + timm config.json + README.md "
                             "model card, optionally uploaded to the Hugging Face Hub.")
    p.add_argument("run_dir", help="a training run's out_dir (config.json, results.json, model.safetensors)")
    p.add_argument("--out", required=True, help="folder to write the export to")
    p.add_argument("--weights", choices=["final", "best", "ema"], default="final",
                   help="which of the run's models: the final one, best.safetensors (best held-out top-1) or "
                        "ema.safetensors (the weights' moving average)")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the export to this Hub model repo (USER/NAME)")
    p.add_argument("--private", action="store_true", help="create the Hub repo private")
    return p


def eval_parser() -> argparse.ArgumentParser:
    p = parser("mpl-eval", "Evaluate a training run's model, or an exported one, on a labeled set: top-1, top-5 "
                           "and (with --real-labels) ImageNet-ReaL precision@1.")
    p.add_argument("model", help="a run directory (config.json, model.safetensors) or an mpl-export folder")
    p.add_argument("--data", required=True, help="labeled evaluation data (image folder, parquet/Arrow, saved)")
    p.add_argument("--split", default="train", help="split of a multi-split --data")
    p.add_argument("--weights", choices=["final", "best", "ema"], default="final",
                   help="a run directory's final model, its best.safetensors or its ema.safetensors")
    p.add_argument("--real-labels", help="ImageNet-ReaL real.json, for ReaL precision@1")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward")
    p.add_argument("--json", action="store_true", help="print the scores as one JSON object")
    return p
