"""A small conv net for scikit-learn's 8x8 handwritten digits (`sklearn.datasets.load_digits`).

The digits benchmark (`mpl_large.experiments.digits`) is the one real-image semi-supervised experiment that
runs offline on two CPU cores, so the network is small (66k parameters) and every layer is one the MPL step
cares about: BatchNorm after every conv (the feedback measurement restores BN statistics, see
`mpl_large.learner.measurement_mode`) and dropout before the classifier (Tables 6-8's "dropout rate").

    stage 1   3x3 conv 32 -> BN -> ReLU -> 3x3 conv 32 -> BN -> ReLU -> 2x2 max pool   (8x8 -> 4x4)
    stage 2   3x3 conv 64 -> BN -> ReLU -> 3x3 conv 64 -> BN -> ReLU -> 2x2 max pool   (4x4 -> 2x2)
    head      global average pool -> dropout (`drop_rate`) -> linear

Convs have no bias (each is followed by a BN). Any input side divisible by 4 works (global pooling); the
default config is the native 8x8, RGB with the gray value in each channel, as the data pipeline decodes
every image to RGB. Mean and std are the pixel statistics of all 1,797 images scaled to [0, 1] (the
0-16 ink levels times 255/16, rounded to uint8): 0.3053 and 0.3759, the same in every channel.
"""

from __future__ import annotations

import torch
from timm.layers import ClassifierHead
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["DigitsCNN"]

DIGITS_MEAN = (0.3053, 0.3053, 0.3053)
DIGITS_STD = (0.3759, 0.3759, 0.3759)


def _conv_bn_relu(in_chs: int, out_chs: int, bn_momentum: float) -> list[nn.Module]:
    return [nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_chs, momentum=bn_momentum), nn.ReLU(inplace=True)]


class DigitsCNN(nn.Module):
    """Two conv stages and a linear head, with timm's classifier API (`forward_features`, `forward_head`,
    `get_classifier`, `reset_classifier`)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        widths: tuple[int, int] = (32, 64),
        global_pool: str = "avg",
        bn_momentum: float = 0.01,
    ) -> None:
        """
        Args:
            num_classes: Classifier outputs; 0 leaves the head as identity (features only).
            in_chans: Input channels (3: the pipeline's RGB; 1 works for raw gray tensors).
            drop_rate: Dropout before the classifier.
            widths: Channels of the two stages.
            global_pool: timm pooling type of the head.
            bn_momentum: PyTorch BN momentum (1 - TF decay; the paper's 0.99 decay is 0.01).
        """
        super().__init__()
        c1, c2 = widths
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.stages = nn.Sequential(
            nn.Sequential(*_conv_bn_relu(in_chans, c1, bn_momentum), *_conv_bn_relu(c1, c1, bn_momentum),
                          nn.MaxPool2d(2)),
            nn.Sequential(*_conv_bn_relu(c1, c2, bn_momentum), *_conv_bn_relu(c2, c2, bn_momentum),
                          nn.MaxPool2d(2)),
        )
        self.feature_info = [dict(num_chs=c1, reduction=2, module="stages.0"),
                             dict(num_chs=c2, reduction=4, module="stages.1")]
        self.num_features = self.head_hidden_size = c2
        self.head = ClassifierHead(c2, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs({
    "digits_cnn": {
        "url": "", "num_classes": 10, "input_size": (3, 8, 8), "pool_size": (2, 2), "crop_pct": 1.0,
        "interpolation": "bicubic", "mean": DIGITS_MEAN, "std": DIGITS_STD,
        "first_conv": "stages.0.0", "classifier": "head.fc",
    },
})


@register_model
def digits_cnn(pretrained: bool = False, **kwargs) -> DigitsCNN:
    """The digits benchmark's conv net (66k parameters with 10 classes). No weights are published: build with
    `pretrained=False`, or name a file with `pretrained_cfg_overlay=dict(file=...)` (an export's)."""
    return build_model_with_cfg(DigitsCNN, "digits_cnn", pretrained, **kwargs)
