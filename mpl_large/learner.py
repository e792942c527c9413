"""A model role (teacher or student): module, optimizer, learning-rate schedule.

The steps in `mpl_large.steps` talk to models only through `LearnerInterface`: forward, `update` (one
optimizer step, optionally stashing the gradient it used), `probe_logits` and `grad_dots` (the feedback
measurement). `Learner` is the single-process implementation; a distributed learner (`zero.ZeroLearner`:
DeepSpeed ZeRO, where each rank holds a partition of the gradient) implements the same methods, so the
steps never change.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mpl_large.guard import all_finite


@contextlib.contextmanager
def measurement_mode(model: nn.Module) -> Iterator[None]:
    """Forward passes that measure the model without training it.

    BatchNorm normalises with batch statistics, as in training, so the measured loss is the function the
    training gradient belongs to; but its running statistics are left untouched (a measurement must not
    train the model on labeled inputs). Dropout and drop-path are off: h is a difference or product
    of two measurements, and independent dropout masks in each would swamp it with noise.
    """
    modes = {m: m.training for m in model.modules()}
    norms = [m for m in modes if isinstance(m, _BatchNorm) and m.track_running_stats]
    model.eval()
    # A training-mode BN that does not track running statistics normalises with the batch and writes
    # nothing: no buffer copies, and no in-place update of tensors the backward of this pass still needs.
    for m in norms:
        m.train(modes[m])
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True
        for m, mode in modes.items():
            m.training = mode


@contextlib.contextmanager
def running_statistics_frozen(model: nn.Module) -> Iterator[None]:
    """For a backward: activation checkpointing recomputes forwards there, and each recomputation would
    update BatchNorm's running statistics a second time. Momentum 0 leaves them as they are while the
    recomputation stays the same computation as the forward (checkpointing checks that); the batch
    counter is put back."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


def advance_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler | None) -> None:
    """One schedule step without an optimizer step. Intended: torch warns when a schedule's first step
    comes before the optimizer's, which is exactly what a waiting model does."""
    if scheduler is not None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            scheduler.step()


@runtime_checkable
class LearnerInterface(Protocol):
    """What the steps, the feedback, the trainer and checkpoints use of a learner: the seam between the
    algorithm and distribution. `Learner` (one process), `zero.ZeroLearner` (a DeepSpeed engine) and
    `memory._Marked` (a measuring wrapper) provide it."""

    model: nn.Module
    """The trained module (under DeepSpeed: the engine's, possibly partitioned)."""
    params: list[torch.Tensor]
    """The trainable parameters."""
    device: torch.device
    """Where the model computes: the trainer moves each batch here (`mpl_large.device.to_device`)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The training forward on an input `prepare` has not seen."""

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Images as the model's input (cast, split)."""

    @property
    def lr(self) -> float:
        """The learning rate the next `update` will use."""

    def update(self, loss: torch.Tensor, stash_grad: bool = False) -> None:
        """One optimizer step on `loss`; with `stash_grad`, keep the gradient for `grad_dots`."""

    def wait(self) -> None:
        """A step in which the model does not train: only its schedule advances."""

    def probe_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits under `measurement_mode`."""

    def grad_dots(self, loss: torch.Tensor) -> torch.Tensor:
        """[g . u, g . g, u . u] for g = grad of `loss` and u = the stashed gradient."""

    def mean_over_replicas(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of `value` over data-parallel replicas."""

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full weights (on rank 0; None elsewhere)."""

    def save(self, directory: Path) -> None:
        """This learner's part of a checkpoint."""

    def load(self, directory: Path) -> None:
        """Restore what `save` wrote."""

    def train(self) -> None: ...

    def eval(self) -> None: ...


class Learner:
    """One model with its optimizer and (step-based) learning-rate scheduler, in a single process."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        autocast: torch.dtype | None = None,
    ) -> None:
        """`autocast`: run forwards under `torch.autocast` in this dtype (bf16), their logits returned in fp32
        so losses, gradients' dot products and h stay fp32; None: the model's own dtype."""
        self.model = model
        self.autocast = autocast
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        """Where the model lives: batches are moved here (`mpl_large.device.to_device`)."""
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._stash: torch.Tensor | None = None
        self.skipped_updates = 0
        """Updates skipped for a non-finite loss or gradient (`mpl_large.guard`)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.autocast is None:
            return self.model(x)
        with torch.autocast(self.device.type, dtype=self.autocast):
            return self.model(x).float()

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Images as the model's input (a distributed learner casts and splits them)."""
        return x

    @property
    def lr(self) -> float:
        """The learning rate the next `update` will use."""
        return self.optimizer.param_groups[0]["lr"]

    def update(self, loss: torch.Tensor, stash_grad: bool = False) -> None:
        """One optimizer step on `loss`, skipped (and counted) if the loss or a gradient is not finite. With
        `stash_grad`, keep the gradient for `grad_dots`."""
        with running_statistics_frozen(self.model):
            loss.backward()
        if stash_grad:
            self._stash = self._flatten([p.grad for p in self.params])
        if all_finite(loss, [p.grad for p in self.params]):  # a host sync: the step must know before it writes
            self.optimizer.step()
        else:
            self.skipped_updates += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()

    def wait(self) -> None:
        """A step in which this model does not train: only its schedule advances (`OptimConfig.wait_steps`)."""
        advance_schedule(self.scheduler)

    def probe_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits under `measurement_mode` (graph kept when grad is enabled, for `grad_dots`)."""
        with measurement_mode(self.model):
            return self._forward(x)

    def grad_dots(self, loss: torch.Tensor) -> torch.Tensor:
        """[g . u, g . g, u . u] for g = grad of `loss` and u = the stashed update gradient.

        g is taken with `autograd.grad`, so it never lands in `.grad` and cannot leak into an update.
        """
        if self._stash is None:
            raise RuntimeError("grad_dots needs a gradient stashed by update(..., stash_grad=True)")
        with measurement_mode(self.model):  # activation checkpointing recomputes the probe's forward here
            g = self._flatten(torch.autograd.grad(loss, self.params, allow_unused=True))
        u, self._stash = self._stash, None
        # Accumulated in float64, one parameter at a time (no float64 copy of the whole gradient): h is a
        # cosine near 1e-3, and an fp32 sum over millions of products moves it by ~1e-5 (as `ZeroLearner`).
        sizes = [p.numel() for p in self.params]
        dots = torch.zeros(3, dtype=torch.float64, device=u.device)
        for g_piece, u_piece in zip(g.split(sizes), u.split(sizes)):
            g_piece, u_piece = g_piece.double(), u_piece.double()
            dots += torch.stack([g_piece @ u_piece, g_piece @ g_piece, u_piece @ u_piece])
        return dots.to(torch.float32 if loss.dtype != torch.float64 else loss.dtype)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's weights on the CPU, contiguous (safetensors needs both)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}

    def save(self, directory: Path) -> None:
        """Model, optimizer and schedule state into `directory` (a checkpoint's part for this learner)."""
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": None if self.scheduler is None else self.scheduler.state_dict()},
                   directory / "learner.pt")

    def load(self, directory: Path) -> None:
        """Restore what `save` wrote (tensors and plain data only: `weights_only=True`)."""
        state = torch.load(directory / "learner.pt", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])

    def mean_over_replicas(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of `value` over data-parallel replicas: one process is one replica."""
        return value

    def _flatten(self, grads) -> torch.Tensor:
        return torch.cat([
            (torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(self.params, grads)
        ])

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()
