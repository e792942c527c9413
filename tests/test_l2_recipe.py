"""The EfficientNet-L2 recipe (§4, C.4): its config holds the paper's numbers; LARS is TF's LARS and is kept
out of partitioning engines; the demo model has L2's blocks; and the demo preset runs end to end on 2 ranks
under `accelerate launch` (MPL in ZeRO-3, LARS finetune, evaluation) and exports a student that timm loads."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

import mpl_large.models  # noqa: F401  (registers efficientnet_l2_demo, efficientnet_b6_wide)
from mpl_large.build import build_model, make_learner
from mpl_large.config import ConfigError, ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from mpl_large.models.efficientnet_wide import L2_DEMO
from mpl_large.optim import build_optimizer
from mpl_large.cli import recipe_parser, run_config
from multiproc import ROOT, free_port
from test_efficientnet_wide import efficientnet_param_count

RECIPE = ROOT / "recipes" / "efficientnet_l2_jft.py"
spec = importlib.util.spec_from_file_location("efficientnet_l2_jft", RECIPE)
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)


def test_config_is_section_4():
    cfg = recipe.config()
    assert (cfg.method, cfg.steps, cfg.batch_size, cfg.mu * cfg.batch_size) == ("mpl", 1_000_000, 2048, 16_384)
    assert cfg.data.image_size == 512 and cfg.parallel.deepspeed == "zero3"
    for net in (cfg.teacher, cfg.student):
        assert (net.name, net.num_classes, net.drop_rate, net.drop_path_rate) == ("efficientnet_l2", 1000, 0.5, 0.2)
        assert net.bn_momentum == pytest.approx(1 - 0.99)
    for optim in (cfg.teacher_optim, cfg.student_optim):  # C.4: RMSProp, exponential decay
        assert (optim.name, optim.schedule, optim.momentum, optim.decay_rate) == ("rmsprop", "exponential", 0.9, 0.97)
        assert (optim.lr, optim.weight_decay, optim.total_steps) == (0.128, 1e-5, 1_000_000)
        assert optim.decay_steps == round(2.4 * 130e6 / 16_384)
    assert (cfg.mpl.feedback, cfg.mpl.label_smoothing, cfg.mpl.uda_factor, cfg.mpl.uda_temperature) == (
        "cosine", 0.1, 16.0, 0.75)
    ft = cfg.finetune  # C.4: LARS, momentum 0.9, lr 0.001, 20,000 steps at batch 4,096
    assert (ft.steps, ft.batch_size, ft.optim.name, ft.optim.lr, ft.optim.momentum) == (20_000, 4096, "lars", 1e-3, 0.9)
    assert ft.optim.schedule == "constant" and ft.deepspeed == "ddp"


def test_b6_wide_variant_differs_only_in_the_architecture():
    l2, wide = dataclasses.asdict(recipe.config()), dataclasses.asdict(recipe.config(model="b6_wide"))
    assert wide["teacher"]["name"] == wide["student"]["name"] == "efficientnet_b6_wide"
    for d in (l2, wide):
        d["teacher"]["name"] = d["student"]["name"] = d["name"] = None
    assert l2 == wide


def test_command_line_paths_and_lengths(tmp_path):
    args = recipe_parser("").parse_args(["--data", "L", "--unlabeled", "U", "--eval", "E", "--steps", "100",
                                         "--out", str(tmp_path)])
    cfg = run_config(recipe.config, args)
    assert (cfg.data.labeled, cfg.data.unlabeled, cfg.data.eval, cfg.out_dir) == ("L", "U", "E", str(tmp_path))
    assert cfg.steps == cfg.student_optim.total_steps == 100 and cfg.finetune.steps == 20_000


def test_lars_is_tf_lars_on_every_layer():
    """One LARS step against TF's LARSOptimizer formula, computed by hand: each tensor's lr is scaled by
    eta * |w| / (|g| + wd |w|), weight decay on weights only, BN and bias adapted too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    cfg = OptimConfig(name="lars", lr=0.5, momentum=0.9, weight_decay=1e-4)
    optimizer = build_optimizer(model, cfg)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.step()
    for p, w, g in zip(model.parameters(), before, grads):
        wd = cfg.weight_decay if w.ndim > 1 else 0.0
        trust = 0.001 * w.norm() / (g.norm() + wd * w.norm()) if w.norm() > 0 else torch.tensor(1.0)
        torch.testing.assert_close(p.detach(), w - cfg.lr * trust * (g + wd * w))


def test_lars_is_refused_in_partitioning_engines():
    cfg = TrainConfig(parallel=ParallelConfig(deepspeed="zero3"))
    with pytest.raises(ConfigError, match="finetune.deepspeed=ddp"):
        make_learner(cfg, nn.Linear(2, 2), OptimConfig(name="lars"), 2)
    with pytest.raises(ConfigError, match="'zero3_bf16' partitions or casts"):
        make_learner(cfg, nn.Linear(2, 2), OptimConfig(name="lars"), 2, deepspeed="zero3_bf16")


def test_demo_model_is_l2_at_a_tenth():
    """Same stages, block types, kernels, strides, expansions and SE as EfficientNet-L2; the parameter count
    of the independent counter at L2's multipliers / 10."""
    with torch.device("meta"):
        demo = timm.create_model("efficientnet_l2_demo", num_classes=10)
        l2 = timm.create_model("efficientnet_l2", num_classes=10)

    def expansion(block) -> int:
        return round(block.conv_pw.out_channels / block.conv_pw.in_channels) if hasattr(block, "conv_pwl") else 1

    def stages(model):
        return [{(type(b).__name__, b.conv_dw.kernel_size, b.conv_dw.stride, expansion(b), type(b.se).__name__,
                  type(b.bn1.act).__name__) for b in stage} for stage in model.blocks]

    assert L2_DEMO == (0.43, 0.53)
    assert stages(demo) == stages(l2)
    assert [len(s) for s in demo.blocks] == [1, 2, 2, 2, 2, 3, 1]
    assert sum(p.numel() for p in demo.parameters()) == efficientnet_param_count(*L2_DEMO, num_classes=10)
    assert demo.pretrained_cfg["input_size"] == (3, 32, 32)


def test_channels_last_changes_the_layout_not_the_function():
    torch.manual_seed(0)
    plain = build_model(ModelConfig("efficientnet_l2_demo", drop_rate=0.0, channels_last=False), "cpu")
    fast = build_model(ModelConfig("efficientnet_l2_demo", drop_rate=0.0, channels_last=True), "cpu")
    fast.load_state_dict(plain.state_dict())
    seen = []
    fast.conv_stem.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(
        memory_format=torch.channels_last)))
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(fast.eval()(x), plain.eval()(x), rtol=1e-4, atol=1e-5)
    assert seen == [True] and x.is_contiguous()


@torch.no_grad()
def test_demo_preset_two_ranks_end_to_end(tmp_path):
    out = tmp_path / "demo"
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(RECIPE), "--preset", "demo", "--out", str(out), "--steps", "2", "--finetune-steps", "1",
        "--no-progress", "--set", "log_every=1", "--set", "student_optim.wait_steps=1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    config = json.loads((out / "config.json").read_text())
    assert (config["parallel"]["deepspeed"], config["finetune"]["deepspeed"], config["finetune"]["optim"]["name"]) == (
        "zero3_blocks", "ddp", "lars")
    assert config["data"]["labeled"] == str(out / "data" / "labeled")
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["main"]["eval_top1"] <= 1 and 0 <= results["finetune"]["eval_top1"] <= 1
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["phase"] in ("train", "finetune")] == [1, 2, 3]
    # The student waits one step in its ZeRO-3 engine (ZeroLearner.wait), then learns.
    assert [m["student_waiting"] for m in metrics if m["phase"] == "train"] == [True, False]

    export = out / "export"
    hub = json.loads((export / "config.json").read_text())
    assert (hub["architecture"], hub["num_classes"]) == ("efficientnet_l2_demo", 10)
    overlay = dict(hub["pretrained_cfg"], file=str(export / "model.safetensors"))
    model = timm.create_model(hub["architecture"], pretrained=True, num_classes=hub["num_classes"],
                              pretrained_cfg_overlay=overlay)
    reference = timm.create_model("efficientnet_l2_demo", num_classes=10)
    reference.load_state_dict(load_file(out / "model.safetensors"))
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(model.eval()(x), reference.eval()(x))
