"""Checkpoints: a 2-rank ZeRO-3 run killed with SIGKILL at a random step and resumed ends bitwise equal to
an uninterrupted run (with data-loader workers: none in the uninterrupted run, 1 before the kill, 2 after); a killed save leaves the previous checkpoint usable; bad checkpoints are refused by
name."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from images import image_folder
from mpl_large.checkpoint import CheckpointError, complete_checkpoints
from mpl_large.config import DataConfig, FinetuneConfig, MPLConfig, ModelConfig, OptimConfig, TrainConfig
from mpl_large.trainer import train
from multiproc import ROOT, WORKERS, free_port, launch


def start_ranks(out, data, *flags):
    port = str(free_port())
    return [subprocess.Popen(
        [sys.executable, str(WORKERS / "resume_run.py"), str(out), str(data), *flags], cwd=ROOT,
        env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": port, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]


def logged_steps(out):
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]


def test_kill_9_then_resume_is_bitwise_equal(tmp_path):
    data = image_folder(tmp_path / "data", 30, size=8)
    launch("resume_run.py", 2, str(tmp_path / "whole"), str(data))

    # Kill both ranks at a random step after the first checkpoint (step 2) and at least the finetune phase's
    # set-up before the end (10 MPL + 4 finetune steps), so the kill cannot lose the race with the last step.
    kill_at = random.Random(os.getpid()).randint(3, 10)
    killed = tmp_path / "killed"
    ranks = start_ranks(killed, data, "--workers=1")
    deadline = time.time() + 300
    while max(logged_steps(killed), default=0) < kill_at and all(p.poll() is None for p in ranks):
        assert time.time() < deadline, "the run never reached the kill step"
        time.sleep(0.05)
    for p in ranks:
        p.send_signal(signal.SIGKILL)
        p.communicate()
    assert max(logged_steps(killed)) < 14, f"the run finished before the kill at step {kill_at}"
    assert complete_checkpoints(killed / "checkpoints"), "no checkpoint was complete at the kill"

    ranks = start_ranks(killed, data, "--resume", "--workers=2")
    outputs = [p.communicate(timeout=300)[0] for p in ranks]
    assert all(p.returncode == 0 for p in ranks), "\n".join(o[-3000:] for o in outputs)
    assert "resuming from" in outputs[0]
    steps = logged_steps(killed)
    assert [s for s in steps if s] == sorted(s for s in steps if s), "metrics.jsonl repeats steps"

    whole, resumed = load_file(tmp_path / "whole" / "model.safetensors"), load_file(killed / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), f"{k} differs after a kill at step {kill_at}"


def small_config(out, data, **changes) -> TrainConfig:
    model = ModelConfig("digits_cnn", num_classes=3, drop_rate=0.3)
    optim = OptimConfig(name="sgd", lr=0.05, momentum=0.9, schedule="cosine", total_steps=6)
    return TrainConfig(**{
        "name": "ckpt", "out_dir": str(out), "method": "mpl", "seed": 1, "steps": 6, "batch_size": 4, "mu": 1,
        "teacher": model, "student": model, "teacher_optim": optim, "student_optim": optim,
        "mpl": MPLConfig(uda_factor=1.0, uda_threshold=0.0, uda_ramp_steps=2),
        "data": DataConfig(labeled=str(data), unlabeled=str(data), augment="svhn", image_size=8),
        "finetune": FinetuneConfig(steps=4, batch_size=4, optim=OptimConfig(name="sgd", lr=0.01, momentum=0.9)),
        "progress": False, "checkpoint_every": 2, **changes,
    })


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, no DeepSpeed: an uninterrupted run, checkpointed at steps 2, 4 (MPL) and 8 (finetune);
    the newest two are kept."""
    root = tmp_path_factory.mktemp("single")
    data = image_folder(root / "data", 24, size=8)
    train(small_config(root / "whole", data))
    assert [p.name for p in complete_checkpoints(root / "whole" / "checkpoints")] == ["step-00000004",
                                                                                      "step-00000008"]
    return root / "whole", data


def resume_copy(whole, tmp_path, *checkpoints):
    """A run directory holding only `checkpoints` of the uninterrupted run."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    for name in checkpoints:
        shutil.copytree(whole / "checkpoints" / name, out / "checkpoints" / name)
    return out


def assert_same_weights(a, b):
    a, b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("step", ["step-00000004", "step-00000008"])  # inside MPL, inside finetuning
def test_single_process_resume_from_each_phase_is_exact(single, tmp_path, step):
    whole, data = single
    out = resume_copy(whole, tmp_path, step)
    train(small_config(out, data, resume=True))
    assert_same_weights(whole, out)


def test_a_killed_save_leaves_the_previous_checkpoint(single, tmp_path):
    whole, data = single
    out = resume_copy(whole, tmp_path, "step-00000004")
    partial = out / "checkpoints" / "tmp-step-00000006"  # what a save killed before its rename leaves
    (partial / "student").mkdir(parents=True)
    (partial / "student" / "learner.pt").write_bytes(b"partial")
    train(small_config(out, data, resume=True))
    assert_same_weights(whole, out)
    assert not partial.exists()  # the next start removed it


def test_truncated_checkpoint_names_the_file(single, tmp_path):
    whole, data = single
    out = resume_copy(whole, tmp_path, "step-00000004")
    victim = out / "checkpoints" / "step-00000004" / "teacher" / "learner.pt"
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"{victim}: truncated or changed \(100 bytes"):
        train(small_config(out, data, resume=True))


def test_mismatched_checkpoint_names_the_field(single, tmp_path):
    whole, data = single
    out = resume_copy(whole, tmp_path, "step-00000004")
    with pytest.raises(CheckpointError, match=r"checkpoint.json: seed is 1 in the checkpoint but 2 in this run"):
        train(small_config(out, data, resume=True, seed=2))
