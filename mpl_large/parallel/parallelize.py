"""`parallelize(model, dims)`: a plain timm model (EfficientNet, ResNet, our WRN) with the layers of
`mpl_large.parallel.spatial` and `.tensor` swapped in by module type and name. Model code is never edited.

Call order on every rank:

    rank, world = mpl_large.zero.init_distributed()     # or dist.init_process_group
    dims = ParallelDims(sp=2).build()                   # dp inferred; builds the process groups
    torch.manual_seed(seed)                             # the same initial weights on every rank
    model = parallelize(timm.create_model(name), dims)  # before an optimizer or engine sees the parameters
    learner = ZeroLearner(model, ...)                   # ZeRO-3 partitions the (swapped) parameters over all ranks
    ...
    x = split_width(replica_batch, dims)                # this rank's strip of its replica's images
    logits = learner(x)                                 # the replica's logits, whole, on each of its ranks

Data: the replicas' batches are shards by `dims.dp_rank` (of `dims.dp`), not by global rank: the sp ranks of a
replica must see the same images, and the same random draws where the model or the step samples on replicated
tensors (pseudo labels, head dropout, drop-path): seed them alike, e.g. by `dims.dp_rank`.

Gradients: after a backward each rank holds its share of the gradient of the sum of all ranks' losses (see
`mpl_large.parallel.spatial`); the average over `grad_group` (the dp * sp ranks with the same parameters) is
the gradient of the mean loss over replicas. ZeRO and DDP average over all ranks, which is the same when
tp = 1, so nothing needs scaling; without an engine call `reduce_gradients` before the optimizer step.
With tp > 1 train without ZeRO (`reduce_gradients`): an engine would average different tensor-parallel
shards with each other (DeepSpeed would need an `mpu` whose data-parallel group is `grad_group`).

Inside `parallelize`, in this order:

1. Tensor parallel (tp > 1), while the modules still have their timm types: in every EfficientNet
   `InvertedResidual`, conv_pw becomes column-parallel, bn1 / conv_dw / bn2 keep their channel shard, the SE's
   conv_reduce is row- and its conv_expand column-parallel, conv_pwl row-parallel; the head's conv_head is
   column-parallel, bn2 sharded and the classifier row-parallel. Other models (ResNet, WRN): the classifier
   is column-parallel with gathered logits.
2. Spatial (sp > 1): squeeze-excite modules (their inner layers act on pooled 1x1 tensors and stay as they
   are, so a BN inside an excitation normalises over its replica even with `sync_bn`), global average
   pools, BatchNorms, windowed convs and pools; 1x1 stride-1 convs need no change. Modules known to reduce
   over space in ways this package does not implement raise an error. With sp = 1 and `sync_bn`, only the
   BatchNorms are swapped.
3. Hooks that tell the spatial layers the model input's global width (one scalar all-reduce per forward).
"""

from __future__ import annotations

import torch.distributed as dist
from timm.layers import (
    BlurPool2d, CecaModule, CondConv2d, EcaModule, EffectiveSEModule, GatherExcite, GlobalContext, SelectiveKernel,
    SEModule, SplitAttn,
)
from timm.layers.adaptive_avgmax_pool import (
    AdaptiveAvgMaxPool2d, AdaptiveCatAvgMaxPool2d, FastAdaptiveAvgMaxPool, FastAdaptiveAvgPool,
    FastAdaptiveCatAvgMaxPool, FastAdaptiveMaxPool,
)
from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame
from timm.models._efficientnet_blocks import InvertedResidual, SqueezeExcite
from timm.models.efficientnet import EfficientNet
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from mpl_large.parallel.dims import ParallelDims
from mpl_large.parallel.spatial import (
    InputWidth, SpatialBatchNorm2d, SpatialConv2d, SpatialGlobalAvgPool, SpatialPool2d, SpatialSqueezeExcite,
    all_reduce_int, split_width, width_local,
)
from mpl_large.parallel.tensor import (
    ColumnParallelConv2d, ColumnParallelLinear, RowParallelConv2d, RowParallelLinear, shard_channels_,
)

__all__ = ["parallelize", "reduce_gradients", "split_width"]

_SE_CHAINS = {SqueezeExcite: ("conv_reduce", "act1", "conv_expand"), SEModule: ("fc1", "bn", "act", "fc2")}
"""timm's squeeze-excite modules and the excitation layers their forward applies, in order."""

_UNSUPPORTED = (
    nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm, nn.AdaptiveMaxPool2d,
    nn.ConvTranspose2d, nn.Upsample, nn.Fold, nn.Unfold, MaxPool2dSame, AvgPool2dSame, BlurPool2d, CondConv2d,
    AdaptiveAvgMaxPool2d, AdaptiveCatAvgMaxPool2d, FastAdaptiveAvgMaxPool, FastAdaptiveCatAvgMaxPool,
    FastAdaptiveMaxPool, EffectiveSEModule, EcaModule, CecaModule, GatherExcite, GlobalContext, SelectiveKernel,
    SplitAttn,
)
"""Layers that reduce, resample or attend over space (timm's max and mixed global pools, its other attention
modules, TF-'same' pools) which have no spatial version here. The list cannot be complete: a model's own
forward may reduce over space (`x.mean((2, 3))`) outside any module; the whole-model parity tests are the
check for a new architecture."""


def parallelize(model: nn.Module, dims: ParallelDims) -> nn.Module:
    """Swap the tensor-parallel (dims.tp > 1) and spatial (dims.sp > 1) layers into `model`, in place, and
    return it; a `model` that is itself such a layer (`nn.Conv2d`, a BatchNorm) comes back swapped. `dims`
    must be built. See the module docstring for the order and what is swapped."""
    dims.group("sp_group")  # raises if dims.build() has not run
    if dims.tp > 1:
        _tensor_parallel(model, dims)
    root = nn.Sequential(model)  # the swaps replace children: under a wrapper, the model is one too
    if dims.sp == 1 and dims.sync_bn and dims.dp > 1:
        _sync_batchnorm(root, dims)
    if dims.sp > 1:
        width = InputWidth()
        _spatial(root, dims, width)

        def set_width(module, args):
            width.width = all_reduce_int(args[0].shape[-1], dims, args[0].device)

        def clear_width(module, args, output):
            width.width = None

        root[0].register_forward_pre_hook(set_width)
        root[0].register_forward_hook(clear_width, always_call=True)
    return root[0]


def reduce_gradients(model: nn.Module, dims: ParallelDims) -> None:
    """Average the gradients over `grad_group`, for training without ZeRO or DDP: afterwards every rank holds
    the unsplit model's gradient of the mean loss over replicas (its own shard of a tensor-parallel one)."""
    group = dims.group("grad_group")
    if group is None:
        return
    size = len(dims.members["grad_group"])
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    for dtype in dict.fromkeys(g.dtype for g in grads):  # the same order on every rank
        same = [g for g in grads if g.dtype == dtype]
        flat = _flatten_dense_tensors(same)
        dist.all_reduce(flat, group=group)
        flat /= size
        for g, reduced in zip(same, _unflatten_dense_tensors(flat, same)):
            g.copy_(reduced)


# ---------------------------------------------------------------------------------------------------
# Spatial


def _spatial(module: nn.Module, dims: ParallelDims, width: InputWidth) -> None:
    for name, child in module.named_children():
        new = _spatial_layer(child, dims, width)
        if new is None:
            _spatial(child, dims, width)
        elif new is not child:
            setattr(module, name, new)


def _sync_batchnorm(module: nn.Module, dims: ParallelDims) -> None:
    """Without spatial partitioning, only the BatchNorms change: statistics over all replicas."""
    for name, child in module.named_children():
        if type(child) in _SE_CHAINS:
            continue  # excitation BNs see pooled, per-replica tensors (as in `_spatial`)
        if isinstance(child, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            setattr(module, name, SpatialBatchNorm2d(child, dims))
        else:
            _sync_batchnorm(child, dims)


def _spatial_layer(m: nn.Module, dims: ParallelDims, width: InputWidth) -> nn.Module | None:
    """The replacement of `m` (`m` itself for a layer that stays), or None to look inside it."""
    if type(m) in _SE_CHAINS:
        if getattr(m, "add_maxpool", False):
            raise ValueError("parallelize: SEModule(add_maxpool=True) has no spatial version")
        return SpatialSqueezeExcite(m, _SE_CHAINS[type(m)], dims, width)
    if isinstance(m, nn.AdaptiveAvgPool2d):
        if m.output_size not in (1, (1, 1)):
            raise ValueError(f"parallelize: AdaptiveAvgPool2d({m.output_size}) has no spatial version (only global)")
        return SpatialGlobalAvgPool(dims, width, keepdim=True)
    if isinstance(m, FastAdaptiveAvgPool):
        return SpatialGlobalAvgPool(dims, width, keepdim=not m.flatten)
    if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        return SpatialBatchNorm2d(m, dims)
    if isinstance(m, nn.Conv2d):
        return m if width_local(m) else SpatialConv2d(m, dims, width)
    if isinstance(m, _UNSUPPORTED):
        raise ValueError(f"parallelize: {type(m).__name__} has no spatial version")
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        return SpatialPool2d(m, dims, width)
    return None


# ---------------------------------------------------------------------------------------------------
# Tensor parallel


def _tensor_parallel(model: nn.Module, dims: ParallelDims) -> None:
    for block in [m for m in model.modules() if isinstance(m, InvertedResidual)]:
        if block.conv_s2d is not None or not isinstance(block.aa, nn.Identity):
            continue  # space-to-depth stems and anti-aliasing stay replicated
        block.conv_pw = ColumnParallelConv2d(block.conv_pw, dims)
        for layer in (block.bn1, block.conv_dw, block.bn2):
            shard_channels_(layer, dims)
        if isinstance(block.se, SqueezeExcite):
            block.se.conv_reduce = RowParallelConv2d(block.se.conv_reduce, dims)
            block.se.conv_expand = ColumnParallelConv2d(block.se.conv_expand, dims)
        elif not isinstance(block.se, nn.Identity):
            raise ValueError(f"parallelize: no tensor-parallel plan for {type(block.se).__name__} in a block")
        block.conv_pwl = RowParallelConv2d(block.conv_pwl, dims)
    if isinstance(model, EfficientNet):
        # conv_head -> bn2 -> pool -> classifier is a pair: features stay sharded until the classifier.
        model.conv_head = ColumnParallelConv2d(model.conv_head, dims)
        shard_channels_(model.bn2, dims)
        model.classifier = RowParallelLinear(model.classifier, dims)
        return
    if not hasattr(model, "get_classifier"):
        return  # not a timm classifier: only its blocks are sharded
    classifier = model.get_classifier()
    if not isinstance(classifier, nn.Linear):
        raise ValueError(f"parallelize: tensor parallel needs a Linear classifier, got {type(classifier).__name__}")
    name = next(n for n, m in model.named_modules() if m is classifier)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, ColumnParallelLinear(classifier, dims))
