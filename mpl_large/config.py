"""Typed configuration. Every field has a docstring; bad values raise an error naming the field."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field}: {message}")


@dataclass
class OptimConfig:
    """One model's optimizer and learning-rate schedule (paper C.4)."""

    name: Literal["sgd", "rmsprop", "lars"] = "sgd"
    """`sgd`: SGD with (Nesterov) momentum (WRN, ResNet); `rmsprop`: TF-style RMSProp (EfficientNets);
    `lars`: LARS, the paper's optimizer for finetuning EfficientNet-L2 / B6-Wide."""
    lr: float = 0.1
    """Peak learning rate (after warm-up)."""
    momentum: float = 0.9
    """Momentum coefficient (0.9 for every optimizer in the paper)."""
    nesterov: bool = True
    """Nesterov momentum for `sgd` (the paper's WRN/ResNet setting)."""
    weight_decay: float = 0.0
    """L2 weight decay, applied to weights only: never to biases or normalization parameters."""
    schedule: Literal["constant", "cosine", "exponential"] = "constant"
    """Learning-rate shape after warm-up: constant, cosine decay to 0 at `total_steps`, or exponential
    decay by `decay_rate` every `decay_steps` (EfficientNet)."""
    wait_steps: int = 0
    """The learning rate is 0 for this many steps; warm-up and decay then start, shifted by `wait_steps`
    (still ending at `total_steps`). On MPL's student this is the *student wait* of the most-used PyTorch
    port (MPL-pytorch's `--student-wait-steps`; the paper does not describe one): the teacher trains
    (supervised + UDA) while the student is neither fed nor stepped (`mpl_large.steps.MPLStep`)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to `lr` over this many steps (after `wait_steps`)."""
    total_steps: int = 1
    """Length of the schedule, counted from step 0 (cosine decays to zero here)."""
    decay_rate: float = 0.97
    """Exponential schedule: multiply the lr by this every `decay_steps` steps."""
    decay_steps: int = 1
    """Exponential schedule: steps between two decays."""

    def __post_init__(self) -> None:
        _check(self.name in ("sgd", "rmsprop", "lars"), "optim.name", f"unknown optimizer {self.name!r}")
        _check(self.schedule in ("constant", "cosine", "exponential"), "optim.schedule",
               f"unknown schedule {self.schedule!r}")
        _check(self.lr >= 0, "optim.lr", f"must be >= 0, got {self.lr}")
        _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(0 <= self.momentum < 1, "optim.momentum", f"must be in [0, 1), got {self.momentum}")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(self.total_steps >= 1, "optim.total_steps", f"must be >= 1, got {self.total_steps}")
        _check(0 <= self.wait_steps < self.total_steps, "optim.wait_steps",
               f"must be in [0, total_steps={self.total_steps}), got {self.wait_steps}")
        _check(self.decay_steps >= 1, "optim.decay_steps", f"must be >= 1, got {self.decay_steps}")
        _check(0 < self.decay_rate <= 1, "optim.decay_rate", f"must be in (0, 1], got {self.decay_rate}")


@dataclass
class MPLConfig:
    """The Meta Pseudo Labels step: pseudo labels, feedback h and the teacher's auxiliary losses."""

    feedback: Literal["cosine", "dot", "taylor", "none"] = "cosine"
    """How the student's feedback h is computed: `cosine` of the two student gradients (paper C.3, the
    default), `dot` = exact eq. 12, `taylor` = labeled loss before minus after the student's step; `none`:
    h = 0, the ablation "MPL without feedback" (the teacher is UDA alone, the student still learns from its
    pseudo labels)."""
    baseline_decay: float = 0.99
    """Decay of the moving-average baseline b subtracted from h (C.3); 0 disables it (b stays 0)."""
    pseudo_labels: Literal["sample", "argmax"] = "sample"
    """`sample` draws y_hat ~ T(x_u_aug) as the paper's REINFORCE derivation needs; `argmax` is greedy."""
    label_smoothing: float = 0.0
    """Label smoothing of the teacher's supervised loss and of the student's loss (Table 8: 0.1)."""
    uda_factor: float = 0.0
    """Weight of the teacher's UDA consistency loss (Table 8 "UDA factor"); 0 turns UDA off."""
    uda_temperature: float = 1.0
    """Sharpening temperature of the UDA target softmax(T(x_u) / tau)."""
    uda_threshold: float = 0.0
    """UDA confidence mask: unlabeled examples whose teacher max-probability on the weak view is below
    this are left out of the UDA loss."""
    uda_ramp_steps: int = 1
    """The UDA weight ramps linearly from 0 to `uda_factor` over this many steps."""

    def __post_init__(self) -> None:
        _check(self.feedback in ("cosine", "dot", "taylor", "none"), "mpl.feedback",
               f"unknown feedback {self.feedback!r}; choose cosine, dot, taylor or none")
        _check(self.pseudo_labels in ("sample", "argmax"), "mpl.pseudo_labels",
               f"unknown mode {self.pseudo_labels!r}; choose sample or argmax")
        _check(0 <= self.baseline_decay < 1, "mpl.baseline_decay", f"must be in [0, 1), got {self.baseline_decay}")
        _check(0 <= self.label_smoothing < 1, "mpl.label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        _check(self.uda_factor >= 0, "mpl.uda_factor", f"must be >= 0, got {self.uda_factor}")
        _check(self.uda_temperature > 0, "mpl.uda_temperature", f"must be > 0, got {self.uda_temperature}")
        _check(0 <= self.uda_threshold <= 1, "mpl.uda_threshold", f"must be in [0, 1], got {self.uda_threshold}")
        _check(self.uda_ramp_steps >= 1, "mpl.uda_ramp_steps", f"must be >= 1, got {self.uda_ramp_steps}")


def save_config(config, path: str | Path) -> None:
    """Write a resolved config dataclass as JSON beside a run."""
    Path(path).write_text(json.dumps(dataclasses.asdict(config), indent=2, default=str) + "\n")


def apply_override(config, assignment: str) -> None:
    """Set one nested field from `section.key=value` (e.g. `data.image_size=64`), converting the value to
    the field's current type. Unknown fields and unparsable values raise `ConfigError` naming the field."""
    key, sep, raw = assignment.partition("=")
    if not sep:
        raise ConfigError(f"override {assignment!r}: expected section.key=value")
    *path, name = key.strip().split(".")
    target = config
    for part in path:
        if not dataclasses.is_dataclass(target) or not hasattr(target, part):
            raise ConfigError(f"{key}: no config section {part!r}")
        target = getattr(target, part)
    fields = {f.name for f in dataclasses.fields(target)} if dataclasses.is_dataclass(target) else set()
    if name not in fields:
        raise ConfigError(f"{key}: unknown field; {type(target).__name__} has {sorted(fields)}")
    current = getattr(target, name)
    try:
        if isinstance(current, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            value = raw.lower() in ("true", "1")
        elif isinstance(current, (int, float, str)):
            value = type(current)(raw)
        else:
            value = json.loads(raw)
    except ValueError:
        raise ConfigError(f"{key}: cannot read {raw!r} as {type(current).__name__}") from None
    setattr(target, name, value)
    if hasattr(target, "__post_init__"):
        target.__post_init__()  # re-validate the section
