"""Evaluation: top-1/top-5 accuracy on a held-out set, and ImageNet-ReaL precision@1."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn


def load_real_labels(path: str | Path, num_examples: int) -> list[list[int]]:
    """ReaL labels (`real.json` of "Are we done with ImageNet?"): one list of valid classes per ImageNet
    validation image, in file-name order; an empty list marks an image ReaL leaves out."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ReaL labels file not found: {path}")
    try:
        labels = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(labels, list) or not all(isinstance(x, list) for x in labels):
        raise ValueError(f"{path}: expected a JSON list of label lists, one per validation image")
    if len(labels) != num_examples:
        raise ValueError(
            f"{path}: has {len(labels)} entries but the evaluation set has {num_examples} images; "
            "ReaL needs the ImageNet validation set in file-name order"
        )
    return labels


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    real_labels: list[list[int]] | None = None,
) -> dict[str, float]:
    """Top-1, top-5 (when there are >= 5 classes), mean CE, and ReaL precision@1 over (images, labels,
    dataset indices) batches. The model is put in eval mode and restored afterwards."""
    was_training = model.training
    model.eval()
    n = top1 = top5 = 0
    loss = 0.0
    real_hits = real_count = 0
    for images, labels, indices in batches:
        logits = model(images).float()
        loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        top1 += (top[:, 0] == labels).sum().item()
        top5 += (top == labels[:, None]).any(dim=-1).sum().item()
        n += len(labels)
        if real_labels is not None:
            for pred, i in zip(top[:, 0].tolist(), indices.tolist()):
                if real_labels[i]:
                    real_count += 1
                    real_hits += pred in real_labels[i]
    model.train(was_training)
    if n == 0:
        raise ValueError("evaluation set is empty")
    out = {"top1": top1 / n, "loss": loss / n}
    if logits.shape[-1] >= 5:
        out["top5"] = top5 / n
    if real_labels is not None:
        out["real_top1"] = real_hits / max(real_count, 1)
    return out
