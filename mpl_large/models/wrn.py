"""WideResNet-28-k for 32x32 images, as in UDA, FixMatch and Meta Pseudo Labels (WRN-28-2 on CIFAR-10).

Zagoruyko & Komodakis, "Wide Residual Networks" (arXiv:1605.07146), in the pre-activation form of the
semi-supervised literature's TF code (google-research/fixmatch `libml/models.py`, `ResNet.classifier`):

    stem    3x3 conv, 16 channels
    group i (i = 1, 2, 3): (depth - 4) / 6 blocks, 16 k * 2^(i-1) channels, first block stride 1, 2, 2
    head    BN -> leaky ReLU -> global average pool -> dropout (`drop_rate`) -> linear

A block is  BN -> act -> 3x3 conv (stride s) -> BN -> act -> [dropout] -> 3x3 conv,  added to the input,
or, when the width or the stride changes, to a 1x1 strided conv of it. Only the first group's first block
feeds the shortcut conv the *activated* input (`activate_before_residual`, as in the TF code); later
groups feed it the raw sum. Convolutions have no bias (every one is followed by a BN, or lands in a
residual sum that the next block's BN normalises).

Normalisation as in MPL's TF code (google-research `meta_pseudo_labels/flag_utils.py`): BN momentum 0.01
in PyTorch terms, i.e. TF decay 0.99 (FixMatch uses 0.999), and epsilon 1e-3. As in the FixMatch TF
code and the PyTorch ports (kekmodel/FixMatch-pytorch, kekmodel/MPL-pytorch): leaky ReLU slope 0.1
(MPL's TF `relu` defaults to 0.2), He-normal fan-out conv init, Xavier-normal head. The PyTorch ports'
block computes `relu(bn1(x))` in the first block of groups 2 and 3 and then discards it (conv1 reads
the raw `x`); here conv1 always reads the activated input, as the TF code does. Parameter counts are
the same either way.

Parameters, WRN-28-2 with 10 classes: 1,467,610 (all trainable; BN running statistics are buffers).
The MPL paper quotes 1.45 M and FixMatch "1.5 M": the TF FixMatch convs carry biases (+2,032 ->
1,469,642), MPL's TF stem has 16 k channels (-> 1,472,170); 1.45 M matches only the 3x3 conv kernels
alone (1,451,952), which suggests a rounded or partial count rather than another architecture.
"""

from __future__ import annotations

import torch
from timm.layers import ClassifierHead
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models import resolve_pretrained_cfg
from torch import nn

__all__ = ["WideResNet"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


class WideBasicBlock(nn.Module):
    """Pre-activation wide basic block (see the module docstring)."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        activate_before_residual: bool = False,
        drop_rate: float = 0.0,
        bn_momentum: float = 0.01,
        bn_eps: float = 1e-3,
        slope: float = 0.1,
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs, momentum=bn_momentum, eps=bn_eps)
        self.act1 = nn.LeakyReLU(slope, inplace=True)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs, momentum=bn_momentum, eps=bn_eps)
        self.act2 = nn.LeakyReLU(slope, inplace=True)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False)
        needs_proj = stride != 1 or in_chs != out_chs
        self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False) if needs_proj else None
        self.activate_before_residual = activate_before_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The activations are in place on BN's output, never on x: x is still needed as the residual.
        out = self.act1(self.bn1(x))
        if self.activate_before_residual:
            x = out
        out = self.conv1(out)
        out = self.conv2(self.drop(self.act2(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(x))


class WideResNet(nn.Module):
    """WRN-depth-k for small (32x32) images with timm's classifier API (`forward_features`,
    `forward_head`, `get_classifier`, `reset_classifier`)."""

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 2,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        block_drop_rate: float = 0.0,
        global_pool: str = "avg",
        bn_momentum: float = 0.01,
        bn_eps: float = 1e-3,
        slope: float = 0.1,
    ) -> None:
        """
        Args:
            depth: 6 n + 4 for n blocks per group (28 -> 4 blocks).
            widen_factor: k; the groups have 16 k, 32 k and 64 k channels.
            num_classes: Classifier outputs; 0 leaves the head as identity (features only).
            in_chans: Input channels.
            drop_rate: Dropout before the classifier (MPL's "dense dropout", timm's `drop_rate`).
            block_drop_rate: Dropout between a block's two convs (the original WRN's dropout).
            global_pool: timm pooling type of the head.
            bn_momentum: PyTorch BN momentum (1 - TF decay).
            bn_eps: BN epsilon.
            slope: Negative slope of the leaky ReLUs.
        """
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6 n + 4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        norm_act = dict(bn_momentum=bn_momentum, bn_eps=bn_eps, slope=slope)
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.stem = nn.Conv2d(in_chans, 16, 3, padding=1, bias=False)
        blocks, in_chs = [], 16
        for group, (width, stride) in enumerate(zip(widths, (1, 2, 2))):
            for i in range(n):
                blocks.append(WideBasicBlock(
                    in_chs, width, stride if i == 0 else 1, activate_before_residual=group == 0 and i == 0,
                    drop_rate=block_drop_rate, **norm_act,
                ))
                in_chs = width
        self.blocks = nn.Sequential(*blocks)
        # For timm's `features_only=True`: the stem and the output of each group (the last one normalised).
        self.feature_info = [dict(num_chs=16, reduction=1, module="stem")] + [
            dict(num_chs=w, reduction=r, module=f"blocks.{(g + 1) * n - 1}")
            for g, (w, r) in enumerate(zip(widths[:2], (1, 2)))
        ] + [dict(num_chs=widths[2], reduction=4, module="act")]
        self.norm = nn.BatchNorm2d(in_chs, momentum=bn_momentum, eps=bn_eps)
        self.act = nn.LeakyReLU(slope, inplace=True)
        self.num_features = self.head_hidden_size = in_chs
        self.head = ClassifierHead(in_chs, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.init_weights(slope)

    def init_weights(self, slope: float = 0.1) -> None:
        # He-normal on fan-out for convs, as the TF code (stddev sqrt(2 / (k * k * out))) and PyTorch ports.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu", a=slope)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)
        if isinstance(self.head.fc, nn.Linear):
            nn.init.xavier_normal_(self.head.fc.weight)
            nn.init.zeros_(self.head.fc.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.act(self.norm(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_WEIGHT_SOURCES = ("file", "state_dict", "url", "hf_hub_id")


def _create_wrn(variant: str, depth: int, widen_factor: int, pretrained: bool = False, **kwargs) -> WideResNet:
    if pretrained:
        # timm only warns and keeps the random init when a config names no weights; we refuse instead.
        cfg = resolve_pretrained_cfg(
            variant, pretrained_cfg=kwargs.get("pretrained_cfg"),
            pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"),
        )
        if not any(getattr(cfg, key, None) for key in _WEIGHT_SOURCES):
            raise ValueError(
                f"{variant}: no pretrained weights are published; pass pretrained=False, or name a file with "
                f"pretrained_cfg_overlay=dict(file=...) (or checkpoint_path=... to timm.create_model)"
            )
    return build_model_with_cfg(
        WideResNet, variant, pretrained, depth=depth, widen_factor=widen_factor,
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)), **kwargs,
    )


def _cfg(**kwargs) -> dict:
    return {
        "url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (8, 8), "crop_pct": 1.0,
        "interpolation": "bilinear", "mean": CIFAR10_MEAN, "std": CIFAR10_STD,
        "first_conv": "stem", "classifier": "head.fc", "paper_ids": "arXiv:2003.10580", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "wrn_28_2": _cfg(),
    "wrn_28_8": _cfg(num_classes=100),  # FixMatch's CIFAR-100 model
    "wrn_28_10": _cfg(),
})


@register_model
def wrn_28_2(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-28-2 (1,467,610 parameters with 10 classes): MPL, UDA and FixMatch on CIFAR-10 and SVHN."""
    return _create_wrn("wrn_28_2", 28, 2, pretrained, **kwargs)


@register_model
def wrn_28_8(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-28-8: FixMatch on CIFAR-100 (default 100 classes)."""
    return _create_wrn("wrn_28_8", 28, 8, pretrained, **kwargs)


@register_model
def wrn_28_10(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-28-10, the original paper's CIFAR model."""
    return _create_wrn("wrn_28_10", 28, 10, pretrained, **kwargs)
