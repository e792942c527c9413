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

Workers: the order above is planned in this process, in chunks of `batch_size` examples (`_MapOrder`,
`_StreamOrder`); a `torch.utils.data.DataLoader` hands the chunks to `workers` processes (`_Decoder`), each
`prefetch` chunks ahead. Nothing a worker does depends on which worker it is, so batches are the same for any
number of workers; the state is that of the last example handed out, never of the prefetched ones, and a
corrupt image a worker skipped is counted and logged here as its batch is handed out. (torchdata's
`StatefulDataLoader` would snapshot the sampler and workers instead; the position alone already determines
everything here.)
"""

from __future__ import annotations

import contextlib
import dataclasses
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
        workers: processes that decode and transform (a `torch.utils.data.DataLoader`'s workers, started
            at the first batch, each `prefetch` chunks ahead); 0: in this process, when a batch is asked for.
        pin_memory: hand out batches in page-locked memory, for non-blocking copies to a CUDA device.
        prefetch: chunks of `batch_size` examples each worker prepares ahead.
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
        workers: int = 0,
        pin_memory: bool = False,
        prefetch: int = 2,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if shuffle_block < 1:
            raise ValueError(f"shuffle_block must be >= 1, got {shuffle_block}")
        if workers < 0 or prefetch < 1:
            raise ValueError(f"need workers >= 0 and prefetch >= 1, got {workers}, {prefetch}")
        columns = _check_columns(dataset, image_column)
        self.dataset = dataset
        self.batch_size, self.transform, self.seed = batch_size, transform, seed
        self.rank, self.world_size, self.shuffle_block = rank, world_size, shuffle_block
        self.workers, self.pin_memory, self.prefetch = workers, pin_memory, prefetch
        self.image_column = image_column
        self.label_column = label_column if label_column is not None and label_column in columns else None
        self.corrupt_log = CorruptImageLog() if corrupt_log is None else corrupt_log
        self.streaming = isinstance(dataset, datasets.IterableDataset)
        self._source = _source_name(dataset)
        if not self.streaming:
            self.examples_per_epoch = len(dataset) // world_size
            """Examples this rank visits per epoch (equal on every rank)."""
            if self.examples_per_epoch == 0:
                raise DataError(f"{self._source}: {len(dataset)} examples cannot be shared by "
                                f"{world_size} ranks")
        self._state: dict[str, Any] = {"epoch": 0, "position": 0}
        if self.streaming:
            self._state.update(block_start=0, block_state=None)
        self._good_this_epoch, self._epoch_from_start = 0, True
        self._order: _StreamOrder | _MapOrder | None = None
        self._chunks: Iterator[_Decoded] | None = None
        self._pending: _Decoded | None = None
        self._pending_next = 0

    @property
    def labeled(self) -> bool:
        return self.label_column is not None

    # -----------------------------------------------------------------------------------------------------
    # State

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands after the last batch handed out (examples prefetched by workers but not
        yet handed out are not part of it); plain Python data (picklable, JSON-able)."""
        state = {**self._state, "seed": self.seed, "rank": self.rank, "world_size": self.world_size}
        if self.streaming:
            state["shuffle_block"] = self.shuffle_block
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; the stream must have been built with the same arguments."""
        keys = ("seed", "rank", "world_size") + (("shuffle_block",) if self.streaming else ())
        for key in keys:
            if key in state and state[key] != getattr(self, key):
                raise DataError(f"cannot resume: state has {key}={state[key]!r}, this stream has "
                                f"{key}={getattr(self, key)!r}; the order would differ")
        self.close()
        self._state = {"epoch": int(state["epoch"]), "position": int(state["position"])}
        if self.streaming:
            self._state.update(block_start=int(state["block_start"]), block_state=state["block_state"])
        self._good_this_epoch, self._epoch_from_start = 0, self._state["position"] == 0

    def close(self) -> None:
        """Stop the workers now (not at garbage collection); the next batch starts them again from the state.
        Idempotent."""
        # Dropping the DataLoader's iterator (its only reference) shuts its workers down and joins them.
        self._chunks, self._order, self._pending, self._pending_next = None, None, None, 0

    # -----------------------------------------------------------------------------------------------------
    # Iteration

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        """The next `batch_size` readable examples in stream order. Examples arrive in chunks, decoded by the
        workers; the stream's position advances past each example, corrupt or not, as it is taken."""
        parts: list[tuple[_Decoded, int, int]] = []  # (chunk, first good row, end good row) taken
        need = self.batch_size
        while need:
            chunk, k = self._next_chunk()
            first = chunk.good_before(k)
            while k < len(chunk.items) and need:
                epoch, position, block = chunk.items[k]
                self._enter_epoch(epoch)
                for where, description in chunk.corrupt[k]:
                    self.corrupt_log.add(where, description)
                if chunk.good[k]:
                    self._good_this_epoch += 1
                    need -= 1
                self._state = {"epoch": epoch, "position": position + 1}
                if self.streaming:
                    assert self._order is not None and isinstance(self._order, _StreamOrder)
                    self._state.update(self._order.block(block))
                k += 1
            parts.append((chunk, first, chunk.good_before(k)))
            self._pending, self._pending_next = (chunk, k) if k < len(chunk.items) else (None, 0)
        return self._assemble(parts)

    def _next_chunk(self) -> tuple[_Decoded, int]:
        if self._pending is not None:
            return self._pending, self._pending_next
        if self._chunks is None:
            self._order = (_StreamOrder(self) if self.streaming else _MapOrder(self))
            decoder = _Decoder(self)
            # Our own generator: the DataLoader draws its workers' base seed from it, not from the global RNG
            # that the training step samples from (nothing here uses the worker seeds: every draw comes from
            # the per-example generator).
            loader = torch.utils.data.DataLoader(
                decoder, batch_size=None, sampler=self._order, num_workers=self.workers,
                collate_fn=_identity, pin_memory=self.pin_memory, generator=torch.Generator().manual_seed(0),
                prefetch_factor=self.prefetch if self.workers else None)
            self._chunks = iter(loader)
        return next(self._chunks), 0

    def _enter_epoch(self, epoch: int) -> None:
        if epoch == self._state["epoch"]:
            return
        if self._epoch_from_start and self._good_this_epoch == 0:
            raise DataError(f"{self._source}: rank {self.rank} read a whole epoch without one readable image")
        self._good_this_epoch, self._epoch_from_start = 0, True

    def _assemble(self, parts: list[tuple[_Decoded, int, int]]) -> Batch:
        if len(parts) == 1 and parts[0][1] == 0 and parts[0][2] == len(parts[0][0].indices):
            chunk = parts[0][0]  # the usual case: one chunk whole, as the workers (and pinning) left it
            return Batch(chunk.inputs, chunk.labels, chunk.indices)
        parts = [p for p in parts if p[2] > p[1]]

        def cat(get):
            tensor = torch.cat([get(c)[a:b] for c, a, b in parts])
            return tensor.pin_memory() if self.pin_memory else tensor

        views = parts[0][0].inputs
        inputs = (tuple(cat(lambda c, v=v: c.inputs[v]) for v in range(len(views))) if isinstance(views, tuple)
                  else cat(lambda c: c.inputs))
        labels = cat(lambda c: c.labels) if self.labeled else None
        return Batch(inputs, labels, cat(lambda c: c.indices))


def _identity(chunk):
    return chunk


@dataclass
class _Decoded:
    """A chunk of consecutive stream examples, decoded and transformed by a worker: the readable ones stacked,
    and for every example, corrupt or not, its place in the stream and the images skipped while making it."""

    inputs: Any
    labels: torch.Tensor | None
    indices: torch.Tensor
    items: list[tuple[int, int, int]]
    """(epoch, position in the epoch, streaming block id) of every example of the chunk."""
    good: list[bool]
    corrupt: list[list[tuple[str, str]]]
    """Per example: (where, error) of each image skipped (the example's own, or a SamplePairing partner's)."""

    def good_before(self, k: int) -> int:
        return sum(self.good[:k])

    def pin_memory(self) -> _Decoded:  # called by the DataLoader's pinning thread
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        inputs = tuple(map(pin, self.inputs)) if isinstance(self.inputs, tuple) else pin(self.inputs)
        return dataclasses.replace(self, inputs=inputs, labels=pin(self.labels), indices=pin(self.indices))


class _Decoder:
    """What the workers run: `decoder[chunk]` decodes and transforms a chunk of (epoch, position, index,
    block, row) planned by the stream's order. A map-style chunk carries row indices and is read here, in
    the worker; a streaming chunk carries its undecoded rows (the stream is read once, in order, in the main
    process). Randomness comes only from the per-(seed, epoch, index) generator, so which process decodes
    an example changes nothing."""

    def __init__(self, stream: BatchStream) -> None:
        self.dataset = None if stream.streaming else stream.dataset
        self.transform, self.seed, self.rank, self.streaming = stream.transform, stream.seed, stream.rank, stream.streaming
        self.image_column, self.label_column = stream.image_column, stream.label_column
        self.corrupt_log, self.source = stream.corrupt_log, stream._source

    def __getitem__(self, chunk: list[tuple[int, int, int, int, dict | None]]) -> _Decoded:
        if self.dataset is not None:
            columns = self.dataset[[index for _, _, index, _, _ in chunk]]
            rows = [{key: values[i] for key, values in columns.items()} for i in range(len(chunk))]
        else:
            rows = [row for *_, row in chunk]
        outputs, labels, indices, good, corrupt = [], [], [], [], []
        for (epoch, _, index, _, _), row in zip(chunk, rows):
            where = (f"{self.source} rank {self.rank} epoch {epoch} stream position {index}" if self.streaming
                     else f"{self.source} row {index}")
            with self.corrupt_log.deferred() as skipped:
                image = decode_image(row[self.image_column], where=where, corrupt_log=self.corrupt_log)
                if image is not None:
                    generator = (augment_generator(self.seed, epoch, index, self.rank) if self.streaming
                                 else augment_generator(self.seed, epoch, index))
                    outputs.append(self.transform(image, generator))
                    if self.label_column is not None:
                        labels.append(int(row[self.label_column]))
                    indices.append(index)
            good.append(image is not None)
            corrupt.append(skipped)
        batch = _collate(outputs, labels if self.label_column is not None else None, indices) if outputs else None
        return _Decoded(batch.inputs if batch else None, batch.labels if batch else None,
                        batch.indices if batch else torch.empty(0, dtype=torch.int64),
                        [(e, p, b) for e, p, _, b, _ in chunk], good, corrupt)


class _MapOrder:
    """The map-style order from the stream's state on, in chunks of `batch_size` (epoch, position, row, -1,
    None): epoch e visits the permutation drawn from (seed, e), dealt round-robin to the ranks."""

    def __init__(self, stream: BatchStream) -> None:
        self.stream = stream
        self.epoch, self.position = stream._state["epoch"], stream._state["position"]

    def __iter__(self) -> Iterator[list]:
        s = self.stream
        while True:
            chunk: list = []
            while len(chunk) < s.batch_size:
                if self.position >= s.examples_per_epoch:
                    self.epoch, self.position = self.epoch + 1, 0
                order = self._epoch_order(self.epoch)
                stop = min(self.position + s.batch_size - len(chunk), len(order))
                chunk += [(self.epoch, p, int(order[p]), -1, None) for p in range(self.position, stop)]
                self.position = stop
            yield chunk

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if getattr(self, "_order_epoch", None) != epoch:
            s = self.stream
            permutation = np.random.default_rng([s.seed, epoch]).permutation(len(s.dataset))
            used = s.examples_per_epoch * s.world_size
            self._order = permutation[:used][s.rank::s.world_size]
            self._order_epoch = epoch
        return self._order


class _StreamOrder:
    """The streaming order from the stream's state on, in chunks of `batch_size` (epoch, position, position,
    block id, row), read in this process. Each block's starting state is kept by id until the stream has
    moved past it, so the stream's `state_dict` can name the block an example came from."""

    def __init__(self, stream: BatchStream) -> None:
        self.stream = stream
        state = stream._state
        self.epoch, self.position = state["epoch"], state["position"]
        self._blocks: dict[int, dict[str, Any]] = {}
        self._block_id = 0
        self._iterator: Iterator[dict[str, Any]] | None = None
        self._block: list[dict[str, Any]] = []
        self._block_pos = 0
        if state["position"] or state["block_state"] is not None:
            self._open_epoch(state["block_state"])
            with _no_shuffle_buffer_warning():  # the loaded state takes effect on the first read
                self._read_block(state["block_start"], state["block_state"])
            self._block_pos = self.position - state["block_start"]

    def block(self, block_id: int) -> dict[str, Any]:
        """{block_start, block_state} of a block; older blocks are forgotten (the stream is past them)."""
        for old in [k for k in self._blocks if k < block_id]:
            del self._blocks[old]
        return self._blocks[block_id]

    def __iter__(self) -> Iterator[list]:
        s = self.stream
        while True:
            chunk = []
            for _ in range(s.batch_size):
                row = self._next_row()
                chunk.append((self.epoch, self.position - 1, self.position - 1, self._block_id, row))
            yield chunk

    def _open_epoch(self, ds_state: dict[str, Any] | None) -> None:
        # Rebuilt every epoch: an IterableDataset that loaded a state restarts from it on every iter().
        # buffer_size=1 shuffles the shard order only; rows are shuffled per block below.
        s = self.stream
        ds = s.dataset.shuffle(seed=s.seed, buffer_size=1, max_buffer_input_shards=1)
        ds = split_dataset_by_node(ds, rank=s.rank, world_size=s.world_size)
        ds.set_epoch(self.epoch)
        if ds_state is not None:
            ds.load_state_dict(ds_state)
        self._epoch_ds = ds
        self._iterator = iter(ds)

    def _read_block(self, block_start: int, block_state: dict[str, Any] | None) -> None:
        """Read and permute the block starting at `block_start`; `block_state`: the state before reading."""
        s = self.stream
        assert self._iterator is not None
        block = list(islice(self._iterator, s.shuffle_block))
        rng = np.random.default_rng([s.seed, self.epoch, s.rank, block_start // s.shuffle_block])
        self._block = [block[i] for i in rng.permutation(len(block))]
        self._block_pos = 0
        self._block_id += 1
        self._blocks[self._block_id] = {"block_start": block_start, "block_state": block_state}

    def _next_row(self) -> dict[str, Any]:
        s = self.stream
        while self._block_pos >= len(self._block):
            if self._iterator is None:
                self._open_epoch(None)
                self._read_block(0, None)
            else:
                # Taken between two reads, so it is exactly the state after `position` rows.
                self._read_block(self.position, self._epoch_ds.state_dict())
            if not self._block:
                if self.position == 0:
                    raise DataError(f"{s._source}: rank {s.rank} of {s.world_size} got no examples")
                self.epoch, self.position, self._iterator = self.epoch + 1, 0, None
        row = self._block[self._block_pos]
        self._block_pos += 1
        self.position += 1
        return row


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
