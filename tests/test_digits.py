"""The digits SSL benchmark: its split is what the issue asks for, its model is registered with timm, and the
recipe runs end to end.

- Split: a fixed test set (the same for every seed); 100 labeled images, 10 per class, drawn by the split
  seed; the unlabeled set is everything else, without labels; the init seed is another number.
- `digits_cnn` is built by name with the data's input size, mean and std.
- `recipes/digits_ssl.py` (its `main`) writes config.json, results.json and table.txt that agree; worker
  processes do not change the numbers.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from mpl_large.config import ConfigError
from mpl_large.experiments.digits import (
    INIT_SEED_OFFSET,
    METHODS,
    DigitsConfig,
    load_digit_images,
    make_split,
    make_streams,
)

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "digits_ssl.py"


def load_recipe():
    spec = importlib.util.spec_from_file_location("recipe_digits_ssl", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def digits():
    return load_digit_images()


def test_images_are_the_real_digits(digits):
    images, labels = digits
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert images.min() == 0 and images.max() == 255
    assert np.bincount(labels).min() >= 170 and len(np.bincount(labels)) == 10


def test_split_fixed_test_balanced_labeled_disjoint(digits):
    _, labels = digits
    cfg = DigitsConfig()
    splits = [make_split(cfg, labels, seed) for seed in (0, 1, 7)]
    for split in splits:
        assert np.array_equal(split.test, splits[0].test)  # fixed: independent of the seed
        assert np.bincount(labels[split.test], minlength=10).tolist() == [50] * 10
        assert len(split.labeled) == 100
        assert np.bincount(labels[split.labeled], minlength=10).tolist() == [10] * 10
        parts = [set(split.test.tolist()), set(split.labeled.tolist()), set(split.unlabeled.tolist())]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert len(parts[0] | parts[1] | parts[2]) == 1797
    assert not np.array_equal(splits[0].labeled, splits[1].labeled)
    assert np.array_equal(make_split(cfg, labels, 1).labeled, splits[1].labeled)  # a function of the seed


def test_split_seed_is_not_the_init_seed(digits):
    _, labels = digits
    cfg = DigitsConfig()
    for seed in (0, 3):
        for method in ("supervised", "uda", "mpl"):
            assert cfg.train_config(method, seed).seed == INIT_SEED_OFFSET + seed
    # The split takes only the split seed: the init seed of seed index 0 gives another split.
    assert not np.array_equal(make_split(cfg, labels, 0).labeled, make_split(cfg, labels, INIT_SEED_OFFSET).labeled)


def test_streams_hold_no_unlabeled_labels(digits):
    images, labels = digits
    cfg = DigitsConfig(batch_size=8, mu=2)
    split = make_split(cfg, labels, 0)
    streams = make_streams(cfg.train_config("mpl", 0), images, labels, split)
    assert "label" not in streams.unlabeled.column_names
    assert len(streams.unlabeled) == len(split.unlabeled) and streams.eval_size() == 500
    batch = next(streams.mixed())
    assert batch.x_l.shape == (8, 3, 8, 8) and batch.x_u.shape == batch.x_u_aug.shape == (16, 3, 8, 8)
    assert not torch.equal(batch.x_u, batch.x_u_aug)
    tuning = make_streams(cfg.train_config("mpl", 0), images, labels, split, eval_on="unlabeled")
    assert tuning.eval_size() == len(split.unlabeled)  # tuning scores on the unlabeled images, not the test set
    assert batch.y_l.dtype == torch.int64 and 0 <= batch.y_l.min() and batch.y_l.max() < 10


def test_model_registered_with_the_datas_config(digits):
    images, _ = digits
    model = timm.create_model("digits_cnn", num_classes=10, drop_rate=0.3)
    assert model(torch.randn(4, 3, 8, 8)).shape == (4, 10)
    assert timm.create_model("digits_cnn", in_chans=1, num_classes=3)(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    cfg = timm.models.get_pretrained_cfg("digits_cnn")
    assert cfg.input_size == (3, 8, 8)
    scaled = images / 255.0
    assert cfg.mean == pytest.approx((scaled.mean(),) * 3, abs=1e-4)
    assert cfg.std == pytest.approx((scaled.std(),) * 3, abs=1e-4)
    with pytest.raises(RuntimeError, match="No pretrained weights exist for digits_cnn"):
        timm.create_model("digits_cnn", pretrained=True)  # an export's file loads: tests/test_export.py


def test_config_names_bad_fields():
    with pytest.raises(ConfigError, match="digits.seeds"):
        DigitsConfig(seeds=0)
    with pytest.raises(ConfigError, match="mpl.feedback"):
        DigitsConfig(feedback="cos")


def test_recipe_writes_table_and_json(tmp_path):
    recipe = load_recipe()
    args = ["--seeds", "1", "--steps", "3", "--finetune-steps", "2"]
    report = recipe.main([*args, "--workers", "1", "--out", str(tmp_path / "a")])

    for name in ("config.json", "results.json", "table.txt"):
        assert (tmp_path / "a" / name).stat().st_size > 0, name
    table = (tmp_path / "a" / "table.txt").read_text()
    for row in ("Supervised", "UDA (teacher alone)", "MPL (UDA teacher)", "MPL + finetune"):
        assert row in table
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["config"]["steps"] == 3 and saved["config"]["seeds"] == 1
    assert set(saved["summary"]) == set(METHODS)
    for method in METHODS:
        summary = saved["summary"][method]
        assert 0.0 <= summary["mean"] <= 1.0 and summary["std"] == 0.0
        assert summary["mean"] == report.summary[method].mean
    assert saved["summary"]["mpl_finetune"]["steps"] == 5 and saved["summary"]["uda"]["steps"] == 3
    ft, uda = saved["summary"]["mpl_finetune"], saved["summary"]["uda"]
    assert ft["vs_uda_mean"] == pytest.approx(ft["top1"][0] - uda["top1"][0]) and uda["vs_uda_mean"] == 0.0

    # Two worker processes give the same numbers as one.
    again = recipe.main([*args, "--workers", "2", "--out", str(tmp_path / "b")])
    assert {k: s.top1 for k, s in again.summary.items()} == {k: s.top1 for k, s in report.summary.items()}
