"""Generated image folders for end-to-end tests: class c's pixels lie in [80c, 80c + 80)."""

from pathlib import Path

import numpy as np
from PIL import Image


def image_folder(root: Path, n: int, classes: int = 3, size: int = 32, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        c = i % classes
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        pixels = (rng.random((size, size, 3)) * 80 + c * 80).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"class{c}" / f"{i:05d}.png")
    return root
