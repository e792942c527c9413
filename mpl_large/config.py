"""The typed configuration of a run, whole: `TrainConfig` and its sections. Every field has a docstring;
bad values raise an error naming the field. This module imports no other of the package, so every layer
may read the schema."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field}: {message}")


@dataclass
class OptimConfig:
    """One model's optimizer and learning-rate schedule (paper C.4)."""

    name: Literal["sgd", "rmsprop", "lars"] = "sgd"
    """`sgd`: SGD with (Nesterov) momentum (WRN, ResNet); `rmsprop`: TF-style RMSProp (EfficientNets);
    `lars`: LARS, the paper's optimizer for finetuning EfficientNet-L2 / B6-Wide."""
    lr: float = 0.1
    """Peak learning rate (after warm-up)."""
    momentum: float = 0.9
    """Momentum coefficient (0.9 for every optimizer in the paper)."""
    nesterov: bool = True
    """Nesterov momentum for `sgd` (the paper's WRN/ResNet setting)."""
    weight_decay: float = 0.0
    """L2 weight decay, applied to weights only: never to biases or normalization parameters."""
    schedule: Literal["constant", "cosine", "exponential"] = "constant"
    """Learning-rate shape after warm-up: constant, cosine decay to 0 at `total_steps`, or exponential
    decay by `decay_rate` every `decay_steps` (EfficientNet)."""
    wait_steps: int = 0
    """The learning rate is 0 for this many steps; warm-up and decay then start, shifted by `wait_steps`
    (still ending at `total_steps`). On MPL's student this is the *student wait* of the most-used PyTorch
    port (MPL-pytorch's `--student-wait-steps`; the paper does not describe one): the teacher trains
    (supervised + UDA) while the student is neither fed nor stepped (`mpl_large.steps.MPLStep`)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to `lr` over this many steps (after `wait_steps`)."""
    total_steps: int = 1
    """Length of the schedule, counted from step 0 (cosine decays to zero here)."""
    decay_rate: float = 0.97
    """Exponential schedule: multiply the lr by this every `decay_steps` steps."""
    decay_steps: int = 1
    """Exponential schedule: steps between two decays."""

    def __post_init__(self) -> None:
        _check(self.name in ("sgd", "rmsprop", "lars"), "optim.name", f"unknown optimizer {self.name!r}")
        _check(self.schedule in ("constant", "cosine", "exponential"), "optim.schedule",
               f"unknown schedule {self.schedule!r}")
        _check(0 <= self.lr < math.inf, "optim.lr", f"must be finite and >= 0, got {self.lr}")
        _check(0 <= self.weight_decay < math.inf, "optim.weight_decay",
               f"must be finite and >= 0, got {self.weight_decay}")
        _check(0 <= self.momentum < 1, "optim.momentum", f"must be in [0, 1), got {self.momentum}")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(self.total_steps >= 1, "optim.total_steps", f"must be >= 1, got {self.total_steps}")
        _check(0 <= self.wait_steps < self.total_steps, "optim.wait_steps",
               f"must be in [0, total_steps={self.total_steps}), got {self.wait_steps}")
        _check(self.decay_steps >= 1, "optim.decay_steps", f"must be >= 1, got {self.decay_steps}")
        _check(0 < self.decay_rate <= 1, "optim.decay_rate", f"must be in (0, 1], got {self.decay_rate}")


@dataclass
class MPLConfig:
    """The Meta Pseudo Labels step: pseudo labels, feedback h and the teacher's auxiliary losses."""

    feedback: Literal["cosine", "dot", "taylor", "none"] = "cosine"
    """How the student's feedback h is computed: `cosine` of the two student gradients (paper C.3, the
    default), `dot` = exact eq. 12, `taylor` = labeled loss before minus after the student's step; `none`:
    h = 0, the ablation "MPL without feedback" (the teacher is UDA alone, the student still learns from its
    pseudo labels)."""
    baseline_decay: float = 0.99
    """Decay of the moving-average baseline b subtracted from h (C.3); 0 disables it (b stays 0)."""
    pseudo_labels: Literal["sample", "argmax"] = "sample"
    """`sample` draws y_hat ~ T(x_u_aug) as the paper's REINFORCE derivation needs; `argmax` is greedy."""
    label_smoothing: float = 0.0
    """Label smoothing of the teacher's supervised loss and of the student's loss (Table 8: 0.1)."""
    uda_factor: float = 0.0
    """Weight of the teacher's UDA consistency loss (Table 8 "UDA factor"); 0 turns UDA off."""
    uda_temperature: float = 1.0
    """Sharpening temperature of the UDA target softmax(T(x_u) / tau)."""
    uda_threshold: float = 0.0
    """UDA confidence mask: unlabeled examples whose teacher max-probability on the weak view is below
    this are left out of the UDA loss."""
    uda_ramp_steps: int = 1
    """The UDA weight ramps linearly from 0 to `uda_factor` over this many steps."""

    def __post_init__(self) -> None:
        _check(self.feedback in ("cosine", "dot", "taylor", "none"), "mpl.feedback",
               f"unknown feedback {self.feedback!r}; choose cosine, dot, taylor or none")
        _check(self.pseudo_labels in ("sample", "argmax"), "mpl.pseudo_labels",
               f"unknown mode {self.pseudo_labels!r}; choose sample or argmax")
        _check(0 <= self.baseline_decay < 1, "mpl.baseline_decay", f"must be in [0, 1), got {self.baseline_decay}")
        _check(0 <= self.label_smoothing < 1, "mpl.label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        _check(self.uda_factor >= 0, "mpl.uda_factor", f"must be >= 0, got {self.uda_factor}")
        _check(self.uda_temperature > 0, "mpl.uda_temperature", f"must be > 0, got {self.uda_temperature}")
        _check(0 <= self.uda_threshold <= 1, "mpl.uda_threshold", f"must be in [0, 1], got {self.uda_threshold}")
        _check(self.uda_ramp_steps >= 1, "mpl.uda_ramp_steps", f"must be >= 1, got {self.uda_ramp_steps}")


def validate(config) -> None:
    """Re-run the checks of `config` and of every section in it (`__post_init__`), innermost first."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            validate(value)
    if hasattr(config, "__post_init__"):
        config.__post_init__()


REDUCED_METHODS = ("reduced_mpl", "noisy_student")
"""Trainer methods run by `mpl_large.reduced`: Reduced MPL and its fixed-teacher baseline."""


@dataclass
class ReducedConfig:
    """Reduced MPL (Appendix E): the large teacher's stored distributions and the reduced teacher's shape."""

    distributions: str = ""
    """Output directory of `python -m mpl_large.reduced precompute`, run over `data.unlabeled`."""
    hidden: int = 128
    """Hidden units of the reduced teacher (Appendix E: 128 for CIFAR-10, 512 for ImageNet)."""
    layers: int = 5
    """Linear layers of the reduced teacher, ReLU between them (Appendix E: 5)."""

    def __post_init__(self) -> None:
        if self.hidden < 1:
            raise ConfigError(f"reduced.hidden: must be >= 1, got {self.hidden}")
        if self.layers < 1:
            raise ConfigError(f"reduced.layers: must be >= 1, got {self.layers}")


@dataclass
class ModelConfig:
    """A model by timm name, and what is set on it before parallelism (`mpl_large.build.build_model`)."""

    name: str = "wrn_28_2"
    """timm model name (`wrn_28_2` is registered by `mpl_large.models`)."""
    num_classes: int = 10
    """Classifier outputs."""
    drop_rate: float = 0.0
    """Dropout before the classifier (the paper's "dropout rate", Tables 6-8)."""
    drop_path_rate: float = 0.0
    """Stochastic depth: the largest per-block drop probability (timm scales it up with depth)."""
    bn_momentum: float | None = 0.01
    """PyTorch BN momentum = 1 - the paper's "batch normalization decay" (0.99); None keeps timm's."""
    grad_checkpointing: bool = False
    """Recompute each block's activations in the backward instead of keeping them (timm's
    `set_grad_checkpointing`): activation memory falls to about the block inputs, at ~1/3 more compute."""
    channels_last: bool | None = None
    """Feed the model channels-last images, so convolutions run in that layout. The weights stay contiguous:
    DeepSpeed cannot flatten channels-last tensors. None (default): the layout measured faster on the run's
    device (`mpl_large.build.CHANNELS_LAST`): channels-last on the CPU (oneDNN; WRN-28-2's MPL step and the
    demo EfficientNet's forward + backward are faster there), contiguous on CUDA until `gpu_check.sh` has
    measured it."""
    compile: bool = False
    """`torch.compile` the model (in place, `nn.Module.compile`: weight names unchanged), after parallelism and
    before the engine wrap. Off by default: on the 2-core CPU the compiled WRN-28-2 MPL step at B=64 was 1.10x
    faster but took ~3.5 minutes of compilation per process, so only runs of more than ~100 such steps gain
    (README, "Devices, precision and compilation")."""

    def __post_init__(self) -> None:
        _check(bool(self.name), "model.name", "a timm model name is required")
        _check(self.num_classes >= 1, "model.num_classes", f"must be >= 1, got {self.num_classes}")
        _check(0 <= self.drop_rate < 1, "model.drop_rate", f"must be in [0, 1), got {self.drop_rate}")
        _check(0 <= self.drop_path_rate < 1, "model.drop_path_rate", f"must be in [0, 1), got {self.drop_path_rate}")
        _check(self.bn_momentum is None or 0 <= self.bn_momentum <= 1, "model.bn_momentum",
               f"must be None or in [0, 1], got {self.bn_momentum}")
        _check(self.channels_last in (None, True, False), "model.channels_last",
               f"must be true, false or null (the device's layout), got {self.channels_last!r}")


@dataclass
class DataConfig:
    """Where the images come from and how they are augmented."""

    labeled: str = ""
    """Labeled training data: an image folder (class subfolders), parquet/Arrow files, or a saved dataset."""
    unlabeled: str = ""
    """Unlabeled data; empty: the labeled source's images after the labeled ones (`split`)."""
    eval: str = ""
    """Held-out evaluation set; empty: no evaluation."""
    eval_split: str = "train"
    """Split of `eval` to read (a folder of class subfolders, or a single file, has only `train`)."""
    split: Literal["none", "paper", "auto"] = "none"
    """`paper`: the C.1 rule on `labeled` (drop the first `num_dropped`, next `num_labeled` labeled,
    the rest unlabeled); `none`: `labeled` is used whole; `auto` (your own data, `mpl-train`'s default):
    without `eval`, `holdout_fraction` of each class is held out for evaluation; without `unlabeled`, the
    labeled training images serve as unlabeled ones too (UDA/FixMatch's convention)."""
    num_labeled: int = 4000
    """Labeled examples under the `paper` split (4,000 for CIFAR-10-4K, 1,000 for SVHN-1K)."""
    num_dropped: int = 5000
    """Leading examples the `paper` split drops (kept for validation in C.1)."""
    augment: Literal["cifar10", "svhn", "imagenet"] = "cifar10"
    """RandAugment op set of Table 5 and weak view (SVHN: no flips)."""
    image_size: int = 32
    """Training and evaluation resolution."""
    randaugment_ops: int = 2
    """RandAugment: ops applied per image."""
    randaugment_magnitude: float = 10.0
    """RandAugment: magnitude (see `mpl_large.data.augment`)."""
    cutout: bool | None = None
    """Cutout (a gray square of half the image side) after RandAugment in the strong view. null: the paper's
    code, on for the cifar10 and svhn op sets, off for imagenet."""
    streaming_unlabeled: bool = False
    """Stream the unlabeled set shard by shard instead of reading it whole."""
    real_labels: str = ""
    """ImageNet-ReaL `real.json`; adds ReaL precision@1 to evaluation."""
    eval_batch_size: int = 256
    """Batch size of evaluation."""
    workers: int = -1
    """Worker processes per rank that decode and augment training images ahead of the step (PyTorch
    DataLoader workers; `mpl_large.data.loader`), shared by the labeled and unlabeled streams. -1: the CPUs
    this process may run on (`os.sched_getaffinity`) divided by the ranks on this node, less one for the
    training process; 0: decode in the training process, between steps. Batches are the same for any value."""
    class_names: list[str] = field(default_factory=list)
    """Names of the class ids 0, 1, ... (an image folder's subfolders, sorted); filled from `labeled` by the
    command line, kept through training and exported as `label_names`. Empty: unnamed."""
    holdout_fraction: float = 0.1
    """`split=auto` without `eval`: the share of each class's labeled images held out for evaluation (at
    least one per class; a fixed draw, the same for every seed). 0: no evaluation."""

    def __post_init__(self) -> None:
        _check(self.split in ("none", "paper", "auto"), "data.split",
               f"unknown split {self.split!r}; choose none, paper or auto")
        _check(0 <= self.holdout_fraction < 1, "data.holdout_fraction",
               f"must be in [0, 1), got {self.holdout_fraction}")
        _check(self.augment in ("cifar10", "svhn", "imagenet"), "data.augment",
               f"unknown augmentation {self.augment!r}; choose cifar10, svhn or imagenet")
        _check(self.image_size >= 1, "data.image_size", f"must be >= 1, got {self.image_size}")
        _check(self.num_labeled >= 1, "data.num_labeled", f"must be >= 1, got {self.num_labeled}")
        _check(self.num_dropped >= 0, "data.num_dropped", f"must be >= 0, got {self.num_dropped}")
        _check(self.randaugment_ops >= 0, "data.randaugment_ops", f"must be >= 0, got {self.randaugment_ops}")
        _check(0 <= self.randaugment_magnitude < math.inf, "data.randaugment_magnitude",
               f"must be finite and >= 0, got {self.randaugment_magnitude}")
        _check(self.cutout in (None, True, False), "data.cutout",
               f"must be true, false or null (the paper's code for the op set), got {self.cutout!r}")
        _check(self.eval_batch_size >= 1, "data.eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        _check(self.workers >= -1, "data.workers", f"must be >= 0, or -1 for one per CPU, got {self.workers}")


@dataclass
class FinetuneConfig:
    """The student alone on labeled data after MPL (§3.2: SGD, lr 1e-5, batch 512, 1,000-2,000 steps)."""

    steps: int = 0
    """Finetune steps; 0 skips the phase."""
    batch_size: int = 512
    """Labeled batch size."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="sgd", lr=1e-5, momentum=0.0, nesterov=False))
    """Optimizer of the finetune phase."""
    deepspeed: str = ""
    """DeepSpeed config of the finetune phase; empty: the run's `parallel.deepspeed`. LARS needs one without ZeRO
    and in fp32 (`ddp`): ZeRO and bf16 hand the optimizer flat partitions, not layers."""

    def __post_init__(self) -> None:
        _check(self.steps >= 0, "finetune.steps", f"must be >= 0, got {self.steps}")
        _check(self.batch_size >= 1, "finetune.batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass
class ParallelConfig:
    """How both models are distributed over the ranks (§4): each model in its own DeepSpeed engine, and
    images split along their width within a replica. Models know none of it: `mpl_large.build` applies it.
    (No field sets tensor parallelism: the trainer does not offer it.)"""

    deepspeed: str = ""
    """DeepSpeed config for both models, by name in ds_configs/ (`ddp`, `zero2`, `zero3`, `zero3_blocks`,
    `zero3_offload`, `zero3_bf16`) or path; each model gets its own engine. Empty: one process, no DeepSpeed. Launch
    multi-process runs with `accelerate launch --multi_gpu --num_processes N` (or torchrun, deepspeed)."""
    spatial: int = 1
    """Spatial degree (§4's model parallelism): ranks per replica that split each image along its width,
    with halo exchange (`mpl_large.parallel`); the world size must divide by it. Needs `parallel.deepspeed`."""
    sync_bn: bool = False
    """BatchNorm statistics over every replica's images (SyncBN) instead of one replica's."""

    def __post_init__(self) -> None:
        _check(self.spatial >= 1, "parallel.spatial", f"must be >= 1, got {self.spatial}")


@dataclass
class TrainConfig:
    """One training run."""

    name: str = "run"
    """Run name (the TensorBoard run and the results' label)."""
    out_dir: str = "runs/run"
    """Where config.json, metrics.jsonl, results.json, weights and TensorBoard files go."""
    method: Literal["mpl", "uda", "supervised", "reduced_mpl", "noisy_student"] = "mpl"
    """`mpl`: teacher + student; `uda`: the teacher alone with UDA; `supervised`: one model, labeled data;
    `reduced_mpl` / `noisy_student`: the student with Appendix E's small teacher over a large teacher's stored
    distributions, adapting / fixed (`mpl_large.reduced`)."""
    seed: int = 0
    """Seeds model init, pseudo-label sampling and data order."""
    steps: int = 1000
    """Steps of the main phase."""
    batch_size: int = 128
    """Labeled batch size per step (global)."""
    mu: int = 1
    """Unlabeled batch = mu * batch_size (the paper uses equal batches: mu = 1)."""
    teacher: ModelConfig = field(default_factory=ModelConfig)
    """The teacher (also the model of `uda` and `supervised`)."""
    student: ModelConfig = field(default_factory=ModelConfig)
    """The student (MPL only)."""
    teacher_optim: OptimConfig = field(default_factory=OptimConfig)
    """Teacher optimizer and schedule (also the single model's in `uda`/`supervised`)."""
    student_optim: OptimConfig = field(default_factory=OptimConfig)
    """Student optimizer and schedule."""
    mpl: MPLConfig = field(default_factory=MPLConfig)
    """Feedback, pseudo labels, label smoothing, UDA."""
    reduced: ReducedConfig = field(default_factory=ReducedConfig)
    """`reduced_mpl` / `noisy_student`: the stored distributions and the reduced teacher (`teacher_optim`)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data sources and augmentation."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """The finetune phase (MPL's student, or the single model)."""
    log_every: int = 10
    """Write training metrics every this many steps."""
    eval_every: int = 0
    """Evaluate every this many steps (0: only at the end of each phase)."""
    progress: bool = True
    """Show the rich progress bar."""
    checkpoint_every: int = 0
    """Save a checkpoint (both models, optimizers, schedules, h baseline, RNG, data position) every this many
    steps into OUT/checkpoints/, keeping the newest two; 0: never."""
    resume: bool = False
    """Continue from the newest complete, verified checkpoint in OUT/checkpoints/ (a fresh start if there is
    none). Only the fields in `mpl_large.run_dir.RESUMABLE` may differ from the checkpoint's config."""
    overwrite: bool = False
    """Replace a previous run's files in `out_dir`; without it a fresh run refuses a non-empty `out_dir`."""
    max_nonfinite_steps: int = 5
    """Stop with an error after this many steps in a row whose loss or gradient was not finite (each such
    update is skipped, counted and logged; `mpl_large.guard`)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """How the models are distributed: DeepSpeed engines, spatial partitioning, SyncBN."""
    device: str = "auto"
    """Where this process computes (`mpl_large.device.choose_device`): `auto` is `cuda:LOCAL_RANK` when CUDA is
    available, else `cpu`; or `cpu`, `cuda`, `cuda:N`. Under DeepSpeed the engine places the model itself
    (`cuda:LOCAL_RANK` on a CUDA machine), so only `auto` is accepted there."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """One-process runs: `bf16` runs forwards under `torch.autocast` in bfloat16, weights, optimizer, losses and h
    stay fp32. Under DeepSpeed the config's `bf16` section decides (e.g. `zero3_bf16`), so this stays `fp32`."""
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Accelerate trackers the metrics also go to (`tensorboard`, `wandb`, `mlflow`, ...; each needs its
    package installed); `metrics.jsonl` is always written. Empty: none."""
    save_best: bool = True
    """Keep the evaluated model with the best held-out top-1 so far as OUT/best.safetensors (needs `eval_every`
    and an evaluation set)."""
    ema_decay: float = 0.0
    """Decay of an exponential moving average of the evaluated model's weights (MPL's student; K's `--ema`,
    e.g. 0.999), evaluated beside it (`eval_ema`) and saved as OUT/ema.safetensors (`mpl-export --weights
    ema`); under ZeRO-3 it is partitioned like the model (`mpl_large.ema`). 0: none."""

    def __post_init__(self) -> None:
        if self.method not in ("mpl", "uda", "supervised", *REDUCED_METHODS):
            raise ConfigError(f"method: unknown method {self.method!r}; choose mpl, uda, supervised, "
                              f"reduced_mpl or noisy_student")
        for name in ("steps", "batch_size", "mu", "log_every", "max_nonfinite_steps"):
            _check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("seed", "eval_every", "checkpoint_every"):
            _check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        _check(bool(self.out_dir), "out_dir", "a run directory is required")
        _check(self.method != "mpl" or self.teacher.num_classes == self.student.num_classes, "student.num_classes",
               f"MPL's student learns the teacher's classes: {self.student.num_classes} != teacher.num_classes "
               f"{self.teacher.num_classes}")
        _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None, "device",
               f"unknown device {self.device!r}; choose auto, cpu, cuda or cuda:N")
        _check(self.precision in ("fp32", "bf16"), "precision", f"unknown precision {self.precision!r}; choose fp32 or bf16")
        _check(not self.parallel.deepspeed or self.device == "auto", "device",
               f"{self.device!r}: under DeepSpeed the engine places the model (cuda:LOCAL_RANK when CUDA is available); "
               f"leave device=auto")
        _check(not self.parallel.deepspeed or self.precision == "fp32", "precision",
               f"{self.precision!r}: under DeepSpeed the config's bf16 section sets the precision (e.g. "
               f"parallel.deepspeed=zero3_bf16); leave precision=fp32")
        _check(0 <= self.ema_decay < 1, "ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        _check(all(isinstance(t, str) and t for t in self.trackers), "trackers",
               f"must be a list of tracker names, got {self.trackers!r}")
        if self.student_optim.wait_steps and self.method != "mpl":
            raise ConfigError(f"student_optim.wait_steps: the student wait is MPL's (method=mpl), "
                              f"not {self.method}'s")


def save_config(config, path: str | Path) -> None:
    """Write a resolved config dataclass as JSON beside a run."""
    Path(path).write_text(json.dumps(dataclasses.asdict(config), indent=2, default=str) + "\n")


def apply_override(config, assignment: str) -> None:
    """Set one nested field from `section.key=value` (e.g. `data.image_size=64`), converting the value to
    the field's current type. Unknown fields and unparsable values raise `ConfigError` naming the field."""
    key, sep, raw = assignment.partition("=")
    if not sep:
        raise ConfigError(f"override {assignment!r}: expected section.key=value")
    *path, name = key.strip().split(".")
    target = config
    for part in path:
        if not dataclasses.is_dataclass(target) or not hasattr(target, part):
            raise ConfigError(f"{key}: no config section {part!r}")
        target = getattr(target, part)
    fields = {f.name for f in dataclasses.fields(target)} if dataclasses.is_dataclass(target) else set()
    if name not in fields:
        raise ConfigError(f"{key}: unknown field; {type(target).__name__} has {sorted(fields)}")
    current = getattr(target, name)
    optional = "None" in str(next(f.type for f in dataclasses.fields(target) if f.name == name))
    try:
        if optional and raw.lower() in ("null", "none"):
            value = None
        elif isinstance(current, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            value = raw.lower() in ("true", "1")
        elif isinstance(current, (int, float, str)):
            value = type(current)(raw)
        else:
            value = json.loads(raw)
    except ValueError:
        raise ConfigError(f"{key}: cannot read {raw!r} as {type(current).__name__}") from None
    setattr(target, name, value)
    if hasattr(target, "__post_init__"):
        target.__post_init__()  # re-validate the section


def config_from_dict(cls, data: dict, where: str = ""):
    """`cls` (a config dataclass) from a dict in `save_config`'s layout, sections nested; a key the schema
    lacks, or a value of the wrong kind, raises `ConfigError` naming the field. Fields left out keep their
    defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of fields, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    defaults = cls()
    values = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"{name}: unknown field; {cls.__name__} has {sorted(fields)}")
        default = getattr(defaults, key)
        if dataclasses.is_dataclass(default):
            value = config_from_dict(type(default), value, name)
        elif not _same_kind(default, value):
            raise ConfigError(f"{name}: expected {type(default).__name__}, got {value!r}")
        values[key] = value
    return cls(**values)


def _same_kind(default, value) -> bool:
    if default is None or value is None:
        return True  # optional fields (`bn_momentum`)
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, list):
        return isinstance(value, list)
    return isinstance(value, type(default))


def load_config(path: str | Path) -> TrainConfig:
    """A `TrainConfig` from a YAML or JSON file with `config.json`'s schema (a saved run's config re-runs it)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml  # a dependency of accelerate; only YAML files need it

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
    try:
        return config_from_dict(TrainConfig, data or {})
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
