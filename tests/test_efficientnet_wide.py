"""EfficientNet-B6-Wide: registered with timm, and its parameter count against an independent count of the
MPL code's EfficientNet (google-research meta_pseudo_labels/modeling.py), built on the meta device."""

import math

import pytest
import timm
import torch

import mpl_large.models  # noqa: F401  (registers efficientnet_b6_wide / efficientnet_b6_mpl)
from mpl_large.models.efficientnet_wide import B6_MPL, B6_WIDE

# B0's stages as in the MPL code: (repeats, kernel, output channels, expansion).
STAGES = [(1, 3, 16, 1), (2, 3, 24, 6), (2, 5, 40, 6), (3, 3, 80, 6), (3, 5, 112, 6), (4, 5, 192, 6), (1, 3, 320, 6)]


def efficientnet_param_count(width: float, depth: float, num_classes: int) -> int:
    """Trainable parameters, counted the way the MPL code builds the network (not from a module)."""

    def fil(c: int, divisor: int = 8) -> int:  # the code's `_fil`
        scaled = c * width
        out = max(divisor, int(scaled + divisor // 2) // divisor * divisor)
        return out + divisor if out < 0.9 * scaled else out

    bn = 2  # gamma and beta per channel
    c_in = fil(32)
    total = 3 * 3 * 3 * c_in + bn * c_in  # stem conv, no bias
    for repeats, k, c, e in STAGES:
        c_out = fil(c)
        for _ in range(math.ceil(depth * repeats)):
            exp = c_in * e
            total += (c_in * exp + bn * exp) if e > 1 else 0  # expand 1x1
            total += k * k * exp + bn * exp  # depthwise
            se = max(1, int(c_in * 0.25))
            total += exp * se + se + se * exp + exp  # SE reduce/expand 1x1 convs with bias
            total += exp * c_out + bn * c_out  # project 1x1
            c_in = c_out
    head = fil(1280)
    return total + c_in * head + bn * head + head * num_classes + num_classes


def meta_param_count(name: str, **kwargs) -> int:
    with torch.device("meta"):
        model = timm.create_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, width_depth, expected", [
    ("efficientnet_b6_wide", B6_WIDE, 389_352_968),
    ("efficientnet_b6_mpl", B6_MPL, 316_649_180),
])
def test_parameter_count(name, width_depth, expected):
    assert efficientnet_param_count(*width_depth, num_classes=1000) == expected
    assert meta_param_count(name) == expected


def test_b6_wide_is_within_a_fifth_of_a_percent_of_the_paper():
    assert abs(meta_param_count("efficientnet_b6_wide") / 390e6 - 1) < 0.002


def test_counter_reproduces_timm_reference_models():
    """The independent counter is right where timm and the paper agree: B0 (5.3 M) and L2 (480 M)."""
    assert efficientnet_param_count(1.0, 1.0, 1000) == meta_param_count("efficientnet_b0") == 5_288_548
    assert efficientnet_param_count(4.3, 5.3, 1000) == meta_param_count("efficientnet_l2")


def test_config():
    with torch.device("meta"):
        model = timm.create_model("efficientnet_b6_wide", num_classes=5)
    assert model.classifier.out_features == 5
    assert model.pretrained_cfg["input_size"] == (3, 512, 512)  # §4's training resolution
    assert timm.models.get_pretrained_cfg("efficientnet_b6_wide").mean == timm.data.IMAGENET_DEFAULT_MEAN
