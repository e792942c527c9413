"""Spatial partitioning (paper §4): every image is split along its width, one strip per rank of a spatial
group, and every layer runs on its strip.

Layout. A tensor of global width W lives on the sp ranks of a group as strips in rank order: rank s holds
columns `shard_bounds(W, sp, s)`, `torch.tensor_split` order (the first W % sp ranks hold one column
more). Every layer's output has the same layout for its own width, so per-position layers (activations,
residual sums, 1x1 stride-1 convs) need no communication at all.

Uneven widths are handled exactly, not refused: a windowed layer (conv, pooling) computes from the global
width which output columns each rank owns and which input columns each of those needs, and ranks exchange
exactly those columns: usually a few halo columns with each neighbour, but as many ranks away as needed when
strips are narrower than the window, and none for a strided 1x1 conv whose strips line up. The only
requirement is a non-empty strip per rank, i.e. every layer's width >= sp (a clear error otherwise). With
the paper's 512-pixel width and sp = 16, EfficientNet's widths 256 ... 16 all divide evenly anyway.

Layers (each swapped in for the plain layer by `mpl_large.parallel.parallelize`):

- `SpatialConv2d`: halo exchange and convolution as one autograd function (forward: receive the columns
  the kernel needs from the neighbours; backward: send their gradients back, where they are added to the
  owner's input gradient). Any kernel, stride, dilation and groups; symmetric, PyTorch-"same" and
  TF-"same" (timm `Conv2dSame`) padding, with the TF padding computed from the global width. It saves
  only its input strip and the received halos for backward (the extended input is rebuilt there), so its
  activation memory is that of the unsplit layer on a strip.
- `SpatialPool2d`: max / average pooling windows over the halo-extended strip.
- `SpatialBatchNorm2d` (also timm's `BatchNormAct2d`): statistics from one all-reduce of per-channel sum,
  sum of squares and count over the spatial group (or every replica, `ParallelDims.sync_bn`); one more
  all-reduce in backward for the two per-channel sums the input gradient needs. Running statistics are
  updated from the global mean and (unbiased) variance, as the unsplit layer does.
- `SpatialGlobalAvgPool`, `SpatialSqueezeExcite`: the pooled sum all-reduced over the spatial group, so the
  head and the excitation see the whole image on every rank.

Gradients. Every collective's backward is its exact adjoint (the adjoint of an all-reduce is an
all-reduce), so a backward computes on each rank its share of d(sum over ranks of each rank's loss)/d(theta).
The ranks of a spatial group compute the same logits and loss from the same images, so that sum counts the
replica's loss sp times: averaging the gradients over the spatial group gives exactly the unsplit model's
gradient, for every parameter alike (convs and BNs whose inputs are strips, and the head after the pooled
all-reduce). Averaging over all dp * sp ranks -- what DDP and ZeRO do -- gives the gradient of the mean
loss over replicas. See `mpl_large.parallel.parallelize.reduce_gradients`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.conv2d_same import Conv2dSameExport
from torch import nn
from torch.autograd import Function

from mpl_large.parallel.dims import ParallelDims

__all__ = [
    "InputWidth", "SpatialBatchNorm2d", "SpatialConv2d", "SpatialGlobalAvgPool", "SpatialPool2d",
    "SpatialSqueezeExcite", "all_reduce_sum", "halo_plan", "shard_bounds", "split_width",
]


def shard_bounds(size: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part `index` when `size` items are split into `parts` in order, the first
    size % parts parts one item larger (torch.tensor_split's split)."""
    base, extra = divmod(size, parts)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


def split_width(x: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """This rank's strip of a batch of images (N, C, H, W): the columns its spatial rank holds. Every rank
    of a spatial group must pass the same images (its replica's batch)."""
    start, stop = shard_bounds(x.shape[-1], dims.sp, dims.sp_rank)
    return x[..., start:stop].contiguous()


# ---------------------------------------------------------------------------------------------------
# Global widths


class InputWidth:
    """The global width of a model's input during its forward, shared by the model's spatial layers.

    A layer's global width is a function of the model input's (the same on every rank), so a layer
    all-reduces its strip width the first time it sees a model input width and caches the answer. The
    hooks `parallelize` installs set `width` before the model's forward (one scalar all-reduce) and clear
    it after; outside a model forward (a layer alone, activation-checkpoint recomputation) a layer
    all-reduces its width at every call.
    """

    def __init__(self) -> None:
        self.width: int | None = None


class _StripLayer(nn.Module):
    """A layer that needs the global width of its input strips."""

    def __init__(self, dims: ParallelDims, input_width: InputWidth | None) -> None:
        super().__init__()
        self.dims = dims
        self.input_width = input_width
        self._widths: dict[int, int] = {}

    def global_width(self, x: torch.Tensor) -> int:
        """The global width of `x`, this rank's strip (checked to be the strip `shard_bounds` assigns)."""
        local = x.shape[-1]
        key = self.input_width.width if self.input_width is not None else None
        width = self._widths.get(key) if key is not None else None
        if width is None:
            width = all_reduce_int(local, self.dims, x.device)
            if key is not None:
                self._widths[key] = width
        expected = shard_bounds(width, self.dims.sp, self.dims.sp_rank)
        if local != expected[1] - expected[0]:
            raise ValueError(
                f"{type(self).__name__}: spatial rank {self.dims.sp_rank} holds {local} columns of a global "
                f"width {width}, expected {expected[1] - expected[0]} (split inputs with split_width)"
            )
        return width


def all_reduce_int(value: int, dims: ParallelDims, device: torch.device) -> int:
    """Sum of an integer over the spatial group (on `device`: NCCL reduces only GPU tensors)."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    if dims.group("sp_group") is not None:
        dist.all_reduce(t, group=dims.group("sp_group"))
    return int(t.item())


# ---------------------------------------------------------------------------------------------------
# Halo exchange


@dataclass(frozen=True)
class HaloPlan:
    """Which columns one rank needs for a window operation along the width, and from whom.

    Columns are global indices. The rank owns output columns `shard_bounds(out_width, sp, rank)`; they read
    input columns [start, stop) with start = first * stride - pad_left, which may run past the image: those
    are `pad` (before, after) padding columns, the rest arrive as `recv` pieces in column order.
    """

    own: tuple[int, int]
    """This rank's input columns."""
    out_width: int
    """Global output width."""
    pad: tuple[int, int]
    """Padding columns before and after the needed input columns."""
    recv: tuple[tuple[int, int, int], ...]
    """(spatial rank, start, stop): the pieces of the needed input, in order; this rank's own among them."""
    send: tuple[tuple[int, int, int], ...]
    """(spatial rank, start, stop): columns of this rank's strip that another rank needs."""


@functools.lru_cache(maxsize=4096)
def halo_plan(
    width: int, parts: int, index: int, kernel: int, stride: int, dilation: int, pad_left: int, pad_right: int
) -> HaloPlan:
    """The `HaloPlan` of rank `index` of `parts` for a window of `kernel` taps (`dilation` apart) moved by
    `stride` over `width` columns padded by `pad_left` and `pad_right`."""
    span = dilation * (kernel - 1) + 1
    out_width = (width + pad_left + pad_right - span) // stride + 1
    if out_width < parts:
        raise ValueError(
            f"a window of {kernel} taps (stride {stride}, dilation {dilation}) over a width of {width} gives "
            f"{out_width} output columns, fewer than the {parts} spatial ranks: use a wider input or a "
            f"smaller spatial degree"
        )

    def needed(rank: int) -> tuple[int, int]:
        first, stop = shard_bounds(out_width, parts, rank)
        return first * stride - pad_left, (stop - 1) * stride - pad_left + span

    start, stop = needed(index)
    own = shard_bounds(width, parts, index)
    recv = []
    for rank in range(parts):
        lo, hi = shard_bounds(width, parts, rank)
        lo, hi = max(lo, start), min(hi, stop)
        if lo < hi:
            recv.append((rank, lo, hi))
    send = []
    for rank in range(parts):
        if rank != index:
            lo, hi = needed(rank)
            lo, hi = max(lo, own[0]), min(hi, own[1])
            if lo < hi:
                send.append((rank, lo, hi))
    return HaloPlan(own, out_width, (max(0, -start), max(0, stop - width)), tuple(recv), tuple(send))


def _exchange(dims: ParallelDims, sends: list, recvs: list) -> None:
    """Point-to-point transfers within the spatial group: `sends` and `recvs` are (spatial rank, tensor)."""
    ranks, group = dims.members["sp_group"], dims.group("sp_group")
    ops = [dist.P2POp(dist.isend, t, ranks[r], group) for r, t in sends]
    ops += [dist.P2POp(dist.irecv, t, ranks[r], group) for r, t in recvs]
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()


def _receive_halos(x: torch.Tensor, plan: HaloPlan, dims: ParallelDims) -> list[torch.Tensor]:
    """Send the columns others need, receive the pieces this rank needs (in column order)."""
    me, first = dims.sp_rank, plan.own[0]
    sends = [(r, x[..., lo - first:hi - first].contiguous()) for r, lo, hi in plan.send]
    recvs = [(r, x.new_empty(*x.shape[:-1], hi - lo)) for r, lo, hi in plan.recv if r != me]
    _exchange(dims, sends, recvs)
    return [t for _, t in recvs]


def _extend(
    x: torch.Tensor, halos: list[torch.Tensor], plan: HaloPlan, rows: tuple[int, int], fill: float, me: int
) -> torch.Tensor:
    """The needed input columns in one tensor: padding, received pieces and this rank's own columns, with
    `rows` (top, bottom) padding rows. A view of x when nothing needs adding."""
    first, halos = plan.own[0], iter(halos)
    pieces = [x[..., lo - first:hi - first] if r == me else next(halos) for r, lo, hi in plan.recv]
    if len(pieces) == 1 and plan.pad == (0, 0) and rows == (0, 0):
        return pieces[0]
    n, c, h, _ = x.shape
    width = plan.pad[0] + sum(p.shape[-1] for p in pieces) + plan.pad[1]
    out = x.new_full((n, c, h + rows[0] + rows[1], width), fill)
    col = plan.pad[0]
    for p in pieces:
        out[:, :, rows[0]:rows[0] + h, col:col + p.shape[-1]] = p
        col += p.shape[-1]
    return out


def _return_halos(
    grad: torch.Tensor, plan: HaloPlan, rows: tuple[int, int], x_shape: torch.Size, dims: ParallelDims
) -> torch.Tensor:
    """The adjoint of `_receive_halos` + `_extend`: the gradient of the extended input, padding dropped,
    each piece added to its owner's input gradient."""
    me, first = dims.sp_rank, plan.own[0]
    grad = grad[:, :, rows[0]:rows[0] + x_shape[2]]
    grad_x = grad.new_zeros(x_shape)
    sends, col = [], plan.pad[0]
    for r, lo, hi in plan.recv:
        piece = grad[..., col:col + hi - lo]
        col += hi - lo
        if r == me:
            grad_x[..., lo - first:hi - first] += piece
        else:
            sends.append((r, piece.contiguous()))
    recvs = [(r, grad.new_empty(*x_shape[:-1], hi - lo)) for r, lo, hi in plan.send]
    _exchange(dims, sends, recvs)
    for (_, lo, hi), (_, t) in zip(plan.send, recvs):
        grad_x[..., lo - first:hi - first] += t
    return grad_x


class _HaloExchange(Function):
    """x (a strip) -> the strip extended by its halos and padding; backward returns the halo gradients."""

    @staticmethod
    def forward(ctx, x, plan: HaloPlan, rows: tuple[int, int], fill: float, dims: ParallelDims):
        ctx.plan, ctx.rows, ctx.dims, ctx.x_shape = plan, rows, dims, x.shape
        out = _extend(x, _receive_halos(x, plan, dims), plan, rows, fill, dims.sp_rank)
        # A function may not return a view of its input; `_extend` returns one when nothing is added.
        return out.clone() if out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() else out

    @staticmethod
    def backward(ctx, grad):
        return _return_halos(grad, ctx.plan, ctx.rows, ctx.x_shape, ctx.dims), None, None, None, None


class _HaloConv2d(Function):
    """Halo exchange + convolution. Saves the strip and the received halos, not the extended input: the
    extended input is rebuilt in backward, so the saved activations are those of the unsplit layer."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan: HaloPlan, rows: tuple[int, int], padding: tuple[int, int],
                conv: SpatialConv2d):
        dims = conv.dims
        halos = _receive_halos(x, plan, dims)
        extended = _extend(x, halos, plan, rows, 0.0, dims.sp_rank)
        y = F.conv2d(extended, weight, bias, conv.stride, padding, conv.dilation, conv.groups)
        ctx.save_for_backward(x, weight, *halos)
        ctx.plan, ctx.rows, ctx.conv, ctx.padding, ctx.has_bias = plan, rows, conv, padding, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, *halos = ctx.saved_tensors
        conv, plan, rows = ctx.conv, ctx.plan, ctx.rows
        extended = _extend(x, halos, plan, rows, 0.0, conv.dims.sp_rank)
        grad_e, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad, extended, weight, [weight.shape[0]] if ctx.has_bias else None, list(conv.stride),
            list(ctx.padding), list(conv.dilation), False, [0, 0], conv.groups,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]],
        )
        grad_x = _return_halos(grad_e, plan, rows, x.shape, conv.dims) if ctx.needs_input_grad[0] else None
        return grad_x, grad_w, grad_b, None, None, None, None


# ---------------------------------------------------------------------------------------------------
# Windowed layers


def _tf_same(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after): the extra column, if any, goes after (timm pad_same)."""
    pad = max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return pad // 2, pad - pad // 2


def width_local(conv: nn.Conv2d) -> bool:
    """A conv that reads only its own output column (1x1 along the width, stride 1, no width padding)
    needs no halo and stays as it is."""
    if conv.kernel_size[1] != 1 or conv.stride[1] != 1:
        return False
    return isinstance(conv, (Conv2dSame, Conv2dSameExport)) or isinstance(conv.padding, str) or conv.padding[1] == 0


class SpatialConv2d(_StripLayer):
    """`nn.Conv2d` (or timm `Conv2dSame`) on width strips, with halo exchange. Holds the original layer's
    weight and bias (the same Parameter objects, the same state-dict keys)."""

    def __init__(self, conv: nn.Conv2d, dims: ParallelDims, input_width: InputWidth | None = None) -> None:
        super().__init__(dims, input_width)
        if conv.padding_mode != "zeros":
            raise ValueError(f"SpatialConv2d: padding_mode {conv.padding_mode!r} is not supported (only 'zeros')")
        self.weight = conv.weight
        self.bias = conv.bias
        self.kernel_size, self.stride, self.dilation = conv.kernel_size, conv.stride, conv.dilation
        self.groups, self.in_channels, self.out_channels = conv.groups, conv.in_channels, conv.out_channels
        self.tf_same = isinstance(conv, (Conv2dSame, Conv2dSameExport))
        if isinstance(conv.padding, str) and conv.padding == "same" and conv.stride != (1, 1):
            raise ValueError("SpatialConv2d: padding='same' needs stride 1 (as nn.Conv2d)")
        self.padding = conv.padding  # tuple, 'same' or 'valid' (ignored when tf_same)

    def _pads(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) padding of the unsplit layer for an input of this global size."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        if self.tf_same:
            return (*_tf_same(height, kh, sh, dh), *_tf_same(width, kw, sw, dw))
        if self.padding == "same":  # nn.Conv2d: total d (k - 1), the odd one after
            th, tw = dh * (kh - 1), dw * (kw - 1)
            return th // 2, th - th // 2, tw // 2, tw - tw // 2
        if self.padding == "valid":
            return 0, 0, 0, 0
        ph, pw = self.padding
        return ph, ph, pw, pw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = self.global_width(x)
        top, bottom, left, right = self._pads(x.shape[-2], width)
        plan = halo_plan(width, self.dims.sp, self.dims.sp_rank, self.kernel_size[1], self.stride[1],
                         self.dilation[1], left, right)
        # Symmetric row padding is the conv's own; asymmetric rows (TF 'same') are built into the extension.
        if top == bottom:
            return _HaloConv2d.apply(x, self.weight, self.bias, plan, (0, 0), (top, 0), self)
        return _HaloConv2d.apply(x, self.weight, self.bias, plan, (top, bottom), (0, 0), self)

    def extra_repr(self) -> str:
        pad = "tf_same" if self.tf_same else self.padding
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={pad}, dilation={self.dilation}, groups={self.groups}, sp={self.dims.sp}")


class SpatialPool2d(_StripLayer):
    """`nn.MaxPool2d` / `nn.AvgPool2d` on width strips, over the halo-extended strip."""

    def __init__(self, pool: nn.MaxPool2d | nn.AvgPool2d, dims: ParallelDims,
                 input_width: InputWidth | None = None) -> None:
        super().__init__(dims, input_width)
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
        self.is_max = isinstance(pool, nn.MaxPool2d)
        self.kernel_size = pair(pool.kernel_size)
        self.stride = pair(pool.stride or pool.kernel_size)
        self.padding = pair(pool.padding)
        self.dilation = pair(pool.dilation) if self.is_max else (1, 1)
        self.ceil_mode = pool.ceil_mode
        if self.is_max and pool.return_indices:
            raise ValueError("SpatialPool2d: MaxPool2d(return_indices=True) is not supported")
        if not self.is_max:
            self.count_include_pad, self.divisor_override = pool.count_include_pad, pool.divisor_override
            if not pool.count_include_pad and self.padding[1]:
                # The width padding is built into the extended strip, where it would be counted.
                raise ValueError("SpatialPool2d: AvgPool2d(count_include_pad=False) with width padding")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = self.global_width(x)
        k, s, p, d = self.kernel_size[1], self.stride[1], self.padding[1], self.dilation[1]
        plan = halo_plan(width, self.dims.sp, self.dims.sp_rank, k, s, d, p, p)
        if self.ceil_mode and -(-(width + 2 * p - d * (k - 1) - 1) // s) + 1 != plan.out_width:
            # ceil_mode would add a partial window at the right edge; rows keep their ceil_mode.
            raise ValueError(f"SpatialPool2d: ceil_mode changes the output width of a {width}-wide input")
        fill = float("-inf") if self.is_max else 0.0
        x = _HaloExchange.apply(x, plan, (0, 0), fill, self.dims)
        padding = (self.padding[0], 0)
        if self.is_max:
            return F.max_pool2d(x, self.kernel_size, self.stride, padding, self.dilation, self.ceil_mode)
        return F.avg_pool2d(x, self.kernel_size, self.stride, padding, self.ceil_mode, self.count_include_pad,
                            self.divisor_override)


# ---------------------------------------------------------------------------------------------------
# Reductions over the strips: BatchNorm, global pooling, squeeze-and-excitation


class _AllReduceSum(Function):
    """Sum over the group; its adjoint is the same sum of the gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Differentiable sum of `x` over `group` (identity for a one-rank group)."""
    return x if group is None else _AllReduceSum.apply(x, group)


class _BatchNorm(Function):
    """Training-mode BatchNorm whose statistics span the strips (and replicas) of `group`."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, factor: float, eps: float, group):
        channels = x.shape[1]
        n = x.numel() // channels
        acc = torch.promote_types(x.dtype, torch.float32)  # bf16 / fp16 statistics in fp32, as native BN
        # The sum of squares as n (var + mean^2) of this rank's strip, from a stable local var_mean, in
        # float64: var = E[x^2] - mean^2 then cancels only float64 numbers. Squares rounded to fp32 would
        # carry errors of ~6e-8 (mean / std)^2 of the variance each.
        var, mean = (t.double() for t in torch.var_mean(x.to(acc), dim=[0, *range(2, x.dim())], correction=0))
        stats = torch.cat([n * mean, n * (var + mean.square()), mean.new_tensor([n])])
        if group is not None:
            dist.all_reduce(stats, group=group)
        count = stats[-1].item()
        if count <= 1:
            raise ValueError(f"BatchNorm: expected more than 1 value per channel when training, got {count:.0f}")
        mean = stats[:channels] / count
        var = (stats[channels:-1] / count - mean.square()).clamp_min(0)
        if running_mean is not None:
            running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
            running_var.mul_(1 - factor).add_((var * (count / (count - 1))).to(running_var.dtype), alpha=factor)
        y = F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), weight, bias, False, 0.0, eps)
        ctx.save_for_backward(x, weight, mean.to(acc), torch.rsqrt(var + eps).to(acc))
        ctx.count, ctx.group, ctx.has_bias = count, group, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, invstd = ctx.saved_tensors
        acc, shape, dims = mean.dtype, [1, -1] + [1] * (x.dim() - 2), [0, *range(2, x.dim())]
        xmu = x.to(acc) - mean.view(shape)
        dy = grad.to(acc)
        # This rank's sums: its share of the weight and bias gradients.
        local = torch.stack([dy.sum(dims, dtype=torch.float64), (dy * xmu).sum(dims, dtype=torch.float64)])
        total = local.clone()
        if ctx.group is not None:
            dist.all_reduce(total, group=ctx.group)
        mean_dy, mean_dy_xmu = (total / ctx.count).to(acc)
        scale = invstd if weight is None else invstd * weight.to(acc)
        grad_x = (dy - mean_dy.view(shape) - xmu * (invstd.square() * mean_dy_xmu).view(shape)) * scale.view(shape)
        needs_w = weight is not None and ctx.needs_input_grad[1]
        grad_w = (local[1].to(acc) * invstd).to(weight.dtype) if needs_w else None
        grad_b = local[0].to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x.to(x.dtype), grad_w, grad_b, None, None, None, None, None


class SpatialBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d over width strips, statistics over `ParallelDims`' bn_group; also stands in for timm's
    `BatchNormAct2d` (keeping its `drop` and `act`). Holds the original layer's parameters and buffers, so
    state-dict keys and `measurement_mode` (which toggles `track_running_stats`) are unchanged."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, dims: ParallelDims) -> None:
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta")
        self.weight, self.bias = bn.weight, bn.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(self, name, getattr(bn, name))
        self.drop = getattr(bn, "drop", nn.Identity())
        self.act = getattr(bn, "act", nn.Identity())
        self.training = bn.training
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As nn.BatchNorm2d.forward: which statistics normalise, and whether the buffers are updated.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if batch_stats:
            update = self.training and self.track_running_stats and self.running_mean is not None
            x = _BatchNorm.apply(x, self.weight, self.bias, self.running_mean if update else None,
                                 self.running_var if update else None, factor, self.eps,
                                 self.dims.group("bn_group"))
        else:
            x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(self.drop(x))


class SpatialGlobalAvgPool(_StripLayer):
    """Global average pooling of width strips: the per-channel sum all-reduced over the spatial group."""

    def __init__(self, dims: ParallelDims, input_width: InputWidth | None = None, keepdim: bool = True) -> None:
        super().__init__(dims, input_width)
        self.keepdim = keepdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = self.global_width(x)
        total = all_reduce_sum(x.sum((2, 3), keepdim=self.keepdim), self.dims.group("sp_group"))
        return total / (x.shape[-2] * width)

    def extra_repr(self) -> str:
        return f"keepdim={self.keepdim}, sp={self.dims.sp}"


class SpatialSqueezeExcite(nn.Module):
    """Squeeze-and-excitation of width strips: the squeeze is the global average (`SpatialGlobalAvgPool`),
    the excitation runs, the same on every rank, on it, and gates this rank's strip.

    Adopts the children of a timm SE module under their own names (`chain`, then `gate`), so state-dict
    keys stay those of the unsplit model.
    """

    def __init__(self, se: nn.Module, chain: tuple[str, ...], dims: ParallelDims,
                 input_width: InputWidth | None = None) -> None:
        super().__init__()
        self.pool = SpatialGlobalAvgPool(dims, input_width)
        self.chain = chain
        for name in (*chain, "gate"):
            self.add_module(name, getattr(se, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = self.pool(x)
        for name in self.chain:
            x_se = getattr(self, name)(x_se)
        return x * self.gate(x_se)
