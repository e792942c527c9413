"""Assembly: from a model's config to a learner the steps can train, in one documented order.

Models know nothing of distribution; `assemble` applies everything else to a plain timm model, always in
this order (torchtitan's `parallelize_*` habit):

1. timm build: `timm.create_model` with the classifier size, dropout and stochastic depth;
2. per-model settings: activation checkpointing, channels-last inputs (by default the layout measured faster
   on the run's device, `CHANNELS_LAST`), BatchNorm momentum;
3. `parallelize`: spatial layers (and SyncBN) when the mesh partitions images (§4), then `torch.compile`
   (`ModelConfig.compile`) of the final module;
4. weights: a trained learner's, for the finetune phase (rank 0's buffers broadcast: `zero.broadcast_buffers`);
5. dtype: the engine's (`zero.cast_for_engine`: bf16 when the DeepSpeed config turns it on);
6. the engine wrap: a single-process `Learner` (which moves the model to `TrainConfig.device` and runs its
   forwards under autocast with `precision=bf16`), or the model in its own DeepSpeed engine (`ZeroLearner`,
   placed by the engine).

Steps 1-3 are `build_model`, steps 5-6 `make_learner` (also used for models that are not timm's, like
Reduced MPL's small teacher).
"""

from __future__ import annotations

import timm
import torch
import torch.distributed as dist
from torch import nn

import mpl_large.models  # noqa: F401  (registers wrn_28_2 with timm)
from mpl_large.config import ConfigError, ModelConfig, OptimConfig, TrainConfig
from mpl_large.learner import LearnerInterface
from mpl_large.optim import build_learner
from mpl_large.parallel import ParallelDims, parallelize
from mpl_large.device import choose_device
from mpl_large.ds_config import load_ds_config
from mpl_large.zero import ZeroLearner, broadcast_buffers, cast_for_engine


def assemble(cfg: TrainConfig, model_cfg: ModelConfig, optim: OptimConfig, micro_batch: int,
             deepspeed: str | None = None, dims: ParallelDims | None = None,
             trained: LearnerInterface | None = None) -> LearnerInterface:
    """A model built from `model_cfg` as a learner, steps 1-6 of the module docstring. `deepspeed`: this
    phase's DeepSpeed config (default `cfg.parallel.deepspeed`); `trained`: a learner whose weights the
    model takes (collective under DeepSpeed: every rank must call)."""
    state = trained.full_state_dict() if trained is not None else None
    model = build_model(model_cfg, choose_device(cfg.device).type, dims)
    if state is not None:
        model.load_state_dict(state)
    if trained is not None and dist.is_initialized():
        broadcast_buffers(model)
    return make_learner(cfg, model, optim, micro_batch, deepspeed, dims)


CHANNELS_LAST = {"cpu": True}
"""`ModelConfig.channels_last=None` by device type, as measured (README, "Devices, precision and compilation"):
on the CPU the trainer's WRN-28-2 MPL step (B=64, mu=7) took 23.2 s with channels-last inputs and 32.5 s with
contiguous ones on the 2-core machine (`benchmarks/mpl_step.py --no-keep-freed-memory [--no-channels-last]`). A
device type not listed (CUDA: no GPU has measured it yet) keeps PyTorch's contiguous default."""


def build_model(model_cfg: ModelConfig, device_type: str, dims: ParallelDims | None = None) -> nn.Module:
    """Steps 1-3: the timm model with its settings, with spatial layers swapped in when the mesh partitions
    images (§4). `device_type`: where it will run, for the layout's default."""
    # Only models with stochastic depth take drop_path_rate (WRN and digits_cnn do not).
    depth = {"drop_path_rate": model_cfg.drop_path_rate} if model_cfg.drop_path_rate else {}
    model = timm.create_model(model_cfg.name, num_classes=model_cfg.num_classes, drop_rate=model_cfg.drop_rate,
                              **depth)
    if model_cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if channels_last(model_cfg, device_type):
        model.register_forward_pre_hook(_channels_last)
    if model_cfg.bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = model_cfg.bn_momentum
    if dims is not None and (dims.sp > 1 or dims.sync_bn):
        model = parallelize(model, dims)
    if model_cfg.compile:
        # After the layer swaps (dynamo traces the final modules) and before the engine wrap (DeepSpeed's
        # hooks stay outside the graph); in place, so parameter names and checkpoints are unchanged.
        model.compile()
    return model


def channels_last(model_cfg: ModelConfig, device_type: str) -> bool:
    """Whether the model takes channels-last inputs: `model_cfg.channels_last`, or the device's default."""
    if model_cfg.channels_last is None:
        return CHANNELS_LAST.get(device_type, False)
    return model_cfg.channels_last


def _channels_last(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.dim() == 4
                 else a for a in args)


def make_learner(cfg: TrainConfig, model: nn.Module, optim: OptimConfig, micro_batch: int,
                 deepspeed: str | None = None, dims: ParallelDims | None = None) -> LearnerInterface:
    """Steps 5-6: a single-process `Learner`, or with `cfg.parallel.deepspeed` (or `deepspeed`, for one
    phase) the model in the engine's dtype in its own DeepSpeed engine; `dims` for a model built by
    `build_model`."""
    deepspeed = cfg.parallel.deepspeed if deepspeed is None else deepspeed
    if not cfg.parallel.deepspeed:
        return build_learner(model, optim, choose_device(cfg.device),
                             torch.bfloat16 if cfg.precision == "bf16" else None)
    ds_config = load_ds_config(deepspeed, choose_device(cfg.device).type)
    flat = ds_config["zero_optimization"].get("stage", 0) > 0 or any(
        ds_config.get(k, {}).get("enabled", False) for k in ("bf16", "fp16"))
    if optim.name == "lars" and flat:
        # LARS scales each layer's step by |w| / |g|; these engines give the optimizer one flat partition
        # per parameter group, so the ratio would span whole partitions instead of layers.
        raise ConfigError(f"deepspeed: {deepspeed!r} partitions or casts the parameters, and LARS needs whole "
                          f"fp32 layers; give the LARS phase `ddp` (finetune.deepspeed=ddp)")
    return ZeroLearner(cast_for_engine(model, ds_config), optim, ds_config, micro_batch, dims)
