"""WideResNet-28-k: registration with timm, the parameter count against the architecture's formula,
layout independence and dropout only in training."""

import pytest
import timm
import torch

import mpl_large.models  # noqa: F401  (registers wrn_28_*)
from mpl_large.models import WideResNet


def wrn_param_count(depth: int, k: int, num_classes: int, in_chans: int = 3) -> int:
    """Trainable parameters of WRN-depth-k, counted from the architecture (not from the module).

    3x3 stem conv to 16 channels; 3 groups of (depth - 4) / 6 blocks with 16k, 32k, 64k channels, each
    block BN(c_in) + 3x3 conv c_in -> c + BN(c) + 3x3 conv c -> c, plus a 1x1 conv shortcut where c_in != c;
    final BN and a linear head with bias. BN has a scale and a shift per channel; convs have no bias.
    """
    n = (depth - 4) // 6
    total = in_chans * 16 * 3 * 3
    c_in = 16
    for c in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            total += 2 * c_in + c_in * c * 9 + 2 * c + c * c * 9
            if c_in != c:
                total += c_in * c
            c_in = c
    return total + 2 * c_in + c_in * num_classes + num_classes


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def wrn():
    torch.manual_seed(0)
    return timm.create_model("wrn_28_2", num_classes=10)


def test_output_shape_and_finite(wrn):
    x = torch.randn(2, 3, 32, 32)
    for train in (True, False):
        out = wrn.train(train)(x)
        assert out.shape == (2, 10)
        assert torch.isfinite(out).all()
    wrn.train()
    wrn(x).logsumexp(-1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in wrn.parameters())
    wrn.zero_grad(set_to_none=True)


def test_parameter_count(wrn):
    # 432 stem + 70,112 + 279,488 + 1,116,032 in the groups + 256 final BN + 1,290 head.
    assert wrn_param_count(28, 2, 10) == 1_467_610
    assert n_params(wrn) == wrn_param_count(28, 2, 10)
    assert all(p.requires_grad for p in wrn.parameters())


def test_parameter_count_other_shapes():
    model = WideResNet(depth=16, widen_factor=3, num_classes=7, in_chans=1)
    assert n_params(model) == wrn_param_count(16, 3, 7, in_chans=1)


def test_timm_config(wrn):
    cfg = timm.data.resolve_data_config({}, model=wrn)
    assert cfg["input_size"] == (3, 32, 32)
    assert timm.create_model("wrn_28_2").num_classes == 10  # from the pretrained_cfg


def test_pretrained_without_weights_is_an_error():
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("wrn_28_2", pretrained=True)


def test_channels_last_matches_contiguous(wrn):
    x = torch.randn(2, 3, 32, 32)
    wrn.eval()
    with torch.no_grad():
        ref = wrn(x)
        wrn.to(memory_format=torch.channels_last)
        try:
            out = wrn(x.contiguous(memory_format=torch.channels_last))
        finally:
            wrn.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_drop_rate_only_in_train_mode():
    torch.manual_seed(0)
    model = timm.create_model("wrn_28_2", num_classes=10, drop_rate=0.5)
    assert model.head.drop.p == 0.5
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
        # In train mode BN uses batch statistics, deterministic for a fixed batch: only dropout differs.
        model.train()
        assert not torch.allclose(model(x), model(x))
        model.head.drop.p = 0.0
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
