"""The command lines: one flag vocabulary, help for every flag, `--help` without torch/timm/datasets, config
files (YAML/JSON, config.json's schema) and `--print-config`, classes taken from an image folder."""

import argparse
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mpl_large import cli, commands
from mpl_large.config import ConfigError, TrainConfig, load_config, save_config
from images import image_folder

ROOT = Path(__file__).resolve().parent.parent
PARSERS = {"train": lambda: cli.recipe_parser("", "mpl-train"), "plan": cli.plan_parser, "select": cli.select_parser,
           "export": cli.export_parser, "eval": cli.eval_parser}


def test_help_imports_no_heavy_module():
    """Every entry point's and every paper recipe's --help, in one fresh interpreter: none of torch, timm,
    datasets, deepspeed is imported (so --help answers at once)."""
    script = f"""
import contextlib, runpy, sys
from mpl_large import commands
for command in ("train", "plan", "select", "export", "evaluate"):
    with contextlib.suppress(SystemExit):  # argparse exits after printing the help
        getattr(commands, command)(["--help"])
for recipe in ("cifar10_4k", "svhn_1k", "imagenet_10pct", "reduced_mpl_cifar10", "reduced_mpl_imagenet",
               "efficientnet_l2_jft"):
    sys.argv = [recipe, "--help"]
    with contextlib.suppress(SystemExit):
        runpy.run_path("{ROOT}/recipes/" + recipe + ".py", run_name="__main__")
print(sorted(m for m in ("torch", "timm", "datasets", "deepspeed") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert out.stdout.count("usage:") == 11


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_flag_has_help(name):
    for action in PARSERS[name]()._actions:
        if not isinstance(action, argparse._HelpAction):
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help"


def test_defaults_are_shown():
    text = cli.plan_parser().format_help()
    assert "(default: 1000)" in text and "(default: sgd)" in text  # --num-classes, --teacher-optimizer


def test_one_flag_vocabulary():
    """The names the issue found mixed are spelled one way in every command, benchmark and recipe."""
    banned = ["--img-size", "--batch", "--worlds", "--ranks", "--ds-config"]
    for path in [*ROOT.glob("mpl_large/**/*.py"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("recipes/*.py")]:
        for flag in re.findall(r"add_argument\(\s*\"(--[a-z-]+)\"", path.read_text()):
            assert flag not in banned, f"{path.name}: {flag}"


def test_choices_mirror_the_modules():
    from mpl_large.memory.plan import OPTIMIZERS
    from mpl_large.selection_store import PROBS_DTYPES

    assert cli.PLAN_OPTIMIZERS == sorted(OPTIMIZERS) and cli.PROBS_DTYPES == sorted(PROBS_DTYPES)


def test_config_file_round_trip(tmp_path):
    """A saved config.json, and the same as YAML, load back to the identical config."""
    cfg = cli.folder_config(steps=50)
    cfg.data.class_names, cfg.trackers, cfg.student.bn_momentum = ["a", "b"], [], None
    save_config(cfg, tmp_path / "config.json")
    assert load_config(tmp_path / "config.json") == cfg
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    assert load_config(tmp_path / "run.yaml") == cfg
    (tmp_path / "partial.yaml").write_text("steps: 7\nstudent:\n  drop_rate: 0.2\n")
    partial = load_config(tmp_path / "partial.yaml")
    assert (partial.steps, partial.student.drop_rate, partial.teacher) == (7, 0.2, TrainConfig().teacher)


@pytest.mark.parametrize("text, field", [("student:\n  dropout: 0.1\n", "student.dropout"),
                                         ("steps: ten\n", "steps"), ("data:\n  image_size: 0\n", "data.image_size"),
                                         ("progress: 1\n", "progress"), ("mpl: [1]\n", "mpl")])
def test_config_file_errors_name_the_field(tmp_path, text, field):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError, match=rf"bad.yaml: {re.escape(field)}:"):
        load_config(tmp_path / "bad.yaml")


def test_classes_come_from_the_folder_and_a_saved_config_reruns(tmp_path, capsys, monkeypatch):
    """mpl-train takes the number and names of classes from --data; --print-config's output, used as
    --config, resolves to the same config; a --num-classes that does not match the folder is refused."""
    monkeypatch.chdir(tmp_path)
    image_folder(tmp_path / "photos", 6, classes=3, size=8)
    commands.train_main(["--data", "photos", "--out", "runs/a", "--print-config", "--set", "seed=3"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["teacher"]["num_classes"] == printed["student"]["num_classes"] == 3
    assert printed["data"]["class_names"] == ["class0", "class1", "class2"]
    assert (printed["data"]["split"], printed["seed"], printed["out_dir"]) == ("auto", 3, "runs/a")
    (tmp_path / "config.json").write_text(json.dumps(printed))
    commands.train_main(["--config", "config.json", "--print-config"])
    assert json.loads(capsys.readouterr().out) == printed

    with pytest.raises(SystemExit):
        commands.train_main(["--data", "photos", "--num-classes", "10", "--print-config"])
    assert "teacher.num_classes: 10, but photos has 3 classes (class0, class1, class2)" in capsys.readouterr().err
