r"""The student's feedback h to the teacher (paper eq. 12, Appendix C.3), and its moving-average baseline.

Notation: g_u = grad_{theta_S} CE(y_hat, S(x_u_aug; theta_S)), the gradient the student steps on;
g_l = grad_{theta_S'} CE(y_l, S(x_l; theta_S')), the labeled gradient after the step, theta_S' =
theta_S - eta_S * g_u. Eq. 12 gives the teacher's gradient of the student's labeled loss as

    grad_{theta_T} L_l = h * grad_{theta_T} CE(y_hat, T(x_u_aug; theta_T)),   h = eta_S * g_l . g_u

so the teacher *minimises* (h - b) * CE(y_hat, T(x_u_aug)). Sign: h > 0 means the step on y_hat lowered
the student's labeled loss (to first order L_l(theta_S') - L_l(theta_S) = -eta_S g_l . g_u), and the
teacher then raises the probability of y_hat; h < 0 lowers it.

Which eta: the student's scheduled learning rate of the step that produced theta_S'. Eq. 12 linearises
exactly that step. With momentum the derivative of theta_S' with respect to g_u is eta_S (heavy ball) or
eta_S * (1 + mu) (Nesterov): a positive constant, so sign and direction are unchanged and eta_T absorbs
the scale. Weight decay does not depend on y_hat and is left out of g_u (the optimizer applies it).
"""

from __future__ import annotations

import abc

import torch

from mpl_large.learner import LearnerInterface
from mpl_large.losses import cross_entropy

_EPS = 1e-12


class Feedback(abc.ABC):
    """Measures h around the student's step: `before` runs ahead of it, `after` once theta_S' exists.

    `after` returns h and the student's labeled logits at theta_S' (for the step's accuracy report).
    """

    stash_grad = False
    """Whether the student's update must keep g_u for `after`."""

    def before(self, student: LearnerInterface, x_l: torch.Tensor, y_l: torch.Tensor) -> None:
        pass

    @abc.abstractmethod
    def after(
        self, student: LearnerInterface, x_l: torch.Tensor, y_l: torch.Tensor, lr: float
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class DotFeedback(Feedback):
    """Exact eq. 12: h = eta_S * g_l . g_u."""

    stash_grad = True

    def after(self, student, x_l, y_l, lr):
        logits = student.probe_logits(x_l)
        dots = student.grad_dots(cross_entropy(logits, y_l))
        return self.combine(dots, lr), logits.detach()

    @staticmethod
    def combine(dots: torch.Tensor, lr: float) -> torch.Tensor:
        return lr * dots[0]


class CosineFeedback(DotFeedback):
    """Paper C.3 (its default): h = cos(g_l, g_u), same sign as eq. 12, bounded in [-1, 1]."""

    @staticmethod
    def combine(dots: torch.Tensor, lr: float) -> torch.Tensor:
        # Norms multiplied after the square roots: |g|^2 |u|^2 underflows fp32 for tiny gradients.
        return dots[0] / (dots[1].sqrt() * dots[2].sqrt()).clamp_min(_EPS)


class TaylorFeedback(Feedback):
    r"""Loss difference: h = L_l(theta_S) - L_l(theta_S'), on the same labeled batch.

    Derivation of the sign. Expand L_l around theta_S' and evaluate at theta_S = theta_S' + eta_S g_u:

        L_l(theta_S) = L_l(theta_S') + eta_S * g_l(theta_S') . g_u + O(eta_S^2 |g_u|^2)

    hence L_l(theta_S) - L_l(theta_S') = eta_S * g_l . g_u + O(eta_S^2) = h_dot + O(eta_S^2).
    "Before minus after" approximates eq. 12's h; "after minus before" is its negative and would make the
    teacher push away from pseudo labels that helped. Both losses are measured in `measurement_mode`
    (same BN treatment, no dropout) so their difference is the step's effect, not noise.
    """

    def __init__(self) -> None:
        self._loss_before: torch.Tensor | None = None

    def before(self, student, x_l, y_l):
        with torch.no_grad():
            self._loss_before = cross_entropy(student.probe_logits(x_l), y_l)

    def after(self, student, x_l, y_l, lr):
        with torch.no_grad():
            logits = student.probe_logits(x_l)
            # Each rank measured its shard of the labeled batch; h is the global one.
            h = student.mean_over_replicas(self._loss_before - cross_entropy(logits, y_l))
        self._loss_before = None
        return h, logits


class NoFeedback(Feedback):
    """The ablation "MPL without feedback": h = 0, so (h - b) = 0 and the teacher learns from its supervised
    and UDA losses alone, while the student still learns from the teacher's pseudo labels. Any gain of MPL
    over this method, with matched seeds, is the feedback's."""

    def after(self, student, x_l, y_l, lr):
        with torch.no_grad():
            logits = student.probe_logits(x_l)  # only for the step's accuracy report
        return logits.new_zeros(()), logits


FEEDBACK = {"dot": DotFeedback, "cosine": CosineFeedback, "taylor": TaylorFeedback, "none": NoFeedback}


def make_feedback(mode: str) -> Feedback:
    try:
        return FEEDBACK[mode]()
    except KeyError:
        raise ValueError(f"mpl.feedback: unknown mode {mode!r}; choose one of {sorted(FEEDBACK)}") from None


class MovingAverageBaseline:
    """b <- decay * b + (1 - decay) * h (C.3). The step subtracts the b of *earlier* steps from h, so the
    baseline does not depend on the current pseudo labels and the REINFORCE estimate stays unbiased.

    `value` is a 0-dim tensor (or a float before the first update): reading it needs no device sync.
    """

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.value: torch.Tensor | float = 0.0

    def update(self, h: torch.Tensor, finite: torch.Tensor) -> None:
        """Fold in h where it is finite (a non-finite h leaves b unchanged)."""
        if self.decay > 0:
            self.value = torch.where(finite, self.decay * self.value + (1.0 - self.decay) * h, self.value)

    def state_dict(self) -> dict:
        dtype = str(self.value.dtype).removeprefix("torch.") if torch.is_tensor(self.value) else None
        return {"value": float(self.value), "dtype": dtype}

    def load_state_dict(self, state: dict) -> None:
        # Restored as the tensor it was: a Python float would make the next update round differently.
        dtype = state.get("dtype")
        self.value = float(state["value"]) if dtype is None else torch.tensor(state["value"], dtype=getattr(torch, dtype))
