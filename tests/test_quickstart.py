"""The README's quickstart on a generated image folder, end to end: `mpl-train` on the folder alone (classes and
names from the data, a held-out tenth, labeled images as unlabeled), best checkpoint and EMA, a resume from the
saved config.json with more steps, `mpl-export` (label names, ModelCard metadata, the card's snippet run as
written in a fresh interpreter) and `mpl-eval` on the run and on the export. Plus the split and EMA units."""

import json
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from mpl_large import commands
from mpl_large.checkpoint import sha256
from mpl_large.data.sources import DataError, load_images
from mpl_large.data.splits import holdout_split
from mpl_large.ema import ModelEMA
from images import image_folder

TINY = ["--set", "teacher.name=digits_cnn", "--set", "student.name=digits_cnn", "--image-size", "8",
        "--set", "batch_size=6", "--set", "log_every=1", "--no-progress", "--trackers"]


def test_own_folder_quickstart(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    image_folder(tmp_path / "photos", 30, classes=3, size=8)
    results = commands.train_main(["--data", "photos", "--out", "runs/p", "--steps", "2", "--eval-every", "1",
                                   "--checkpoint-every", "1", "--ema-decay", "0.5", *TINY])
    run = tmp_path / "runs" / "p"
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["class_names"] == ["class0", "class1", "class2"] and config["student"]["num_classes"] == 3
    assert {"eval_top1", "eval_ema_top1"} <= results["main"].keys()
    assert results["best"]["sha256"] == sha256(run / "best.safetensors")
    assert results["ema_sha256"] == sha256(run / "ema.safetensors")
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["phase"] == "eval"]
    top = max(r["top1"] for r in evals)
    assert (results["best"]["top1"], results["best"]["step"]) == (top, min(r["step"] for r in evals if r["top1"] == top))

    # The saved config re-runs the run; with --resume and more steps it continues the checkpoint at step 1.
    longer = commands.train_main(["--config", str(run / "config.json"), "--resume", "--steps", "3", "--no-progress"])
    assert longer["resumes"][-1]["step"] == 1 and longer["resumes"][-1]["changed"]["steps"] == [2, 3]
    assert json.loads((run / "config.json").read_text())["student_optim"]["total_steps"] == 3

    for which in ("final", "ema"):
        commands.export([str(run), "--out", f"export_{which}", "--weights", which])
    export = tmp_path / "export_final"
    assert json.loads((export / "config.json").read_text())["label_names"] == ["class0", "class1", "class2"]
    card = (export / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    metric = meta["model-index"][0]["results"][0]["metrics"][0]
    assert metric["type"] == "accuracy" and metric["value"] == pytest.approx(longer["main"]["eval_top1"], abs=1e-6)

    # The card's snippet, as written, in a fresh interpreter: same logits as the run's model, the class names.
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    probe = snippet + "\nimport torch\nx = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))\n" \
        "print(labels)\nprint(model(x).tolist())\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    printed = out.stdout.strip().splitlines()
    assert printed[0] == "['class0', 'class1', 'class2']"
    reference = timm.create_model("digits_cnn", num_classes=3)
    reference.load_state_dict(load_file(run / "model.safetensors"))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.tensor(json.loads(printed[1])).allclose(reference.eval()(x), atol=1e-5)

    # The EMA: the final average is 0.5 * (the average in the step-2 checkpoint) + 0.5 * (the step-3 weights).
    names = timm.create_model("digits_cnn", num_classes=3)
    names = [n for n, _ in names.named_parameters()] + [n for n, b in names.named_buffers() if b.is_floating_point()]
    stored = load_file(run / "checkpoints" / "step-00000002" / "ema" / "ema-rank0.safetensors")
    ema, final = load_file(run / "ema.safetensors"), load_file(run / "model.safetensors")
    assert not torch.equal(ema[names[0]], final[names[0]])
    for i, name in enumerate(names):
        assert torch.allclose(ema[name], 0.5 * stored[str(i)] + 0.5 * final[name], atol=1e-6), name

    # mpl-eval scores the run's model and its export alike, on any labeled folder.
    image_folder(tmp_path / "test", 9, classes=3, size=8, seed=1)
    capsys.readouterr()
    for model in (str(run), str(export)):
        commands.evaluate([model, "--data", "test", "--json"])
    run_scores, export_scores = map(json.loads, capsys.readouterr().out.strip().splitlines())
    assert run_scores == export_scores and run_scores["images"] == 9 and 0 <= run_scores["top1"] <= 1


def test_holdout_split_is_per_class_and_refuses_a_class_it_would_empty(tmp_path):
    ds = load_images(image_folder(tmp_path / "a", 30, classes=3, size=8))
    train, held = holdout_split(ds, 0.2)
    assert sorted(held["label"]) == [0, 0, 1, 1, 2, 2] and len(train) == 24
    assert not set(train["image"][i]["path"] for i in range(24)) & set(h["path"] for h in held["image"])
    again_train, again_held = holdout_split(ds, 0.2)
    assert again_held["image"] == held["image"]  # the same draw every time (every seed)
    one = datasets.Dataset.from_dict({"label": [0, 0, 0, 1]}, features=datasets.Features(
        {"label": datasets.ClassLabel(names=["cat", "dog"])}))
    with pytest.raises(DataError, match=r"class 'dog' has 1 example\(s\).*data.holdout_fraction=0"):
        holdout_split(one, 0.1)


def test_ema_is_the_moving_average_and_applied_restores():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, 0.9)
    start = [t.detach().clone() for t in model.state_dict().values() if t.is_floating_point()]
    expected = [t.clone() for t in start]
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(4, 3))  # BN statistics move too
        ema.update()
        live = [t for t in model.state_dict().values() if t.is_floating_point()]
        expected = [0.9 * e + 0.1 * t for e, t in zip(expected, live)]
    trained = [t.detach().clone() for t in model.state_dict().values() if t.is_floating_point()]
    with ema.applied():
        inside = [t.detach().clone() for t in model.state_dict().values() if t.is_floating_point()]
    after = [t for t in model.state_dict().values() if t.is_floating_point()]
    assert all(torch.allclose(a, e, atol=1e-6) for a, e in zip(inside, expected))
    assert all(torch.equal(a, t) for a, t in zip(after, trained))
