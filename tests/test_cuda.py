"""Checks that need a CUDA device (`cuda` marker; skipped with the reason elsewhere). `benchmarks/gpu_check.sh`
runs them on a one-GPU machine: device placement through the trainer, a bf16 step against fp32, ZeroLearner at
world size 1, h on CUDA against the CPU in fp32, and a checkpoint round trip with the CUDA RNG state."""

import copy
import socket

import pytest
import torch
from safetensors.torch import load_file

from mpl_large.checkpoint import rng_states
from mpl_large.config import MPLConfig, OptimConfig, ParallelConfig
from mpl_large.optim import build_learner
from mpl_large.steps import MPLStep
from mpl_large.trainer import train
from test_device import tiny_config
from test_precision import batches, mpl_step

pytestmark = pytest.mark.cuda


@pytest.fixture
def exact_cuda():
    """fp32 without TF32 and with deterministic cuDNN kernels, so CUDA results compare with tight bounds."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic,
     torch.backends.cudnn.benchmark) = saved


def on(device: str, step: MPLStep) -> MPLStep:
    """`step`'s learners rebuilt with their models (same weights) on `device`."""
    optim = OptimConfig(lr=0.05, momentum=0.9)
    learners = [build_learner(copy.deepcopy(learner.model), optim, device, learner.autocast)
                for learner in (step.teacher, step.student)]
    return MPLStep(*learners, step.config)


def test_trainer_places_models_and_batches_on_the_gpu(tmp_path):
    results = train(tiny_config(tmp_path))  # device=auto: cuda:0 here
    assert 0 <= results["finetune"]["eval_top1"] <= 1
    weights = load_file(tmp_path / "run" / "model.safetensors")  # saved from the CPU copies
    assert all(t.device.type == "cpu" for t in weights.values())


def test_h_on_cuda_matches_cpu_in_fp32(exact_cuda):
    """The same weights, batch and (argmax) pseudo labels: h and the losses within 1e-4 relative."""
    base = mpl_step()
    base.config = MPLConfig(uda_factor=1.0, feedback="cosine", pseudo_labels="argmax")
    cpu, gpu = on("cpu", base), on("cuda", base)
    x_l, y_l, x_u, x_u_aug = batches(1)[0]
    ref = cpu(x_l, y_l, x_u, x_u_aug, 0)
    got = gpu(*(t.cuda() for t in (x_l, y_l, x_u, x_u_aug)), 0)
    for key in ("h", "teacher_loss", "student_loss"):
        assert getattr(got, key) == pytest.approx(getattr(ref, key), rel=1e-4, abs=1e-6), key


def test_bf16_step_matches_fp32_on_cuda():
    base = mpl_step()
    base.config = MPLConfig(uda_factor=1.0, feedback="cosine", pseudo_labels="argmax")
    fp32 = on("cuda", base)
    bf16 = on("cuda", base)
    for learner in (bf16.teacher, bf16.student):
        learner.autocast = torch.bfloat16
    batch = [t.cuda() for t in batches(1)[0]]
    ref, low = fp32(*batch, 0), bf16(*batch, 0)
    assert low.teacher_loss != ref.teacher_loss
    for key in ("teacher_loss", "student_loss"):
        assert getattr(low, key) == pytest.approx(getattr(ref, key), rel=2e-2), key
    assert low.h == pytest.approx(ref.h, rel=1e-1, abs=1e-3)


def test_zero_learner_at_world_size_one_on_cuda(tmp_path, monkeypatch, exact_cuda):
    """One NCCL rank: the engine puts the model on cuda:0; the trainer's batches follow; h as a `Learner`'s."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)
    from mpl_large.ds_config import load_ds_config
    from mpl_large.zero import ZeroLearner, init_distributed

    init_distributed()
    try:
        base = mpl_step()
        base.config = MPLConfig(uda_factor=1.0, feedback="cosine", pseudo_labels="argmax")
        reference = on("cuda", base)
        optim = OptimConfig(lr=0.05, momentum=0.9)
        ds = load_ds_config("zero2", "cuda")
        assert ds["zero_optimization"]["overlap_comm"]  # the GPU config was chosen
        zero = MPLStep(ZeroLearner(copy.deepcopy(base.teacher.model), optim, ds, 8),
                       ZeroLearner(copy.deepcopy(base.student.model), optim, ds, 8), base.config)
        assert zero.teacher.device == torch.device("cuda", 0)
        batch = [t.cuda() for t in batches(1)[0]]
        ref, got = reference(*batch, 0), zero(*batch, 0)
        assert got.h == pytest.approx(ref.h, rel=1e-4, abs=1e-6)
        assert got.teacher_loss == pytest.approx(ref.teacher_loss, rel=1e-5)
        # The whole trainer under DeepSpeed (zero2 -> zero2_gpu.json), NCCL collectives on CUDA tensors.
        cfg = tiny_config(tmp_path)
        cfg.parallel = ParallelConfig(deepspeed="zero2")
        results = train(cfg)
        assert 0 <= results["finetune"]["eval_top1"] <= 1
    finally:
        torch.distributed.destroy_process_group()


def test_checkpoint_round_trip_restores_the_cuda_rng(tmp_path, exact_cuda):
    """Two steps straight through, and one step + resume + one step: the same final weights. The checkpoint holds
    the CUDA generator's state (pseudo labels and dropout are drawn on the GPU)."""
    whole = tiny_config(tmp_path / "whole")
    whole.finetune.steps = 0
    train(whole)
    first = tiny_config(tmp_path / "resumed")
    first.finetune.steps, first.steps, first.checkpoint_every = 0, 2, 1
    train(first)  # writes step 1's checkpoint
    saved = load_file(next((tmp_path / "resumed" / "run" / "checkpoints").glob("step-*")) / "rng-rank0.safetensors")
    assert "cuda" in saved and "cuda" in rng_states()
    torch.cuda.manual_seed(12345)  # a resume must not depend on the generator's state before it
    first.resume = True
    train(first)
    a = load_file(tmp_path / "whole" / "run" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "run" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compiled_steps_equal_eager_on_cuda(exact_cuda):
    """Inductor (triton kernels) against eager, three fp32 steps on the GPU, argmax pseudo labels."""
    eager, compiled = mpl_step(), mpl_step(compile_=True)
    for step in (eager, compiled):
        step.config = MPLConfig(uda_factor=1.0, feedback="cosine", pseudo_labels="argmax")
        for learner in (step.teacher, step.student):  # parameters move in place: the optimizers keep them
            learner.model.to("cuda")
            learner.device = torch.device("cuda", 0)
    for t, batch in enumerate(batches(3)):
        batch = [x.cuda() for x in batch]
        ref, got = eager(*batch, t), compiled(*batch, t)
        for key in ("teacher_loss", "student_loss", "h"):
            assert getattr(got, key) == pytest.approx(getattr(ref, key), rel=1e-4, abs=1e-5), key
