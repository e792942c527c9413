"""Image datasets from disk through `datasets`: image folders, parquet, Arrow, and streaming shards.

`load_images` returns a `datasets.Dataset` (or an `IterableDataset` when streaming, for unlabeled sets too
large to read in one go: JFT/YFCC scale) with two canonical columns, `image` and, when labeled, `label`.
The image column is left *undecoded* (`datasets.Image(decode=False)`: `{"bytes", "path"}` dicts) so that
decoding happens in `decode_image`, where an unreadable or corrupt file is counted, logged with its path and
skipped, instead of raising inside `datasets` and stopping a run hours in.

Accepted `path`s:
    - a directory of class subfolders (`imagefolder`; split subfolders `train/`, `test/`, ... are honoured);
    - a `save_to_disk` directory (a `Dataset` or a `DatasetDict`, whose `split` is taken);
    - parquet: a `.parquet` file, a directory holding `*.parquet` files, a glob, or a list of files;
    - Arrow: an `.arrow` file, a directory holding `*.arrow` files, a glob, or a list of files.
A single file, glob or list *is* the split; `split` chooses only among the splits of a directory.
"""

from __future__ import annotations

import contextlib
import glob
import io
import logging
import os
import re
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image

__all__ = [
    "IMAGE",
    "LABEL",
    "CorruptImageLog",
    "DataError",
    "decode_image",
    "load_images",
    "natural_key",
]

log = logging.getLogger(__name__)

IMAGE = "image"
"""Name of the image column in every dataset `load_images` returns."""
LABEL = "label"
"""Name of the label column (integer class ids) in every labeled dataset `load_images` returns."""

PathLike = str | os.PathLike
_GLOB_CHARS = re.compile(r"[*?\[]")


class DataError(ValueError):
    """A dataset cannot be used as asked; the message names the path, split or column at fault."""


def natural_key(name: PathLike) -> list[Any]:
    """Sort key that orders embedded numbers numerically: `shard-2` before `shard-10`."""
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", str(name))]


# ---------------------------------------------------------------------------------------------------------
# Decoding


class CorruptImageLog:
    """Counts and remembers the images that could not be decoded; each one is also logged as a warning.

    One per stream (the loader owns it), so a run can report how much data it silently lost. Only the
    first `max_records` locations are kept in memory; `count` keeps counting.
    """

    def __init__(self, max_records: int = 1000) -> None:
        self.count = 0
        self.records: list[str] = []
        self.max_records = max_records
        self._deferred: list[tuple[str, str]] | None = None

    def record(self, where: str, error: BaseException) -> None:
        description = f"{type(error).__name__}: {error}"
        if self._deferred is not None:
            self._deferred.append((where, description))
        else:
            self.add(where, description)

    def add(self, where: str, description: str) -> None:
        """Count and log one skipped image (`description`: the error, as text)."""
        self.count += 1
        if len(self.records) < self.max_records:
            self.records.append(where)
        log.warning("skipping unreadable image %s (%s); %d skipped so far", where, description, self.count)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[list[tuple[str, str]]]:
        """Collect failures as (where, description) instead of counting them. A data-loader worker decodes
        ahead of training, in another process: what it skipped travels back with the example and is counted
        and logged (`add`) when the stream hands that example's batch out, so a count never includes examples
        that were prefetched but not consumed, and it reaches the main process's log."""
        collected: list[tuple[str, str]] = []
        previous, self._deferred = self._deferred, collected
        try:
            yield collected
        finally:
            self._deferred = previous

    def __repr__(self) -> str:
        return f"CorruptImageLog(count={self.count})"


# What PIL raises on garbage, truncated or hostile files. Anything else is a bug and propagates.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


def decode_image(
    value: Any, *, where: str | None = None, corrupt_log: CorruptImageLog | None = None
) -> Image.Image | None:
    """Decode one undecoded image value to an RGB PIL image, or return None if it cannot be read.

    Args:
        value: a `datasets.Image(decode=False)` dict (`{"bytes", "path"}`; bytes win when both are set),
            raw bytes, a file path, or an already decoded PIL image.
        where: location to report when `value` carries no path, e.g. "cifar.parquet row 17".
        corrupt_log: receives the failure (counted and logged); with None the failure is only logged.

    A failure is reported with the file's path when there is one, else with `where`; the caller skips the
    example and goes on.
    """
    path = None
    try:
        if isinstance(value, Image.Image):
            img = value
        else:
            data = value
            if isinstance(value, dict):
                path = value.get("path")
                data = value.get("bytes") or path
            elif isinstance(value, (str, os.PathLike)):
                path = value
            if data is None:
                raise ValueError("image value has neither bytes nor a path")
            img = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data)
        # convert() forces the full decode, so truncated files fail here rather than in the transform.
        return img.convert("RGB")
    except _DECODE_ERRORS as error:
        location = str(path) if path else (where or "<image without path>")
        if corrupt_log is None:
            log.warning("skipping unreadable image %s (%s: %s)", location, type(error).__name__, error)
        else:
            corrupt_log.record(location, error)
        return None


# ---------------------------------------------------------------------------------------------------------
# Loading


def _files_kind(files: list[str], origin: str) -> str:
    suffixes = {Path(f).suffix.lower() for f in files}
    if suffixes == {".parquet"}:
        return "parquet"
    if suffixes == {".arrow"}:
        return "arrow"
    raise DataError(f"{origin}: expected .parquet or .arrow files, got suffixes {sorted(suffixes)}")


def _resolve(path: PathLike | Sequence[PathLike]) -> tuple[str, dict[str, Any]]:
    """(builder, load_dataset kwargs) for `path`; builder "saved" means `datasets.load_from_disk`."""
    if not isinstance(path, (str, os.PathLike)):
        files = [os.fspath(p) for p in path]
        if not files:
            raise DataError("empty list of data files")
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise DataError(f"data file does not exist: {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                          if len(missing) > 1 else ""))
        return _files_kind(files, files[0]), {"data_files": files}
    text = os.fspath(path)
    if _GLOB_CHARS.search(text) and not os.path.exists(text):
        files = sorted(glob.glob(text, recursive=True), key=natural_key)
        if not files:
            raise DataError(f"no files match {text!r}")
        return _files_kind(files, text), {"data_files": files}
    p = Path(text)
    if not p.exists():
        raise DataError(f"dataset path does not exist: {text}")
    if p.is_file():
        return _files_kind([text], text), {"data_files": [text]}
    if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
        return "saved", {}
    # data_dir (not data_files) so datasets infers splits from names like train-*.parquet or test/.
    if next(p.rglob("*.parquet"), None) is not None:
        return "parquet", {"data_dir": text}
    if next(p.rglob("*.arrow"), None) is not None:
        return "arrow", {"data_dir": text}
    return "imagefolder", {"data_dir": text}


def _column_names(ds: datasets.Dataset | datasets.IterableDataset) -> list[str]:
    names = ds.column_names
    if names is None:  # an IterableDataset whose features are unknown until read
        names = list(next(iter(ds)).keys())
    return list(names)


def load_images(
    path: PathLike | Sequence[PathLike],
    *,
    split: str = "train",
    labeled: bool = True,
    streaming: bool = False,
    image_column: str = "image",
    label_column: str = "label",
    cache_dir: PathLike | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load an image dataset with columns `image` (undecoded) and, if `labeled`, `label` (class ids).

    Args:
        path: see the module docstring for the accepted forms.
        split: which split of a multi-split directory; ignored for a file, glob or list.
        labeled: require a label column and keep it; False drops any label column (an unlabeled set
            carries no labels to leak).
        streaming: return an `IterableDataset` read shard by shard instead of a map-style `Dataset`.
        image_column, label_column: the source's column names; renamed to `image` and `label`.
        cache_dir: where `datasets` writes its Arrow cache for parquet/imagefolder sources.

    Raises:
        DataError: missing path, no matching files, unknown split, missing image or label column (the
            message lists the columns found), or a label column that is not integer class ids.
    """
    builder, kwargs = _resolve(path)
    origin = os.fspath(path) if isinstance(path, (str, os.PathLike)) else os.fspath(path[0])
    try:
        if builder == "saved":
            ds = datasets.load_from_disk(origin)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{origin}: no split {split!r}; splits found: {sorted(ds)}")
                ds = ds[split]
            if streaming:
                # Shards are contiguous row ranges, cheap to make: many, so ranks can split by shard.
                ds = ds.to_iterable_dataset(num_shards=max(1, min(len(ds), 1024)))
        else:
            if "data_files" in kwargs:
                kwargs = {"data_files": {split: kwargs["data_files"]}}
            cache = {} if cache_dir is None else {"cache_dir": os.fspath(cache_dir)}
            ds = datasets.load_dataset(builder, split=split, streaming=streaming, **kwargs, **cache)
    except DataError:
        raise
    except (ValueError, FileNotFoundError) as error:  # unknown split, no data files, unreadable schema
        raise DataError(f"{origin}: cannot load split {split!r} as {builder}: {error}") from error

    columns = _column_names(ds)
    if image_column not in columns:
        raise DataError(f"{origin}: no image column {image_column!r}; columns found: {columns}")
    if labeled and label_column not in columns:
        raise DataError(f"{origin}: no label column {label_column!r} (labeled=True); columns found: "
                        f"{columns}. Pass label_column=... or labeled=False.")
    keep = [image_column, label_column] if labeled else [image_column]
    ds = ds.select_columns(keep)
    renames = {old: new for old, new in zip(keep, (IMAGE, LABEL)) if old != new}
    if renames:
        ds = ds.rename_columns(renames)
    try:
        ds = ds.cast_column(IMAGE, datasets.Image(decode=False))
    except (ValueError, TypeError, NotImplementedError) as error:
        raise DataError(f"{origin}: column {image_column!r} does not hold images: {error}") from error
    if labeled and ds.features is not None:
        feature = ds.features[LABEL]
        is_int = isinstance(feature, datasets.ClassLabel) or (
            isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")))
        if not is_int:
            raise DataError(f"{origin}: label column {label_column!r} must hold integer class ids, got "
                            f"{feature}; convert it first, e.g. with Dataset.class_encode_column")
    return ds


def class_names(path: PathLike, split: str = "train") -> list[str] | None:
    """The class names of a labeled source, in class-id order: an image folder's subfolders (sorted), a
    saved or parquet dataset's `ClassLabel` names; None when its labels are bare integers."""
    feature = load_images(path, split=split).features[LABEL]
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def check_labels(ds: datasets.Dataset, num_classes: int, origin: PathLike, field: str) -> None:
    """Every label of `ds` is a class id in [0, num_classes): raises `DataError` naming the first row (and its
    image file, when it has one) that is not. Negative ids, such as cross-entropy's `ignore_index` -100, are
    refused too: every labeled example must be learned from. `field`: the config field num_classes came from."""
    labels = np.asarray(ds.with_format("numpy")[LABEL])
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad) == 0:
        return
    row = int(bad[0])
    image = ds[row][IMAGE]
    file = f" ({image['path']})" if isinstance(image, dict) and image.get("path") else ""
    kind = ("a negative label (ignore_index-style labels are not supported)" if labels[row] < 0
            else f"a class id past {field}={num_classes}")
    raise DataError(f"{os.fspath(origin)}: row {row}{file} has label {int(labels[row])}, {kind}; labels must be "
                    f"in [0, {num_classes}); {len(bad)} rows are out of range")
