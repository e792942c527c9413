r"""Reduced Meta Pseudo Labels (Appendix E): the large teacher runs once; a small teacher adapts.

Full MPL keeps a large teacher and a large student in memory and trains both. Reduced MPL splits that:

1. `precompute`: a large teacher T, trained to convergence on the labeled set, scores the unlabeled set
   once and keeps the K most confident images per class, writing its class distribution of every scored
   image. This is the selection command (`mpl_large.select`: sharded, resumable, deterministic order,
   memory bounded by the top-K table and one shard); `python -m mpl_large.reduced precompute` runs it.
2. Training reads those distributions (`StoredDistributions`, memory-mapped: `mpl_large.selection_store`) and never loads T. The
   reduced teacher T' (`ReducedTeacher`, a 5-layer ReLU perceptron) maps T's distribution p of an image
   to a calibrated one; the student learns from pseudo labels y_hat ~ T'(p) on the image's strong view,
   and T' learns from the student's feedback h exactly as the full teacher does (eq. 12, C.3):

       student:  theta_S' = theta_S - eta_S * grad CE(y_hat, S(x_u_aug; theta_S))
       teacher:  minimise (h - b) * CE(y_hat, T'(p; theta_T'))

   T' sees no image, so it has no supervised or UDA term: the feedback is its only signal.
3. The baseline of Table 11, NoisyStudent, is the same recipe with a teacher that does not adapt: the
   student learns from y_hat ~ T'(p) with T' frozen at its initialisation, i.e. from T itself.

Initialisation. Appendix E motivates T' by "many actions of the reduced teacher T' would be close to an
identity map" and gives no initialisation. We make the identity exact at the start: T' outputs
log p + MLP(log p) with the MLP's last layer zero, so T'(p) = p before the first update (up to the floor
`min_prob` on probabilities stored as 0), and the fixed-teacher baseline is T. No pre-training is needed.

CLI:

    python -m mpl_large.reduced precompute --model efficientnet_l2 --weights teacher.safetensors \
        --num-classes 1000 --data /data/yfcc --image-size 512 --top-k 12800 --out /data/yfcc-l2
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from mpl_large import select
from mpl_large.build import build_model
from mpl_large.config import ConfigError, MPLConfig, OptimConfig, TrainConfig
from mpl_large.data.pipeline import Batches, Streams, TrainBatch
from mpl_large.device import choose_device
from mpl_large.feedback import MovingAverageBaseline, make_feedback
from mpl_large.learner import LearnerInterface
from mpl_large.losses import accuracy, cross_entropy, sample_pseudo_labels
from mpl_large.selection_store import StoredDistributions
from mpl_large.steps import PseudoLabelStep, student_step_and_feedback


# --------------------------------------------------------------------------------------------------
# The reduced teacher and its step


class ReducedTeacher(nn.Module):
    """T': the large teacher's distribution p -> logits of a calibrated distribution.

    A perceptron of `layers` linear layers with ReLU between them reads log p and adds its output to
    log p: log-probabilities make temperature and per-class bias changes, the usual calibrations, affine in
    the input. The last layer starts at zero, so T'(p) = p until the feedback moves it.
    """

    def __init__(self, num_classes: int, hidden: int = 128, layers: int = 5, min_prob: float = 1e-8) -> None:
        super().__init__()
        widths = [num_classes] + [hidden] * (layers - 1) + [num_classes]
        mlp: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
            mlp += [nn.ReLU()] if i else []
            mlp.append(nn.Linear(n_in, n_out))
        self.mlp = nn.Sequential(*mlp)
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.min_prob = min_prob
        """Floor on p before the log: fp16 storage flushes probabilities below ~6e-8 to 0."""

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        log_p = probs.to(self.mlp[0].weight.dtype).clamp_min(self.min_prob).log()
        return log_p + self.mlp(log_p)


@dataclass
class ReducedMPLStepResult:
    teacher_loss: float
    """(h - b) * CE(y_hat, T'(p)), the reduced teacher's whole loss; zero when h was not finite."""
    student_loss: float
    """CE(y_hat, S(x_u_aug; theta_S)), the loss of the student's update."""
    h: float
    """The feedback coefficient before the baseline is subtracted."""
    baseline: float
    """The baseline b subtracted from h at this step."""
    h_skipped: bool
    """h was not finite: the teacher was not moved and b was not updated."""
    teacher_shift: float
    """KL(p || T'(p)), batch mean: how far the reduced teacher has moved from the large one (0 at init)."""
    student_accuracy: float
    """Student top-1 on the labeled batch, after its update."""


class ReducedMPLStep:
    """Reduced MPL: the student learns from y_hat ~ T'(p); T' learns only from the student's feedback h.

    The same student update, feedback h and moving-average baseline as `MPLStep`; the teacher reads the
    stored distributions p instead of images. Learners are used only through `LearnerInterface`, so
    a distributed student (and teacher) run this step unchanged.
    """

    def __init__(self, teacher: LearnerInterface, student: LearnerInterface, config: MPLConfig) -> None:
        if config.uda_factor > 0:
            raise ConfigError("mpl.uda_factor: the reduced teacher sees no images, so it has no UDA loss; set 0")
        self.teacher = teacher
        self.student = student
        self.config = config
        self.feedback = make_feedback(config.feedback)
        self.baseline = MovingAverageBaseline(config.baseline_decay)

    def __call__(
        self, x_l: torch.Tensor, y_l: torch.Tensor, p_u: torch.Tensor, x_u_aug: torch.Tensor, step: int
    ) -> ReducedMPLStepResult:
        cfg = self.config
        t_logits = self.teacher(p_u)

        # y_hat ~ T'(p), then the student's step on it: theta_S' = theta_S - eta_S * grad CE(y_hat, S(x_u_aug)).
        y_hat = sample_pseudo_labels(t_logits, cfg.pseudo_labels)
        s = student_step_and_feedback(self.student, self.feedback, self.baseline, cfg, x_l, y_l, x_u_aug, y_hat)

        # The teacher's only loss: (h - b) * CE(y_hat, T'(p)).
        t_loss = s.advantage * cross_entropy(t_logits, y_hat)
        self.teacher.update(t_loss)

        with torch.no_grad():
            p = p_u.to(t_logits.dtype)
            shift = (torch.xlogy(p, p) - p * t_logits.log_softmax(-1)).sum(-1).mean()
        h = s.h
        stats = torch.stack([
            t_loss.detach(), s.student_loss.detach(), h, torch.as_tensor(s.baseline, dtype=h.dtype, device=h.device),
            ~s.finite, shift.to(h.dtype), accuracy(s.student_logits_l, y_l),
        ]).tolist()  # the step's one host sync
        return ReducedMPLStepResult(
            teacher_loss=stats[0], student_loss=stats[1], h=stats[2], baseline=stats[3], h_skipped=bool(stats[4]),
            teacher_shift=stats[5], student_accuracy=stats[6],
        )


def noisy_student_step(
    teacher: ReducedTeacher, student: LearnerInterface, config: MPLConfig
) -> PseudoLabelStep:
    """Table 11's NoisyStudent: Reduced MPL's student, pseudo labels and losses with a teacher that never
    adapts (frozen in place). Call it as `step(p_u, x_u_aug, step)`."""
    return PseudoLabelStep(teacher, student, config.pseudo_labels, config.label_smoothing)


# --------------------------------------------------------------------------------------------------
# The trainer's main phase for `reduced_mpl` and `noisy_student`


class ReducedPhase(NamedTuple):
    step: Callable[[TrainBatch, int], object]
    batches: Batches
    student: LearnerInterface
    """The learner whose model is evaluated, finetuned and saved."""
    saved: dict[str, LearnerInterface]
    """The learners a checkpoint saves."""
    state: dict
    """The step's own checkpointed state (the h baseline)."""


def reduced_phase(
    cfg: TrainConfig, streams: Streams,
    make_learner: Callable[[nn.Module, OptimConfig, int], LearnerInterface],
) -> ReducedPhase:
    """The main phase of `reduced_mpl` / `noisy_student`.

    The unlabeled stream becomes the selected images, in selection order, so each batch's dataset
    indices are positions in `StoredDistributions`. `make_learner(model, optim, micro_batch)` is the
    trainer's learner factory (single process or a DeepSpeed engine).
    """
    d = cfg.data
    if not cfg.reduced.distributions:
        raise ConfigError("reduced.distributions: Reduced MPL needs the large teacher's stored distributions "
                          "(--distributions DIR, from `python -m mpl_large.reduced precompute --out DIR`)")
    if not d.unlabeled:
        raise ConfigError("data.unlabeled: Reduced MPL reads the images the distributions were computed over; "
                          "set it to the precompute's --data")
    stored = StoredDistributions(cfg.reduced.distributions)
    expected = f"{Path(d.unlabeled).resolve()} [train]"
    if stored.source is not None and stored.source != expected:
        raise ConfigError(f"data.unlabeled: {expected} is not the data in {stored.directory} ({stored.source})")
    if stored.num_classes != cfg.student.num_classes:
        raise ConfigError(f"student.num_classes: {cfg.student.num_classes}, but the distributions in "
                          f"{stored.directory} have {stored.num_classes} classes")
    streams.unlabeled = stored.images(streams.unlabeled)
    batches = WithDistributions(streams.mixed(), stored)

    batch = streams.unlabeled_batch_size
    student = make_learner(build_model(cfg.student, choose_device(cfg.device).type), cfg.student_optim, batch)
    teacher = ReducedTeacher(stored.num_classes, cfg.reduced.hidden, cfg.reduced.layers)
    if cfg.method == "reduced_mpl":
        small = make_learner(teacher, cfg.teacher_optim, batch)
        step = ReducedMPLStep(small, student, cfg.mpl)
        return ReducedPhase(lambda b, t: step(b.x_l, b.y_l, b.p_u, b.x_u_aug, t), batches, student,
                            {"teacher": small, "student": student}, {"baseline": step.baseline})
    fixed = noisy_student_step(teacher, student, cfg.mpl)  # the frozen teacher is T itself: nothing to save
    fixed.teacher.to(student.device)
    return ReducedPhase(lambda b, t: fixed(b.p_u, b.x_u_aug, t), batches, student, {"student": student}, {})


class WithDistributions:
    """`Batches` whose unlabeled examples carry their stored distributions (`TrainBatch.p_u`), read on the host
    by dataset row; the trainer moves them to the device with the rest of the batch. Resumable as `Batches`."""

    def __init__(self, batches: Batches, stored: StoredDistributions) -> None:
        self.batches, self.stored = batches, stored

    def __iter__(self) -> WithDistributions:
        return self

    @property
    def images_per_batch(self) -> int:
        return self.batches.images_per_batch

    def close(self) -> None:
        self.batches.close()

    def __next__(self) -> TrainBatch:
        batch = next(self.batches)
        return dataclasses.replace(batch, p_u=self.stored[batch.u_index])

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(
        prog="python -m mpl_large.reduced",
        description="Reduced Meta Pseudo Labels (Appendix E). `precompute` scores the unlabeled set with the "
                    "large teacher once and stores its distributions; it takes the flags of "
                    "`python -m mpl_large.select` (see `precompute --help`).")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("precompute", add_help=False, help="run the large teacher once over the unlabeled set")
    _, select_args = parser.parse_known_args(argv)
    return select.main(select_args)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    main()
