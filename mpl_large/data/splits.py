"""The paper's labeled/unlabeled/held-out splits (Appendix C.1, §3.3), as functions over any dataset.

CIFAR-10-4K and SVHN-1K (C.1): the training images in their download order; the first 5,000 are the
validation set and are removed; the next 4,000 (CIFAR-10) or 1,000 (SVHN) are the labeled set. The paper
notes, and `class_histogram` shows, that this prefix is slightly class-imbalanced; it is kept as is so results
stay comparable.

Unlabeled set: the images left after the validation and labeled ones, i.e. the labeled images are *not*
included. That is the paper's count (§3.2: "4,000 ... labeled ... while 41,000 ... unlabeled" = 50,000 -
5,000 - 4,000). UDA and FixMatch instead reuse the labeled images as unlabeled ones too;
`include_labeled_in_unlabeled=True` gives that. The unlabeled set has its label column removed.

ImageNet-p% (C.1): the 1,024 training shards in order; p% takes the leading floor(1024 * p / 100) shards
(102 for 10%, 204 for 20%: the paper's numbers are floors, not roundings); the last 20 shards (about
25,000 images) are held out for hyper-parameter tuning (§3.3, §4) and never used for training. For a
dataset that is not sharded, `fraction_split` and `held_out_rows` do the same on leading/trailing rows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from fractions import Fraction
from typing import NamedTuple, TypeVar

import datasets
import numpy as np

from mpl_large.data.sources import LABEL, DataError, natural_key

__all__ = [
    "ShardSplit",
    "class_histogram",
    "fraction_split",
    "held_out_rows",
    "held_out_shards",
    "holdout_split",
    "paper_split",
    "paper_validation",
    "shard_fraction",
    "shard_split",
]

log = logging.getLogger(__name__)

FileT = TypeVar("FileT")

IMAGENET_SHARDS = 1024
IMAGENET_HELD_OUT_SHARDS = 20
IMAGENET_HELD_OUT_IMAGES = 25_000


def _unlabeled(ds: datasets.Dataset, label_column: str) -> datasets.Dataset:
    return ds.remove_columns(label_column) if label_column in ds.column_names else ds


def class_histogram(
    ds: datasets.Dataset, *, num_classes: int | None = None, label_column: str = LABEL
) -> list[int]:
    """Examples per class, indexed by class id; length `num_classes`, else the ClassLabel's, else max + 1."""
    if label_column not in ds.column_names:
        raise DataError(f"no label column {label_column!r}; columns found: {ds.column_names}")
    labels = np.asarray(ds.select_columns([label_column]).with_format("numpy")[label_column], dtype=np.int64)
    if num_classes is None:
        feature = ds.features[label_column]
        if isinstance(feature, datasets.ClassLabel):
            num_classes = feature.num_classes
        else:
            num_classes = int(labels.max(initial=-1)) + 1
    return np.bincount(labels, minlength=num_classes).tolist()


def paper_validation(ds: datasets.Dataset, num_dropped: int = 5000) -> datasets.Dataset:
    """The first `num_dropped` examples: C.1's validation images, which `paper_split` removes."""
    if len(ds) < num_dropped:
        raise DataError(f"cannot hold out the first {num_dropped} examples of a dataset of {len(ds)}")
    return ds.select(range(num_dropped))


def paper_split(
    ds: datasets.Dataset,
    num_labeled: int,
    num_dropped: int = 5000,
    *,
    include_labeled_in_unlabeled: bool = False,
    label_column: str = LABEL,
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(labeled, unlabeled) by C.1: drop the first `num_dropped`, label the next `num_labeled`.

    `ds` must be in the source's original order (CIFAR-10's five batch files in order, SVHN's `mat` file).
    CIFAR-10-4K: `paper_split(cifar_train, 4000)`; SVHN-1K: `paper_split(svhn_train, 1000)`. The
    unlabeled set is the rest, without the labeled images unless `include_labeled_in_unlabeled`, and
    without a label column. The labeled set's class counts are logged: they are not balanced.
    """
    if num_labeled < 1 or num_dropped < 0:
        raise DataError(f"need num_labeled >= 1 and num_dropped >= 0, got {num_labeled} and {num_dropped}")
    end = num_dropped + num_labeled
    if len(ds) < end:
        raise DataError(f"dataset has {len(ds)} examples; dropping {num_dropped} and labeling {num_labeled} "
                        f"needs {end}")
    if label_column not in ds.column_names:
        raise DataError(f"no label column {label_column!r} to split on; columns found: {ds.column_names}")
    labeled = ds.select(range(num_dropped, end))
    unlabeled = _unlabeled(ds.select(range(num_dropped if include_labeled_in_unlabeled else end, len(ds))),
                           label_column)
    counts = class_histogram(labeled, label_column=label_column)
    present = [c for c in counts if c] or [0]
    log.info("paper split: %d dropped, %d labeled (per class %s, max/min %d/%d), %d unlabeled",
             num_dropped, num_labeled, counts, max(present), min(present), len(unlabeled))
    return labeled, unlabeled


def _leading_count(total: int, percent: float) -> int:
    if not 0 < percent <= 100:
        raise DataError(f"percent must be in (0, 100], got {percent}")
    # Exact arithmetic: 1024 * 10 / 100 = 102.4 -> 102, never 102.39999 -> 102 by luck.
    return math.floor(Fraction(total) * Fraction(str(percent)) / 100)


def held_out_shards(files: Sequence[FileT], n: int = IMAGENET_HELD_OUT_SHARDS) -> list[FileT]:
    """The last `n` shards in natural order: ImageNet's ~25,000 tuning images (C.1)."""
    if not 0 <= n < len(files):
        raise DataError(f"cannot hold out {n} of {len(files)} shards")
    return sorted(files, key=natural_key)[len(files) - n:]


def shard_fraction(
    files: Sequence[FileT], percent: float, *, num_held_out: int = IMAGENET_HELD_OUT_SHARDS
) -> list[FileT]:
    """The leading floor(len(files) * percent / 100) shards in natural order (ImageNet-p%).

    Over 1,024 shards: 102 at 10%, 204 at 20%. The last `num_held_out` shards are never included, so
    100% means every shard but the held-out ones.
    """
    ordered = sorted(files, key=natural_key)
    if not 0 <= num_held_out < len(ordered):
        raise DataError(f"cannot hold out {num_held_out} of {len(ordered)} shards")
    count = min(_leading_count(len(ordered), percent), len(ordered) - num_held_out)
    if count == 0:
        raise DataError(f"{percent}% of {len(ordered)} shards is no shard")
    return ordered[:count]


class ShardSplit(NamedTuple):
    """ImageNet-p% as shard lists: labeled (leading p%), unlabeled (the rest), held_out (the last n)."""

    labeled: list
    unlabeled: list
    held_out: list


def shard_split(files: Sequence[FileT], percent: float, *, num_held_out: int = IMAGENET_HELD_OUT_SHARDS,
                include_labeled_in_unlabeled: bool = False) -> ShardSplit:
    """ImageNet-p%: `shard_fraction` labeled, the remaining training shards unlabeled, the last held out."""
    ordered = sorted(files, key=natural_key)
    labeled = shard_fraction(ordered, percent, num_held_out=num_held_out)
    train_end = len(ordered) - num_held_out
    unlabeled = ordered[0 if include_labeled_in_unlabeled else len(labeled):train_end]
    return ShardSplit(labeled, unlabeled, ordered[train_end:])


def held_out_rows(ds: datasets.Dataset, n: int = IMAGENET_HELD_OUT_IMAGES) -> datasets.Dataset:
    """The last `n` rows: the row-level counterpart of `held_out_shards` (§3.3's 25,000 tuning images)."""
    if not 0 <= n < len(ds):
        raise DataError(f"cannot hold out {n} of {len(ds)} rows")
    return ds.select(range(len(ds) - n, len(ds)))


def fraction_split(
    ds: datasets.Dataset,
    percent: float,
    *,
    num_held_out: int = IMAGENET_HELD_OUT_IMAGES,
    include_labeled_in_unlabeled: bool = False,
    label_column: str = LABEL,
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(labeled, unlabeled) for a dataset that is not sharded: the leading floor(len * percent / 100)
    rows labeled, the training rows after them unlabeled; the last `num_held_out` rows are in neither."""
    if not 0 <= num_held_out < len(ds):
        raise DataError(f"cannot hold out {num_held_out} of {len(ds)} rows")
    train_end = len(ds) - num_held_out
    count = min(_leading_count(len(ds), percent), train_end)
    if count == 0:
        raise DataError(f"{percent}% of {len(ds)} rows is no row")
    labeled = ds.select(range(count))
    unlabeled = _unlabeled(ds.select(range(0 if include_labeled_in_unlabeled else count, train_end)),
                           label_column)
    return labeled, unlabeled


def holdout_split(ds: datasets.Dataset, fraction: float, *, seed: int = 0, label_column: str = LABEL,
                  origin: str = "data.labeled") -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, held_out) for your own labeled data (`data.split=auto` without an evaluation set): per class,
    round(fraction * count) examples, at least one, drawn with `seed`, are held out; every class must keep at
    least one training example. Rows keep their order within each part."""
    labels = np.asarray(ds.select_columns([label_column]).with_format("numpy")[label_column], dtype=np.int64)
    feature = ds.features[label_column]
    names = feature.names if isinstance(feature, datasets.ClassLabel) else None
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        k = max(1, round(fraction * len(rows)))
        if k >= len(rows):
            name = f"class {names[c]!r}" if names else f"class {c}"
            raise DataError(f"{origin}: {name} has {len(rows)} example(s); holding out {k} for evaluation "
                            f"(data.holdout_fraction={fraction}) leaves none to train on. Add images, pass an "
                            f"evaluation set (--eval), or set data.holdout_fraction=0")
        held.extend(rng.choice(rows, k, replace=False).tolist())
    held_set = set(held)
    train = [i for i in range(len(ds)) if i not in held_set]
    return ds.select(train), ds.select(sorted(held))
