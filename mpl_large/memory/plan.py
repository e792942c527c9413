"""Memory planner: per-rank bytes of one Meta Pseudo Labels step under DDP and DeepSpeed ZeRO, and a verdict
per strategy against a memory budget.

    mpl-plan --teacher efficientnet_l2 --student efficientnet_l2 --image-size 64 \\
        --labeled-batch 1 --unlabeled-batch 1 --world-size 2 --zero-stage 3 --budget-gib 11 \
        --teacher-optimizer sgd_heavy_ball --student-optimizer sgd_heavy_ball

Models are built by timm name on the meta device (no memory, EfficientNet-L2 in a fraction of a second);
their activations are the tensors autograd saves for the backward, counted on the meta device. What the
step holds, per rank (N ranks, P parameters of a model, d bytes per parameter element in the working
dtype, k optimizer states per parameter: SGD/LARS 1 (momentum), RMSprop 2 (square average, momentum),
Adam 2; t gradient-sized temporaries of the optimizer's step, see `OPTIMIZERS`):

    stage 0 (DDP)  parameters P d; gradients P d from the backward to the step, plus a flattened copy of
                   them while they are all-reduced; k states of P in fp32, t temporaries in the step;
                   bf16 adds fp32 master weights (P 4) and fp32 gradients during the step (P 4).
    ZeRO-1/2       parameters P d (one flat buffer); fp32 master partition P/N 4 and k state partitions;
                   the averaged gradient partition P/N d from the backward to the step (the student's
                   probe backward leaves one until the next update's step), the reduce bucket at the end
                   of a backward, t temporaries (P/N 4 each) in the step, which steps on the averaged
                   partition (an fp32 copy of it under bf16). ZeRO-1 reduces whole gradients (P d) at
                   the end of the backward.
    ZeRO-3         parameter partition P/N d, master, state and gradient partitions (P/N each), the reduce
                   bucket; the step on a flat fp32 copy of the gradient partition with t temporaries, one
                   `sub_group_size` group at a time; gathered parameters: the running module and the
                   prefetch bucket, and from a model's forward to its backward those DeepSpeed keeps for
                   their next use: up to `stage3_max_live_parameters` prefetched ones, and those within
                   `stage3_max_reuse_distance` of it (with both defaults, 1e9: the whole model). On one
                   rank the partition is the parameter: nothing is gathered.
    offload        master weights, optimizer states and fp32 gradients in host memory (counted apart);
                   with parameter offload, the parameter partitions too.

plus per model the buffers (BatchNorm statistics, replicated), and for the step: the activations of
the teacher's forward on x_l, x_u, x_u_aug in one pass (x_l and x_u_aug without UDA), held until the
teacher's update at the end of the step; the student's on x_u_aug, then on x_l at theta_S' (the probe);
and the stash of the student's gradient partition for the feedback (P_S / N fp32, dot and cosine only).

Activations are divided by the spatial degree S (each rank holds a strip of every image; halos are not
counted). With checkpointing only the inputs of the checkpointed blocks (timm's `set_grad_checkpointing`
units) and one block's recomputed activations are held. A backward needs, beyond the saved tensors, the
gradients of one layer's input and output: `GRAD_WORKSPACE` times the largest saved tensor.

The peak is the largest of the levels along the step (see `Plan.phases`). tests/test_plan.py holds it
within 20 % of peaks measured on CPU (`mpl_large.memory.measure`), fp32, ZeRO stages 0, 2 and 3 at 1 and 2 ranks
(measured: within 12 %); the bf16 and offload terms follow DeepSpeed's code and are not measured.
"""

from __future__ import annotations

import argparse
import functools
import math
from dataclasses import dataclass, field, replace
from typing import Literal

import timm
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import mpl_large.models  # noqa: F401  (registers our models with timm)
from mpl_large.ds_config import load_ds_config

GiB = 1 << 30

OPTIMIZERS = {"sgd": (1, 1), "sgd_heavy_ball": (1, 0), "lars": (1, 2), "rmsprop": (2, 2), "adam": (2, 2),
              "adamw": (2, 2)}
"""Per optimizer: (fp32 states of a parameter's size it keeps, gradient-sized temporaries its step
allocates). `sgd` is the repository's SGD (Nesterov momentum, or weight decay: one temporary),
`sgd_heavy_ball` plain momentum without weight decay (updates in place), `rmsprop` timm's RMSpropTF
with momentum (square average and momentum buffer)."""

GRAD_WORKSPACE = 2
"""Largest saved tensors' worth of memory a backward holds beyond the saved tensors: the gradient flowing
into a layer and the one it produces."""

STRATEGIES = {"DDP": "ddp", "ZeRO-2": "zero2", "ZeRO-3": "zero3", "ZeRO-3+offload": "zero3_offload"}
"""The verdict table's strategies and their configs in ds_configs/."""


# ---------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class ZeroSettings:
    """The DeepSpeed settings that decide memory (defaults: DeepSpeed's)."""

    stage: int = 3
    """ZeRO stage: 0 (plain data parallel), 1, 2 or 3."""
    offload_optimizer: bool = False
    """Master weights, optimizer states and fp32 gradients in host memory."""
    offload_param: bool = False
    """ZeRO-3 parameter partitions in host memory too."""
    bf16: bool = False
    """bf16 parameters, gradients and activations; fp32 master weights and optimizer states."""
    reduce_bucket_size: int = 500_000_000
    """Elements of the gradient reduce bucket (ZeRO-2, ZeRO-3). Counted up to the model's size, the part
    gradients ever fill; a GPU allocates the whole bucket, so keep it below the parameter count."""
    allreduce_bucket_size: int = 500_000_000
    """Elements flattened per all-reduce of stage 0's gradients."""
    prefetch_bucket_size: int = 50_000_000
    """ZeRO-3: elements of parameters gathered ahead of use."""
    max_live_parameters: int = 1_000_000_000
    """ZeRO-3: elements the prefetcher may keep gathered. Once DeepSpeed has traced a forward and
    backward, it prefetches parameters for their next use (the backward) and keeps them until then."""
    max_reuse_distance: int = 1_000_000_000
    """ZeRO-3: a parameter used again within this many elements of the trace stays gathered. A
    parameter's next use after its forward is its backward, about twice the parameters after it away."""
    param_persistence_threshold: int = 100_000
    """ZeRO-3: parameters this small stay whole on every rank."""
    sub_group_size: int = 1_000_000_000
    """ZeRO-3: the optimizer steps the partition in groups of this many elements, one at a time: the
    step's flat fp32 gradient and temporaries are a group's."""

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_optimization.stage: must be 0, 1, 2 or 3, got {self.stage}")
        if self.offload_param and self.stage != 3:
            raise ValueError("zero_optimization.offload_param: only ZeRO-3 offloads parameters")
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("zero_optimization.offload_optimizer: needs ZeRO stage 1, 2 or 3")

    @classmethod
    def from_ds_config(cls, config: dict) -> ZeroSettings:
        """The settings a DeepSpeed config dict states (DeepSpeed's defaults for the rest)."""
        zero = config.get("zero_optimization", {})
        d = cls()

        def get(key: str, default):
            return int(float(zero.get(key, default)))

        offload = lambda key: zero.get(key, {}).get("device", "none") not in ("none", None)  # noqa: E731
        return cls(
            stage=int(zero.get("stage", 0)),
            offload_optimizer=offload("offload_optimizer"),
            offload_param=offload("offload_param"),
            bf16=bool(config.get("bf16", {}).get("enabled", False)),
            reduce_bucket_size=get("reduce_bucket_size", d.reduce_bucket_size),
            allreduce_bucket_size=int(float(config.get("allreduce_bucket_size", d.allreduce_bucket_size))),
            prefetch_bucket_size=get("stage3_prefetch_bucket_size", d.prefetch_bucket_size),
            max_live_parameters=get("stage3_max_live_parameters", d.max_live_parameters),
            max_reuse_distance=get("stage3_max_reuse_distance", d.max_reuse_distance),
            param_persistence_threshold=get("stage3_param_persistence_threshold", d.param_persistence_threshold),
            sub_group_size=get("sub_group_size", d.sub_group_size),
        )

    @classmethod
    def from_config_file(cls, name: str) -> ZeroSettings:
        """By path, or by name in ds_configs/ (`zero3`)."""
        return cls.from_ds_config(load_ds_config(name))


@dataclass
class Workload:
    """One MPL step's shapes: the two models, the images and what the step computes."""

    teacher: str = "efficientnet_l2"
    """timm name of the teacher (`mpl_large.models` is imported: ours are known too)."""
    student: str = "efficientnet_l2"
    """timm name of the student."""
    num_classes: int = 1000
    image_size: int = 224
    """Square input resolution."""
    labeled_batch: int = 1
    """Labeled images per data-parallel replica (x_l)."""
    unlabeled_batch: int = 1
    """Unlabeled images per replica and view (x_u and x_u_aug)."""
    teacher_optimizer: str = "sgd"
    """sgd, lars, rmsprop, adam or adamw: decides the optimizer states."""
    student_optimizer: str = "sgd"
    feedback: Literal["cosine", "dot", "taylor"] = "cosine"
    """dot and cosine stash the student's gradient partition and run a probe backward; taylor runs two
    no-grad forwards instead."""
    uda: bool = True
    """The teacher's forward sees x_l, x_u and x_u_aug (without UDA: x_l and x_u_aug)."""
    checkpointing: bool = False
    """Per-block activation checkpointing in both models."""
    spatial: int = 1
    """Spatial-partition degree S: each of a replica's S ranks holds a 1/S strip of every image."""

    def __post_init__(self) -> None:
        for role in ("teacher", "student"):
            name = getattr(self, f"{role}_optimizer")
            if name not in OPTIMIZERS:
                raise ValueError(f"{role}_optimizer: unknown optimizer {name!r}; one of {sorted(OPTIMIZERS)}")
        if self.feedback not in ("cosine", "dot", "taylor"):
            raise ValueError(f"feedback: unknown mode {self.feedback!r}")
        for key in ("image_size", "labeled_batch", "unlabeled_batch", "spatial", "num_classes"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")


# ---------------------------------------------------------------------------------------------------
# Models on the meta device


@dataclass(frozen=True)
class Activations:
    """Bytes autograd saves in one forward, as a + b * batch (a: per-channel statistics and the like)."""

    saved: tuple[float, float]
    """All saved tensors (parameters and buffers excluded)."""
    outside_blocks: tuple[float, float]
    """Saved tensors of the layers outside the checkpointed blocks (stem, head)."""
    block_inputs: tuple[float, float]
    """Sum of the checkpointed blocks' inputs."""
    largest_block: tuple[float, float]
    """The largest block's saved tensors."""
    largest_tensor: tuple[float, float]
    """The largest single saved tensor."""

    @staticmethod
    def at(coef: tuple[float, float], batch: int) -> int:
        return int(coef[0] + coef[1] * batch)

    def held(self, batch: int, checkpointing: bool) -> int:
        """Bytes a forward on `batch` images leaves for its backward: the saved tensors, or with
        checkpointing those outside the blocks and the blocks' inputs."""
        if not checkpointing:
            return self.at(self.saved, batch)
        return self.at(self.outside_blocks, batch) + self.at(self.block_inputs, batch)

    def backward_extra(self, batch: int, checkpointing: bool) -> int:
        """Bytes a backward needs on top of `held`: the gradient workspace, and with checkpointing one
        block's recomputed activations."""
        work = GRAD_WORKSPACE * self.at(self.largest_tensor, batch)
        return work + (self.at(self.largest_block, batch) if checkpointing else 0)


@dataclass(frozen=True)
class ModelProfile:
    """What the planner needs of a model, read off its meta-device instance."""

    name: str
    params: int
    """Trainable parameters."""
    param_sizes: tuple[int, ...]
    """Every trainable parameter's element count (ZeRO-3 keeps the small ones whole)."""
    largest_module: int
    """Most parameters any single module owns directly (ZeRO-3 gathers a module's at once)."""
    buffer_bytes: int
    """Buffers (BatchNorm running statistics), fp32: every rank holds them whole."""
    activations: Activations


def checkpoint_units(model: nn.Module) -> list[nn.Module]:
    """The modules timm's `set_grad_checkpointing` recomputes one at a time: `checkpoint_seq` over
    `model.blocks` (flattened one level, as EfficientNet's) or over ResNet's `layer1` ... `layer4`."""
    if hasattr(model, "blocks") and isinstance(model.blocks, nn.Sequential):
        units = []
        for child in model.blocks:
            units.extend(child if isinstance(child, nn.Sequential) else [child])
        return units
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)):
        return [b for i in range(1, 5) for b in getattr(model, f"layer{i}")]
    raise ValueError(f"checkpointing: the planner does not know which blocks {type(model).__name__} checkpoints")


def _saved_bytes(model: nn.Module, image_size: int, batch: int) -> dict[str, int]:
    """One forward on the meta device, counting the storages autograd saves (each once)."""
    own = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    units = {id(u): i for i, u in enumerate(checkpoint_units(model))} if _has_units(model) else {}
    saved: dict[int, tuple[int, int]] = {}
    current = [-1]
    inputs = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in own and key not in saved:
            saved[key] = (storage.nbytes(), current[0])
        return t

    def enter(module, args):
        current[0] = units[id(module)]
        inputs[0] += args[0].untyped_storage().nbytes()

    def leave(module, args, output):
        current[0] = -1

    hooks = [m.register_forward_pre_hook(enter) for m in model.modules() if id(m) in units]
    hooks += [m.register_forward_hook(leave) for m in model.modules() if id(m) in units]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.empty(batch, 3, image_size, image_size, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    per_block: dict[int, int] = {}
    for nbytes, block in saved.values():
        per_block[block] = per_block.get(block, 0) + nbytes
    return {
        "saved": sum(b for b, _ in saved.values()),
        "outside_blocks": per_block.get(-1, 0),
        "block_inputs": inputs[0],
        "largest_block": max((v for k, v in per_block.items() if k >= 0), default=0),
        "largest_tensor": max((b for b, _ in saved.values()), default=0),
    }


def _has_units(model: nn.Module) -> bool:
    try:
        checkpoint_units(model)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=32)
def profile_model(name: str, num_classes: int, image_size: int) -> ModelProfile:
    """Build `name` on the meta device and count its parameters, buffers and saved activations (fp32),
    the latter at batch 2 and 4 to separate per-image bytes from per-channel ones."""
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=num_classes)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # Batch 2 and 4: BatchNorm refuses a batch of one 1x1 image.
    two, four = _saved_bytes(model, image_size, 2), _saved_bytes(model, image_size, 4)
    coef = {k: (2 * two[k] - four[k], (four[k] - two[k]) / 2) for k in two}
    return ModelProfile(
        name=name,
        params=sum(p.numel() for p in params),
        param_sizes=tuple(p.numel() for p in params),
        largest_module=max(sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad)
                           for m in model.modules()),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        activations=Activations(**coef),
    )


# ---------------------------------------------------------------------------------------------------
# The plan


@dataclass
class ModelMemory:
    """One model's bytes on one rank (accelerator memory unless said otherwise)."""

    role: str
    params: int
    """Parameters in the working dtype (under ZeRO-3 the partition, plus the small parameters whole)."""
    master: int
    """fp32 master weights (ZeRO: the partition; stage 0 with bf16: all)."""
    optimizer_states: int
    buffers: int
    """BatchNorm statistics and other buffers, whole on every rank."""
    grad_buffer: int
    """ZeRO-3's gradient partition buffer and reduce bucket, allocated once."""
    gradients: int
    """Gradients a backward creates and the next optimizer step frees (stage 0: all; ZeRO-1/2: the
    averaged partition)."""
    probe_leftover: int
    """ZeRO-1/2 student: the probe backward's averaged partition, held until the next update's step."""
    backward_transient: int
    """Held at the end of a backward beyond the gradients: the all-reduce copy (stage 0), the reduce
    bucket and the partition the reduced gradients land in (ZeRO-1/2), the gathered module and its full
    gradient (ZeRO-3)."""
    step_transient: int
    """Held during the optimizer step: the flat fp32 gradient partition (ZeRO), fp32 gradients (stage 0
    bf16), and the optimizer's temporaries."""
    working: int
    """ZeRO-3: parameters gathered while a module computes (the module and the prefetch bucket)."""
    keep: int
    """ZeRO-3: parameters that stay gathered from the model's forward until its backward."""
    host: int
    """Offloaded to host memory."""

    @property
    def state(self) -> int:
        """What persists between steps."""
        return (self.params + self.master + self.optimizer_states + self.buffers + self.grad_buffer
                + self.probe_leftover)


@dataclass
class MemoryPhase:
    name: str
    level: int
    """Bytes held when the phase ends."""
    peak: int
    """Most bytes held during the phase."""


CUDA_CONTEXT_BYTES = 512 * 2**20
"""A CUDA rank's memory outside PyTorch's allocator before any tensor: the CUDA context with the kernels of
torch, cuBLAS and cuDNN that a training step loads (lazily, CUDA_MODULE_LOADING=LAZY, PyTorch's default) and
the cuBLAS workspaces. An estimate: NVIDIA documents no figure (CUDA C++ Programming Guide, "Lazy Loading"); a
few hundred MiB on recent GPUs is what `nvidia-smi` shows beyond `torch.cuda.memory_reserved()`. Neither this
nor the NCCL buffers appear in `torch.cuda.max_memory_allocated`."""

NCCL_BUFFSIZE = 4 * 2**20
"""NCCL's buffer per channel per peer and protocol (the NCCL_BUFFSIZE default, 4194304 bytes: NCCL's
environment-variable documentation)."""

NCCL_CHANNELS = 16
"""Channels an NCCL communicator opens on an NVLink node (NCCL picks up to NCCL_MAX_NCHANNELS by topology; 16 is
an estimate for 8-GPU NVLink hosts, NCCL_DEBUG=INFO prints the number)."""


def cuda_reserved(world_size: int, spatial: int = 1) -> int:
    """Bytes per CUDA rank outside PyTorch's allocator: the context, plus per NCCL communicator (the world's
    and, with spatial partitioning, its spatial group's) a send and a receive buffer to each ring neighbour on
    every channel."""
    communicators = (world_size > 1) + (1 < spatial < world_size)
    return CUDA_CONTEXT_BYTES + communicators * NCCL_CHANNELS * 2 * 2 * NCCL_BUFFSIZE


@dataclass
class Plan:
    """Per-rank memory of one MPL step."""

    workload: Workload
    zero: ZeroSettings
    world_size: int
    teacher: ModelMemory
    student: ModelMemory
    activations: dict[str, tuple[int, int]]
    """Per forward (teacher, student, probe): (bytes held from its end into its backward, bytes its
    backward needs on top: gradient workspace and, with checkpointing, a recomputed block)."""
    stash: int
    """The student's stashed gradient partition (fp32)."""
    inputs: int
    phases: list[MemoryPhase] = field(default_factory=list)
    device_reserved: int = 0
    """On a CUDA rank, bytes outside PyTorch's allocator (`cuda_reserved`); 0 on the CPU."""

    @property
    def peak(self) -> int:
        return max(p.peak for p in self.phases)

    @property
    def state(self) -> int:
        """Bytes that persist between steps (both models)."""
        return self.teacher.state + self.student.state

    @property
    def host(self) -> int:
        return self.teacher.host + self.student.host

    def fits(self, budget: int) -> bool:
        return self.peak + self.device_reserved <= budget


def model_memory(role: str, prof: ModelProfile, optimizer: str, zero: ZeroSettings, world: int,
                 probe: bool = False) -> ModelMemory:
    """One engine's bytes on one rank (see the module docstring); `probe`: the student of dot/cosine
    feedback, whose engine runs a backward that no step consumes."""
    p, n = prof.params, world
    d = 2 if zero.bf16 else 4
    part = math.ceil(p / n)
    k, temps = OPTIMIZERS[optimizer]
    buffers = prof.buffer_bytes // 4 * d
    none = dict(grad_buffer=0, probe_leftover=0, working=0, keep=0, host=0)
    if zero.stage == 0:
        # DeepSpeed flattens the gradients (in fp32 under bf16) to all-reduce them, and frees them after
        # the step; bf16 keeps fp32 master weights and steps on fp32 copies of the gradients.
        return ModelMemory(
            role, params=p * d, master=p * 4 if zero.bf16 else 0, optimizer_states=k * p * 4, buffers=buffers,
            gradients=p * d, backward_transient=min(p, zero.allreduce_bucket_size) * (4 if zero.bf16 else d),
            step_transient=(temps + zero.bf16) * p * 4, **none)
    # The step works on an fp32 gradient partition: under ZeRO-1/2 the averaged partition itself in fp32
    # (a copy under bf16), under ZeRO-3 a flat copy of one sub-group; plus the optimizer's temporaries.
    master, states, step, host = part * 4, k * part * 4, (temps + zero.bf16) * part * 4, 0
    if zero.offload_optimizer:
        host, master, states, step = master + states + step, 0, 0, 0
    if zero.stage in (1, 2):
        # At the end of a backward the reduce bucket and the partition the reduced gradients land in are
        # held while they are flattened into the averaged partition the step consumes.
        whole = p * d if zero.stage == 1 else 0  # ZeRO-1 reduces whole gradients after the backward
        return ModelMemory(
            role, params=p * d, master=master, optimizer_states=states, buffers=buffers, grad_buffer=0,
            gradients=part * d, probe_leftover=part * d if probe else 0,
            backward_transient=min(p, zero.reduce_bucket_size) * d + part * d + whole, step_transient=step,
            working=0, keep=0, host=host)
    small = sum(s for s in prof.param_sizes if s <= zero.param_persistence_threshold)
    params, grads = (part + small) * d, part * d
    if zero.offload_param:
        host, params = host + part * d, small * d
    if zero.offload_optimizer:
        host, grads = host + grads, 0
    # Gathering allocates the whole parameter; on one rank the partition is the whole parameter.
    if not zero.offload_optimizer:
        step = (1 + temps) * min(part, zero.sub_group_size) * 4
    module = prof.largest_module * d if n > 1 else 0
    prefetched = zero.max_live_parameters if zero.prefetch_bucket_size else 0
    keep = min(p, max(prefetched, zero.max_reuse_distance // 2)) * d if n > 1 else 0
    return ModelMemory(
        role, params=params, master=master, optimizer_states=states, buffers=buffers,
        grad_buffer=grads + min(p, zero.reduce_bucket_size) * d, gradients=0, probe_leftover=0,
        backward_transient=2 * module, step_transient=step,
        working=min(module + min(p, zero.prefetch_bucket_size) * d, p * d - keep + module), keep=keep, host=host)


def plan(workload: Workload, zero: ZeroSettings, world_size: int, device: str = "cpu") -> Plan:
    """The per-rank memory of one MPL step of `workload` on `world_size` ranks with `zero`; on a `cuda` device
    also what the rank holds outside PyTorch's allocator (`Plan.device_reserved`)."""
    if world_size < 1:
        raise ValueError(f"world_size: must be >= 1, got {world_size}")
    if world_size % workload.spatial:
        raise ValueError(f"spatial: {workload.spatial} does not divide the world size {world_size}")
    w = workload
    t_prof = profile_model(w.teacher, w.num_classes, w.image_size)
    s_prof = profile_model(w.student, w.num_classes, w.image_size)
    probe = w.feedback != "taylor"
    teacher = model_memory("teacher", t_prof, w.teacher_optimizer, zero, world_size)
    student = model_memory("student", s_prof, w.student_optimizer, zero, world_size, probe=probe)
    d = 2 if zero.bf16 else 4
    bl, bu = w.labeled_batch, w.unlabeled_batch

    def acts(prof: ModelProfile, batch: int) -> tuple[int, int]:
        a = prof.activations
        return tuple(n * d // 4 // w.spatial for n in (a.held(batch, w.checkpointing),
                                                         a.backward_extra(batch, w.checkpointing)))

    t_batch = bl + (2 if w.uda else 1) * bu
    activations = {"teacher": acts(t_prof, t_batch), "student": acts(s_prof, bu),
                   "probe": acts(s_prof, bl) if probe else (0, 0)}
    stash = math.ceil(s_prof.params / world_size) * 4 if probe else 0
    # x_l, x_u, x_u_aug as loaded (fp32), and their copy in the working dtype under bf16.
    inputs = (bl + 2 * bu) * 3 * w.image_size ** 2 * (4 + (d if zero.bf16 else 0)) // w.spatial
    result = Plan(w, zero, world_size, teacher, student, activations, stash, inputs,
                  device_reserved=cuda_reserved(world_size, w.spatial) if device == "cuda" else 0)
    result.phases = _timeline(result)
    return result


def _timeline(p: Plan) -> list[MemoryPhase]:
    """Levels and peaks along one MPL step at steady state (optimizer states exist), in the step's order.

    A forward ends holding its activations (and, under ZeRO-3, the parameters kept for reuse) with the
    gathered working set on top. A backward peaks either at its start (all activations) or at its end
    (the new gradients and the reduction buffers, activations gone).
    """
    t, s, a = p.teacher, p.student, p.activations
    phases: list[MemoryPhase] = []
    level = p.inputs + t.state + s.state

    def phase(name: str, peak: int, end: int) -> None:
        nonlocal level
        phases.append(MemoryPhase(name, end, max(level, end, peak)))
        level = end

    def forward(name: str, m: ModelMemory, acts: tuple[int, int]) -> None:
        phase(name, level + acts[0] + m.keep + m.working, level + acts[0] + m.keep)

    def backward(m: ModelMemory, acts: tuple[int, int]) -> tuple[int, int]:
        """(peak of a backward whose forward left `acts`, level after it with the new gradients)."""
        after = level - acts[0] - m.keep + m.gradients
        return max(level + acts[1] + m.working, after + m.backward_transient + m.working), after

    # The teacher's forward on x_l, x_u, x_u_aug: its activations stay until its update at the end.
    forward("teacher forward", t, a["teacher"])
    # The student's forward on x_u_aug, backward, stash of its gradient partition, step.
    forward("student forward", s, a["student"])
    peak, after = backward(s, a["student"])
    phase("student backward", peak, after + p.stash)
    phase("student step", level + s.step_transient, level - s.gradients - s.probe_leftover)
    if p.stash:
        # The labeled backward at theta_S': its gradient is measured against the stash, then cleared.
        forward("student probe forward", s, a["probe"])
        peak, after = backward(s, a["probe"])
        phase("student probe backward", peak, after - s.gradients + s.probe_leftover - p.stash)
    else:
        phase("student probe forwards (no grad)", level + s.working, level)
    # The teacher's backward and step: its activations go, its gradients come and go.
    peak, after = backward(t, a["teacher"])
    phase("teacher backward", peak, after)
    phase("teacher step", level + t.step_transient, level - t.gradients)
    return phases


def strategies(workload: Workload, world_size: int, bf16: bool | None = None,
               zero_overrides: dict | None = None, device: str = "cpu") -> dict[str, Plan]:
    """A plan per strategy of the verdict table, each with its config from ds_configs/, `zero_overrides`
    merged into the `zero_optimization` section of the ZeRO ones (bucket sizes), dtype from `bf16` when
    given."""
    out = {}
    for name, file in STRATEGIES.items():
        config = load_ds_config(file)
        if zero_overrides and config["zero_optimization"].get("stage", 0) > 0:
            config["zero_optimization"] = {**config["zero_optimization"], **zero_overrides}
        zero = ZeroSettings.from_ds_config(config)
        if bf16 is not None:
            zero = replace(zero, bf16=bf16)
        out[name] = plan(workload, zero, world_size, device)
    return out


# ---------------------------------------------------------------------------------------------------
# Command line


ZERO_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_max_live_parameters",
             "stage3_max_reuse_distance", "sub_group_size")
"""The zero_optimization keys `--deepspeed` lends to every strategy of the verdict table."""

ROWS = [("parameters", "params"), ("fp32 master weights", "master"), ("optimizer states", "optimizer_states"),
        ("buffers", "buffers"), ("gradient partition + bucket (ZeRO-3)", "grad_buffer"),
        ("gradients to the step", "gradients"), ("probe gradient to the next step", "probe_leftover"),
        ("gathered while computing (ZeRO-3)", "working"), ("kept gathered forward to backward", "keep"),
        ("backward transient", "backward_transient"), ("step transient", "step_transient"),
        ("offloaded to host", "host")]
"""The breakdown table: (label, `ModelMemory` field)."""


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from mpl_large.cli import plan_parser  # the flags live with every command's (`mpl-plan`)

    return plan_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


def run(args: argparse.Namespace) -> None:
    """Plan and print the tables for `mpl-plan`'s arguments."""
    workload = Workload(
        teacher=args.teacher, student=args.student, num_classes=args.num_classes, image_size=args.image_size,
        labeled_batch=args.labeled_batch, unlabeled_batch=args.unlabeled_batch,
        teacher_optimizer=args.teacher_optimizer, student_optimizer=args.student_optimizer,
        feedback=args.feedback, uda=not args.no_uda, checkpointing=args.checkpointing, spatial=args.spatial)
    bf16 = args.dtype == "bf16"
    default = {0: "ddp", 1: "zero2", 2: "zero2", 3: "zero3_offload" if args.offload else "zero3"}[args.zero_stage]
    zero = replace(ZeroSettings.from_config_file(args.deepspeed or default), stage=args.zero_stage, bf16=bf16,
                   offload_optimizer=args.offload and args.zero_stage > 0,
                   offload_param=args.offload and args.zero_stage == 3)
    overrides = None
    if args.deepspeed:
        section = load_ds_config(args.deepspeed)["zero_optimization"]
        overrides = {k: v for k, v in section.items() if k in ZERO_KEYS}
    result = plan(workload, zero, args.world_size, args.device)
    budget = int(args.budget_gib * GiB)
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # piped: do not squeeze the tables into 80 columns

    console.print(f"[bold]{args.teacher} -> {args.student}[/bold]  {args.image_size}px, per replica "
                  f"B_l={args.labeled_batch} B_u={args.unlabeled_batch}, N={args.world_size}, S={args.spatial}, "
                  f"ZeRO-{args.zero_stage}{' + offload' if args.offload else ''}, {args.dtype}, "
                  f"checkpointing {'on' if args.checkpointing else 'off'}")
    t_prof = profile_model(args.teacher, args.num_classes, args.image_size)
    s_prof = profile_model(args.student, args.num_classes, args.image_size)
    console.print(f"parameters: teacher {t_prof.params / 1e6:.1f} M, student {s_prof.params / 1e6:.1f} M")

    table = Table(title="per-rank bytes (GiB)")
    for col in ("", "teacher", "student"):
        table.add_column(col, justify="right")
    for label, key in ROWS:
        table.add_row(label, _gib(getattr(result.teacher, key)), _gib(getattr(result.student, key)))
    act = {k: f"{_gib(v[0])} + {_gib(v[1])}" for k, v in result.activations.items()}
    table.add_row("activations (held + backward extra)", act["teacher"], f"{act['student']} (probe {act['probe']})")
    table.add_row("feedback stash", "", _gib(result.stash))
    console.print(table)

    table = Table(title="along the step (GiB)")
    for col in ("phase", "level at end", "peak"):
        table.add_column(col, justify="right")
    for ph in result.phases:
        table.add_row(ph.name, _gib(ph.level), _gib(ph.peak))
    console.print(table)
    console.print(f"model state {_gib(result.state)} GiB, peak [bold]{_gib(result.peak)} GiB[/bold] per rank "
                  f"(+ {_gib(result.host)} GiB host) against a budget of {args.budget_gib:g} GiB")
    if result.device_reserved:
        console.print(f"+ {_gib(result.device_reserved)} GiB per CUDA rank outside PyTorch's allocator (context, "
                      f"NCCL buffers): [bold]{_gib(result.peak + result.device_reserved)} GiB[/bold] of the device")

    table = Table(title=f"verdict per strategy ({args.dtype}, N={args.world_size}, budget {args.budget_gib:g} GiB "
                        f"per rank; configs from ds_configs/"
                        f"{', buckets of ' + args.deepspeed if args.deepspeed else ''})")
    for col in ("strategy", "model state", "peak", "host", "fits"):
        table.add_column(col, justify="right")
    for name, sp in strategies(workload, args.world_size, bf16, overrides, args.device).items():
        fits = "[green]yes[/green]" if sp.fits(budget) else "[red]no[/red]"
        table.add_row(name, _gib(sp.state), _gib(sp.peak), _gib(sp.host), fits)
    console.print(table)


if __name__ == "__main__":
    main()
