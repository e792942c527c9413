"""Evaluation: top-1/top-5 accuracy on a held-out set, and ImageNet-ReaL precision@1."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from mpl_large.device import collective_device, to_device


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
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Top-1, top-5 (when there are >= 5 classes), mean CE, and ReaL precision@1 over (images, labels,
    dataset indices) batches. The model is put in eval mode and restored afterwards. `prepare` turns images
    into the model's input (a learner's: dtype, width strip); default: cast to the parameters' dtype.

    Under torch.distributed every rank scores its own batches and the counts are summed over ranks. Ranks
    step in lockstep (a ZeRO-3 forward is collective): a rank out of batches repeats a forward on its last
    images, uncounted, until every rank is done. The ranks of a spatial group count the same images: all
    counts are multiplied alike, so the ratios are unchanged."""
    was_training = model.training
    model.eval()
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    prepare = prepare or (lambda x: x.to(dtype))
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    reduce_on = collective_device()  # NCCL reduces CUDA tensors only, gloo CPU ones
    counts = torch.zeros(6, dtype=torch.float64)  # n, top1, top5, loss sum, ReaL hits, ReaL count
    num_classes = 0
    iterator, idle = iter(batches), None
    while True:
        batch = next(iterator, None)
        if distributed:
            busy = torch.tensor([batch is not None], dtype=torch.int32, device=reduce_on)
            dist.all_reduce(busy)
            if busy.item() == 0:
                break
            if batch is None:
                if idle is None:
                    raise ValueError("evaluation: this rank has no evaluation images to step with")
                model(idle)
                continue
        elif batch is None:
            break
        images, labels = to_device(batch[:2], device)  # indices stay on the host: they index the ReaL list
        indices = batch[2]
        images = prepare(images)
        idle = images[:1]
        logits = model(images).float()
        num_classes = logits.shape[-1]
        k = min(5, num_classes)
        top = logits.topk(k, dim=-1).indices
        counts += torch.tensor([
            len(labels), (top[:, 0] == labels).sum().item(), (top == labels[:, None]).any(dim=-1).sum().item(),
            nn.functional.cross_entropy(logits, labels, reduction="sum").item(), 0, 0,
        ], dtype=torch.float64)
        if real_labels is not None:
            for pred, i in zip(top[:, 0].tolist(), indices.tolist()):
                if real_labels[i]:
                    counts[5] += 1
                    counts[4] += pred in real_labels[i]
    model.train(was_training)
    if distributed:
        counts = counts.to(reduce_on)
        dist.all_reduce(counts)
        counts = counts.cpu()
        classes = torch.tensor([num_classes], device=reduce_on)
        dist.all_reduce(classes, op=dist.ReduceOp.MAX)
        num_classes = int(classes.item())
    n, top1, top5, loss, real_hits, real_count = counts.tolist()
    if n == 0:
        raise ValueError("evaluation set is empty")
    out = {"top1": top1 / n, "loss": loss / n}
    if num_classes >= 5:
        out["top5"] = top5 / n
    if real_labels is not None:
        out["real_top1"] = real_hits / max(real_count, 1)
    return out
