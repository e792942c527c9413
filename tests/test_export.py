"""Export: timm loads the exported folder and gives the trained model's logits exactly.

- A real (one-step) training run of our registered `wrn_28_2`, and an MPL run directory with an
  EfficientNet-B0 student: loaded with `pretrained_cfg_overlay` and with `local-dir:`, identical logits;
  the weights are the run's bytes; config.json has the run's input size and mean/std; the card holds the
  results and the config.
- Bad run directories are refused naming the file.
- `--push-to-hub` without a token, without a network, or with HF_HUB_OFFLINE=1 fails clearly, never prints
  the token, and keeps the exported folder (no real network is used).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import huggingface_hub.constants
from mpl_large.checkpoint import sha256
from mpl_large.config import DataConfig, FinetuneConfig, ModelConfig, TrainConfig, save_config
from mpl_large.export import main
from mpl_large.trainer import train
from images import image_folder

SECRET = "hf_notarealtokenbutsecret123"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wrn_run(tmp_path_factory) -> Path:
    """A one-step supervised run of wrn_28_2, written by the trainer itself."""
    root = tmp_path_factory.mktemp("export")
    cfg = TrainConfig(
        name="wrn_export", out_dir=str(root / "run"), method="supervised", steps=1, batch_size=4, progress=False,
        teacher=ModelConfig("wrn_28_2", num_classes=3), finetune=FinetuneConfig(steps=0),
        data=DataConfig(labeled=str(image_folder(root / "train", 12)), eval=str(image_folder(root / "eval", 6, seed=1)),
                        eval_batch_size=6),
    )
    train(cfg)
    return root / "run"


@pytest.fixture(scope="module")
def effnet_run(tmp_path_factory) -> Path:
    """An MPL run directory whose saved model is an EfficientNet-B0 student at 40x40 (the teacher differs)."""
    run = tmp_path_factory.mktemp("effnet") / "run"
    run.mkdir()
    cfg = TrainConfig(name="effnet_export", method="mpl", teacher=ModelConfig("resnet18", num_classes=4),
                      student=ModelConfig("efficientnet_b0", num_classes=4), data=DataConfig(image_size=40))
    save_config(cfg, run / "config.json")
    torch.manual_seed(0)
    student = timm.create_model("efficientnet_b0", num_classes=4)
    for m in student.modules():  # trained-looking BN statistics, so eval-mode logits depend on them
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    save_file(student.state_dict(), str(run / "model.safetensors"))
    (run / "results.json").write_text(json.dumps({"name": "effnet_export", "method": "mpl",
                                                  "main": {"h": 0.25, "eval_top1": 0.5},
                                                  "model_sha256": sha256(run / "model.safetensors")}))
    return run


def reference_logits(name: str, num_classes: int, run: Path, x: torch.Tensor) -> torch.Tensor:
    model = timm.create_model(name, num_classes=num_classes)
    model.load_state_dict(load_file(run / "model.safetensors"))
    return model.eval()(x)


def loaded_both_ways(out: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    cfg = json.loads((out / "config.json").read_text())
    by_name = timm.create_model(cfg["architecture"], pretrained=True, num_classes=cfg["num_classes"],
                                pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file=str(out / "model.safetensors")))
    by_folder = timm.create_model(f"local-dir:{out}", pretrained=True)
    return by_name.eval(), by_folder.eval()


@torch.no_grad()
def test_wrn_run_exports_to_identical_logits(wrn_run, tmp_path):
    out = main([str(wrn_run), "--out", str(tmp_path / "export")])
    assert (out / "model.safetensors").read_bytes() == (wrn_run / "model.safetensors").read_bytes()
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["architecture"], cfg["num_classes"]) == ("wrn_28_2", 3)
    pre = cfg["pretrained_cfg"]
    assert pre["input_size"] == [3, 32, 32] and pre["interpolation"] == "bilinear"
    assert pre["mean"] == list(timm.models.get_pretrained_cfg("wrn_28_2").mean)

    x = torch.randn(3, 3, 32, 32)
    expected = reference_logits("wrn_28_2", 3, wrn_run, x)
    for model in loaded_both_ways(out):
        assert torch.equal(model(x), expected)

    card = (out / "README.md").read_text()
    results = json.loads((wrn_run / "results.json").read_text())
    assert f"| main | eval_top1 | {results['main']['eval_top1']:.4g} |" in card
    assert '"method": "supervised"' in card and "library_name: timm" in card


@torch.no_grad()
def test_mpl_run_exports_its_student(effnet_run, tmp_path):
    out = main([str(effnet_run), "--out", str(tmp_path / "export")])
    by_name, by_folder = loaded_both_ways(out)
    x = torch.randn(2, 3, 40, 40)
    expected = reference_logits("efficientnet_b0", 4, effnet_run, x)
    assert torch.equal(by_name(x), expected) and torch.equal(by_folder(x), expected)

    data = timm.data.resolve_model_data_config(by_folder)
    assert data["input_size"] == (3, 40, 40) and data["crop_pct"] == timm.models.get_pretrained_cfg(
        "efficientnet_b0").crop_pct
    assert tuple(data["mean"]) == timm.data.IMAGENET_DEFAULT_MEAN
    cfg = json.loads((out / "config.json").read_text())
    assert "tag" not in cfg["pretrained_cfg"]  # timm's ImageNet weights' tag does not describe ours


def test_bad_run_directories_are_named(effnet_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text((effnet_run / "config.json").read_text())
    with pytest.raises(SystemExit):
        main([str(run), "--out", str(tmp_path / "o1")])
    assert f"{run / 'results.json'}: no such file" in capsys.readouterr().err

    save_file({"classifier.weight": torch.zeros(4, 8)}, str(run / "model.safetensors"))
    (run / "results.json").write_text(json.dumps({"model_sha256": sha256(run / "model.safetensors")}))
    with pytest.raises(SystemExit):
        main([str(run), "--out", str(tmp_path / "o2")])
    assert "model.safetensors does not fit efficientnet_b0 with 4 classes" in capsys.readouterr().err


def test_push_without_token_or_network_keeps_the_export(effnet_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "export"
    args = [str(effnet_run), "--out", str(out), "--push-to-hub", "someone/mpl-export"]
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 1
    assert "no Hugging Face token: set HF_TOKEN" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]

    # A token, but the Hub cannot be reached (a closed local port stands in for no network).
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    assert exit_info.value.code == 1
    assert "upload to someone/mpl-export failed" in captured.err and f"kept in {out}" in captured.err
    assert SECRET not in captured.err + captured.out
    assert (out / "model.safetensors").is_file()


def test_push_offline_from_the_command_line(effnet_run, tmp_path):
    out = tmp_path / "export"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_TOKEN": SECRET, "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "mpl_large.export", str(effnet_run), "--out", str(out),
                           "--push-to-hub", "someone/mpl-export"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "HF_HUB_OFFLINE is set: not uploading to someone/mpl-export" in proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    assert (out / "config.json").is_file() and (out / "README.md").is_file()


OUR_MODULES = ("digits", "wrn", "efficientnet_wide")
"""The modules of `mpl_large.models` that register architectures (timm keys them by the last name part)."""
REGISTERED = sorted(name for module in OUR_MODULES for name in timm.list_models(module=module))
LARGE = {"efficientnet_b6_mpl", "efficientnet_b6_wide"}


def test_registered_models_are_ours():
    assert {"digits_cnn", "wrn_28_2", "efficientnet_l2_demo"} | LARGE <= set(REGISTERED)
    assert all(timm.models.get_pretrained_cfg(name).url == "" for name in REGISTERED)  # none from elsewhere


@pytest.mark.parametrize("name", REGISTERED)
def test_every_registered_model_exports_and_loads(tmp_path, name):
    """Finding 9: a digits_cnn export could not be loaded the documented way (pretrained=True raised).
    The B6 models (300-390 M parameters, 1.2-1.6 GB of weights) run with the `MPL_LARGE_TEST_LARGE=1`
    environment variable: they share efficientnet_l2_demo's code path and need several GB here."""
    if name in LARGE and os.environ.get("MPL_LARGE_TEST_LARGE") != "1":
        pytest.skip("set MPL_LARGE_TEST_LARGE=1 to export the 300 M+ parameter B6 models")
    run = tmp_path / "run"
    run.mkdir()
    size = {"digits_cnn": 8}.get(name, 32)
    cfg = TrainConfig(name=name, method="supervised", teacher=ModelConfig(name, num_classes=5),
                      data=DataConfig(image_size=size))
    save_config(cfg, run / "config.json")
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5)
    for m in model.modules():  # trained-looking BN statistics
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "model.safetensors"))
    (run / "results.json").write_text(json.dumps({"name": name, "method": "supervised",
                                                  "model_sha256": sha256(run / "model.safetensors")}))
    out = main([str(run), "--out", str(tmp_path / "export")])
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model.eval()(x)
        for loaded in loaded_both_ways(out):
            assert torch.equal(loaded(x), expected)


def test_export_test_loads_what_it_writes(effnet_run, tmp_path, monkeypatch, capsys):
    """An export timm would load differently from the run's model (here: a config.json naming another
    architecture) is refused, not reported done."""
    import mpl_large.export

    write = mpl_large.export.write_timm_config

    def wrong_architecture(model, config, path):
        hub_config = write(model, config, path)
        path.write_text(json.dumps({**hub_config, "architecture": "efficientnet_b1"}))
        return hub_config
    monkeypatch.setattr(mpl_large.export, "write_timm_config", wrong_architecture)
    with pytest.raises(SystemExit):
        main([str(effnet_run), "--out", str(tmp_path / "export")])
    assert "timm cannot load the export" in capsys.readouterr().err
