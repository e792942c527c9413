"""A real-image semi-supervised benchmark that runs offline on two CPU cores: scikit-learn's digits.

`sklearn.datasets.load_digits` ships 1,797 real 8x8 handwritten digits (ink levels 0-16, ~180 per class),
the one real image dataset available without a download. The benchmark follows §3.2's protocol at toy
scale, with the shared trainer (`mpl_large.trainer.train`) and the paper's steps:

- **Split.** A fixed test set of `test_per_class` images per class (500), drawn once by `TEST_SPLIT_SEED`
  and the same for every seed. Of the other 1,297 images, `labeled_per_class` per class (100 in all) are
  labeled, drawn by the *split seed*; the rest (1,197) are unlabeled and enter training without labels.
- **Images.** Ink levels scaled to uint8 (x 255/16), gray copied to RGB (the pipeline decodes to RGB),
  kept at the native 8x8. The views are the paper's SVHN ones (Table 5 without rotations and TranslateX,
  which make wrong invariances for digits; no flips): weak = pad-1-and-crop, strong = weak + RandAugment
  + Cutout (4x4, half the side as in the paper's code).
- **Methods**, one `TrainConfig` each, the same conv net (`digits_cnn`) for every model:
  Supervised (labeled batches only), UDA (the teacher alone: supervised + UDA loss), MPL (UDA teacher +
  student, the student is scored), MPL + finetune (that same student after `finetune_steps` steps on the
  labeled images; the MPL run's `results["finetune"]`, so it costs only the finetune steps). Two MPL
  variants with the same seeds and budget, each with its + finetune key: `mpl_nofeedback` (`feedback="none"`,
  h = 0: the feedback ablation) and `mpl_wait` (the student waits `student_wait_steps`, MPL-pytorch's
  practice). `runs` picks which runs to train.
- **Step budget.** Supervised, UDA and MPL train `steps` steps each on the same batch sizes (MPL's
  teacher sees exactly UDA's batches per step). MPL + finetune is `steps` + `finetune_steps`: the paper's
  protocol, stated in the table's Steps column. `equal_total` gives Supervised and UDA
  `steps + finetune_steps` instead, for a comparison at equal total step count.
- **Hyper-parameters.** Every model: SGD with Nesterov momentum 0.9, lr 0.05 (Table 8's SVHN teacher),
  linear warm-up then cosine decay (C.4), weight decay 5e-4, dropout 0.3, BN decay 0.99; batch 32 labeled
  + 32 unlabeled (mu = 1, equal batches as in the paper); UDA factor 1 and temperature 0.8 (Table 7,
  SVHN), confidence mask 0.6. Tuned, on seeds 100-101 with `eval_on="unlabeled"` (never on the test
  set), for all methods alike: RandAugment magnitude 10 -> 5 (MPL +1.0 point, UDA unchanged) and the
  finetune phase (300 steps, lr 1e-2, momentum 0.9; §3.2's lr 1e-5 only re-estimates BN statistics here).

Seeds, for seed index i: the labeled split uses `i`; `TrainConfig.seed` (model init, pseudo-label
sampling, batch order and augmentation) uses `INIT_SEED_OFFSET + i`. All methods of seed i share the split.

What to expect (5 seeds, 1,000 steps, ~7 minutes on 2 idle cores): UDA > Supervised by ~1.4 points; the
MPL student alone is ~2 points *below* UDA, and MPL + finetune ties UDA (paired difference within one
std). The evidence points to the step budget. The student learns only from labels sampled on strong
views, on which the 8x8 teacher is unsure (at magnitude 10 its argmax on x_u_aug agrees with its argmax
on x_u for only 60-77% of images), and its BN statistics come from strong views alone (re-estimating them
on clean images adds 1-14 points along training). With 4x the steps the student comes within 0.9 points
of UDA (0.25 after BN re-estimation) and the MPL teacher ends level with UDA (one seed). The feedback
helps little, if at all: on the 5 benchmark seeds (machine B) MPL minus MPL with h = 0 is +0.36 +- 0.82
points for the student and 0.00 +- 0.63 after finetuning (paired). Dot or taylor h, no baseline, a 3x
student lr, argmax labels and label smoothing did not close the gap. A student wait of 300 of the 1,000
steps costs the student 0.64 +- 0.71 points against MPL (0.08 +- 0.86 after finetuning).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
import timm
import torch
from PIL import Image
from rich.table import Table
from sklearn.datasets import load_digits

import mpl_large.models.digits  # noqa: F401  (registers digits_cnn with timm)
from mpl_large.config import ConfigError, DataConfig, FinetuneConfig, MPLConfig, ModelConfig, OptimConfig, TrainConfig
from mpl_large.data.pipeline import Streams
from mpl_large.experiments.common import fork_map, start_report, write_report
from mpl_large.trainer import train

TEST_SPLIT_SEED = 20_240_601
"""Draws the fixed test set; never changes with the seed index."""
INIT_SEED_OFFSET = 1000
"""`TrainConfig.seed` = INIT_SEED_OFFSET + seed index: the init seed differs from the split seed."""
NUM_CLASSES = 10
MODEL = "digits_cnn"

METHODS = ("supervised", "uda", "mpl", "mpl_finetune", "mpl_nofeedback", "mpl_nofeedback_finetune", "mpl_wait",
           "mpl_wait_finetune")
"""Result keys, in table order."""
METHOD_NAMES = {"supervised": "Supervised", "uda": "UDA (teacher alone)", "mpl": "MPL (UDA teacher)",
                "mpl_finetune": "MPL + finetune", "mpl_nofeedback": "MPL, h ≡ 0 (no feedback)",
                "mpl_nofeedback_finetune": "MPL, h ≡ 0 + finetune", "mpl_wait": "MPL, student wait",
                "mpl_wait_finetune": "MPL, student wait + finetune"}
RUNS = ("mpl", "mpl_wait", "mpl_nofeedback", "uda", "supervised")
"""Training runs per seed, most expensive first (each MPL run also yields its + finetune key). `mpl_nofeedback`
is MPL with `feedback="none"` (the teacher is UDA alone, the student learns from its pseudo labels);
`mpl_wait` is MPL with the student waiting `student_wait_steps` of the same step budget."""
MPL_RUNS = ("mpl", "mpl_wait", "mpl_nofeedback")


@dataclass
class DigitsConfig:
    """The digits benchmark: split, step budget, per-method hyper-parameters, workers and outputs."""

    seeds: int = 5
    """Number of seeds; seed indices are first_seed .. first_seed + seeds - 1 (split seed i, init seed
    INIT_SEED_OFFSET + i)."""
    first_seed: int = 0
    """First seed index (the benchmark: 0; hyper-parameters were tuned on 100-101)."""
    test_per_class: int = 50
    """Fixed test images per class (500 in all)."""
    labeled_per_class: int = 10
    """Labeled images per class (100 in all), drawn by the split seed from the non-test images."""
    steps: int = 1000
    """Steps of each method's main phase (Supervised, UDA and MPL alike)."""
    finetune_steps: int = 300
    """Steps of MPL's student on labeled data after MPL (MPL + finetune)."""
    equal_total: bool = False
    """Give Supervised and UDA `steps + finetune_steps` so every final model has the same step count."""
    batch_size: int = 32
    """Labeled batch per step; the unlabeled batch is `mu` times this."""
    mu: int = 1
    """Unlabeled batch = mu * batch_size."""
    randaugment_ops: int = 2
    """RandAugment ops per strong view."""
    randaugment_magnitude: float = 5.0
    """RandAugment magnitude (0-10 scale, see `mpl_large.data.augment`)."""
    weight_decay: float = 5e-4
    """Weight decay of every optimizer (Tables 7 and 8)."""
    warmup_steps: int = 100
    """Linear lr warm-up of every main phase, then cosine decay to 0 at `steps`."""
    supervised_lr: float = 0.05
    """Supervised model's learning rate."""
    teacher_lr: float = 0.05
    """UDA model's and MPL teacher's learning rate (the same: MPL's teacher is the UDA model plus h)."""
    student_lr: float = 0.05
    """MPL student's learning rate."""
    dropout: float = 0.3
    """Dropout before the classifier, every model."""
    label_smoothing: float = 0.0
    """Label smoothing of supervised and student losses."""
    uda_factor: float = 1.0
    """Weight of the UDA loss (UDA and MPL's teacher)."""
    uda_temperature: float = 0.8
    """UDA target sharpening temperature."""
    uda_threshold: float = 0.6
    """UDA confidence mask on the weak view's max probability."""
    uda_ramp_steps: int = 200
    """UDA weight ramp."""
    feedback: Literal["cosine", "dot", "taylor"] = "cosine"
    """MPL feedback h (C.3: cosine)."""
    baseline_decay: float = 0.99
    """Moving-average baseline of h (0: none)."""
    pseudo_labels: Literal["sample", "argmax"] = "sample"
    """MPL pseudo labels: sampled from the teacher (the paper) or its argmax."""
    student_wait_steps: int = 300
    """`mpl_wait`: the student's schedule starts after this many of the `steps` (MPL-pytorch's student wait;
    at most half of them, so a shortened run keeps a student phase); the teacher trains alone (supervised +
    UDA) until then."""
    runs: tuple[str, ...] = RUNS
    """Which of RUNS to train (e.g. only `mpl_wait` while tuning its wait)."""
    finetune_lr: float = 1e-2
    """Finetune learning rate, constant (§3.2 uses 1e-5 for a student trained 1M steps; here that only
    re-estimates BN statistics, see the module docstring)."""
    finetune_momentum: float = 0.9
    """Finetune SGD momentum (§3.2: plain SGD)."""
    finetune_batch_size: int = 100
    """Finetune batch (§3.2: 512 > 100 labeled images, so the whole labeled set)."""
    eval_on: Literal["test", "unlabeled"] = "test"
    """`test`: the fixed test set (the benchmark). `unlabeled`: the seed's unlabeled images with their true
    labels (transductive accuracy; labels never reach training), to tune without looking at the test set."""
    workers: int = 2
    """Processes that run (method, seed) runs in parallel, one torch thread each; 1 runs in this process."""
    out_dir: str = "runs/digits_ssl"
    """Where config.json, results.json, table.txt and one run directory per (method, seed) are written."""

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"digits.{name}: {message}")

        check(self.seeds >= 1, "seeds", f"must be >= 1, got {self.seeds}")
        check(self.first_seed >= 0, "first_seed", f"must be >= 0, got {self.first_seed}")
        check(1 <= self.test_per_class <= 150, "test_per_class", f"must be in [1, 150], got {self.test_per_class}")
        check(1 <= self.labeled_per_class <= 20, "labeled_per_class",
              f"must be in [1, 20], got {self.labeled_per_class}")
        check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        check(self.finetune_steps >= 0, "finetune_steps", f"must be >= 0, got {self.finetune_steps}")
        check(self.workers >= 1, "workers", f"must be >= 1, got {self.workers}")
        check(set(self.runs) <= set(RUNS), "runs", f"unknown runs {sorted(set(self.runs) - set(RUNS))}; "
              f"choose from {list(RUNS)}")
        check(self.student_wait_steps >= 0, "student_wait_steps", f"must be >= 0, got {self.student_wait_steps}")
        self.train_config("mpl_wait", 0)  # TrainConfig, OptimConfig and MPLConfig check their own fields

    def main_steps(self, method: str) -> int:
        extra = self.finetune_steps if self.equal_total and method not in MPL_RUNS else 0
        return self.steps + extra

    def train_config(self, method: str, seed: int) -> TrainConfig:
        """The `TrainConfig` of one run: `method` in RUNS, seed index `seed`."""
        steps = self.main_steps(method)

        wait = min(self.student_wait_steps, steps // 2) if method == "mpl_wait" else 0

        def optim(lr: float, wait: int = 0) -> OptimConfig:
            return OptimConfig(name="sgd", lr=lr, momentum=0.9, nesterov=True, weight_decay=self.weight_decay,
                               schedule="cosine", wait_steps=wait,
                               warmup_steps=min(self.warmup_steps, steps - wait - 1), total_steps=steps)

        # Contiguous, as every figure of this benchmark was measured: the CPU's channels-last default would
        # change the convolutions' round-off and so the results.
        model = ModelConfig(MODEL, num_classes=NUM_CLASSES, drop_rate=self.dropout, channels_last=False)
        return TrainConfig(
            name=f"{method}_seed{seed}",
            out_dir=str(Path(self.out_dir) / "runs" / f"{method}_seed{seed}"),
            overwrite=True,  # the experiment owns its runs' directories: a rerun replaces them
            method="mpl" if method in MPL_RUNS else method,
            seed=INIT_SEED_OFFSET + seed,
            steps=steps,
            batch_size=self.batch_size,
            mu=self.mu,
            teacher=model,
            student=dataclasses.replace(model),
            teacher_optim=optim(self.supervised_lr if method == "supervised" else self.teacher_lr),
            student_optim=optim(self.student_lr, wait),
            mpl=MPLConfig(
                feedback="none" if method == "mpl_nofeedback" else self.feedback, baseline_decay=self.baseline_decay, pseudo_labels=self.pseudo_labels,
                label_smoothing=self.label_smoothing,
                uda_factor=0.0 if method == "supervised" else self.uda_factor,
                uda_temperature=self.uda_temperature, uda_threshold=self.uda_threshold,
                uda_ramp_steps=min(self.uda_ramp_steps, steps),
            ),
            data=DataConfig(augment="svhn", image_size=8, randaugment_ops=self.randaugment_ops,
                            randaugment_magnitude=self.randaugment_magnitude, eval_batch_size=500),
            finetune=FinetuneConfig(
                steps=self.finetune_steps if method in MPL_RUNS else 0, batch_size=self.finetune_batch_size,
                optim=OptimConfig(name="sgd", lr=self.finetune_lr, momentum=self.finetune_momentum, nesterov=False),
            ),
            log_every=50,
            progress=False,
        )


# ----------------------------------------------------------------------------------------------- data


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as (N, 8, 8) uint8 gray images (ink levels x 255/16, rounded) and int64 labels."""
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


@dataclass
class DigitsSplit:
    """Indices into `load_digit_images()`: a fixed test set, and one seed's labeled and unlabeled sets."""

    test: np.ndarray
    labeled: np.ndarray
    unlabeled: np.ndarray


def fixed_test_indices(labels: np.ndarray, per_class: int) -> np.ndarray:
    """The fixed test set: `per_class` images of each class, drawn by TEST_SPLIT_SEED (sorted)."""
    rng = np.random.default_rng(TEST_SPLIT_SEED)
    chosen = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(NUM_CLASSES)]
    return np.sort(np.concatenate(chosen))


def make_split(cfg: DigitsConfig, labels: np.ndarray, split_seed: int) -> DigitsSplit:
    """Fixed test set; `labeled_per_class` labeled per class from the rest by `split_seed`; the rest unlabeled."""
    test = fixed_test_indices(labels, cfg.test_per_class)
    pool = np.setdiff1d(np.arange(len(labels)), test)
    rng = np.random.default_rng([split_seed, 1])
    labeled = np.sort(np.concatenate([
        rng.choice(pool[labels[pool] == c], cfg.labeled_per_class, replace=False) for c in range(NUM_CLASSES)
    ]))
    return DigitsSplit(test=test, labeled=labeled, unlabeled=np.setdiff1d(pool, labeled))


def to_dataset(images: np.ndarray, labels: np.ndarray | None) -> datasets.Dataset:
    """An in-memory `datasets.Dataset` of RGB PIL images (`image`) and, if given, int labels (`label`)."""
    columns: dict = {"image": [Image.fromarray(img, mode="L").convert("RGB") for img in images]}
    features = {"image": datasets.Image()}
    if labels is not None:
        columns["label"] = labels.tolist()
        features["label"] = datasets.Value("int64")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def make_streams(cfg: TrainConfig, images: np.ndarray, labels: np.ndarray, split: DigitsSplit,
                 eval_on: str = "test") -> Streams:
    """The run's `Streams`; the unlabeled set carries no label column (nothing can leak into training).
    `eval_on="unlabeled"` scores on the unlabeled images instead of the test set (for tuning)."""
    evaluation = split.test if eval_on == "test" else split.unlabeled
    pretrained = timm.models.get_pretrained_cfg(cfg.student.name)
    return Streams(
        to_dataset(images[split.labeled], labels[split.labeled]),
        to_dataset(images[split.unlabeled], None),
        to_dataset(images[evaluation], labels[evaluation]),
        augment=cfg.data.augment, image_size=cfg.data.image_size, mean=pretrained.mean, std=pretrained.std,
        batch_size=cfg.batch_size, unlabeled_batch_size=cfg.mu * cfg.batch_size, seed=cfg.seed,
        randaugment_ops=cfg.data.randaugment_ops, randaugment_magnitude=cfg.data.randaugment_magnitude,
        eval_batch_size=cfg.data.eval_batch_size,
    )


# ---------------------------------------------------------------------------------------------- runs


@dataclass
class RunResult:
    method: str
    """One of RUNS."""
    seed: int
    """Seed index."""
    top1: dict[str, float]
    """Test top-1 per table key this run yields (MPL: `mpl` and `mpl_finetune`)."""
    steps: dict[str, int]
    """Total training steps behind each key."""
    seconds: float
    last: dict = field(default_factory=dict)
    """The last logged training step of the main phase (losses, h, accuracies)."""


def run_one(cfg: DigitsConfig, method: str, seed: int) -> RunResult:
    """Train one method on seed index `seed`'s split with one torch thread, and score it on the test set."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 66k-parameter net on 8x8 images: more threads cost more than they save
    start = time.perf_counter()
    try:
        # `train` seeds torch's global generator; hand the caller's state back afterwards.
        with torch.random.fork_rng(devices=[]):
            images, labels = load_digit_images()
            tcfg = cfg.train_config(method, seed)
            streams = make_streams(tcfg, images, labels, make_split(cfg, labels, seed), cfg.eval_on)
            results = train(tcfg, streams=streams)
    finally:
        torch.set_num_threads(threads)
    top1 = {method: results["main"]["eval_top1"]}
    steps = {method: tcfg.steps}
    if "finetune" in results:
        top1[f"{method}_finetune"] = results["finetune"]["eval_top1"]
        steps[f"{method}_finetune"] = tcfg.steps + tcfg.finetune.steps
    last = {k: v for k, v in results["main"].items() if not k.startswith("eval_")}
    return RunResult(method, seed, top1, steps, time.perf_counter() - start, last)


def run_all(cfg: DigitsConfig) -> list[RunResult]:
    """Every (method, seed) run, in `cfg.workers` forked processes (fork: spawned workers would re-import
    torch and timm, seconds each); MPL runs are queued first so the two workers finish together."""
    seeds = range(cfg.first_seed, cfg.first_seed + cfg.seeds)
    return fork_map(run_one, [(cfg, method, seed) for method in RUNS if method in cfg.runs for seed in seeds],
                    cfg.workers)


# ------------------------------------------------------------------------------------------- reporting


@dataclass
class MethodSummary:
    mean: float
    std: float
    """Sample standard deviation over seeds (0 for one seed)."""
    min: float
    max: float
    top1: list[float]
    """Per seed index, in order."""
    steps: int
    """Training steps behind the final model."""
    vs_uda_mean: float | None = None
    """Mean over seeds of (this method - UDA) on the same split: the paired difference (None: no UDA)."""
    vs_uda_std: float | None = None
    """Sample std of that paired difference."""


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(results: list[RunResult]) -> dict[str, MethodSummary]:
    """Per table key: top-1 statistics over seeds and the paired difference to UDA, seed by seed."""
    by_key = {key: {r.seed: r for r in results if key in r.top1} for key in METHODS}
    uda = by_key["uda"]
    out = {}
    for key, runs in by_key.items():
        if not runs:
            continue
        seeds = sorted(runs)
        accs = [runs[s].top1[key] for s in seeds]
        mean, std = _mean_std(accs)
        paired = [runs[s].top1[key] - uda[s].top1["uda"] for s in seeds if s in uda]
        vs_mean, vs_std = _mean_std(paired) if paired else (None, None)
        out[key] = MethodSummary(mean=mean, std=std, min=min(accs), max=max(accs), top1=accs,
                                 steps=runs[seeds[0]].steps[key], vs_uda_mean=vs_mean, vs_uda_std=vs_std)
    return out


def render_table(cfg: DigitsConfig, summary: dict[str, MethodSummary]) -> Table:
    table = Table(
        title=f"Digits SSL: {NUM_CLASSES * cfg.labeled_per_class} labeled, {cfg.seeds} seeds, scored on "
              + (f"{NUM_CLASSES * cfg.test_per_class} fixed test images" if cfg.eval_on == "test"
                 else "the unlabeled images (tuning)"),
        caption="top-1 (%), mean ± sample std over seeds; MPL rows score the student; "
                "vs UDA: paired per-seed difference",
    )
    for column in ("Method", "Top-1", "vs UDA", "Min", "Max", "Steps"):
        table.add_column(column, justify="left" if column == "Method" else "right", no_wrap=True)
    for key, s in summary.items():
        vs_uda = "" if key == "uda" or s.vs_uda_mean is None else (
            f"{100 * s.vs_uda_mean:+.2f} ± {100 * s.vs_uda_std:.2f}")
        table.add_row(METHOD_NAMES[key], f"{100 * s.mean:.2f} ± {100 * s.std:.2f}", vs_uda,
                      f"{100 * s.min:.2f}", f"{100 * s.max:.2f}", str(s.steps))
    return table


@dataclass
class DigitsReport:
    summary: dict[str, MethodSummary]
    results: list[RunResult]
    seconds: float
    paths: dict[str, str]


def run_digits(cfg: DigitsConfig, console=None) -> DigitsReport:
    """Run every method and seed, then write config.json, results.json and table.txt to `cfg.out_dir` and
    print the table."""
    start = time.perf_counter()
    out = start_report(cfg, cfg.out_dir)
    results = run_all(cfg)
    summary = summarize(results)
    seconds = time.perf_counter() - start

    paths = {name: str(out / name) for name in ("config.json", "results.json", "table.txt")}
    write_report(paths, {
        "config": asdict(cfg),
        "summary": {k: asdict(v) for k, v in summary.items()},
        "runs": [asdict(r) for r in results],
        "seconds": seconds,
    }, render_table(cfg, summary), console)
    return DigitsReport(summary=summary, results=results, seconds=seconds, paths=paths)
