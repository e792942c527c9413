"""Device plumbing without a GPU: the device choice, `to_device`, and a trainer run in which every batch tensor
must be moved before any computation touches it.

On a CPU-only machine a missing `.to(device)` changes nothing (the tensor is already "there"), so the trainer test
watches the tensors instead: `HostTensors` (a `TorchFunctionMode`) knows every tensor the data pipeline hands out
and records any torch operation on one other than the move itself. Forgetting to move a batch, a view, the labels
or the evaluation images is then an operation on a host tensor, exactly what fails on CUDA.
"""

import contextlib
import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from mpl_large.build import build_model, make_learner
from mpl_large.config import (ConfigError, DataConfig, FinetuneConfig, ModelConfig, MPLConfig, OptimConfig,
                              ParallelConfig, TrainConfig, apply_override, config_from_dict)
from mpl_large.data.pipeline import Batches, Streams, TrainBatch
from mpl_large.device import choose_device, to_device
from mpl_large.parallel import ParallelDims
from mpl_large.trainer import train
from images import image_folder


def test_to_device_moves_every_tensor_of_a_batch():
    batch = TrainBatch(torch.ones(2, 3), torch.zeros(2, dtype=torch.long), torch.ones(2, 3), torch.ones(2, 3),
                       torch.arange(2), torch.full((2, 4), 0.25))
    moved = to_device(batch, torch.device("meta"))
    assert isinstance(moved, TrainBatch)
    for f in dataclasses.fields(TrainBatch):
        assert getattr(moved, f.name).device.type == "meta", f.name
    nested = to_device((torch.ones(1), [torch.ones(1), 3], {"a": torch.ones(1), "b": None}), torch.device("meta"))
    assert nested[0].is_meta and nested[1][0].is_meta and nested[1][1] == 3 and nested[2]["a"].is_meta
    assert nested[2]["b"] is None and to_device(TrainBatch(torch.ones(1), None), "meta").y_l is None


def test_device_choice_and_config_errors(monkeypatch):
    if not torch.cuda.is_available():
        assert choose_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="device: 'cuda', but CUDA is not available"):
            choose_device("cuda")
    assert choose_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="^device: unknown device 'gpu'"):
        TrainConfig(device="gpu")
    with pytest.raises(ConfigError, match="^precision: unknown precision 'fp16'"):
        TrainConfig(precision="fp16")
    with pytest.raises(ConfigError, match="^device: 'cpu': under DeepSpeed"):
        TrainConfig(device="cpu", parallel=ParallelConfig(deepspeed="zero2"))


def test_learner_moves_its_model_to_the_chosen_device(monkeypatch):
    """The model on the `meta` device: every parameter, and the optimizer built over them, live there."""
    monkeypatch.setattr("mpl_large.build.choose_device", lambda requested: torch.device("meta"))
    learner = make_learner(TrainConfig(), torch.nn.Linear(3, 2), OptimConfig(), 2)
    assert learner.device == torch.device("meta")
    assert all(p.is_meta for p in learner.model.parameters())
    assert all(p.is_meta for group in learner.optimizer.param_groups for p in group["params"])
    with pytest.raises(RuntimeError):  # what a batch left on the host meets: mixing devices raises
        learner(torch.ones(4, 3))
    assert learner(to_device(torch.ones(4, 3), learner.device)).is_meta


def test_spatial_group_must_fit_within_a_node():
    ParallelDims(sp=4).check_node(8)
    ParallelDims(sp=2, tp=2).check_node(4)
    ParallelDims(sp=1).check_node(3)
    with pytest.raises(ConfigError, match=r"parallel.spatial: .* = 16 ranks does not fit within one node of 8 ranks"):
        ParallelDims(sp=16).check_node(8)
    with pytest.raises(ConfigError, match="parallel.spatial"):
        ParallelDims(sp=4).check_node(6)  # 4 | 12 = world, but ranks 4-7 straddle nodes 0 and 1


class HostTensors(TorchFunctionMode):
    """Records torch operations on tensors the data pipeline produced (host tensors), other than moving them. A
    move returns a new tensor even on the CPU (where `.to("cpu")` would return the tensor itself)."""

    SHAPE_ONLY = {"__len__", "dim", "size", "numel", "is_floating_point", "__get__"}

    def __init__(self) -> None:
        super().__init__()
        self.host: dict[int, torch.Tensor] = {}  # by id; holding them keeps the ids unique
        self.moves: dict[int, int] = {}
        self.misuses: list[str] = []
        self.paused = False

    def register(self, obj) -> None:
        if dataclasses.is_dataclass(obj):  # not `asdict`: it copies the tensors
            obj = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
        for leaf in pytree.tree_leaves(obj):
            if isinstance(leaf, torch.Tensor):
                self.host[id(leaf)] = leaf
                self.moves[id(leaf)] = 0

    @contextlib.contextmanager
    def pause(self):
        self.paused, before = True, self.paused
        try:
            yield
        finally:
            self.paused = before

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        if func is torch.Tensor.to and id(args[0]) in self.host:
            self.moves[id(args[0])] += 1
            out = func(*args, **kwargs)
            return out.clone() if out is args[0] else out
        name = getattr(func, "__name__", str(func))
        if name not in self.SHAPE_ONLY:
            for leaf in pytree.tree_leaves((args, kwargs)):
                if isinstance(leaf, torch.Tensor) and id(leaf) in self.host:
                    self.misuses.append(name)
        return func(*args, **kwargs)


def tiny_config(tmp_path, **changes) -> TrainConfig:
    data = image_folder(tmp_path / "train", 16, size=8)
    evaluation = image_folder(tmp_path / "eval", 4, size=8, seed=1)
    model = ModelConfig(name="digits_cnn", num_classes=3)
    optim = OptimConfig(lr=0.05)
    return TrainConfig(
        out_dir=str(tmp_path / "run"), steps=2, batch_size=2, mu=2, teacher=model, student=model,
        teacher_optim=optim, student_optim=optim, mpl=MPLConfig(uda_factor=1.0), log_every=1, progress=False,
        data=DataConfig(labeled=str(data), eval=str(evaluation), split="paper", num_labeled=6, num_dropped=0,
                        image_size=8, eval_batch_size=4),
        finetune=FinetuneConfig(steps=1, batch_size=2), **changes)


def test_trainer_moves_every_batch_tensor_once_before_use(tmp_path, monkeypatch):
    guard = HostTensors()
    next_batch, eval_batches = Batches.__next__, Streams.eval_batches

    def guarded_next(self):
        with guard.pause():  # the pipeline's own host work
            batch = next_batch(self)
        guard.register(batch)
        return batch

    def guarded_eval(self):
        for images, labels, indices in eval_batches(self):
            guard.register((images, labels))  # indices index a host list (ReaL): they stay on the host
            yield images, labels, indices

    monkeypatch.setattr(Batches, "__next__", guarded_next)
    monkeypatch.setattr(Streams, "eval_batches", guarded_eval)
    with guard:
        results = train(tiny_config(tmp_path))
    assert "finetune" in results
    assert guard.misuses == []
    # 2 MPL steps x 5 tensors (x_l, y_l, x_u, x_u_aug, u_index), 1 finetune step x 2, 2 evaluations x 2.
    assert len(guard.moves) == 2 * 5 + 1 * 2 + 2 * 2
    assert set(guard.moves.values()) == {1}


def test_planner_adds_cuda_context_and_nccl_buffers_on_cuda_ranks():
    from mpl_large.memory.plan import CUDA_CONTEXT_BYTES, NCCL_BUFFSIZE, NCCL_CHANNELS, Workload, ZeroSettings, plan

    workload = Workload(teacher="digits_cnn", student="digits_cnn", num_classes=3, image_size=8, labeled_batch=2,
                        unlabeled_batch=2)
    zero = ZeroSettings.from_config_file("zero2")
    cpu, one, two = plan(workload, zero, 2), plan(workload, zero, 1, "cuda"), plan(workload, zero, 2, "cuda")
    assert cpu.device_reserved == 0 and one.device_reserved == CUDA_CONTEXT_BYTES  # one rank: no communicator
    assert two.device_reserved == CUDA_CONTEXT_BYTES + NCCL_CHANNELS * 4 * NCCL_BUFFSIZE
    assert two.peak == cpu.peak  # the allocator's figure is unchanged; the budget check counts both
    assert cpu.fits(cpu.peak) and not two.fits(two.peak)


def test_gpu_deepspeed_configs_are_chosen_by_device():
    from mpl_large.ds_config import DS_CONFIGS, ds_config_path, load_ds_config

    for name in ("zero2", "zero3", "zero3_bf16", "zero3_offload"):
        cpu, gpu = load_ds_config(name), load_ds_config(name, "cuda:0")
        zc, zg = cpu.pop("zero_optimization"), gpu.pop("zero_optimization")
        assert gpu == cpu and zg["stage"] == zc["stage"]  # clipping, dtype, optimizer policy: the same run
        assert zg["stage3_param_persistence_threshold" if zc["stage"] == 3 else "stage"] == \
            zc["stage3_param_persistence_threshold" if zc["stage"] == 3 else "stage"]
        assert zg["overlap_comm"] and not zc["overlap_comm"]
        assert zg["reduce_bucket_size"] >= 10 * zc["reduce_bucket_size"]
    assert load_ds_config("ddp", "cuda") == load_ds_config("ddp")  # nothing to overlap: one file
    assert ds_config_path("zero3_gpu") == DS_CONFIGS / "zero3_gpu.json"  # a named file is taken as named
    assert ds_config_path("zero3", "cpu") == DS_CONFIGS / "zero3.json"


def test_the_default_layout_is_the_devices_measured_one():
    """`channels_last=None` resolves by device type (`CHANNELS_LAST`): channels-last inputs on the CPU, PyTorch's
    contiguous default on CUDA (not measured there yet); an explicit setting wins everywhere. No GPU is needed:
    only the device's type decides."""
    def first_conv_input(model_cfg, device_type):
        model = build_model(model_cfg, device_type).eval()
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        seen = []
        conv.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(
            memory_format=torch.channels_last)))
        with torch.no_grad():
            model(torch.randn(2, 3, 8, 8))
        return seen[0]

    default = ModelConfig(name="digits_cnn", num_classes=3)
    assert first_conv_input(default, "cpu") and not first_conv_input(default, "cuda")
    assert not first_conv_input(dataclasses.replace(default, channels_last=False), "cpu")
    assert first_conv_input(dataclasses.replace(default, channels_last=True), "cuda")


def test_cpu_trainer_keeps_freed_host_memory(tmp_path, monkeypatch):
    class Called(Exception):
        """Raised by the stand-in: the trainer called it."""

    def called():
        raise Called

    monkeypatch.setattr("mpl_large.trainer.keep_freed_host_memory", called)
    with pytest.raises(Called):  # the first thing a CPU run does, before any data or model
        train(tiny_config(tmp_path))


_REFAULTS = """
import resource, sys
import torch
from mpl_large.device import keep_freed_host_memory
if sys.argv[1] == "kept":
    assert keep_freed_host_memory()
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
                          torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU())
x = torch.randn(64, 3, 64, 64)
def step():  # activations of 32 MiB each: at glibc's largest mmap threshold
    net(x).square().mean().backward()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_freed_host_memory_is_reused_without_page_faults():
    """Training steps of a small conv net: by default each step's activations are fresh mmaps, faulted in page
    by page (here ~540,000 faults in 3 steps); with `keep_freed_host_memory` the steps reuse the heap memory of
    the ones before (~8,000)."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}  # small pages: many faults to count
    faults = {mode: int(subprocess.run([sys.executable, "-c", _REFAULTS, mode], env=env, capture_output=True,
                                       text=True, check=True).stdout) for mode in ("default", "kept")}
    assert faults["default"] > 100, faults
    assert faults["kept"] < faults["default"] / 10, faults


def test_layout_setting_reads_true_false_and_null():
    cfg = TrainConfig()
    apply_override(cfg, "teacher.channels_last=true")
    assert cfg.teacher.channels_last is True
    apply_override(cfg, "teacher.channels_last=null")  # back to the device's layout
    assert cfg.teacher.channels_last is None
    with pytest.raises(ConfigError, match="channels_last"):
        config_from_dict(TrainConfig, {"teacher": {"channels_last": "yes"}})
