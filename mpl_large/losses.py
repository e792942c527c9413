"""The losses of Algorithm 1, written once and shared by every step type."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits lose the small differences h is made of: losses are computed in fp32 or wider."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def sample_pseudo_labels(logits: torch.Tensor, mode: str = "sample") -> torch.Tensor:
    """y_hat ~ softmax(logits) per row (`sample`, the paper), or its argmax (`argmax`)."""
    logits = logits.detach()
    if mode == "argmax":
        return logits.argmax(dim=-1)
    return torch.multinomial(_at_least_fp32(logits).softmax(dim=-1), num_samples=1).squeeze(-1)


def uda_loss(
    logits_weak: torch.Tensor, logits_strong: torch.Tensor, temperature: float, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """UDA consistency: CE(StopGradient(softmax(T(x_u) / tau)), T(x_u_aug)), confidence-masked.

    The mask uses the unsharpened weak-view probability, as in UDA. Masked examples count in the batch
    mean as zeros, so the loss scale does not jump with the mask rate. Returns (loss, mask rate).
    """
    weak = _at_least_fp32(logits_weak.detach())
    target = (weak / temperature).softmax(dim=-1)
    mask = (weak.softmax(dim=-1).amax(dim=-1) >= threshold).float()
    per_example = -(target * _at_least_fp32(logits_strong).log_softmax(dim=-1)).sum(dim=-1)
    return (per_example * mask).mean(), mask.mean()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy of a batch, as a 0-dim tensor."""
    return (logits.detach().argmax(dim=-1) == labels).float().mean()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Batch-mean CE, computed in fp32 or wider."""
    return F.cross_entropy(_at_least_fp32(logits), labels, label_smoothing=label_smoothing)
