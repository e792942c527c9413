"""Unlabeled-data selection: score images with a trained teacher, keep the K most confident per class.

Paper §3.3 and Appendix E: a teacher trained on the labeled set assigns class probabilities to every
unlabeled image, and the K images with the highest probability for each class are kept (K = 12,800 for
ImageNet, 50,000 for CIFAR-10/TinyImages, 35,000 for SVHN). An image belongs to the class of the teacher's
argmax, and its confidence is that maximum probability. Reduced MPL (Appendix E) then reuses the large
teacher's full distributions, so they are written too.

The files are written and read by `mpl_large.selection_store`, which documents their layout.

Memory is bounded by the top-K state (O(num_classes * k)), one shard of probabilities and one batch,
whatever the dataset's size. Full probabilities are never held for the kept examples: for ImageNet that
would be 1000 * 12,800 * 1000 floats (51 GB in fp32).

Classes with fewer than k candidates keep all of them, and `selection.json` lists them. The student's
class-balanced dataset then pads such classes by duplicating their images (Noisy Student's up-sampling,
which the paper's §4 data uses); that belongs to the data loader, not to this selection.

CLI (see `main`):

    python -m mpl_large.select --model efficientnet_b0 --weights teacher.safetensors --num-classes 1000 \\
        --data /data/yfcc --image-size 224 --batch-size 256 --top-k 12800 --out /data/yfcc-selected
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import timm
import timm.data
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from mpl_large.data.sources import IMAGE, decode_image, load_images
from mpl_large.selection_store import (FORMAT_VERSION, PROBS_DTYPES, Selection, clean, finalize, read_progress,
                                       read_shard_index, save_json, save_safetensors, write_shard)

log = logging.getLogger(__name__)



class TopKPerClass:
    """The k most confident examples per class of everything seen so far, in O(num_classes * k) memory.

    Order within a class: confidence descending, then dataset index ascending, so ties are broken by the
    lower index whatever the order examples arrive in. Dataset indices must be unique.

    The kept examples are a (num_classes, k) table, sorted per row; empty slots hold index -1 and
    confidence -inf. `update` drops at once every candidate that cannot beat its class's k-th kept example,
    and buffers the rest; when `buffer_size` candidates are pending, one sort merges them with the table
    (per class top-k by (confidence, -index)). Merging a whole batch into the table every time would sort
    num_classes * k entries per batch (12.8M for ImageNet); buffering amortises that to a few operations per
    surviving candidate. A stale threshold between merges only lets extra candidates through, never drops
    one that belongs in the top k, so the result is exactly the top k of everything seen.
    """

    def __init__(self, num_classes: int, k: int, buffer_size: int | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.num_classes = num_classes
        self.k = k
        self.buffer_size = buffer_size if buffer_size is not None else max(num_classes * k, 1 << 16)
        if self.buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {self.buffer_size}")
        self.index = torch.full((num_classes, k), -1, dtype=torch.int64)
        self.confidence = torch.full((num_classes, k), -torch.inf, dtype=torch.float32)
        self.candidates = torch.zeros(num_classes, dtype=torch.int64)
        """Examples seen per class (the teacher's argmax), kept or not."""
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.pending_size = 0

    def update(self, index: torch.Tensor, label: torch.Tensor, confidence: torch.Tensor) -> None:
        """Offer a batch of examples: dataset `index`, predicted class `label`, `confidence` (max prob)."""
        index = index.detach().to("cpu", torch.int64).reshape(-1)
        label = label.detach().to("cpu", torch.int64).reshape(-1)
        confidence = confidence.detach().to("cpu", torch.float32).reshape(-1)
        if not (index.numel() == label.numel() == confidence.numel()):
            raise ValueError(f"index, label and confidence differ in length: "
                             f"{index.numel()}, {label.numel()}, {confidence.numel()}")
        if index.numel() == 0:
            return
        if label.min() < 0 or label.max() >= self.num_classes:
            raise ValueError(f"labels must be in [0, {self.num_classes}), got [{label.min()}, {label.max()}]")
        if index.min() < 0:
            raise ValueError(f"dataset indices must be >= 0, got {index.min()}")
        if not torch.isfinite(confidence).all():
            raise ValueError("non-finite confidence: the teacher produced NaN or inf")
        self.candidates += torch.bincount(label, minlength=self.num_classes)
        worst_conf, worst_index = self.confidence[label, -1], self.index[label, -1]
        beats = (confidence > worst_conf) | ((confidence == worst_conf) & (index < worst_index))
        if beats.any():
            self._pending.append((index[beats], label[beats], confidence[beats]))
            self.pending_size += int(beats.sum())
        if self.pending_size >= self.buffer_size:
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        kept = self.index >= 0
        rows = torch.arange(self.num_classes).unsqueeze(1).expand(-1, self.k)
        index = torch.cat([self.index[kept]] + [p[0] for p in self._pending])
        label = torch.cat([rows[kept]] + [p[1] for p in self._pending])
        confidence = torch.cat([self.confidence[kept]] + [p[2] for p in self._pending])
        self._pending, self.pending_size = [], 0
        # Lexicographic order (label asc, confidence desc, index asc): stable sorts, least significant first.
        order = torch.argsort(index, stable=True)
        order = order[torch.argsort(confidence[order], descending=True, stable=True)]
        order = order[torch.argsort(label[order], stable=True)]
        index, label, confidence = index[order], label[order], confidence[order]
        counts = torch.bincount(label, minlength=self.num_classes)
        rank = torch.arange(label.numel()) - (torch.cumsum(counts, 0) - counts)[label]
        top = rank < self.k
        self.index.fill_(-1)
        self.confidence.fill_(-torch.inf)
        self.index[label[top], rank[top]] = index[top]
        self.confidence[label[top], rank[top]] = confidence[top]

    def kept_per_class(self) -> torch.Tensor:
        self._merge()
        return (self.index >= 0).sum(1)

    def selected(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(index, label, confidence) of the kept examples, by class, then confidence desc, then index."""
        self._merge()
        kept = self.index >= 0
        label = torch.arange(self.num_classes).unsqueeze(1).expand(-1, self.k)[kept]
        return self.index[kept].clone(), label.clone(), self.confidence[kept].clone()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors, of a size independent of how many examples were seen."""
        self._merge()
        return {"index": self.index.clone(), "confidence": self.confidence.clone(),
                "candidates": self.candidates.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        shape = (self.num_classes, self.k)
        if tuple(state["index"].shape) != shape or tuple(state["confidence"].shape) != shape:
            raise ValueError(f"top-k state has shape {tuple(state['index'].shape)}, expected {shape} "
                             f"(num_classes, k)")
        if tuple(state["candidates"].shape) != (self.num_classes,):
            raise ValueError(f"candidates has shape {tuple(state['candidates'].shape)}, "
                             f"expected ({self.num_classes},)")
        self.index = state["index"].to(torch.int64).clone()
        self.confidence = state["confidence"].to(torch.float32).clone()
        self.candidates = state["candidates"].to(torch.int64).clone()
        self._pending, self.pending_size = [], 0


# --------------------------------------------------------------------------------------------------


def score_and_select(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    k: int,
    out_dir: str | os.PathLike,
    shard_size: int,
    resume: bool = True,
    *,
    probs_dtype: str = "float16",
    first_example: int = 0,
    source: str | None = None,
    teacher: str | None = None,
    buffer_size: int | None = None,
) -> Selection:
    """Score every example of `batches` with the teacher `model` and keep the k most confident per class.

    Args:
        model: the teacher; run in eval mode under `torch.inference_mode`, on its parameters' device. Its
            training flag is restored afterwards.
        batches: `(indices, images)` pairs: dataset indices (LongTensor, unique) and the model's input. Must
            be deterministic: a resumed run iterates it again from the start and skips what the checkpoint
            already consumed (see `first_example`).
        num_classes, k: the teacher's classes and how many examples to keep per class.
        out_dir: where the shards, checkpoint and selection go (created if missing).
        shard_size: examples per probability shard; a checkpoint is written at every shard boundary.
        resume: continue from `out_dir`'s checkpoint if there is one. False starts over, deleting this
            command's files in `out_dir`.
        probs_dtype: "float16" (default), "bfloat16" or "float32" for the stored probabilities. float16
            flushes probabilities below ~6e-8 to 0; the selection itself always uses the fp32 softmax.
        first_example: stream position of the first example `batches` yields. A resumed run may pass an
            iterable that already skips the examples `read_progress(out_dir)["consumed"]` says are done,
            starting at a batch boundary at or before that position (so batches are the same as in the
            first run, and so are the teacher's outputs). Batches that end before the checkpoint are
            skipped without running the model; one that straddles it is run whole and its done part dropped.
        source, teacher: descriptions written to `selection.json`; a resume refuses a checkpoint made with
            other values (or another k, num_classes, shard_size, probs_dtype).
        buffer_size: candidates `TopKPerClass` buffers between merges (default max(num_classes * k, 65536)).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if probs_dtype not in PROBS_DTYPES:
        raise ValueError(f"probs_dtype must be one of {sorted(PROBS_DTYPES)}, got {probs_dtype!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"format_version": FORMAT_VERSION, "k": k, "num_classes": num_classes, "shard_size": shard_size,
                "probs_dtype": probs_dtype, "source": source, "teacher": teacher}
    topk = TopKPerClass(num_classes, k, buffer_size)

    progress = read_progress(out_dir) if resume else None
    if progress is None:
        clean(out_dir)
        consumed, shards, complete = 0, 0, False
    else:
        changed = {key: (progress.get(key), value) for key, value in settings.items()
                   if progress.get(key) != value}
        if changed:
            raise ValueError(f"{out_dir}: the checkpoint was made with other settings "
                             f"(name: (checkpoint, now)): {changed}; use another directory or resume=False")
        topk.load_state_dict(load_file(str(out_dir / "state.safetensors")))
        consumed, shards, complete = progress["consumed"], progress["shards"], progress["complete"]
        log.info("resuming %s: %d examples scored, %d shards written", out_dir, consumed, shards)
    if first_example > consumed:
        raise ValueError(f"batches start at example {first_example}, after the {consumed} examples the "
                         f"checkpoint in {out_dir} has scored: examples in between would be missed")

    def checkpoint(done: bool) -> None:
        state = {**settings, "consumed": consumed, "shards": shards, "complete": done}
        save_safetensors(topk.state_dict(), out_dir / "state.safetensors", {"progress": json.dumps(state)})
        save_json(state, out_dir / "progress.json")

    if not complete:
        first_param = next(iter(model.parameters()), None)
        device = first_param.device if first_param is not None else torch.device("cpu")
        was_training = model.training
        model.eval()
        buffer_index: list[torch.Tensor] = []
        buffer_probs: list[torch.Tensor] = []
        buffered = 0
        position = first_example
        try:
            for indices, images in batches:
                n = len(indices)
                if n == 0:
                    continue
                if position + n <= consumed:  # scored before the checkpoint we resumed from
                    position += n
                    continue
                with torch.inference_mode():
                    logits = model(images.to(device, non_blocking=True))
                if logits.shape != (n, num_classes):
                    raise ValueError(f"the teacher returned logits of shape {tuple(logits.shape)} for a batch "
                                     f"of {n}, expected ({n}, {num_classes})")
                probs = logits.float().softmax(-1).cpu()
                indices = torch.as_tensor(indices, dtype=torch.int64).cpu()
                lo = max(consumed - position, 0)
                position += n
                # Split the batch at shard boundaries, so each checkpoint covers exactly the shards written.
                while lo < n:
                    take = min(n - lo, shard_size - buffered)
                    idx, p = indices[lo:lo + take], probs[lo:lo + take]
                    confidence, label = p.max(-1)
                    topk.update(idx, label, confidence)
                    buffer_index.append(idx)
                    buffer_probs.append(p.to(PROBS_DTYPES[probs_dtype]))
                    buffered += take
                    consumed += take
                    lo += take
                    if buffered == shard_size:
                        write_shard(out_dir, shards, buffer_index, buffer_probs)
                        shards += 1
                        buffer_index, buffer_probs, buffered = [], [], 0
                        checkpoint(done=False)
                        log.info("%d examples scored, %d shards", consumed, shards)
            if position < consumed:
                raise ValueError(f"batches ended at example {position}, but the checkpoint in {out_dir} "
                                 f"had already scored {consumed}: the data changed since")
            if buffered:
                write_shard(out_dir, shards, buffer_index, buffer_probs)
                shards += 1
            checkpoint(done=True)
        finally:
            model.train(was_training)

    return finalize(out_dir, topk, settings, consumed, shards)


# --------------------------------------------------------------------------------------------------
# The command: a timm teacher over an image dataset read by `mpl_large.data.sources.load_images`.
# Unreadable images are logged and skipped (not scored, not counted in `examples_scored`).


def load_teacher(name: str, num_classes: int, weights: str | os.PathLike | None = None) -> nn.Module:
    """`timm.create_model(name, num_classes=...)`, randomly initialised, then `weights` (safetensors only)."""
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"teacher weights {path}: no such file")
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"teacher weights {path}: not a readable safetensors file ({e})") from e
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"teacher weights {path} do not fit {name} with {num_classes} classes: {e}") from e
    return model


def _eval_transform(model: nn.Module, image_size: int):
    """Resize + center crop + normalize, with the model's pretrained_cfg mean/std/crop_pct (timm falls back
    to ImageNet's)."""
    config = timm.data.resolve_model_data_config(model)
    config["input_size"] = (3, image_size, image_size)
    config["crop_mode"] = "center"
    return timm.data.create_transform(**config, is_training=False)


class _ImageRows(torch.utils.data.Dataset):
    """Rows `start..` of a `load_images` table as (dataset row, transformed image, readable)."""

    def __init__(self, ds, transform, image_size: int, start: int):
        self.ds, self.transform, self.image_size, self.start = ds, transform, image_size, start

    def __len__(self) -> int:
        return len(self.ds) - self.start

    def __getitem__(self, i: int):
        i += self.start
        image = decode_image(self.ds[i][IMAGE], where=f"row {i}")
        if image is None:  # logged by decode_image; dropped from its batch by _readable
            return i, torch.zeros(3, self.image_size, self.image_size), False
        return i, self.transform(image), True


def _readable(loader, unreadable: list[int]):
    """The loader's batches without their unreadable images (counted in `unreadable[0]`)."""
    for index, images, ok in loader:
        unreadable[0] += int((~ok).sum())
        yield index[ok], images[ok]


def _restart_point(out_dir: Path, progress: dict | None, batch_size: int) -> tuple[int, int]:
    """(dataset row, stream position) to restart the CLI's stream at: the first row of the batch holding the
    first unscored row, and the number of examples scored before that row.

    Rows and stream positions differ by the unreadable images dropped so far; the shards' `index` tensors
    (the rows scored, in increasing order) give the position. Restarting at a batch boundary keeps every
    batch, and so the teacher's outputs, the same as in an uninterrupted run.
    """
    if not progress or progress["consumed"] == 0:
        return 0, 0
    position, start = progress["consumed"], None
    for s in reversed(range(progress["shards"])):
        rows = read_shard_index(out_dir, s)
        if start is None:
            start = (int(rows[-1]) + 1) // batch_size * batch_size
        later = int((rows >= start).sum())
        position -= later
        if later < len(rows):
            break
    return start, position


def build_parser() -> argparse.ArgumentParser:
    from mpl_large.cli import select_parser  # one flag vocabulary for every command (`mpl-select`)

    return select_parser()


def main(argv: list[str] | None = None) -> Selection:

    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("num_classes", "image_size", "batch_size", "top_k", "shard_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    if not args.resume and read_progress(out) is not None:
        parser.error(f"--out {out} holds a previous run: pass --resume to continue it, or use another directory")
    try:
        model = load_teacher(args.model, args.num_classes, args.weights).to(args.device)
        # The selection's `index` is the row of this table: whoever reads the selection (Reduced MPL)
        # must load the same --data and --split with load_images(..., labeled=False).
        ds = load_images(args.data, split=args.split, labeled=False, cache_dir=args.cache_dir)
    except (FileNotFoundError, ValueError) as e:  # DataError is a ValueError
        parser.error(str(e))

    # No decoding of images already scored: restart at the batch holding the first unscored one.
    start, first_example = _restart_point(out, read_progress(out) if args.resume else None, args.batch_size)
    start = min(start, len(ds))
    rows = _ImageRows(ds, _eval_transform(model, args.image_size), args.image_size, start)
    loader = torch.utils.data.DataLoader(rows, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                                         pin_memory=args.device.startswith("cuda"))
    unreadable = [0]
    teacher = args.model + (f" ({Path(args.weights).resolve()})" if args.weights else " (random init)")
    source = f"{Path(args.data).resolve()} [{args.split}]"
    selection = score_and_select(model, _readable(loader, unreadable), args.num_classes, args.top_k, out,
                                 args.shard_size, resume=args.resume, probs_dtype=args.probs_dtype,
                                 first_example=first_example, source=source, teacher=teacher)
    print(f"scored {selection.examples_scored} images, kept {selection.index.numel()} "
          f"({len(selection.short_classes)} classes short of {args.top_k}); this run skipped "
          f"{unreadable[0]} unreadable images (logged above) -> {out}", file=sys.stderr)
    return selection


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    main()
