"""The TwoMoon experiment (§3.1): the data is the paper's, and the recipe runs end to end.

- Data: 2,000 points, 1,000 per moon, 6 labeled with 3 per moon, fixed by the seed index.
- The model is the paper's: 2-8-8-2, sigmoid, every parameter in [-0.1, 0.1].
- `recipes/two_moon.py` (its `main`) writes config.json, results.json, table.txt and the PNG, and the
  numbers in them agree with each other; the Supervised model leaves its initial plateau.
- Seeds, not worker processes, fix the results.
"""

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from mpl_large.config import ConfigError
from mpl_large.experiments.two_moon import METHODS, TwoMoonConfig, make_data, make_mlp, run_seeds

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "two_moon.py"


def load_recipe():
    spec = importlib.util.spec_from_file_location("recipe_two_moon", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("seed", [0, 13])
def test_data_is_two_moons_of_1000_with_3_labeled_each(seed):
    data = make_data(TwoMoonConfig(), seed)
    assert data.x.shape == (2000, 2) and data.x.dtype == torch.float32
    assert torch.bincount(data.y).tolist() == [1000, 1000]
    assert len(data.labeled) == 6 and len(set(data.labeled.tolist())) == 6
    assert torch.bincount(data.y[data.labeled]).tolist() == [3, 3]
    unlabeled = data.unlabeled
    assert len(unlabeled) == 1994 and not set(unlabeled.tolist()) & set(data.labeled.tolist())
    again = make_data(TwoMoonConfig(), seed)
    assert torch.equal(again.x, data.x) and torch.equal(again.labeled, data.labeled)
    other = make_data(TwoMoonConfig(), seed + 1)
    assert not torch.equal(other.x, data.x)


def test_model_is_the_papers():
    model = make_mlp(TwoMoonConfig(), torch.Generator().manual_seed(0))
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(8, 2), (8,), (8, 8), (8,), (2, 8), (2,)]
    assert sum(isinstance(m, torch.nn.Sigmoid) for m in model) == 2
    assert all(p.abs().max() <= 0.1 for p in model.parameters())


def test_config_names_bad_fields():
    with pytest.raises(ConfigError, match="two_moon.figure_seed"):
        TwoMoonConfig(seeds=2, figure_seed=2)
    with pytest.raises(ConfigError, match="mpl.feedback"):
        TwoMoonConfig(feedback="cos")


def test_recipe_writes_table_figure_and_json(tmp_path):
    report = load_recipe().main(["--seeds", "2", "--steps", "1500", "--workers", "2", "--out", str(tmp_path)])

    for name in ("config.json", "results.json", "table.txt", "two_moon.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "two_moon.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "table.txt").read_text()
    for row in ("Supervised", "Pseudo Labels", "Meta Pseudo Labels"):
        assert row in table

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["steps"] == 1500 and saved["config"]["seeds"] == 2
    assert [s["seed"] for s in saved["seeds"]] == [0, 1]
    for method in METHODS:
        accs = [s["accuracy"][method] for s in saved["seeds"]]
        assert all(0.0 <= a <= 1.0 for a in accs)
        summary = saved["summary"][method]
        assert summary["successes"] == sum(a >= 0.95 for a in accs)
        assert summary["mean_accuracy"] == pytest.approx(sum(accs) / 2)
        assert report.summary[method].successes == summary["successes"]
    # 1,500 steps get the Supervised model and the MPL teacher (which also sees the labels) off the
    # initial plateau where every point gets one class (50%): the training loop really trains.
    assert max(s["accuracy"]["supervised"] for s in saved["seeds"]) > 0.6
    assert max(s["mpl_teacher_accuracy"] for s in saved["seeds"]) > 0.6


def test_results_depend_on_seed_not_on_worker_count():
    cfg = TwoMoonConfig(seeds=2, steps=40, unlabeled_batch=16)
    one = run_seeds(dataclasses.replace(cfg, workers=1))
    two = run_seeds(dataclasses.replace(cfg, workers=2))
    for a, b in zip(one, two):
        assert a.accuracy == b.accuracy and a.mpl_h_mean == b.mpl_h_mean
        assert all(torch.equal(a.models["mpl"][k], b.models["mpl"][k]) for k in a.models["mpl"])
