"""EfficientNet-B6-Wide, the paper's second large student (§4, Table 4: 390 M parameters), for timm.

The paper: "the same depth with EfficientNet-B6 but has the width factor increased from 2.1 to 5.0 ...
390 million parameters". The two statements do not fit together under EfficientNet's scaling rules
(channels = round(c * width) to a multiple of 8, never below 90 % of c * width; repeats = ceil(r * depth);
SE bottleneck = a quarter of the block's input channels). Counted with 1,000 classes:

    definition                                      parameters   vs 390 M
    B6 depth 2.6, width 5.0 (the paper's words)     316,649,180  -18.8 %
    the MPL code's `efficientnet-b6-mpl` (5.0, 2.6) 316,649,180  (the same: google-research
                                                                 meta_pseudo_labels/modeling.py builds
                                                                 blocks, SE and head exactly as timm)
    B6 depth 2.6, width 5.56                        389,352,968  -0.17 %  <- `efficientnet_b6_wide`
    B6 depth 2.6, width 5.6                         394,266,806  +1.1 %
    B5 depth 2.2, width 5.9                         390,290,032  +0.07 %  (not B6's depth)
    B7 depth 3.1, width 5.0                         398,539,760  +2.2 %   (not B6's depth)

Neither a different channel divisor (16 ... 256: 317-345 M at width 5.0), nor an unscaled 1280-channel
head (303 M), nor JFT's 18,291 classes in the classifier (427 M) gives 390 M at depth 2.6 and width 5.0;
the number's origin is not in the paper or its code. `efficientnet_b6_wide` keeps what the paper states
twice, B6's depth ("same depth", "B6-Wide"), and takes the width that lands nearest 390 M (the count moves
in steps: width 5.55 gives 389.31 M, 5.58 gives 393.23 M). `efficientnet_b6_mpl` is the released code's
definition, for anyone reproducing that code.

Both are timm's own EfficientNet (`_gen_efficientnet`: stem 32, MBConv stages of B0, head 1280, swish,
SE 0.25), only the multipliers differ. Their default config is the paper's §4 training resolution, 512x512,
with ImageNet mean/std. No weights are published: build with `pretrained=False`, or name a file with
`pretrained_cfg_overlay=dict(file=...)`.

`efficientnet_l2_demo` is EfficientNet-L2 with a tenth of its multipliers (width 0.43, depth 0.53 instead of
4.3, 5.3): the same stem, seven MBConv stages with L2's kernels, strides, expansions and SE, swish and head,
with 13 blocks instead of 88 and 0.6 M parameters (10 classes) instead of 480 M. It is the model of the
CPU demo (`recipes/efficientnet_l2_jft.py --preset demo`), configured for its 32x32 digits.
"""

from __future__ import annotations

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model
from timm.models.efficientnet import EfficientNet, _gen_efficientnet

__all__ = ["B6_WIDE", "B6_MPL", "L2_DEMO"]

B6_WIDE = (5.56, 2.6)
"""(width, depth) of `efficientnet_b6_wide`: B6's depth, the width nearest the paper's 390 M."""
B6_MPL = (5.0, 2.6)
"""(width, depth) of `efficientnet_b6_mpl`: the MPL code's `efficientnet-b6-mpl`, 317 M."""
L2_DEMO = (0.43, 0.53)
"""(width, depth) of `efficientnet_l2_demo`: a tenth of EfficientNet-L2's (4.3, 5.3)."""


def _cfg(**kwargs) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 512, 512), "pool_size": (16, 16), "crop_pct": 1.0,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv_stem", "classifier": "classifier", "paper_ids": "arXiv:2003.10580", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "efficientnet_b6_wide": _cfg(),
    "efficientnet_b6_mpl": _cfg(),
    "efficientnet_l2_demo": _cfg(input_size=(3, 32, 32), pool_size=(1, 1), interpolation="bilinear"),
})


def _create(variant: str, width: float, depth: float, pretrained: bool, **kwargs) -> EfficientNet:
    return _gen_efficientnet(variant, channel_multiplier=width, depth_multiplier=depth, pretrained=pretrained,
                             **kwargs)


@register_model
def efficientnet_b6_wide(pretrained: bool = False, **kwargs) -> EfficientNet:
    """EfficientNet-B6-Wide: B6 depth (2.6), width 5.56; 389,352,968 parameters with 1,000 classes."""
    return _create("efficientnet_b6_wide", *B6_WIDE, pretrained, **kwargs)


@register_model
def efficientnet_b6_mpl(pretrained: bool = False, **kwargs) -> EfficientNet:
    """The MPL code's `efficientnet-b6-mpl`: width 5.0, depth 2.6; 316,649,180 parameters with 1,000 classes."""
    return _create("efficientnet_b6_mpl", *B6_MPL, pretrained, **kwargs)


@register_model
def efficientnet_l2_demo(pretrained: bool = False, **kwargs) -> EfficientNet:
    """EfficientNet-L2 at a tenth of its width and depth multipliers (0.43, 0.53): the CPU demo's model."""
    return _create("efficientnet_l2_demo", *L2_DEMO, pretrained, **kwargs)
