"""Step types. Each consumes one batch, updates its learners and returns a small result dataclass.

`MPLStep` is Algorithm 1 (Appendix B) with the details of Appendix C.3. The step never touches
distribution: it uses learners only through `LearnerInterface`, which a distributed learner provides too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from mpl_large.config import MPLConfig
from mpl_large.feedback import Feedback, MovingAverageBaseline, make_feedback
from mpl_large.learner import LearnerInterface
from mpl_large.losses import accuracy, cross_entropy, sample_pseudo_labels, uda_loss


def teacher_forward(
    teacher: LearnerInterface, cfg: MPLConfig, x_l: torch.Tensor, x_u: torch.Tensor, x_u_aug: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """T(x_l), T(x_u), T(x_u_aug) from one pass (one set of BN statistics); T(x_u) only when UDA is on."""
    views = [x_l, x_u, x_u_aug] if cfg.uda_factor > 0 else [x_l, x_u_aug]
    logits = teacher(torch.cat(views)).split([len(v) for v in views])
    return logits[0], (logits[1] if cfg.uda_factor > 0 else None), logits[-1]


def supervised_and_uda(
    cfg: MPLConfig, t_l: torch.Tensor, y_l: torch.Tensor, t_u: torch.Tensor | None, t_ua: torch.Tensor, step: int
) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """The teacher's auxiliary losses: (supervised CE, UDA loss, UDA weight at `step`, UDA mask rate)."""
    sup = cross_entropy(t_l, y_l, cfg.label_smoothing)
    if t_u is None:
        return sup, sup.new_zeros(()), 0.0, sup.new_zeros(())
    uda, mask_rate = uda_loss(t_u, t_ua, cfg.uda_temperature, cfg.uda_threshold)
    return sup, uda, cfg.uda_factor * min(1.0, (step + 1) / cfg.uda_ramp_steps), mask_rate


class StudentFeedback(NamedTuple):
    student_loss: torch.Tensor
    """CE(y_hat, S(x_u_aug; theta_S)), the loss of the student's update."""
    h: torch.Tensor
    """The feedback coefficient (eq. 12 / C.3), detached, on the device."""
    baseline: torch.Tensor | float
    """The baseline b of earlier steps."""
    advantage: torch.Tensor
    """h - b, or 0 when h is not finite: the weight of the teacher's CE(y_hat, T(x_u_aug))."""
    finite: torch.Tensor
    student_logits_l: torch.Tensor
    """S(x_l; theta_S'), from the feedback's measurement."""


def student_step_and_feedback(
    student: LearnerInterface, feedback: Feedback, baseline: MovingAverageBaseline, cfg: MPLConfig,
    x_l: torch.Tensor, y_l: torch.Tensor, x_u_aug: torch.Tensor, y_hat: torch.Tensor,
) -> StudentFeedback:
    """The student's half of Algorithm 1, shared by full and Reduced MPL: the update on pseudo labels,
    theta_S' = theta_S - eta_S * grad CE(y_hat, S(x_u_aug; theta_S)), then h measured on the labeled batch
    and the baseline of earlier steps subtracted. h stays on the device: no host sync here."""
    feedback.before(student, x_l, y_l)
    lr = student.lr
    s_loss = cross_entropy(student(x_u_aug), y_hat, cfg.label_smoothing)
    student.update(s_loss, stash_grad=feedback.stash_grad)
    h, s_logits_l = feedback.after(student, x_l, y_l, lr)
    h = h.detach()
    finite = torch.isfinite(h)
    b = baseline.value
    advantage = torch.where(finite, h - b, torch.zeros_like(h))
    baseline.update(h, finite)
    return StudentFeedback(s_loss, h, b, advantage, finite, s_logits_l)


@dataclass
class MPLStepResult:
    teacher_loss: float
    """Total teacher loss: supervised + UDA weight * UDA + MPL."""
    teacher_supervised_loss: float
    teacher_uda_loss: float
    teacher_mpl_loss: float
    """(h - b) * CE(y_hat, T(x_u_aug)); zero when h was not finite."""
    student_loss: float
    """CE(y_hat, S(x_u_aug; theta_S)), the loss of the student's update."""
    h: float
    """The feedback coefficient before the baseline is subtracted."""
    baseline: float
    """The baseline b subtracted from h at this step."""
    h_skipped: bool
    """h was not finite: the MPL term was left out and b was not updated."""
    uda_mask_rate: float
    """Fraction of unlabeled examples that passed the UDA confidence threshold."""
    teacher_accuracy: float
    """Teacher top-1 on the labeled batch."""
    student_accuracy: float
    """Student top-1 on the labeled batch, after its update (nan while the student waits)."""
    mpl_to_uda: float
    """|MPL term| / |UDA weight * UDA loss|: how hard the feedback pulls on the teacher next to UDA (nan when
    the UDA term is 0). A ratio of the two loss terms, not of their gradient norms: both are per-example
    means of a loss on the same logits T(x_u_aug) (cross-entropy times (h - b), and UDA's cross-entropy to
    a sharpened target), and measuring each term's gradient norm would take two more teacher backward
    passes (under ZeRO-3 each with its own reduction over the partitions)."""
    student_waiting: bool = False
    """The step fell in the student's wait (`OptimConfig.wait_steps`): the teacher trained on supervised +
    UDA alone, the student was not fed, h is 0 and b is unchanged."""


class MPLStep:
    """Meta Pseudo Labels: the student learns only from the teacher's pseudo labels; the teacher learns
    from labeled data, UDA, and the student's feedback h.

    `student_wait_steps` (the student's `OptimConfig.wait_steps`): for the first steps the student's lr is 0,
    so its update would be a no-op and h would measure a step that was never taken. The student is then
    neither fed nor stepped (only its schedule advances) and the teacher takes the UDA step alone; MPL,
    feedback included, starts with the student's schedule.
    """

    def __init__(self, teacher: LearnerInterface, student: LearnerInterface, config: MPLConfig,
                 student_wait_steps: int = 0) -> None:
        self.teacher = teacher
        self.student = student
        self.config = config
        self.student_wait_steps = student_wait_steps
        self.feedback = make_feedback(config.feedback)
        self.baseline = MovingAverageBaseline(config.baseline_decay)

    def __call__(
        self, x_l: torch.Tensor, y_l: torch.Tensor, x_u: torch.Tensor, x_u_aug: torch.Tensor, step: int
    ) -> MPLStepResult:
        cfg = self.config
        t_l, t_u, t_ua = teacher_forward(self.teacher, cfg, x_l, x_u, x_u_aug)
        if step < self.student_wait_steps:
            return self._teacher_alone(t_l, y_l, t_u, t_ua, step)

        # Sample a pseudo label y_hat ~ P(. | x_u_aug; theta_T).
        y_hat = sample_pseudo_labels(t_ua, cfg.pseudo_labels)

        # The student learns from y_hat; its feedback h (eq. 12 / C.3), less the baseline.
        s = student_step_and_feedback(self.student, self.feedback, self.baseline, cfg, x_l, y_l, x_u_aug, y_hat)

        # Teacher: supervised + UDA + (h - b) * CE(y_hat, T(x_u_aug)), one update.
        sup, uda, uda_weight, mask_rate = supervised_and_uda(cfg, t_l, y_l, t_u, t_ua, step)
        mpl = s.advantage * cross_entropy(t_ua, y_hat)
        t_loss = sup + uda_weight * uda + mpl
        self.teacher.update(t_loss)

        return self._result(t_loss, sup, uda, uda_weight, mpl, s.student_loss.detach(), s.h, s.baseline, ~s.finite,
                            mask_rate, accuracy(t_l, y_l), accuracy(s.student_logits_l, y_l))

    def _teacher_alone(self, t_l, y_l, t_u, t_ua, step: int) -> MPLStepResult:
        """A step of the student's wait: the teacher's supervised + UDA update; the student only waits."""
        sup, uda, uda_weight, mask_rate = supervised_and_uda(self.config, t_l, y_l, t_u, t_ua, step)
        t_loss = sup + uda_weight * uda
        self.teacher.update(t_loss)
        self.student.wait()
        zero, nan = sup.new_zeros(()), sup.new_full((), float("nan"))
        return self._result(t_loss, sup, uda, uda_weight, zero, nan, zero, self.baseline.value, zero.bool(),
                            mask_rate, accuracy(t_l, y_l), nan, student_waiting=True)

    @staticmethod
    def _result(t_loss, sup, uda, uda_weight, mpl, s_loss, h, baseline, skipped, mask_rate, t_acc, s_acc,
                student_waiting: bool = False) -> MPLStepResult:
        uda_term = (uda_weight * uda).detach().abs()
        ratio = torch.where(uda_term > 0, mpl.detach().abs() / uda_term, torch.full_like(uda_term, float("nan")))
        stats = torch.stack([
            t_loss.detach(), sup.detach(), uda.detach(), mpl.detach(), s_loss, h,
            torch.as_tensor(baseline, dtype=h.dtype, device=h.device), skipped, mask_rate, t_acc, s_acc, ratio,
        ]).tolist()  # the step's one host sync
        return MPLStepResult(
            teacher_loss=stats[0], teacher_supervised_loss=stats[1], teacher_uda_loss=stats[2],
            teacher_mpl_loss=stats[3], student_loss=stats[4], h=stats[5], baseline=stats[6],
            h_skipped=bool(stats[7]), uda_mask_rate=stats[8], teacher_accuracy=stats[9], student_accuracy=stats[10],
            mpl_to_uda=stats[11], student_waiting=student_waiting,
        )


@dataclass
class SupervisedStepResult:
    loss: float
    accuracy: float


class FinetuneStep:
    """One model alone on labeled data: the student's finetune phase (§3.2, §4) and the supervised baseline."""

    def __init__(self, learner: LearnerInterface, label_smoothing: float = 0.0) -> None:
        self.learner = learner
        self.label_smoothing = label_smoothing

    def __call__(self, x_l: torch.Tensor, y_l: torch.Tensor, step: int) -> SupervisedStepResult:
        logits = self.learner(x_l)
        loss = cross_entropy(logits, y_l, self.label_smoothing)
        self.learner.update(loss)
        loss_value, acc = torch.stack([loss.detach(), accuracy(logits, y_l)]).tolist()
        return SupervisedStepResult(loss=loss_value, accuracy=acc)


@dataclass
class UDAStepResult:
    loss: float
    supervised_loss: float
    uda_loss: float
    uda_mask_rate: float
    accuracy: float
    """Top-1 on the labeled batch."""


class UDAStep:
    """The teacher alone: supervised + UDA (the paper's UDA baseline, and MPL's teacher without feedback)."""

    def __init__(self, learner: LearnerInterface, config: MPLConfig) -> None:
        if config.uda_factor <= 0:
            raise ValueError("mpl.uda_factor: the UDA step needs uda_factor > 0")
        self.learner = learner
        self.config = config

    def __call__(
        self, x_l: torch.Tensor, y_l: torch.Tensor, x_u: torch.Tensor, x_u_aug: torch.Tensor, step: int
    ) -> UDAStepResult:
        t_l, t_u, t_ua = teacher_forward(self.learner, self.config, x_l, x_u, x_u_aug)
        sup, uda, uda_weight, mask_rate = supervised_and_uda(self.config, t_l, y_l, t_u, t_ua, step)
        loss = sup + uda_weight * uda
        self.learner.update(loss)
        stats = torch.stack([loss.detach(), sup.detach(), uda.detach(), mask_rate, accuracy(t_l, y_l)]).tolist()
        return UDAStepResult(*stats)


class PseudoLabelStep:
    """Pseudo Labels (eq. 1): the student learns from a fixed, already trained teacher.

    The teacher predicts on the clean view in eval mode; the student trains on the augmented view. The
    teacher module is frozen in place (eval mode, no gradients): pass a copy to keep training it.
    """

    def __init__(
        self, teacher: nn.Module, student: LearnerInterface, pseudo_labels: str = "sample",
        label_smoothing: float = 0.0,
    ) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student
        self.pseudo_labels = pseudo_labels
        self.label_smoothing = label_smoothing

    def __call__(self, x_u: torch.Tensor, x_u_aug: torch.Tensor, step: int) -> SupervisedStepResult:
        with torch.no_grad():
            y_hat = sample_pseudo_labels(self.teacher(x_u), self.pseudo_labels)
        logits = self.student(x_u_aug)
        loss = cross_entropy(logits, y_hat, self.label_smoothing)
        self.student.update(loss)
        loss_value, agreement = torch.stack([loss.detach(), accuracy(logits, y_hat)]).tolist()
        return SupervisedStepResult(loss=loss_value, accuracy=agreement)
