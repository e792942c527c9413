"""Tensor-parallel layers vs the unsplit layers, on real gloo ranks: tp=2 (2 ranks), tp=4 and sp=2 x tp=2
(4 ranks). Channel counts (10, 7 classes) do not divide by 4, so shards are uneven.

Checked against the unsplit module: outputs, input gradients, every parameter gradient (a sharded one
against its slice of the unsplit gradient, summed over the spatial group), BN running statistics, and the
number of collectives: one all-reduce forward and one backward per column/row pair.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.distributed as dist
from parallel_harness import mismatch, run_ranks
from timm.layers import BatchNormAct2d, SelectAdaptivePool2d
from timm.models._efficientnet_blocks import InvertedResidual, SqueezeExcite
from torch import nn

from mpl_large.parallel import ParallelDims, parallelize, split_width
from mpl_large.parallel.spatial import shard_bounds
from mpl_large.parallel.tensor import (
    ColumnParallelConv2d, ColumnParallelLinear, RowParallelConv2d, RowParallelLinear, shard_channels_,
)


def pair() -> nn.Sequential:
    """conv_pw -> BN+act -> depthwise -> BN+act -> conv_pwl: an inverted residual without SE or skip."""
    return nn.Sequential(nn.Conv2d(8, 10, 1), BatchNormAct2d(10, act_layer=nn.SiLU),
                         nn.Conv2d(10, 10, 3, padding=1, groups=10), BatchNormAct2d(10, act_layer=nn.SiLU),
                         nn.Conv2d(10, 6, 1))


def shard_pair(m: nn.Sequential, dims: ParallelDims) -> nn.Sequential:
    m[0] = ColumnParallelConv2d(m[0], dims)
    for i in (1, 2, 3):
        shard_channels_(m[i], dims)
    m[4] = RowParallelConv2d(m[4], dims)
    return m


def block(stride: int) -> nn.Sequential:
    """timm's EfficientNet block with SE; stride 2 with TF 'same' padding (Conv2dSame depthwise)."""
    se = functools.partial(SqueezeExcite, rd_ratio=0.25)
    return nn.Sequential(InvertedResidual(8, 8 if stride == 1 else 6, 3, stride=stride, exp_ratio=1.25,
                                          pad_type="same" if stride == 2 else "", act_layer=nn.SiLU, se_layer=se))


def head() -> nn.Sequential:
    """EfficientNet's head: conv_head -> bn2 -> global pool -> classifier (7 classes)."""
    return nn.Sequential(nn.Conv2d(8, 10, 1), BatchNormAct2d(10, act_layer=nn.SiLU),
                         SelectAdaptivePool2d(pool_type="avg", flatten=True), nn.Linear(10, 7))


def shard_head(m: nn.Sequential, dims: ParallelDims) -> nn.Sequential:
    m[0] = ColumnParallelConv2d(m[0], dims)
    shard_channels_(m[1], dims)
    m[3] = RowParallelLinear(m[3], dims)
    return m


def classifier() -> nn.Sequential:
    return nn.Sequential(SelectAdaptivePool2d(pool_type="avg", flatten=True), nn.Linear(8, 7))


def shard_classifier(m: nn.Sequential, dims: ParallelDims) -> nn.Sequential:
    m[1] = ColumnParallelLinear(m[1], dims)
    return m


CASES = {
    # name: (factory, manual tensor-parallel plan or None for parallelize's, input shape, pairs)
    "pair": (pair, shard_pair, (2, 8, 5, 12), 1),
    "inverted_residual_se": (lambda: block(1), None, (2, 8, 5, 12), 2),
    "inverted_residual_se_s2_tf_same": (lambda: block(2), None, (2, 8, 6, 16), 2),
    "head": (head, shard_head, (3, 8, 4, 12), 1),
    "classifier_gathered": (classifier, shard_classifier, (3, 8, 4, 12), 1),
}
CONFIGS = {2: {"tp2": dict(tp=2)}, 4: {"tp4": dict(tp=4), "sp2tp2": dict(sp=2, tp=2)}}


class CountCollectives:
    """Counts all-reduce and all-gather calls (patched on torch.distributed, where the layers look them up)."""

    def __init__(self) -> None:
        self.calls = 0
        self.saved = dist.all_reduce, dist.all_gather

    def __enter__(self):
        def counted(fn):
            def wrapper(*args, **kwargs):
                self.calls += 1
                return fn(*args, **kwargs)
            return wrapper
        dist.all_reduce, dist.all_gather = (counted(f) for f in self.saved)
        return self

    def __exit__(self, *exc):
        dist.all_reduce, dist.all_gather = self.saved


def check_case(name: str, dims: ParallelDims) -> list[str]:
    factory, plan, shape, pairs = CASES[name]
    torch.manual_seed(0)
    ref = factory()
    model = copy.deepcopy(ref)
    if plan is not None:
        plan(model, dims)
    model = parallelize(model, dims)
    gen = torch.Generator().manual_seed(1)
    x_full = torch.randn(*shape, generator=gen) * 2 + 0.5
    x_ref = x_full.clone().requires_grad_()
    y_ref = ref(x_ref)
    g = torch.randn(y_ref.shape, generator=gen)
    (y_ref * g).sum().backward()

    x = split_width(x_full, dims).requires_grad_()
    with CountCollectives() as forward:
        y = model(x)
    replicated = y.dim() < 4  # pooled: the same on every spatial rank
    out_cols = slice(None) if replicated else slice(*shard_bounds(y_ref.shape[-1], dims.sp, dims.sp_rank))
    with CountCollectives() as backward:
        (y * g[..., out_cols]).sum().div(dims.sp if replicated else 1).backward()

    in_cols = slice(*shard_bounds(shape[-1], dims.sp, dims.sp_rank))
    failures = mismatch("output", y, y_ref[..., out_cols]) + mismatch("input grad", x.grad, x_ref.grad[..., in_cols])
    params = dict(model.named_parameters())
    for pname, p in ref.named_parameters():
        grad = params[pname].grad.clone()
        if dims.sp > 1:
            dist.all_reduce(grad, group=dims.group("sp_group"))
        shard = getattr(params[pname], "tp_shard", None)
        want = p.grad if shard is None else p.grad.narrow(shard.dim, shard.start, shard.stop - shard.start)
        failures += mismatch(f"{pname} grad", grad, want)
    buffers = dict(model.named_buffers())
    for bname, b in ref.named_buffers():
        if b.dim() and buffers[bname].shape != b.shape:  # a sharded BN's statistics: this rank's channels
            b = b[slice(*shard_bounds(b.shape[0], dims.tp, dims.tp_rank))]
        failures += mismatch(bname, buffers[bname], b)
    if dims.sp == 1 and (forward.calls, backward.calls) != (pairs, pairs):
        failures.append(f"{forward.calls} collectives forward, {backward.calls} backward; expected {pairs} each")
    return failures


def world(rank: int, world_size: int) -> dict[str, list[str]]:
    meshes = {cfg: ParallelDims(**kw).build() for cfg, kw in CONFIGS[world_size].items()}
    return {f"{cfg}:{name}": check_case(name, dims) for cfg, dims in meshes.items() for name in CASES}


@pytest.fixture(scope="module")
def results():
    return {size: run_ranks(world, size) for size in CONFIGS}


@pytest.mark.parametrize("key", [(size, f"{cfg}:{name}") for size, cfgs in CONFIGS.items() for cfg in cfgs
                                 for name in CASES], ids=lambda k: k[1])
def test_tensor_parallel_matches_unsplit(results, key):
    size, case = key
    failures = {rank: out[case] for rank, out in enumerate(results[size]) if out[case]}
    assert not failures, f"{case} on {size} ranks: {failures}"
