"""From a run's `DataConfig` to the batches the steps consume.

Labeled images get the weak view; unlabeled images a weak view `x_u` and a strong (RandAugment) view
`x_u_aug` of the same image; evaluation images are resized and centre-cropped. Every view is normalised
with the student's mean/std. Batches are per rank: the global batch is split evenly across ranks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import datasets
import timm
import torch
from torchvision.transforms.v2 import functional as TF

from mpl_large.config import ConfigError, TrainConfig
from mpl_large.data.augment import strong_transform, weak_transform
from mpl_large.data.loader import BatchStream, ImageSampler, eval_batches
from mpl_large.data.sources import LABEL, CorruptImageLog, check_labels, load_images
from mpl_large.data.splits import holdout_split, paper_split
from mpl_large.device import is_cuda


@dataclass
class TrainBatch:
    """What one training step consumes: a labeled batch and, for MPL/UDA, two views of an unlabeled one."""

    x_l: torch.Tensor
    y_l: torch.Tensor
    x_u: torch.Tensor | None = None
    x_u_aug: torch.Tensor | None = None
    u_index: torch.Tensor | None = None
    """Dataset rows of the unlabeled examples (Reduced MPL looks up their stored teacher distributions)."""
    p_u: torch.Tensor | None = None
    """Reduced MPL: the large teacher's stored distributions of the unlabeled examples (looked up on the host,
    moved with the rest of the batch)."""


class Batches:
    """`TrainBatch`es from a labeled stream and, for MPL/UDA, an unlabeled one; resumable: `state_dict`
    is where both streams stand after the last batch."""

    def __init__(self, labeled: BatchStream, unlabeled: BatchStream | None = None) -> None:
        self.streams = {"labeled": labeled} | ({"unlabeled": unlabeled} if unlabeled is not None else {})

    def __iter__(self) -> Iterator[TrainBatch]:
        return self

    @property
    def images_per_batch(self) -> int:
        """Images one batch holds on this rank, every view counted (labeled + 2 x unlabeled)."""
        views = {"labeled": 1, "unlabeled": 2}
        return sum(views[name] * stream.batch_size for name, stream in self.streams.items())

    def close(self) -> None:
        """Stop the streams' worker processes (idempotent; the next batch would start them again)."""
        for stream in self.streams.values():
            stream.close()

    def __next__(self) -> TrainBatch:
        lab = next(self.streams["labeled"])
        if "unlabeled" not in self.streams:
            return TrainBatch(lab.inputs, lab.labels)
        unl = next(self.streams["unlabeled"])
        x_u, x_u_aug = unl.inputs
        return TrainBatch(lab.inputs, lab.labels, x_u, x_u_aug, unl.indices)

    def state_dict(self) -> dict:
        return {name: stream.state_dict() for name, stream in self.streams.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, stream in self.streams.items():
            stream.load_state_dict(state[name])


class Normalize:
    """PIL image or uint8 tensor -> float tensor, scaled to [0, 1] and normalised per channel."""

    def __init__(self, mean, std) -> None:
        self.mean, self.std = list(mean), list(std)

    def __call__(self, img) -> torch.Tensor:
        x = TF.to_dtype(TF.to_image(img), torch.float32, scale=True)
        return TF.normalize(x, self.mean, self.std)


class Streams:
    """The run's labeled, unlabeled and evaluation data for this rank."""

    def __init__(
        self,
        labeled: datasets.Dataset,
        unlabeled: datasets.Dataset | datasets.IterableDataset | None,
        eval_set: datasets.Dataset | None,
        *,
        augment: str,
        image_size: int,
        mean,
        std,
        batch_size: int,
        unlabeled_batch_size: int,
        seed: int,
        randaugment_ops: int = 2,
        randaugment_magnitude: float = 10.0,
        cutout: bool | None = None,
        eval_batch_size: int = 256,
        crop_pct: float = 1.0,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.labeled, self.unlabeled, self.eval_set = labeled, unlabeled, eval_set
        self.workers = workers
        """Data-loader worker processes of this rank, shared out between the streams of a phase."""
        self.pin_memory = pin_memory
        """Hand out training batches in page-locked memory: on a CUDA device their copies are non-blocking."""
        self.batch_size, self.unlabeled_batch_size = batch_size, unlabeled_batch_size
        self.eval_batch_size, self.seed, self.rank, self.world_size = eval_batch_size, seed, rank, world_size
        self.image_size, self.crop_pct = image_size, crop_pct
        self.corrupt_log = CorruptImageLog()
        self._normalize = Normalize(mean, std)
        weak = weak_transform(augment, image_size)
        partners = unlabeled if isinstance(unlabeled, datasets.Dataset) else labeled
        strong = strong_transform(augment, image_size, randaugment_ops, randaugment_magnitude, cutout,
                                  pair_sampler=ImageSampler(partners, corrupt_log=self.corrupt_log))
        self.strong = strong
        """The strong view's transform (before normalisation)."""
        self._weak_tensor = lambda img, g: self._normalize(weak(img, g))
        # Both views from one generator: weak first, then the strong view's own draws.
        self._two_views = lambda img, g: (self._normalize(weak(img, g)), self._normalize(strong(img, g)))

    @classmethod
    def from_config(cls, cfg: TrainConfig, shard: tuple[int, int] | None = None) -> Streams:
        """`shard`: (index, count) of this process's data shard; default (rank, world size). Under spatial
        partitioning the ranks of a replica share one shard: (data-parallel rank, replicas)."""
        d = cfg.data
        if not d.labeled:
            raise ConfigError("data.labeled: a labeled training set is required (--data PATH)")
        rank, world = shard or _rank_world()
        for name, total in (("batch_size", cfg.batch_size), ("finetune.batch_size", cfg.finetune.batch_size)):
            if total % world:
                raise ConfigError(f"{name}: {total} does not split evenly over {world} data-parallel replicas")
        # The classes the labels index: the teacher's (MPL's student has the same), Reduced MPL's student's.
        field = "teacher.num_classes" if cfg.method in ("mpl", "uda", "supervised") else "student.num_classes"
        num_classes = cfg.teacher.num_classes if field == "teacher.num_classes" else cfg.student.num_classes
        labeled = load_images(d.labeled)
        check_labels(labeled, num_classes, d.labeled, field)
        unlabeled = eval_set = None
        if d.split == "paper":
            labeled, unlabeled = paper_split(labeled, d.num_labeled, d.num_dropped)
        if d.split == "auto" and not d.eval and d.holdout_fraction > 0:
            labeled, eval_set = holdout_split(labeled, d.holdout_fraction, origin=d.labeled)
        if d.split == "auto" and not d.unlabeled:
            unlabeled = labeled.remove_columns(LABEL)
        if d.unlabeled:
            unlabeled = load_images(d.unlabeled, labeled=False, streaming=d.streaming_unlabeled)
        if cfg.method != "supervised" and unlabeled is None:
            raise ConfigError(f"data.unlabeled: method {cfg.method!r} needs unlabeled data "
                              "(--unlabeled PATH, or data.split=auto or paper)")
        if d.eval:
            eval_set = load_images(d.eval, split=d.eval_split)
        if eval_set is not None:
            check_labels(eval_set, num_classes, d.eval, field)
        pretrained = timm.models.get_pretrained_cfg(cfg.student.name)
        return cls(
            labeled, unlabeled, eval_set, augment=d.augment, image_size=d.image_size,
            mean=pretrained.mean, std=pretrained.std, crop_pct=pretrained.crop_pct or 1.0,
            batch_size=cfg.batch_size // world, unlabeled_batch_size=cfg.mu * cfg.batch_size // world,
            seed=cfg.seed, randaugment_ops=d.randaugment_ops, randaugment_magnitude=d.randaugment_magnitude,
            cutout=d.cutout, eval_batch_size=d.eval_batch_size, rank=rank, world_size=world,
            workers=d.workers if d.workers >= 0 else default_workers(), pin_memory=is_cuda(cfg.device),
        )

    def _stream(self, dataset, batch_size: int, transform, seed_offset: int, workers: int) -> BatchStream:
        return BatchStream(dataset, batch_size, transform, seed=self.seed * 10 + seed_offset, rank=self.rank,
                           world_size=self.world_size, corrupt_log=self.corrupt_log, workers=workers,
                           pin_memory=self.pin_memory)

    def mixed(self) -> Batches:
        """Labeled (weak view) and unlabeled (weak, strong views) batches, for MPL and UDA."""
        labeled, unlabeled = split_workers(self.workers, self.batch_size, self.unlabeled_batch_size)
        return Batches(labeled=self._stream(self.labeled, self.batch_size, self._weak_tensor, 1, labeled),
                       unlabeled=self._stream(self.unlabeled, self.unlabeled_batch_size, self._two_views, 2,
                                              unlabeled))

    def labeled_only(self, batch_size: int | None = None) -> Batches:
        """Labeled batches (weak view), for supervised training and finetuning; `batch_size` is global."""
        size = self.batch_size if batch_size is None else batch_size // self.world_size
        return Batches(labeled=self._stream(self.labeled, size, self._weak_tensor, 3, self.workers))

    @property
    def has_eval(self) -> bool:
        return self.eval_set is not None

    def eval_size(self) -> int:
        return 0 if self.eval_set is None else len(self.eval_set)

    def eval_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        resize = round(self.image_size / self.crop_pct)

        def transform(img, generator):
            img = TF.center_crop(TF.resize(img, resize), self.image_size)
            return self._normalize(img)

        for b in eval_batches(self.eval_set, self.eval_batch_size, transform, rank=self.rank,
                              world_size=self.world_size, corrupt_log=self.corrupt_log):
            yield b.inputs, b.labels, b.indices


def default_workers() -> int:
    """`data.workers=-1`: the CPUs this process may run on, shared by the ranks on this node (torchrun,
    `accelerate launch` and `deepspeed` set LOCAL_WORLD_SIZE), less one for the training process."""
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, len(os.sched_getaffinity(0)) // max(ranks_here, 1) - 1)


def split_workers(workers: int, labeled_batch: int, unlabeled_batch: int) -> tuple[int, int]:
    """(labeled, unlabeled) workers out of `workers`, by each stream's work per step: an unlabeled image
    (a weak and a RandAugment view) costs about 2.5 labeled ones (weak view), in CPU time per image measured by
    `benchmarks/input_pipeline.py` at 32 px. With one worker the labeled stream, the cheaper, stays in this
    process."""
    if workers <= 1:
        return 0, workers
    share = labeled_batch / (labeled_batch + 2.5 * unlabeled_batch)
    labeled = min(workers - 1, max(1, round(workers * share)))
    return labeled, workers - labeled


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
