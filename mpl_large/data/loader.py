"""Deterministic, resumable, rank-sharded batches of decoded and transformed images.

`BatchStream` is an infinite iterator of fixed-size `Batch`es for training (the labeled and the unlabeled
stream of MPL); `eval_batches` is one ordered pass for evaluation.

Determinism: what a stream yields is a pure function of (seed, rank, world_size) and its position, never of
wall time, worker scheduling or how often it was checkpointed:
    - map-style `Dataset`: epoch e visits the permutation drawn from (seed, e); the first
      len // world_size * world_size entries are dealt round-robin to the ranks (rank r takes entries
      r, r + world_size, ...), so every rank has the same count and the few left over, a different few
      each epoch, wait for a later epoch. Batches run on across epoch boundaries: every batch is full.
    - streaming `IterableDataset`: shards are shuffled per epoch (`ds.shuffle(seed)` + `set_epoch`) and
      dealt to ranks (`split_dataset_by_node`); rows are shuffled within consecutive blocks of
      `shuffle_block` rows by a permutation drawn from (seed, epoch, rank, block). Ranks may see different
      counts per epoch (shard sizes differ); a training stream never ends, so nothing waits on that.
    - augmentation: the transform gets a `torch.Generator` seeded from (seed, epoch, index), so an
      example's views depend only on where it sits in the stream.

Exact resume: `state_dict()` after any batch, then `load_state_dict` on a fresh stream built with the same
arguments, yields exactly the batches the original would have yielded next. For streaming data the state
holds the `IterableDataset`'s own `state_dict()` taken at the start of the current block; resuming re-reads
that one block. `datasets`' own shuffle buffer is deliberately not used for rows (buffer_size=1): it is not
saved in its state, so a resumed buffered stream refills it and silently loses and reorders examples.

Corrupt or unreadable images are skipped (counted in `corrupt_log`, logged with their path) and the batch is
filled from the next examples, so batch size never changes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from PIL import Image

from mpl_large.data.augment import augment_generator
from mpl_large.data.sources import IMAGE, LABEL, CorruptImageLog, DataError, decode_image

__all__ = ["Batch", "BatchStream", "ImageSampler", "Transform", "eval_batches"]

Transform = Callable[[Image.Image, torch.Generator], "torch.Tensor | tuple[torch.Tensor, ...]"]
"""`transform(rgb_image, generator)` -> a tensor, or a tuple of tensors (e.g. weak and strong views). All
randomness must come from `generator` (see `mpl_large.data.augment`)."""


@dataclass
class Batch:
    """One batch. `inputs` is a stacked tensor, or a tuple of them when the transform returns views."""

    inputs: torch.Tensor | tuple[torch.Tensor, ...]
    labels: torch.Tensor | None
    """int64 class ids; None for an unlabeled dataset."""
    indices: torch.Tensor
    """Map-style: the dataset row of each example. Streaming: its position in this rank's epoch stream."""


class _DropShuffleBufferWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "shuffle buffer" not in record.getMessage()


@contextlib.contextmanager
def _no_shuffle_buffer_warning() -> Iterator[None]:
    """Silence `datasets`' warning that a resumed shuffle buffer is refilled: with buffer_size=1 (below)
    there is nothing to refill, and the warning would say on every resume that data was lost."""
    logger, quiet = logging.getLogger("datasets.iterable_dataset"), _DropShuffleBufferWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _source_name(ds: datasets.Dataset | datasets.IterableDataset) -> str:
    files = getattr(ds, "cache_files", None) or []
    return os.path.basename(files[0]["filename"]) if files else "dataset"


def _collate(outputs: list[Any], labels: list[int] | None, indices: list[int]) -> Batch:
    if isinstance(outputs[0], (tuple, list)):
        inputs: torch.Tensor | tuple[torch.Tensor, ...] = tuple(torch.stack(view) for view in zip(*outputs))
    else:
        inputs = torch.stack(outputs)
    return Batch(inputs, None if labels is None else torch.tensor(labels, dtype=torch.int64),
                 torch.tensor(indices, dtype=torch.int64))


def _check_columns(ds: datasets.Dataset | datasets.IterableDataset, image_column: str) -> list[str]:
    columns = ds.column_names
    if columns is None:
        columns = list(next(iter(ds)).keys())
    if image_column not in columns:
        raise DataError(f"{_source_name(ds)}: no image column {image_column!r}; columns found: {columns}")
    return list(columns)


class BatchStream:
    """Infinite iterator of `Batch`es; see the module docstring for order, sharding and resume.

    Args:
        dataset: a `Dataset` or a streaming `IterableDataset`, e.g. from `load_images`; its image column
            undecoded (decoded images work too).
        batch_size: examples per batch on this rank.
        transform: `transform(image, generator)`, see `Transform`.
        seed: non-negative; use a different one for each stream of a run (labeled, unlabeled).
        rank, world_size: this process's slice of the data.
        corrupt_log: counts skipped images; a fresh one by default (`stream.corrupt_log`).
        image_column, label_column: labels are yielded iff `label_column` is a column (None: never).
        shuffle_block: streaming only: rows shuffled together (memory: this many undecoded images).
    """

    def __init__(
        self,
        dataset: datasets.Dataset | datasets.IterableDataset,
        batch_size: int,
        transform: Transform,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        corrupt_log: CorruptImageLog | None = None,
        image_column: str = IMAGE,
        label_column: str | None = LABEL,
        shuffle_block: int = 4096,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if shuffle_block < 1:
            raise ValueError(f"shuffle_block must be >= 1, got {shuffle_block}")
        columns = _check_columns(dataset, image_column)
        self.dataset = dataset
        self.batch_size, self.transform, self.seed = batch_size, transform, seed
        self.rank, self.world_size, self.shuffle_block = rank, world_size, shuffle_block
        self.image_column = image_column
        self.label_column = label_column if label_column is not None and label_column in columns else None
        self.corrupt_log = CorruptImageLog() if corrupt_log is None else corrupt_log
        self.streaming = isinstance(dataset, datasets.IterableDataset)
        self._source = _source_name(dataset)
        self._epoch, self._position = 0, 0
        self._good_this_epoch, self._epoch_from_start = 0, True
        if self.streaming:
            self._reset_stream()
        else:
            self.examples_per_epoch = len(dataset) // world_size
            """Examples this rank visits per epoch (equal on every rank)."""
            if self.examples_per_epoch == 0:
                raise DataError(f"{self._source}: {len(dataset)} examples cannot be shared by "
                                f"{world_size} ranks")
            self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    @property
    def labeled(self) -> bool:
        return self.label_column is not None

    # -----------------------------------------------------------------------------------------------------
    # State

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands after the last batch; plain Python data (picklable, JSON-able)."""
        state: dict[str, Any] = {
            "epoch": self._epoch, "position": self._position,
            "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
        }
        if self.streaming:
            state.update(shuffle_block=self.shuffle_block, block_start=self._block_start,
                         block_state=self._block_state)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; the stream must have been built with the same arguments."""
        keys = ("seed", "rank", "world_size") + (("shuffle_block",) if self.streaming else ())
        for key in keys:
            if key in state and state[key] != getattr(self, key):
                raise DataError(f"cannot resume: state has {key}={state[key]!r}, this stream has "
                                f"{key}={getattr(self, key)!r}; the order would differ")
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
        self._good_this_epoch, self._epoch_from_start = 0, self._position == 0
        if self.streaming:
            self._reset_stream()
            self._block_start, self._block_state = int(state["block_start"]), state["block_state"]
            self._open_epoch(self._block_state)
            with _no_shuffle_buffer_warning():  # the loaded state takes effect on the first read
                self._read_block()
            self._block_pos = self._position - self._block_start

    # -----------------------------------------------------------------------------------------------------
    # Iteration

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        outputs: list[Any] = []
        labels: list[int] | None = [] if self.labeled else None
        indices: list[int] = []
        while len(outputs) < self.batch_size:
            for epoch, index, row in self._take(self.batch_size - len(outputs)):
                where = f"{self._source} row {index}" if not self.streaming else (
                    f"{self._source} rank {self.rank} epoch {epoch} stream position {index}")
                image = decode_image(row[self.image_column], where=where, corrupt_log=self.corrupt_log)
                if image is None:
                    continue
                self._good_this_epoch += 1
                generator = (augment_generator(self.seed, epoch, index) if not self.streaming
                             else augment_generator(self.seed, epoch, index, self.rank))
                outputs.append(self.transform(image, generator))
                if labels is not None:
                    labels.append(int(row[self.label_column]))
                indices.append(index)
        return _collate(outputs, labels, indices)

    def _next_epoch(self) -> None:
        if self._epoch_from_start and self._good_this_epoch == 0:
            raise DataError(f"{self._source}: rank {self.rank} read a whole epoch without one readable image")
        self._epoch += 1
        self._position = 0
        self._good_this_epoch, self._epoch_from_start = 0, True

    def _take(self, count: int) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """Up to `count` (epoch, index, row) from the stream, advancing the state past each."""
        if self.streaming:
            for _ in range(count):
                yield self._stream_next()
            return
        # Roll over lazily, once the previous epoch's last rows have been decoded and counted.
        if self._position >= self.examples_per_epoch:
            self._next_epoch()
        order = self._epoch_order()
        stop = min(self._position + count, len(order))
        chosen = order[self._position:stop].tolist()
        rows = self.dataset[chosen]
        self._position = stop
        for i, index in enumerate(chosen):
            yield self._epoch, index, {key: values[i] for key, values in rows.items()}

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self._epoch:
            permutation = np.random.default_rng([self.seed, self._epoch]).permutation(len(self.dataset))
            used = self.examples_per_epoch * self.world_size
            self._order = permutation[:used][self.rank::self.world_size]
            self._order_epoch = self._epoch
        return self._order

    # Streaming ------------------------------------------------------------------------------------------

    def _reset_stream(self) -> None:
        self._iterator: Iterator[dict[str, Any]] | None = None
        self._block: list[dict[str, Any]] = []
        self._block_pos, self._block_start = 0, 0
        self._block_state: dict[str, Any] | None = None

    def _open_epoch(self, ds_state: dict[str, Any] | None) -> None:
        # Rebuilt every epoch: an IterableDataset that loaded a state restarts from it on every iter().
        # buffer_size=1 shuffles the shard order only; rows are shuffled per block below.
        ds = self.dataset.shuffle(seed=self.seed, buffer_size=1, max_buffer_input_shards=1)
        ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)
        ds.set_epoch(self._epoch)
        if ds_state is not None:
            ds.load_state_dict(ds_state)
        self._epoch_ds = ds
        self._iterator = iter(ds)

    def _read_block(self) -> None:
        """Read and permute the block starting at `_block_start`; the state before reading is saved."""
        assert self._iterator is not None
        block = list(islice(self._iterator, self.shuffle_block))
        block_index = self._block_start // self.shuffle_block
        rng = np.random.default_rng([self.seed, self._epoch, self.rank, block_index])
        permutation = rng.permutation(len(block))
        self._block = [block[i] for i in permutation]
        self._block_pos = 0

    def _stream_next(self) -> tuple[int, int, dict[str, Any]]:
        while self._block_pos >= len(self._block):
            if self._iterator is None:
                self._open_epoch(None)
                self._block_start, self._block_state = 0, None
            else:
                self._block_start = self._position
                # Taken between two reads, so it is exactly the state after `_position` rows.
                self._block_state = self._epoch_ds.state_dict()
            self._read_block()
            if not self._block:
                if self._position == 0:
                    raise DataError(f"{self._source}: rank {self.rank} of {self.world_size} got no examples")
                self._next_epoch()
                self._reset_stream()
        row = self._block[self._block_pos]
        self._block_pos += 1
        self._position += 1
        return self._epoch, self._position - 1, row


class ImageSampler:
    """`sampler(generator)` -> a decoded RGB image at an index drawn from `generator`: the `pair_sampler`
    that `augment.RandAugment` needs for SamplePairing, deterministic like the rest of the transform.
    A corrupt image is skipped for the next index."""

    def __init__(self, dataset: datasets.Dataset, *, corrupt_log: CorruptImageLog | None = None,
                 image_column: str = IMAGE) -> None:
        _check_columns(dataset, image_column)
        self.dataset, self.image_column = dataset, image_column
        self.corrupt_log = CorruptImageLog() if corrupt_log is None else corrupt_log

    def __call__(self, generator: torch.Generator) -> Image.Image:
        start = int(torch.randint(len(self.dataset), (), generator=generator))
        for offset in range(len(self.dataset)):
            index = (start + offset) % len(self.dataset)
            image = decode_image(self.dataset[index][self.image_column], corrupt_log=self.corrupt_log,
                                 where=f"{_source_name(self.dataset)} row {index}")
            if image is not None:
                return image
        raise DataError(f"{_source_name(self.dataset)}: no readable image to sample")


def eval_batches(
    dataset: datasets.Dataset,
    batch_size: int,
    transform: Transform,
    *,
    rank: int = 0,
    world_size: int = 1,
    corrupt_log: CorruptImageLog | None = None,
    image_column: str = IMAGE,
    label_column: str | None = LABEL,
) -> Iterator[Batch]:
    """One pass over this rank's contiguous slice of `dataset`, in order, nothing dropped.

    Slices differ in size by at most one example, so ranks may yield different batch counts and the last
    batch may be short: gather results with their counts (`Batch.indices`), not per batch. Corrupt images
    are skipped, which shortens batches. The transform gets a generator seeded from (0, 0, index).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    if isinstance(dataset, datasets.IterableDataset):
        raise DataError("eval_batches needs a map-style Dataset (an evaluation set fits on disk)")
    columns = _check_columns(dataset, image_column)
    label_column = label_column if label_column is not None and label_column in columns else None
    corrupt_log = CorruptImageLog() if corrupt_log is None else corrupt_log
    source = _source_name(dataset)
    bounds = np.linspace(0, len(dataset), world_size + 1).round().astype(int)
    for start in range(int(bounds[rank]), int(bounds[rank + 1]), batch_size):
        chosen = list(range(start, min(start + batch_size, int(bounds[rank + 1]))))
        rows = dataset[chosen]
        outputs, labels, indices = [], [] if label_column else None, []
        for i, index in enumerate(chosen):
            where = f"{source} row {index}"
            image = decode_image(rows[image_column][i], where=where, corrupt_log=corrupt_log)
            if image is None:
                continue
            outputs.append(transform(image, augment_generator(0, 0, index)))
            if labels is not None:
                labels.append(int(rows[label_column][i]))
            indices.append(index)
        if outputs:
            yield _collate(outputs, labels, indices)
