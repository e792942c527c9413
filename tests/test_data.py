"""Data sources, the paper's splits, and the deterministic, resumable, rank-sharded batch stream.

Every dataset is generated in tmp_path. Images are 4x4 PNGs whose pixels all equal the example's id, so a
decoded batch says which examples it holds.
"""

from __future__ import annotations

import io
import json
import logging
import random

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from mpl_large.data.loader import BatchStream, ImageSampler, eval_batches
from mpl_large.data.sources import CorruptImageLog, DataError, decode_image, load_images
from mpl_large.data.splits import (
    class_histogram,
    fraction_split,
    held_out_rows,
    held_out_shards,
    paper_split,
    paper_validation,
    shard_fraction,
    shard_split,
)

datasets.disable_progress_bars()


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def in_memory(n: int, *, labels: list[int] | None = None, corrupt: tuple[int, ...] = ()) -> datasets.Dataset:
    """n undecoded images with ids 0..n-1 (rows in `corrupt` hold random bytes), labels id % 3 by default."""
    rng = random.Random(0)
    images = [{"bytes": rng.randbytes(40) if i in corrupt else png(i), "path": None} for i in range(n)]
    features = datasets.Features(image=datasets.Image(decode=False), label=datasets.Value("int64"))
    labels = labels if labels is not None else [i % 3 for i in range(n)]
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def ident(img: Image.Image, generator: torch.Generator) -> torch.Tensor:
    """(image id, one draw from the per-example generator): shows order and augmentation randomness."""
    return torch.tensor([float(np.asarray(img)[0, 0, 0]), float(torch.rand((), generator=generator))])


def two_views(img: Image.Image, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return ident(img, generator), ident(img, generator)


def ids(batch) -> list[int]:
    inputs = batch.inputs[0] if isinstance(batch.inputs, tuple) else batch.inputs
    return inputs[:, 0].long().tolist()


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.indices, y.indices)
        for vx, vy in zip(x.inputs, y.inputs):
            assert torch.equal(vx, vy)
        assert (x.labels is None and y.labels is None) or torch.equal(x.labels, y.labels)


@pytest.fixture
def folder(tmp_path):
    """Image folder: 3 classes x 2 images (ids 10*class + i) and one corrupt .png in class b."""
    root = tmp_path / "folder"
    for c, name in enumerate("abc"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            (root / name / f"{i}.png").write_bytes(png(10 * c + i))
    (root / "b" / "broken.png").write_bytes(random.Random(1).randbytes(200))
    return root


@pytest.fixture
def parquet_shards(tmp_path):
    """4 parquet shards of 12 rows each (ids 0..47), columns `img` and `y`."""
    full = in_memory(48).rename_columns({"image": "img", "label": "y"}).cast_column("img", datasets.Image())
    paths = []
    for k in range(4):
        paths.append(tmp_path / "shards" / f"part-{k}.parquet")
        full.shard(4, k, contiguous=True).to_parquet(str(paths[-1]))
    return paths


# ---------------------------------------------------------------------------------------------------------
# Sources


def test_load_image_folder(folder, tmp_path):
    ds = load_images(folder, cache_dir=tmp_path / "cache")
    assert ds.column_names == ["image", "label"]
    assert ds.features["image"] == datasets.Image(decode=False)
    assert ds.features["label"].names == ["a", "b", "c"]
    assert len(ds) == 7
    assert ds[0]["image"]["path"].endswith(".png")  # undecoded: the loader decodes


def test_load_parquet_file_dir_glob_list_and_streaming(parquet_shards, tmp_path):
    cache = tmp_path / "cache"
    kw = dict(image_column="img", label_column="y", cache_dir=cache)
    forms = [parquet_shards[0], parquet_shards[0].parent, str(parquet_shards[0].parent / "part-*.parquet"),
             parquet_shards]
    for form, rows in zip(forms, [12, 48, 48, 48]):
        ds = load_images(form, **kw)
        assert ds.column_names == ["image", "label"] and len(ds) == rows
        assert decode_image(ds[1]["image"]).getpixel((0, 0)) == (1, 1, 1)
    stream = load_images(parquet_shards, streaming=True, **kw)
    assert isinstance(stream, datasets.IterableDataset) and stream.num_shards == 4
    assert sorted(ex["label"] for ex in stream) == sorted(i % 3 for i in range(48))


def test_load_arrow_and_saved_dataset(tmp_path):
    src = in_memory(6)
    datasets.DatasetDict(train=src, test=src.select(range(2))).save_to_disk(str(tmp_path / "dict"))
    assert len(load_images(tmp_path / "dict", split="test")) == 2
    with pytest.raises(DataError, match="no split 'validation'.*'test', 'train'"):
        load_images(tmp_path / "dict", split="validation")
    src.save_to_disk(str(tmp_path / "saved"))
    assert len(load_images(tmp_path / "saved")) == 6
    assert len(load_images(str(tmp_path / "saved" / "*.arrow"), cache_dir=tmp_path / "cache")) == 6
    stream = load_images(tmp_path / "saved", streaming=True, labeled=False)
    assert [decode_image(ex["image"]).getpixel((0, 0))[0] for ex in stream] == list(range(6))


def test_missing_path_names_it(tmp_path):
    with pytest.raises(DataError, match="does not exist: .*nowhere"):
        load_images(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no files match .*nothing-\\*.parquet"):
        load_images(str(tmp_path / "nothing-*.parquet"))


def test_no_label_column_names_column_and_file(parquet_shards, tmp_path):
    message = r"part-0.parquet: no label column 'label'.*columns found: \['img', 'y'\]"
    with pytest.raises(DataError, match=message):
        load_images(parquet_shards[0], image_column="img", cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="no image column 'image'"):
        load_images(parquet_shards[0], labeled=False, cache_dir=tmp_path / "cache")
    unlabeled = load_images(parquet_shards[0], image_column="img", labeled=False, cache_dir=tmp_path / "cache")
    assert unlabeled.column_names == ["image"]


def test_decode_image_reports_location_without_path(caplog):
    log = CorruptImageLog()
    with caplog.at_level(logging.WARNING):
        value = {"bytes": b"not an image", "path": None}
        assert decode_image(value, where="x.parquet row 7", corrupt_log=log) is None
    assert log.count == 1 and log.records == ["x.parquet row 7"]
    assert "x.parquet row 7" in caplog.text
    assert decode_image(png(3)).mode == "RGB"


# ---------------------------------------------------------------------------------------------------------
# BatchStream (map-style)


def test_corrupt_image_counted_logged_skipped(folder, tmp_path, caplog):
    ds = load_images(folder, cache_dir=tmp_path / "cache")
    stream = BatchStream(ds, 4, ident, seed=0)
    with caplog.at_level(logging.WARNING):
        batches = [next(stream) for _ in range(6)]  # 24 good images: 4 epochs of 6 good + 1 corrupt
    assert all(len(b.indices) == 4 for b in batches)  # refilled, never short
    # Once per epoch read to its end: 3 epochs, plus the 4th if its broken file came before its last image.
    assert stream.corrupt_log.count in (3, 4)
    assert caplog.text.count("skipping unreadable image") == stream.corrupt_log.count
    assert stream.corrupt_log.records[0].endswith("broken.png")
    assert "broken.png" in caplog.text
    seen = sorted(set(i for b in batches for i in ids(b)))
    assert seen == [0, 1, 10, 11, 20, 21]
    for b in batches:  # labels follow the images through the shuffle
        assert b.labels.tolist() == [i // 10 for i in ids(b)]


def test_same_seed_same_order_different_seed_differs():
    ds = in_memory(40)

    def run(seed):
        stream = BatchStream(ds, 8, ident, seed=seed)
        batches = [next(stream) for _ in range(5)]
        return torch.cat([torch.cat([b.indices.float(), b.inputs[:, 1]]) for b in batches])

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    first_epoch = next(BatchStream(ds, 40, ident, seed=1)).indices.tolist()
    assert sorted(first_epoch) == list(range(40)) and first_epoch != list(range(40))


@pytest.mark.parametrize("n, world_size", [(10, 2), (11, 3)])
def test_ranks_get_equal_disjoint_slices(n, world_size):
    ds = in_memory(n)
    per_rank = n // world_size
    slices = [next(BatchStream(ds, per_rank, ident, seed=5, rank=r, world_size=world_size)).indices.tolist()
              for r in range(world_size)]
    flat = [i for s in slices for i in s]
    assert len(flat) == len(set(flat)) == per_rank * world_size  # disjoint, equal sizes
    if n % world_size == 0:
        assert sorted(flat) == list(range(n))  # together they cover the epoch


def test_resume_mid_epoch_gives_identical_batches():
    ds = in_memory(23, corrupt=(4,))
    original = BatchStream(ds, 5, two_views, seed=3)
    for _ in range(2):
        next(original)
    state = json.loads(json.dumps(original.state_dict()))  # a checkpoint round trip
    expected = [next(original) for _ in range(6)]  # runs across three epoch boundaries
    resumed = BatchStream(ds, 5, two_views, seed=3)
    resumed.load_state_dict(state)
    assert_same_batches([next(resumed) for _ in range(6)], expected)
    # The two views of an example differ, and the same example differs between epochs (new generator).
    views = expected[0].inputs
    assert not torch.equal(views[0][:, 1], views[1][:, 1])
    with pytest.raises(DataError, match="seed"):
        BatchStream(ds, 5, two_views, seed=4).load_state_dict(state)


def test_eval_batches_cover_each_row_once_in_order():
    ds = in_memory(11)
    per_rank = [[i for b in eval_batches(ds, 2, ident, rank=r, world_size=3) for i in b.indices.tolist()]
                for r in range(3)]
    assert [i for s in per_rank for i in s] == list(range(11))


def test_image_sampler_is_a_function_of_the_generator():
    sampler = ImageSampler(in_memory(9, corrupt=(2,)))
    draws = [np.asarray(sampler(torch.Generator().manual_seed(s)))[0, 0, 0] for s in range(20)]
    assert draws == [np.asarray(sampler(torch.Generator().manual_seed(s)))[0, 0, 0] for s in range(20)]
    assert 2 not in draws


# ---------------------------------------------------------------------------------------------------------
# BatchStream (streaming)


def test_streaming_order_ranks_and_resume(parquet_shards):
    stream_ds = load_images(parquet_shards, streaming=True, image_column="img", label_column="y")
    kw = dict(seed=7, shuffle_block=5)
    epoch = ids(next(BatchStream(stream_ds, 48, ident, **kw)))
    assert sorted(epoch) == list(range(48)) and epoch != list(range(48))

    ranks = [ids(next(BatchStream(stream_ds, 24, ident, rank=r, world_size=2, **kw))) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == list(range(48))  # 4 shards -> 2 per rank, disjoint

    original = BatchStream(stream_ds, 7, two_views, **kw)
    states, batches = [], []
    for _ in range(16):  # 112 examples: past two epoch boundaries
        states.append(original.state_dict())
        batches.append(next(original))
    for k in (3, 7, 13):  # mid-block, mid-epoch, second epoch
        resumed = BatchStream(stream_ds, 7, two_views, **kw)
        resumed.load_state_dict(json.loads(json.dumps(states[k])))
        assert_same_batches([next(resumed) for _ in range(16 - k)], batches[k:])
    # A stream resumed from a resumed stream's state is still exact.
    resumed = BatchStream(stream_ds, 7, two_views, **kw)
    resumed.load_state_dict(states[3])
    next(resumed)
    again = BatchStream(stream_ds, 7, two_views, **kw)
    again.load_state_dict(resumed.state_dict())
    assert_same_batches([next(again) for _ in range(12)], batches[4:])


# ---------------------------------------------------------------------------------------------------------
# Splits


def test_paper_split_drops_first_then_labels_next():
    ds = in_memory(30).add_column("id", list(range(30)))
    labeled, unlabeled = paper_split(ds, num_labeled=8, num_dropped=5)
    assert labeled["id"][:] == list(range(5, 13))
    assert unlabeled["id"][:] == list(range(13, 30)) and "label" not in unlabeled.column_names
    assert paper_validation(ds, num_dropped=5)["id"][:] == list(range(5))
    _, with_labeled = paper_split(ds, num_labeled=8, num_dropped=5, include_labeled_in_unlabeled=True)
    assert with_labeled["id"][:] == list(range(5, 30))
    with pytest.raises(DataError, match="needs 40"):
        paper_split(ds, num_labeled=35, num_dropped=5)


def test_paper_split_labeled_prefix_is_class_imbalanced():
    # Rows in source order whose leading labels are not balanced, as in CIFAR-10's first batch files.
    labels = [0, 1, 2] * 2 + [0, 0, 1, 0, 2, 0, 1, 0, 0] + [1, 2] * 10
    labeled, _ = paper_split(in_memory(len(labels), labels=labels), num_labeled=9, num_dropped=6)
    assert class_histogram(labeled, num_classes=3) == [6, 2, 1]
    assert class_histogram(in_memory(30)) == [10, 10, 10]


def test_shard_fraction_and_held_out():
    names = [f"train-{i:05d}-of-01024" for i in range(1024)]
    shuffled = random.Random(0).sample(names, len(names))
    assert shard_fraction(shuffled, 10) == names[:102]
    assert len(shard_fraction(names, 20)) == 204  # floor(204.8), the paper's count
    assert held_out_shards(shuffled) == names[-20:]
    assert shard_fraction(names, 100) == names[:-20]  # held-out shards never train
    split = shard_split(names, 10)
    assert split.labeled == names[:102] and split.unlabeled == names[102:1004]
    assert split.held_out == names[1004:]
    # Natural order: s2 before s10.
    assert shard_fraction([f"s{i}" for i in range(30)], 10, num_held_out=2) == ["s0", "s1", "s2"]


def test_fraction_split_rows():
    ds = in_memory(40).add_column("id", list(range(40)))
    labeled, unlabeled = fraction_split(ds, 25, num_held_out=4)
    assert labeled["id"][:] == list(range(10)) and unlabeled["id"][:] == list(range(10, 36))
    assert held_out_rows(ds, 4)["id"][:] == [36, 37, 38, 39]


@pytest.mark.parametrize("setting,size", [(None, 16), (True, 16), (False, None)])
def test_cutout_setting_reaches_the_strong_view(tmp_path, setting, size):
    from images import image_folder

    import mpl_large.models  # noqa: F401  (registers the default wrn_28_2, whose normalisation Streams reads)
    from mpl_large.config import DataConfig, TrainConfig
    from mpl_large.data.pipeline import Streams

    folder = image_folder(tmp_path / "images", 6)
    cfg = TrainConfig(batch_size=2, data=DataConfig(labeled=str(folder), split="auto", augment="svhn", cutout=setting))
    cutout = Streams.from_config(cfg, shard=(0, 1)).strong.cutout
    assert (cutout and cutout.size) == size
