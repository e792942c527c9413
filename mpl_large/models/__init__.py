"""Our own architectures, registered with timm so that every model is built by name.

Importing this package registers them: `import mpl_large.models` and then
`timm.create_model("wrn_28_2", num_classes=10)`. Models know nothing of distribution.
"""

from mpl_large.models import efficientnet_wide  # noqa: F401  (registers efficientnet_b6_wide)
from mpl_large.models.digits import DigitsCNN
from mpl_large.models.wrn import WideResNet

__all__ = ["DigitsCNN", "WideResNet"]
