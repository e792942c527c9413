"""The paper's optimizer families, shared by the recipes (their command line: `mpl_large.cli.recipe_main`)."""

from __future__ import annotations

from mpl_large.config import OptimConfig


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
