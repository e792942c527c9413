"""Tensor parallelism: channel-sharded 1x1 conv pairs and the classifier (Megatron-LM's column / row split,
applied to the wide blocks and large heads of EfficientNet-L2).

A pair is a column-parallel layer (output channels sharded: each rank computes its channels from the whole
input) followed, after any channel-local layers (BatchNorm, depthwise conv, activations), by a row-parallel
layer (input channels sharded: each rank's partial sum over its channels, summed over the group). Each rank
holds 1/tp of both weights and of the activations between them, and a pair costs one all-reduce forward
(after the row layer) and one backward (at the column layer's input):

    copy_to_tensor_parallel      identity forward, all-reduce backward (each shard's input gradient is partial)
    reduce_from_tensor_parallel  all-reduce forward, identity backward

The tensors outside a pair are replicated over the group and so are their gradients: every rank holds the
full gradient of a replicated parameter and of its own shard of a sharded one. No gradient reduction over
the tensor-parallel group is ever needed; sharded parameters carry a `tp_shard` (`Shard`) saying which
slice of the unsplit parameter they are.

Channel counts need not divide by tp: shards follow `shard_bounds` (the first ranks one channel more).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

from mpl_large.parallel.dims import ParallelDims
from mpl_large.parallel.spatial import shard_bounds

__all__ = [
    "ColumnParallelConv2d", "ColumnParallelLinear", "RowParallelConv2d", "RowParallelLinear", "Shard",
    "copy_to_tensor_parallel", "reduce_from_tensor_parallel", "shard_channels_",
]


@dataclass(frozen=True)
class Shard:
    """Where a tensor-parallel parameter sits in the unsplit one."""

    dim: int
    """The sharded dimension."""
    start: int
    """First index of this shard along `dim`."""
    stop: int
    """One past the last index."""
    size: int
    """Size of the unsplit parameter along `dim`."""


def _shard(t: torch.Tensor | None, dim: int, dims: ParallelDims) -> tuple[torch.Tensor | None, Shard | None]:
    if t is None:
        return None, None
    if t.shape[dim] < dims.tp:
        raise ValueError(f"tensor parallel: {t.shape[dim]} channels cannot be split over tp = {dims.tp} ranks")
    start, stop = shard_bounds(t.shape[dim], dims.tp, dims.tp_rank)
    return t.detach().narrow(dim, start, stop - start).clone(), Shard(dim, start, stop, t.shape[dim])


def _parameter(full: nn.Parameter | None, dim: int, dims: ParallelDims) -> nn.Parameter | None:
    """This rank's shard of `full` along `dim`, a new parameter tagged with its `tp_shard`."""
    data, shard = _shard(full, dim, dims)
    if data is None:
        return None
    p = nn.Parameter(data, requires_grad=full.requires_grad)
    p.tp_shard = shard
    return p


class _CopyToTP(Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(Function):
    """Concatenate the shards of the last dimension from every rank (forward); keep this rank's slice of
    the gradient (backward). Shards may differ by one: gloo gathers equal sizes, so they are padded."""

    @staticmethod
    def forward(ctx, x, size: int, dims: ParallelDims):
        bounds = [shard_bounds(size, dims.tp, r) for r in range(dims.tp)]
        ctx.bounds = bounds[dims.tp_rank]
        width = bounds[0][1] - bounds[0][0]  # the first shard is the largest
        padded = F.pad(x, (0, width - x.shape[-1])).contiguous()
        parts = [torch.empty_like(padded) for _ in bounds]
        dist.all_gather(parts, padded, group=dims.group("tp_group"))
        return torch.cat([p[..., :b - a] for p, (a, b) in zip(parts, bounds)], dim=-1)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.bounds
        return grad[..., a:b].contiguous(), None, None


def copy_to_tensor_parallel(x: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """Enter a column-parallel layer: identity, whose backward sums the input gradient over the group."""
    group = dims.group("tp_group")
    return x if group is None else _CopyToTP.apply(x, group)


def reduce_from_tensor_parallel(x: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """Leave a row-parallel layer: sum the partial outputs over the group; the gradient passes unchanged."""
    group = dims.group("tp_group")
    return x if group is None else _ReduceFromTP.apply(x, group)


def _check_pointwise(conv: nn.Conv2d, role: str) -> None:
    if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1:
        raise ValueError(f"{role}: needs a 1x1 stride-1 conv with groups=1, got {conv}")
    if not isinstance(conv.padding, str) and conv.padding != (0, 0):
        raise ValueError(f"{role}: needs an unpadded 1x1 conv, got padding {conv.padding}")


class ColumnParallelConv2d(nn.Module):
    """1x1 conv with its output channels sharded: this rank computes its channels from the whole input."""

    def __init__(self, conv: nn.Conv2d, dims: ParallelDims) -> None:
        super().__init__()
        _check_pointwise(conv, "ColumnParallelConv2d")
        self.dims = dims
        self.weight = _parameter(conv.weight, 0, dims)
        self.bias = _parameter(conv.bias, 0, dims)
        self.in_channels, self.out_channels = conv.in_channels, self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(copy_to_tensor_parallel(x, self.dims), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels} (of {self.weight.tp_shard.size}), tp={self.dims.tp}"


class RowParallelConv2d(nn.Module):
    """1x1 conv with its input channels sharded: partial sums over this rank's channels, summed over the
    group, then the (replicated) bias."""

    def __init__(self, conv: nn.Conv2d, dims: ParallelDims) -> None:
        super().__init__()
        _check_pointwise(conv, "RowParallelConv2d")
        self.dims = dims
        self.weight = _parameter(conv.weight, 1, dims)
        self.bias = conv.bias
        self.in_channels, self.out_channels = self.weight.shape[1], conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tensor_parallel(F.conv2d(x, self.weight), self.dims)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.in_channels} (of {self.weight.tp_shard.size}), {self.out_channels}, tp={self.dims.tp}"


class RowParallelLinear(nn.Module):
    """Linear layer with its input features sharded (the classifier after a column-parallel `conv_head`)."""

    def __init__(self, linear: nn.Linear, dims: ParallelDims) -> None:
        super().__init__()
        self.dims = dims
        self.weight = _parameter(linear.weight, 1, dims)
        self.bias = linear.bias
        self.in_features, self.out_features = self.weight.shape[1], linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tensor_parallel(F.linear(x, self.weight), self.dims)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.in_features} (of {self.weight.tp_shard.size}), {self.out_features}, tp={self.dims.tp}"


class ColumnParallelLinear(nn.Module):
    """Linear layer with its output features (classes) sharded, the logits gathered: a large head on a
    model whose features are replicated (ResNet, WRN). One collective each way: the all-gather of the
    logits forward, the all-reduce of the feature gradient backward."""

    def __init__(self, linear: nn.Linear, dims: ParallelDims) -> None:
        super().__init__()
        self.dims = dims
        self.weight = _parameter(linear.weight, 0, dims)
        self.bias = _parameter(linear.bias, 0, dims)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_tensor_parallel(x, self.dims), self.weight, self.bias)
        return y if self.dims.tp == 1 else _GatherFromTP.apply(y, self.out_features, self.dims)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.weight.shape[0]} (of {self.out_features}), tp={self.dims.tp}"


def shard_channels_(module: nn.Module, dims: ParallelDims) -> nn.Module:
    """Keep only this rank's channels of a channel-local layer between the two halves of a pair, in place:
    a BatchNorm (timm's BatchNormAct2d too) or a depthwise conv (groups == channels)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.weight = _parameter(module.weight, 0, dims)
        module.bias = _parameter(module.bias, 0, dims)
        for name in ("running_mean", "running_var"):
            if getattr(module, name) is not None:
                setattr(module, name, _shard(getattr(module, name), 0, dims)[0])
        start, stop = shard_bounds(module.num_features, dims.tp, dims.tp_rank)
        module.num_features = stop - start
    elif isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels:
        module.weight = _parameter(module.weight, 0, dims)
        module.bias = _parameter(module.bias, 0, dims)
        module.in_channels = module.out_channels = module.groups = module.weight.shape[0]
    else:
        raise ValueError(f"shard_channels_: {type(module).__name__} is not a BatchNorm or a depthwise conv")
    return module
