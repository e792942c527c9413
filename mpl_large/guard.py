"""The non-finite policy: no update from a non-finite loss or gradient, no non-finite weight written.

- A learner (`Learner`, `ZeroLearner`) skips an update whose loss or gradient has a NaN or inf
  (`all_finite`): no optimizer step, so weights and optimizer state are untouched; the schedule still
  advances, so the learning rate stays a function of the step. It counts these in `skipped_updates`.
- The trainer's `NonFiniteGuard` notices a step in which any learner skipped, logs it with the step, and
  raises `NonFiniteError` after `TrainConfig.max_nonfinite_steps` such steps in a row: a run that has
  diverged stops instead of training on, and before it writes anything.
- `check_finite` runs before every checkpoint and before the final weights are saved: it refuses (naming
  the tensors) rather than write a non-finite weight or BatchNorm statistic.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from mpl_large.device import collective_device


class NonFiniteError(RuntimeError):
    """Training produced non-finite values the run cannot continue (or save) from; names the step or tensors."""


def all_finite(loss: torch.Tensor, grads: Iterable[torch.Tensor | None]) -> torch.Tensor:
    """One boolean tensor on the loss's device: the loss and every gradient are finite."""
    flags = [torch.isfinite(loss.detach()).all()]
    flags += [torch.isfinite(g).all() for g in grads if g is not None]
    return torch.stack(flags).all()


def nonfinite_tensors(model: nn.Module) -> list[str]:
    """Names of this rank's parameters (its ZeRO-3 partition, where partitioned) and buffers holding a NaN
    or inf."""
    bad = [name for name, p in model.named_parameters()
           if not torch.isfinite(getattr(p, "ds_tensor", p).detach()).all()]
    bad += [name for name, b in model.named_buffers() if b.is_floating_point() and not torch.isfinite(b).all()]
    return bad


def check_finite(learners: dict[str, object], what: str) -> None:
    """Collective: raise `NonFiniteError` before writing `what` if any rank holds a non-finite weight."""
    bad = [f"{name}.{tensor}" for name, learner in learners.items() for tensor in nonfinite_tensors(learner.model)]
    count = torch.tensor([len(bad)], device=collective_device())
    if dist.is_initialized():
        dist.all_reduce(count)
    if int(count):
        shown = ", ".join(bad[:5]) or "on another rank"
        raise NonFiniteError(f"not writing {what}: {int(count)} tensors hold NaN or inf ({shown})")


class NonFiniteGuard:
    """Counts the steps in which a learner skipped its update; stops the run after `limit` in a row."""

    def __init__(self, learners: dict[str, object], limit: int) -> None:
        self.learners, self.limit = learners, limit
        self.seen = {name: learner.skipped_updates for name, learner in learners.items()}
        self.total = 0
        self.consecutive = 0

    def check(self) -> list[str]:
        """After a step: the learners that skipped an update in it (empty: a finite step)."""
        skipped = [name for name, learner in self.learners.items() if learner.skipped_updates > self.seen[name]]
        self.seen = {name: learner.skipped_updates for name, learner in self.learners.items()}
        self.total += bool(skipped)
        self.consecutive = self.consecutive + 1 if skipped else 0
        return skipped

    def stop_if_diverged(self, step: int, skipped: list[str]) -> None:
        if self.consecutive >= self.limit:
            raise NonFiniteError(f"step {step}: {self.consecutive} steps in a row had a non-finite loss or gradient "
                                 f"({', '.join(skipped)} skipped its update); stopping before any non-finite "
                                 f"weight is written (max_nonfinite_steps={self.limit}). Lower the learning rate, "
                                 f"or resume from the last checkpoint")
