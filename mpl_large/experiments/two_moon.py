"""The TwoMoon experiment (paper §3.1, Figure 2): Supervised vs Pseudo Labels vs Meta Pseudo Labels.

2,000 points in two moons, 6 of them labeled. Three methods train the paper's network (2-8-8-2, sigmoid
hidden units, weights and biases ~ U[-0.1, 0.1], SGD with a constant learning rate of 0.1, no
regularization) and each final classifier is scored on all 2,000 points:

- Supervised: `FinetuneStep` on the 6 labeled points.
- Pseudo Labels: the Supervised model, frozen, labels the unlabeled points for a fresh student
  (`PseudoLabelStep`), which never sees a labeled point.
- Meta Pseudo Labels: `MPLStep`; the teacher learns from the labeled points and the student's feedback h,
  the student only from the teacher's pseudo labels. No UDA: 2-D points have no augmentation, so the
  "augmented" view is the point itself (x_u_aug = x_u) and `uda_factor` is 0.

A run counts as a success when its classifier (the student, for PL and MPL) is right on at least
`success_accuracy` of the 2,000 points. A linear boundary reaches only ~88% on these moons, so success
needs a boundary that bends with the moons.

What to expect (measured over 20 seeds): with the paper's init every network first sits on a plateau where
it gives all points one class (~1-3k steps), and a boundary that bends with the moons needs large weights:
even a student trained on the *true* labels of all points (batch 64) needs ~1e5 steps to pass 95% (10/20
seeds at 100k steps, 20/20 at 190k). Within this budget all three methods end near the best ~linear
classifier (~80-85%), and they stay there at 300k steps.

Initialisations are paired so the methods differ only in what they do: the Supervised model and the MPL
teacher start from the same weights (init "A"), the PL student and the MPL student from the same other
weights (init "B"); PL and MPL draw the same unlabeled minibatches.

Seeds, for seed index i: the data (moon noise and the choice of labeled points) use `i`; the two
initialisations use a torch generator seeded with `10_000 + i`; pseudo-label sampling (torch's global
generator) and minibatch order use `20_000 + i`.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from rich.table import Table
from sklearn.datasets import make_moons
from torch import nn

from mpl_large.config import ConfigError, MPLConfig, OptimConfig
from mpl_large.experiments.common import fork_map, start_report, write_report
from mpl_large.optim import build_learner
from mpl_large.steps import FinetuneStep, MPLStep, PseudoLabelStep

METHODS = ("supervised", "pseudo_labels", "mpl")
"""Result keys, in table and figure order."""
METHOD_NAMES = {"supervised": "Supervised", "pseudo_labels": "Pseudo Labels", "mpl": "Meta Pseudo Labels"}


@dataclass
class TwoMoonConfig:
    """One TwoMoon run: data, the paper's fixed training settings, step budget, MPL knobs, outputs."""

    seeds: int = 20
    """Number of seeds (independent datasets and initialisations); seed indices are 0 .. seeds-1."""
    points_per_moon: int = 1000
    """Points per moon (paper: 1,000, so 2,000 in all)."""
    labeled_per_moon: int = 3
    """Labeled points per moon, drawn at random by the data seed (paper: 3, so 6 in all)."""
    noise: float = 0.1
    """Std of the Gaussian noise `sklearn.datasets.make_moons` adds (moons of radius 1; our choice, the
    paper gives none). At 0.1 the moons are clearly separated but a linear boundary gets only ~88%."""
    hidden_units: int = 8
    """Width of each of the two sigmoid hidden layers (paper: 8)."""
    init_range: float = 0.1
    """Weights and biases ~ U[-init_range, init_range] (paper: 0.1)."""
    lr: float = 0.1
    """Constant SGD learning rate of every network, teacher and student alike (paper: 0.1)."""
    steps: int = 6000
    """SGD steps of every network: the Supervised model (which is also PL's teacher), PL's student, and
    MPL's teacher and student (updated together, one `MPLStep` per step). 20 seeds x 3 methods at 6000
    fit in ~2.5 minutes on 2 idle cores."""
    unlabeled_batch: int = 64
    """Unlabeled points per PL / MPL step, drawn with replacement; 0 = all 1,994 every step. All 6 labeled
    points are in every step."""
    feedback: Literal["cosine", "dot", "taylor"] = "cosine"
    """MPL feedback h: `cosine` (paper C.3, its default), `dot` (exact eq. 12) or `taylor`."""
    baseline_decay: float = 0.99
    """Decay of the moving-average baseline subtracted from h (C.3); 0 turns it off."""
    pseudo_labels: Literal["sample", "argmax"] = "sample"
    """How PL's and MPL's teachers label: `sample` y_hat ~ T(x_u) (the paper) or `argmax`."""
    success_accuracy: float = 0.95
    """A run succeeds when its classifier's accuracy on all points is at least this."""
    workers: int = 2
    """Processes that run seeds in parallel (one torch thread each); 1 runs in this process."""
    figure_seed: int = 0
    """Seed index whose three classifiers are drawn in the figure."""
    out_dir: str = "runs/two_moon"
    """Where config.json, results.json, table.txt and two_moon.png are written."""

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"two_moon.{name}: {message}")

        check(self.seeds >= 1, "seeds", f"must be >= 1, got {self.seeds}")
        check(self.points_per_moon >= 1, "points_per_moon", f"must be >= 1, got {self.points_per_moon}")
        check(1 <= self.labeled_per_moon < self.points_per_moon, "labeled_per_moon",
              f"must be in [1, points_per_moon), got {self.labeled_per_moon}")
        check(self.noise >= 0, "noise", f"must be >= 0, got {self.noise}")
        check(self.hidden_units >= 1, "hidden_units", f"must be >= 1, got {self.hidden_units}")
        check(self.init_range > 0, "init_range", f"must be > 0, got {self.init_range}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        check(self.unlabeled_batch >= 0, "unlabeled_batch", f"must be >= 0, got {self.unlabeled_batch}")
        check(0 < self.success_accuracy <= 1, "success_accuracy", f"must be in (0, 1], got {self.success_accuracy}")
        check(self.workers >= 1, "workers", f"must be >= 1, got {self.workers}")
        check(0 <= self.figure_seed < self.seeds, "figure_seed",
              f"must be a seed index in [0, {self.seeds}), got {self.figure_seed}")
        # MPLConfig checks feedback, baseline_decay and pseudo_labels, naming its own fields.
        self.mpl_config()

    def mpl_config(self) -> MPLConfig:
        return MPLConfig(feedback=self.feedback, baseline_decay=self.baseline_decay,
                         pseudo_labels=self.pseudo_labels, uda_factor=0.0)

    def optim_config(self) -> OptimConfig:
        # Plain SGD, constant lr, no weight decay: the paper applies no regularization.
        return OptimConfig(name="sgd", lr=self.lr, momentum=0.0, nesterov=False)


# ----------------------------------------------------------------------------------------------- data


@dataclass
class TwoMoonData:
    x: torch.Tensor
    """(2 * points_per_moon, 2) float32 points."""
    y: torch.Tensor
    """(2 * points_per_moon,) int64 moon index, 0 or 1."""
    labeled: torch.Tensor
    """(2 * labeled_per_moon,) indices of the labeled points, moon 0's first."""

    @property
    def unlabeled(self) -> torch.Tensor:
        mask = torch.ones(len(self.y), dtype=torch.bool)
        mask[self.labeled] = False
        return mask.nonzero().squeeze(1)


def make_data(cfg: TwoMoonConfig, seed: int) -> TwoMoonData:
    """Two moons of `points_per_moon` each and `labeled_per_moon` labeled points per moon, all from `seed`."""
    x, y = make_moons(n_samples=(cfg.points_per_moon, cfg.points_per_moon), noise=cfg.noise, random_state=seed)
    rng = np.random.default_rng(seed)
    labeled = np.concatenate([
        rng.choice(np.flatnonzero(y == moon), cfg.labeled_per_moon, replace=False) for moon in (0, 1)
    ])
    return TwoMoonData(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64),
                       torch.tensor(labeled, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------- model


def make_mlp(cfg: TwoMoonConfig, generator: torch.Generator) -> nn.Module:
    """The paper's classifier: 2 -> 8 -> 8 -> 2, sigmoid hidden units, every parameter ~ U[-r, r]."""
    h = cfg.hidden_units
    model = nn.Sequential(nn.Linear(2, h), nn.Sigmoid(), nn.Linear(h, h), nn.Sigmoid(), nn.Linear(h, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-cfg.init_range, cfg.init_range, generator=generator)
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(dim=-1) == y).float().mean().item()


# -------------------------------------------------------------------------------------------- methods


@dataclass
class SeedResult:
    seed: int
    accuracy: dict[str, float]
    """Accuracy on all points, per method (for PL and MPL: the student's)."""
    labeled_accuracy: dict[str, float]
    """Accuracy on the labeled points, per method."""
    mpl_teacher_accuracy: float
    """The MPL teacher's accuracy on all points (not scored; shows whether the student follows it)."""
    mpl_h_mean: float
    """Mean feedback h over the MPL run."""
    mpl_h_positive: float
    """Fraction of MPL steps with h - b > 0 (the teacher raised the probability of its pseudo labels)."""
    seconds: float
    """Wall time of this seed (all three methods)."""
    models: dict[str, dict] = field(default_factory=dict, repr=False)
    """Final state dicts per method (for the figure; not written to JSON)."""


def _unlabeled_batches(data: TwoMoonData, cfg: TwoMoonConfig, seed: int):
    """The unlabeled batch of each step; PL and MPL of one seed get the same sequence."""
    pool = data.x[data.unlabeled]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(cfg.steps):
        if cfg.unlabeled_batch == 0:
            yield pool
        else:
            yield pool[torch.randint(len(pool), (cfg.unlabeled_batch,), generator=generator)]


def run_seed(cfg: TwoMoonConfig, seed: int) -> SeedResult:
    """Supervised, Pseudo Labels and MPL on the dataset and initialisations of one seed index."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-8-8-2 MLP: extra threads cost more than they save
    try:
        # Pseudo-label sampling draws from torch's global generator: seed it here, give the caller's back.
        with torch.random.fork_rng(devices=[]):
            return _train_seed(cfg, seed)
    finally:
        torch.set_num_threads(threads)


def _train_seed(cfg: TwoMoonConfig, seed: int) -> SeedResult:
    start = time.perf_counter()
    data = make_data(cfg, seed)
    x_l, y_l = data.x[data.labeled], data.y[data.labeled]
    init_gen = torch.Generator().manual_seed(10_000 + seed)
    init_a = make_mlp(cfg, init_gen).state_dict()
    init_b = make_mlp(cfg, init_gen).state_dict()
    sample_seed = 20_000 + seed

    def fresh(init: dict) -> nn.Module:
        model = make_mlp(cfg, torch.Generator())
        model.load_state_dict(init)
        return model

    # Supervised: the 6 labeled points, full batch.
    supervised = fresh(init_a)
    step = FinetuneStep(build_learner(supervised, cfg.optim_config()))
    for t in range(cfg.steps):
        step(x_l, y_l, t)

    # Pseudo Labels: a frozen copy of the Supervised model teaches a fresh student.
    torch.manual_seed(sample_seed)
    pl_student = fresh(init_b)
    step = PseudoLabelStep(copy.deepcopy(supervised), build_learner(pl_student, cfg.optim_config()),
                           pseudo_labels=cfg.pseudo_labels)
    for t, x_u in enumerate(_unlabeled_batches(data, cfg, sample_seed)):
        step(x_u, x_u, t)

    # Meta Pseudo Labels: teacher and student from independent inits; x_u_aug = x_u (no UDA).
    torch.manual_seed(sample_seed)
    teacher, student = fresh(init_a), fresh(init_b)
    step = MPLStep(build_learner(teacher, cfg.optim_config()), build_learner(student, cfg.optim_config()),
                   cfg.mpl_config())
    h_sum, h_positive = 0.0, 0
    for t, x_u in enumerate(_unlabeled_batches(data, cfg, sample_seed)):
        result = step(x_l, y_l, x_u, x_u, t)
        h_sum += result.h
        h_positive += result.h - result.baseline > 0

    models = {"supervised": supervised, "pseudo_labels": pl_student, "mpl": student}
    return SeedResult(
        seed=seed,
        accuracy={k: accuracy(m, data.x, data.y) for k, m in models.items()},
        labeled_accuracy={k: accuracy(m, x_l, y_l) for k, m in models.items()},
        mpl_teacher_accuracy=accuracy(teacher, data.x, data.y),
        mpl_h_mean=h_sum / cfg.steps,
        mpl_h_positive=h_positive / cfg.steps,
        seconds=time.perf_counter() - start,
        models={k: m.state_dict() for k, m in models.items()},
    )


def run_seeds(cfg: TwoMoonConfig) -> list[SeedResult]:
    """All seeds, in `cfg.workers` forked processes (`common.fork_map`)."""
    return fork_map(run_seed, [(cfg, s) for s in range(cfg.seeds)], 1 if cfg.seeds == 1 else cfg.workers)


# ------------------------------------------------------------------------------------------- reporting


@dataclass
class MethodSummary:
    successes: int
    seeds: int
    success_rate: float
    mean_accuracy: float
    std_accuracy: float
    min_accuracy: float
    max_accuracy: float


def summarize(cfg: TwoMoonConfig, results: list[SeedResult]) -> dict[str, MethodSummary]:
    """Per method (plus the MPL teacher, for reference): success count and accuracy statistics."""
    columns = {m: [r.accuracy[m] for r in results] for m in METHODS}
    columns["mpl_teacher"] = [r.mpl_teacher_accuracy for r in results]
    out = {}
    for name, accs in columns.items():
        wins = sum(a >= cfg.success_accuracy for a in accs)
        out[name] = MethodSummary(
            successes=wins, seeds=len(accs), success_rate=wins / len(accs), mean_accuracy=statistics.fmean(accs),
            std_accuracy=statistics.pstdev(accs), min_accuracy=min(accs), max_accuracy=max(accs),
        )
    return out


def render_table(cfg: TwoMoonConfig, summary: dict[str, MethodSummary]) -> Table:
    table = Table(
        title=f"TwoMoon (§3.1): {cfg.seeds} seeds, {cfg.steps} steps, feedback={cfg.feedback}",
        caption=f"success: accuracy on all {2 * cfg.points_per_moon} points >= {cfg.success_accuracy:.0%}; "
                "PL and MPL score their student",
    )
    for column in ("Method", "Success", "Rate", "Mean acc", "Std", "Min", "Max"):
        table.add_column(column, justify="left" if column == "Method" else "right", no_wrap=True)
    names = {**METHOD_NAMES, "mpl_teacher": "MPL teacher (info)"}
    for key, s in summary.items():
        table.add_row(names[key], f"{s.successes}/{s.seeds}", f"{s.success_rate:.0%}",
                      f"{s.mean_accuracy:.2%}", f"{s.std_accuracy:.2%}", f"{s.min_accuracy:.2%}",
                      f"{s.max_accuracy:.2%}", style="dim" if key == "mpl_teacher" else None)
    return table


def plot_decision_regions(cfg: TwoMoonConfig, result: SeedResult, path: Path) -> None:
    """Figure 2's layout: the decision regions of Supervised, PL and MPL on one dataset, labeled points large."""
    import matplotlib  # here: the backend must be chosen before pyplot is imported, and only for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    data = make_data(cfg, result.seed)
    x, y = data.x.numpy(), data.y.numpy()
    lo, hi = x.min(0) - 0.3, x.max(0) + 0.3
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 300), np.linspace(lo[1], hi[1], 300))
    grid = torch.tensor(np.stack([gx.ravel(), gy.ravel()], 1), dtype=torch.float32)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), constrained_layout=True)
    regions = ListedColormap(["#f4a6a6", "#a8dba8"])  # moon 0 red, moon 1 green, as in the paper
    for ax, method in zip(axes, METHODS):
        model = make_mlp(cfg, torch.Generator())
        model.load_state_dict(result.models[method])
        with torch.no_grad():
            decision = model(grid).argmax(-1).numpy().reshape(gx.shape)
        ax.contourf(gx, gy, decision, levels=[-0.5, 0.5, 1.5], cmap=regions)
        ax.scatter(x[:, 0], x[:, 1], c=np.where(y == 0, "#b22222", "#1e7b1e"), s=3, alpha=0.5, linewidths=0)
        lab = data.labeled.numpy()
        ax.scatter(x[lab, 0], x[lab, 1], c=np.where(y[lab] == 0, "#b22222", "#1e7b1e"), s=160,
                   marker="*", edgecolors="black", linewidths=1.2, zorder=3, label="labeled")
        ax.set_title(f"{METHOD_NAMES[method]}: {result.accuracy[method]:.1%}")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(loc="lower left")
    fig.suptitle(f"TwoMoon, seed {result.seed} (regions: classifier's decision; stars: the 6 labeled points)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class TwoMoonReport:
    summary: dict[str, MethodSummary]
    results: list[SeedResult]
    seconds: float
    paths: dict[str, str]


def run_two_moon(cfg: TwoMoonConfig, console=None) -> TwoMoonReport:
    """Run every seed, then write config.json, results.json, table.txt and two_moon.png to `cfg.out_dir`
    and print the table."""
    start = time.perf_counter()
    out = start_report(cfg, cfg.out_dir)
    results = run_seeds(cfg)
    summary = summarize(cfg, results)
    seconds = time.perf_counter() - start

    paths = {name: str(out / name) for name in ("config.json", "results.json", "table.txt", "two_moon.png")}
    plot_decision_regions(cfg, results[cfg.figure_seed], Path(paths["two_moon.png"]))
    write_report(paths, {
        "config": asdict(cfg),
        "summary": {k: asdict(v) for k, v in summary.items()},
        "seeds": [{f.name: getattr(r, f.name) for f in fields(r) if f.name != "models"} for r in results],
        "seconds": seconds,
    }, render_table(cfg, summary), console)
    return TwoMoonReport(summary=summary, results=results, seconds=seconds, paths=paths)
