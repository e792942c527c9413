"""Spatial layers vs the unsplit layers, on real gloo ranks (2 and 4, forked once per world size).

Every case builds a plain layer, swaps it with `parallelize`, runs both on the same images (the spatial
one on this rank's strip) and checks the output strip, the input-gradient strip, every parameter gradient
(the ranks' shares summed) and the BatchNorm running statistics against the unsplit layer, within 1e-5 of
each tensor's scale (max |x|, at least 1) in fp32. The objective is sum(y * g) for a fixed random g, split
the same way (a replicated output, the global pool's, contributes 1/sp of it on each rank).

Mesh configurations: sp2 and dp2sync (SyncBN alone) on 2 ranks; sp4, dp2sp2 (per-replica BN) and
dp2sp2sync (SyncBN over both replicas) on 4 ranks. Widths 13, 15, 7, 11 and 33 make uneven strips, and at
sp=4 strips narrower than the kernel's halo, which must then come from two ranks away. The `bare_` cases
hand `parallelize` the layer itself rather than a model containing it.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.distributed as dist
from parallel_harness import mismatch, run_ranks
from timm.layers import BatchNormAct2d, Conv2dSame, SelectAdaptivePool2d, SEModule
from timm.models._efficientnet_blocks import SqueezeExcite
from torch import nn

from mpl_large.config import ConfigError
from mpl_large.learner import measurement_mode
from mpl_large.parallel import ParallelDims, parallelize, split_width
from mpl_large.parallel.spatial import halo_plan, shard_bounds

CONV_CASES = {
    # name: (layer factory, input shape N, C, H, W)
    "conv3x3": (lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 6, 16)),
    "conv3x3_s2": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 6, 16)),
    "conv7x7_s2_stem": (lambda: nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False), (2, 3, 10, 32)),
    "conv1x1_s2": (lambda: nn.Conv2d(4, 6, 1, stride=2, bias=False), (2, 4, 6, 16)),
    "conv1x1_s2_w13": (lambda: nn.Conv2d(4, 6, 1, stride=2), (2, 4, 6, 13)),
    "depthwise5x5": (lambda: nn.Conv2d(6, 6, 5, padding=2, groups=6), (2, 6, 6, 16)),
    "depthwise5x5_s2": (lambda: nn.Conv2d(6, 6, 5, stride=2, padding=2, groups=6, bias=False), (2, 6, 6, 16)),
    "grouped3x3": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 6, 16)),
    "dilated3x3": (lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2), (2, 4, 6, 16)),
    "valid3x3": (lambda: nn.Conv2d(4, 6, 3), (2, 4, 6, 16)),
    "torch_same4x4": (lambda: nn.Conv2d(4, 6, 4, padding="same"), (2, 4, 6, 16)),
    "tf_same3x3_s2": (lambda: Conv2dSame(4, 6, 3, stride=2), (2, 4, 6, 16)),
    "tf_same3x3_s2_w15": (lambda: Conv2dSame(4, 6, 3, stride=2), (2, 4, 7, 15)),
    "tf_same5x5_s2_depthwise": (lambda: Conv2dSame(6, 6, 5, stride=2, groups=6), (2, 6, 6, 16)),
    "tf_same5x5_s2_depthwise_w13": (lambda: Conv2dSame(6, 6, 5, stride=2, groups=6), (2, 6, 6, 13)),
    "tf_same3x3": (lambda: Conv2dSame(4, 6, 3), (2, 4, 6, 16)),
    "conv3x3_w13": (lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 6, 13)),
    "conv3x3_s2_w13": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 6, 13)),
    "conv7x7_w7_narrow": (lambda: nn.Conv2d(4, 6, 7, padding=3), (2, 4, 5, 7)),
    "conv5x5_s2_dilated_w11": (lambda: nn.Conv2d(4, 6, 5, stride=2, padding=3, dilation=2), (2, 4, 5, 11)),
}
POOL_CASES = {
    "maxpool3x3_s2": (lambda: nn.MaxPool2d(3, 2, 1), (2, 4, 6, 16)),
    "maxpool3x3_s2_w13": (lambda: nn.MaxPool2d(3, 2, 1), (2, 4, 6, 13)),
    "avgpool2x2_s2_ceil": (lambda: nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False), (2, 4, 6, 16)),
    "avgpool3x3_w13": (lambda: nn.AvgPool2d(3, 1, 1), (2, 4, 6, 13)),
    "global_avg": (lambda: SelectAdaptivePool2d(pool_type="avg", flatten=True), (2, 4, 3, 13)),
    "global_fast_avg": (lambda: SelectAdaptivePool2d(pool_type="fast", flatten=True), (2, 4, 3, 16)),
    "se_efficientnet": (lambda: SqueezeExcite(6, rd_ratio=0.25, act_layer=nn.SiLU), (2, 6, 4, 13)),
    "se_module": (lambda: SEModule(6, rd_channels=4), (3, 6, 4, 16)),
}


def _bn_eval() -> nn.Module:
    bn = nn.BatchNorm2d(4)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    return bn.eval()


BN_CASES = {
    "bn": (lambda: nn.BatchNorm2d(4), (2, 4, 6, 16)),
    "bn_act_silu": (lambda: BatchNormAct2d(4, eps=1e-3, act_layer=nn.SiLU), (2, 4, 6, 16)),
    "bn_cumulative": (lambda: nn.BatchNorm2d(4, momentum=None), (2, 4, 6, 16)),
    "bn_no_affine": (lambda: nn.BatchNorm2d(4, affine=False), (2, 4, 6, 16)),
    "bn_w13": (lambda: nn.BatchNorm2d(4), (2, 4, 6, 13)),
    "bn_large_mean": (lambda: nn.BatchNorm2d(4), (2, 4, 6, 16)),
    "bn_eval": (_bn_eval, (2, 4, 6, 16)),
    "bn_measurement": (lambda: nn.BatchNorm2d(4), (2, 4, 6, 16)),
}
BARE_CASES = {
    "bare_conv3x3_w33": (lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 6, 33)),
    "bare_maxpool3x3_s2": (lambda: nn.MaxPool2d(3, 2, 1), (2, 4, 6, 16)),
    "bare_bn": (lambda: nn.BatchNorm2d(4), (2, 4, 6, 16)),
}
"""The layer is the whole model: `parallelize` must swap the root itself."""
ALL = {**CONV_CASES, **POOL_CASES, **BN_CASES, **BARE_CASES}
OFFSET = {"bn_large_mean": 100.0}
"""Input mean (default 0.5; std 2): 50 standard deviations, where statistics summed in fp32 lose the
variance."""
CONFIGS = {
    2: {"sp2": dict(sp=2), "dp2sync": dict(dp=2, sync_bn=True)},
    4: {"sp4": dict(sp=4), "dp2sp2": dict(dp=2, sp=2), "dp2sp2sync": dict(dp=2, sp=2, sync_bn=True)},
}
REPLICA_CASES = [*BN_CASES, "conv3x3_s2", "se_efficientnet", "bare_bn"]
"""Cases also run with two replicas: the BN statistics per replica, or over both with SyncBN (dp2sync: SyncBN
without spatial partitioning, where only the BatchNorms are swapped)."""


def cases(config: str) -> list[str]:
    return list(ALL) if config.startswith("sp") else REPLICA_CASES


def check_case(name: str, dims: ParallelDims) -> list[str]:
    factory, shape = ALL[name]
    torch.manual_seed(0)
    ref = factory()
    bare = name in BARE_CASES
    model = parallelize(copy.deepcopy(ref) if bare else nn.Sequential(copy.deepcopy(ref)), dims)
    layer = model if bare else model[0]
    n = shape[0]
    gen = torch.Generator().manual_seed(1)
    x_all = torch.randn(n * dims.dp, *shape[1:], generator=gen) * 2 + OFFSET.get(name, 0.5)
    mine = slice(dims.dp_rank * n, (dims.dp_rank + 1) * n)
    # The unsplit layer sees what the group it normalises over sees: all replicas with SyncBN, else one.
    together = dims.sync_bn
    x_ref = (x_all if together else x_all[mine]).clone().requires_grad_()
    mode = measurement_mode if name == "bn_measurement" else lambda m: contextlib.nullcontext()
    passes = 2 if name.startswith("bn") else 1  # a second pass moves the running statistics again
    with mode(ref):
        for _ in range(passes):
            y_ref = ref(x_ref)
    g_all = torch.randn(n * dims.dp, *y_ref.shape[1:], generator=gen)
    (y_ref * (g_all if together else g_all[mine])).sum().backward()
    y_ref, x_grad = (y_ref[mine], x_ref.grad[mine]) if together else (y_ref, x_ref.grad)

    x = split_width(x_all[mine], dims).requires_grad_()
    with mode(layer):
        for _ in range(passes):
            y = model(x)
    replicated = y.dim() < 4
    out_cols = slice(None) if replicated else slice(*shard_bounds(y_ref.shape[-1], dims.sp, dims.sp_rank))
    in_cols = slice(*shard_bounds(shape[-1], dims.sp, dims.sp_rank))
    (y * g_all[mine][..., out_cols]).sum().div(dims.sp if replicated else 1).backward()

    failures = mismatch("output", y, y_ref[..., out_cols]) + mismatch("input grad", x.grad, x_grad[..., in_cols])
    group = dims.group("grad_group" if together else "sp_group")
    params = dict(layer.named_parameters())
    for pname, p in ref.named_parameters():
        grad = params[pname].grad.clone()
        dist.all_reduce(grad, group=group)
        failures += mismatch(f"{pname} grad", grad, p.grad)
    buffers = dict(layer.named_buffers())
    for bname, b in ref.named_buffers():
        failures += mismatch(bname, buffers[bname], b)
    return failures


def check_errors(dims: ParallelDims) -> list[str]:
    """Layers without a spatial version, and strips narrower than one column, are refused by name."""
    failures = []
    refused = [(nn.GroupNorm(2, 4), "GroupNorm"), (SelectAdaptivePool2d(pool_type="max"), "AdaptiveMaxPool2d"),
               (SelectAdaptivePool2d(pool_type="fastmax"), "FastAdaptiveMaxPool")]
    for layer, match in refused:
        try:
            parallelize(nn.Sequential(layer), dims)
            failures.append(f"{type(layer).__name__} was accepted")
        except ValueError as e:
            if match not in str(e):
                failures.append(f"error does not name {match}: {e}")
    narrow = parallelize(nn.Sequential(nn.Conv2d(4, 4, 3, stride=2, padding=1)), dims)
    try:
        narrow(split_width(torch.zeros(1, 4, 4, 2 * dims.sp - 2), dims))  # 2 sp - 2 columns -> sp - 1 outputs
        failures.append("a layer with fewer output columns than ranks was accepted")
    except ValueError as e:
        if "fewer than" not in str(e):
            failures.append(f"unexpected error: {e}")
    return failures


def world(rank: int, world_size: int) -> dict[str, list[str]]:
    meshes = {cfg: ParallelDims(**kw).build() for cfg, kw in CONFIGS[world_size].items()}
    out = {f"{cfg}:{name}": check_case(name, dims) for cfg, dims in meshes.items() for name in cases(cfg)}
    out["errors"] = check_errors(meshes["sp4" if world_size == 4 else "sp2"])
    return out


@pytest.fixture(scope="module")
def results():
    return {size: run_ranks(world, size) for size in CONFIGS}


@pytest.mark.parametrize("key", [
    (size, f"{cfg}:{name}") for size, cfgs in CONFIGS.items() for cfg in cfgs for name in cases(cfg)
], ids=lambda k: k[1])
def test_layer_matches_unsplit(results, key):
    size, case = key
    failures = {rank: out[case] for rank, out in enumerate(results[size]) if out[case]}
    assert not failures, f"{case} on {size} ranks: {failures}"


@pytest.mark.parametrize("size", list(CONFIGS))
def test_unsupported_layers_and_too_narrow_strips_raise(results, size):
    failures = {rank: out["errors"] for rank, out in enumerate(results[size]) if out["errors"]}
    assert not failures, failures


# ---------------------------------------------------------------------------------------------------
# The exchange plan and the mesh, without processes


@pytest.mark.parametrize("width,parts", [(16, 2), (13, 4), (7, 4), (32, 4), (11, 3)])
@pytest.mark.parametrize("kernel,stride,dilation,pads", [
    (1, 1, 1, (0, 0)), (1, 2, 1, (0, 0)), (3, 1, 1, (1, 1)), (3, 2, 1, (0, 1)), (5, 2, 1, (1, 2)),
    (7, 1, 1, (3, 3)), (3, 1, 2, (2, 2)), (4, 1, 1, (1, 2)),
])
def test_halo_plan_tiles_each_window(width, parts, kernel, stride, dilation, pads):
    """Each rank's pieces are exactly the input columns its output windows read, clipped to the image,
    with the rest as padding; what rank a sends rank b is what b expects from a."""
    span = dilation * (kernel - 1) + 1
    out_width = (width + sum(pads) - span) // stride + 1
    if out_width < parts:
        with pytest.raises(ValueError, match="fewer than"):
            halo_plan(width, parts, 0, kernel, stride, dilation, *pads)
        return
    plans = [halo_plan(width, parts, r, kernel, stride, dilation, *pads) for r in range(parts)]
    for r, plan in enumerate(plans):
        first, stop = shard_bounds(out_width, parts, r)
        read = sorted({j * stride - pads[0] + t * dilation for j in range(first, stop) for t in range(kernel)})
        start, end = read[0], read[-1] + 1
        assert plan.pad == (max(0, -start), max(0, end - width))
        cols = [c for _, lo, hi in plan.recv for c in range(lo, hi)]
        assert cols == list(range(max(start, 0), min(end, width)))
        for q, lo, hi in plan.recv:
            assert shard_bounds(width, parts, q)[0] <= lo < hi <= shard_bounds(width, parts, q)[1]
            if q != r:
                assert (r, lo, hi) in plans[q].send
        assert len(plan.send) == sum(q != r and any(s == r for s, _, _ in p.recv) for q, p in enumerate(plans))


def test_pointwise_and_aligned_strided_convs_exchange_nothing():
    for r in range(4):
        assert halo_plan(32, 4, r, 1, 1, 1, 0, 0).send == ()
        assert halo_plan(32, 4, r, 1, 2, 1, 0, 0).send == ()  # even strips: every strip starts on an even column
    assert any(halo_plan(13, 4, r, 1, 2, 1, 0, 0).send for r in range(4))  # strip 2 of 4 reads column 10 of strip 3


def test_dims_layout_and_validation():
    dims = ParallelDims(dp=2, sp=2, tp=2)
    assert [dims.coords(r) for r in (0, 1, 2, 5, 7)] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 1), (1, 1, 1)]
    with pytest.raises(ConfigError, match=r"dp \(2\) \* sp \(2\) \* tp \(2\) = 8 ranks, but the process group has 4"):
        dims.resolve(4)
    inferred = ParallelDims(sp=2)
    inferred.resolve(6)
    assert inferred.dp == 3
    with pytest.raises(ConfigError, match="not divisible"):
        ParallelDims(sp=4).resolve(6)
    with pytest.raises(ConfigError, match="parallel.sp"):
        ParallelDims(sp=0)
    with pytest.raises(RuntimeError, match="build"):
        ParallelDims(sp=2).group("sp_group")
