"""The shared trainer through the paper recipes, a few steps each on generated images."""

import importlib.util
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from mpl_large.config import ConfigError, TrainConfig, apply_override
from mpl_large.metrics import evaluate, load_real_labels
from mpl_large.plot import plot_training_accuracy
from images import image_folder

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
TINY = ["--set", "log_every=1", "--no-progress"]


def recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(name: str, argv: list[str]) -> dict:
    module = recipe(name)
    return module.recipe_main(module.config, module.__doc__, argv + TINY)


def test_cifar10_recipe_end_to_end(tmp_path):
    train, test = image_folder(tmp_path / "train", 48), image_folder(tmp_path / "test", 9, seed=1)
    out = tmp_path / "run"
    results = run("cifar10_4k", [
        "--data", str(train), "--eval", str(test), "--out", str(out), "--steps", "2", "--finetune-steps", "1",
        "--set", "batch_size=4", "--set", "finetune.batch_size=4", "--set", "data.num_dropped=6",
        "--set", "data.num_labeled=12", "--set", "teacher.num_classes=3", "--set", "student.num_classes=3",
    ])
    assert {"main", "finetune"} <= results.keys()
    assert 0 <= results["finetune"]["eval_top1"] <= 1
    config = json.loads((out / "config.json").read_text())
    assert config["batch_size"] == 4 and config["data"]["num_labeled"] == 12  # overrides are saved resolved
    assert config["student_optim"]["lr"] == 0.3 and config["mpl"]["uda_factor"] == 1.0  # Table 8
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == ["train", "train", "eval", "finetune", "eval"]
    assert {"h", "baseline", "uda_mask_rate", "teacher_accuracy", "student_accuracy"} <= records[0].keys()
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    student = timm.create_model("wrn_28_2", num_classes=3)
    student.load_state_dict(load_file(out / "model.safetensors"))
    assert plot_training_accuracy([out], tmp_path / "fig.png").stat().st_size > 0


@pytest.mark.parametrize("method", ["uda", "supervised"])
def test_svhn_recipe_baselines_from_parquet(tmp_path, method):
    import datasets

    folder = image_folder(tmp_path / "images", 30)
    ds = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train", cache_dir=str(tmp_path / "c"))
    ds.to_parquet(str(tmp_path / "train.parquet"))
    results = run("svhn_1k", [
        "--data", str(tmp_path / "train.parquet"), "--out", str(tmp_path / "run"), "--method", method,
        "--steps", "2", "--finetune-steps", "0", "--set", "batch_size=4", "--set", "data.num_dropped=3",
        "--set", "data.num_labeled=9", "--set", "teacher.num_classes=3",
    ])
    assert results["method"] == method and "finetune" not in results
    key = "uda_mask_rate" if method == "uda" else "loss"
    assert key in results["main"]


def test_imagenet_recipe_with_real_labels(tmp_path):
    train = image_folder(tmp_path / "train", 12, size=40)
    unlabeled = image_folder(tmp_path / "unlabeled", 8, size=40, seed=2)
    val = image_folder(tmp_path / "val", 6, size=40, seed=3)
    real = tmp_path / "real.json"
    real.write_text(json.dumps([[0], [1, 2], [], [2], [0, 1], []]))
    results = run("imagenet_10pct", [
        "--data", str(train), "--unlabeled", str(unlabeled), "--eval", str(val), "--real-labels", str(real),
        "--out", str(tmp_path / "run"), "--steps", "1", "--finetune-steps", "0",
        "--set", "batch_size=2", "--set", "data.image_size=32", "--set", "data.eval_batch_size=4",
        "--set", "teacher.name=resnet18", "--set", "student.name=resnet18",
        "--set", "teacher.num_classes=3", "--set", "student.num_classes=3",
    ])
    assert 0 <= results["main"]["eval_real_top1"] <= 1


def test_missing_data_path_is_named(tmp_path):
    with pytest.raises(Exception, match="nowhere"):
        run("cifar10_4k", ["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"), "--steps", "1"])


def test_overrides_check_fields_and_types():
    cfg = TrainConfig()
    apply_override(cfg, "data.image_size=64")
    apply_override(cfg, "mpl.feedback=dot")
    apply_override(cfg, "progress=false")
    assert (cfg.data.image_size, cfg.mpl.feedback, cfg.progress) == (64, "dot", False)
    with pytest.raises(ConfigError, match="data.imagesize"):
        apply_override(cfg, "data.imagesize=3")
    with pytest.raises(ConfigError, match="batch_size"):
        apply_override(cfg, "batch_size=big")
    with pytest.raises(ConfigError, match="mpl.feedback"):
        apply_override(cfg, "mpl.feedback=cos")  # the section re-validates


def test_evaluate_against_brute_force():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 7)
    x, y = torch.randn(30, 4), torch.randint(0, 7, (30,))
    real = [[int(c)] if i % 3 else [] for i, c in enumerate(torch.randint(0, 7, (30,)))]
    batches = [(x[i:i + 8], y[i:i + 8], torch.arange(i, min(i + 8, 30))) for i in range(0, 30, 8)]
    out = evaluate(model, batches, real)
    logits = model(x)
    ranked = logits.argsort(dim=-1, descending=True)
    assert out["top1"] == pytest.approx(sum(int(ranked[i, 0] == y[i]) for i in range(30)) / 30)
    assert out["top5"] == pytest.approx(sum(int(y[i] in ranked[i, :5]) for i in range(30)) / 30)
    kept = [i for i in range(30) if real[i]]
    assert out["real_top1"] == pytest.approx(sum(int(ranked[i, 0]) in real[i] for i in kept) / len(kept))


def test_real_labels_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="real.json"):
        load_real_labels(tmp_path / "real.json", 3)
    (tmp_path / "real.json").write_text("[[1], [2]]")
    with pytest.raises(ValueError, match="2 entries"):
        load_real_labels(tmp_path / "real.json", 3)
