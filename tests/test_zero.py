"""DeepSpeed engines: world size 2 equals world size 1 for the same global batch, for ZeRO stages 0, 2, 3
and 3 with offload; the feedback dot product from gradient partitions is the full one; the probe gradient
never reaches an update. Real 2-rank runs over gloo (tests/workers/zero_parity.py)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mpl_large.config import ConfigError
from mpl_large.ds_config import DS_CONFIGS, load_ds_config
from mpl_large.zero import engine_config
from multiproc import launch
from workers.zero_parity import CASES, STEPS


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for world in (1, 2):
        out[world] = tmp_path_factory.mktemp(f"world{world}")
        launch("zero_parity.py", world, str(out[world]))
    return out


@pytest.mark.parametrize("config,feedback", CASES)
def test_two_ranks_equal_one(runs, config, feedback):
    one = load_file(runs[1] / f"{config}_{feedback}.safetensors")
    two = load_file(runs[2] / f"{config}_{feedback}.safetensors")
    assert one.keys() == two.keys()
    assert len(one["h"]) == STEPS and (one["h"] != 0).all()
    if feedback == "taylor":
        # A difference of two fp32 losses (~1.6): its resolution is absolute, ~1e-7, not relative.
        torch.testing.assert_close(two["h"], one["h"], rtol=0, atol=1e-6)
    elif feedback == "reduced":
        # Its h are near-orthogonal cosines (~0.01): fp32 summation order moves them by ~2e-8 absolute.
        torch.testing.assert_close(two["h"], one["h"], rtol=1e-6, atol=1e-7)
    else:
        torch.testing.assert_close(two["h"], one["h"], rtol=1e-6, atol=0)
    weights = [k for k in one if k != "h"]
    assert any(k.startswith("teacher.") for k in weights) and any(k.startswith("student.") for k in weights)
    for k in weights:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5, msg=k)


@pytest.mark.parametrize("config", list(dict.fromkeys(c for c, _ in CASES)))
def test_probe_gradient_never_reaches_the_update(runs, config):
    state = load_file(runs[2] / f"probe_{config}.safetensors")
    names = [k.removeprefix("with.") for k in state if k.startswith("with.")]
    assert names
    for k in names:
        assert torch.equal(state[f"with.{k}"], state[f"without.{k}"]), k


def test_every_shipped_config_states_clipping_and_optimizer_policy():
    for path in DS_CONFIGS.glob("*.json"):
        config = load_ds_config(path.stem)
        assert config["gradient_clipping"] == 0.0, path
    assert {"ddp", "zero2", "zero3", "zero3_offload"} <= {p.stem for p in DS_CONFIGS.glob("*.json")}


def test_bad_configs_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no config file 'zero9'"):
        load_ds_config("zero9")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ConfigError, match="broken.json is not valid JSON"):
        load_ds_config(str(broken))
    silent = tmp_path / "silent.json"
    silent.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match=r"silent.json must set \['gradient_clipping'"):
        load_ds_config(str(silent))


def test_engine_config_fills_batch_bookkeeping_without_touching_the_file():
    config = load_ds_config("zero3")
    filled = engine_config(config, micro_batch=4, world_size=2)
    assert filled["train_batch_size"] == 8 and filled["gradient_accumulation_steps"] == 1
    assert "train_batch_size" not in config


def test_recipe_under_accelerate_launch_zero3_bf16_checkpointing(tmp_path):
    """The CIFAR-10 recipe end to end on 2 ranks: `accelerate launch`, both models in ZeRO-3 bf16
    engines, the student with activation checkpointing, MPL then finetune (a fresh engine), distributed
    evaluation and the gathered weights saved by rank 0."""
    import subprocess
    import sys
    from pathlib import Path

    import timm

    from multiproc import ROOT, free_port
    from images import image_folder

    train, test = image_folder(tmp_path / "train", 48), image_folder(tmp_path / "test", 9, seed=1)
    out = tmp_path / "run"
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "recipes/cifar10_4k.py", "--data", str(train), "--eval", str(test), "--out", str(out),
        "--steps", "2", "--finetune-steps", "1", "--deepspeed", "zero3_bf16", "--no-progress",
        "--set", "log_every=1", "--set", "batch_size=4", "--set", "finetune.batch_size=4",
        "--set", "data.num_dropped=6", "--set", "data.num_labeled=12", "--set", "teacher.num_classes=3",
        "--set", "student.num_classes=3", "--set", "student.grad_checkpointing=true",
    ]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["finetune"]["eval_top1"] <= 1
    assert json.loads((out / "config.json").read_text())["parallel"]["deepspeed"] == "zero3_bf16"
    weights = load_file(out / "model.safetensors")
    assert weights["head.fc.weight"].dtype == torch.bfloat16
    model = timm.create_model("wrn_28_2", num_classes=3)
    model.load_state_dict({k: v.float() for k, v in weights.items()})  # strict: every tensor gathered


def test_trainer_with_spatial_partitioning_matches_one_process(tmp_path):
    """§4's layout through the trainer: each image split along width across 2 ranks (one replica), both
    models in ZeRO-3 engines; MPL, finetune and evaluation equal a single process on the same batches."""
    from images import image_folder

    data, test = image_folder(tmp_path / "data", 24), image_folder(tmp_path / "test", 9, seed=1)
    launch("spatial_train.py", 1, str(tmp_path / "single"), str(data), str(test), "single")
    launch("spatial_train.py", 2, str(tmp_path / "spatial"), str(data), str(test), "spatial")
    single, spatial = (load_file(tmp_path / run / "model.safetensors") for run in ("single", "spatial"))
    assert single.keys() == spatial.keys()
    for k in single:
        torch.testing.assert_close(spatial[k], single[k], rtol=0, atol=1e-5, msg=k)
    one, two = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("single", "spatial"))
    assert abs(one["finetune"]["eval_loss"] - two["finetune"]["eval_loss"]) < 1e-4 * abs(one["finetune"]["eval_loss"])
