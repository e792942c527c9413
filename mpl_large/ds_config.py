"""DeepSpeed configs: the repository's, by name, or a file; checked for the keys whose DeepSpeed defaults
would change the algorithm. Plain JSON: DeepSpeed itself is not imported here (the planner reads configs
without it)."""

from __future__ import annotations

import json
from pathlib import Path

from mpl_large.config import ConfigError

DS_CONFIGS = Path(__file__).resolve().parent.parent / "ds_configs"
"""The repository's DeepSpeed configs; `ParallelConfig.deepspeed` may name one without its path or suffix."""

REQUIRED = {"zero_optimization", "gradient_clipping", "zero_allow_untested_optimizer"}
"""Keys every config must state: DeepSpeed's defaults (clipping at 1.0, refusing torch optimizers) would
silently change the algorithm."""


def ds_config_path(name: str, device: str = "cpu") -> Path:
    """The file of a DeepSpeed config: `name` itself if it is a file, else ds_configs/NAME.json, or on a CUDA
    `device` ds_configs/NAME_gpu.json where there is one. The CPU files keep communication serial
    (`overlap_comm: false`) with 1e7-5e7-element buckets, sized for host memory; the `_gpu` files overlap it
    with the backward on a separate CUDA stream and use DeepSpeed's default GPU bucket sizes. Naming a file
    (`zero3_gpu`, or a path) always takes that file."""
    path = Path(name)
    if path.exists() or path.suffix:
        return path
    gpu = DS_CONFIGS / f"{name}_gpu.json"
    return gpu if str(device).startswith("cuda") and gpu.is_file() else DS_CONFIGS / f"{name}.json"


def load_ds_config(name: str, device: str = "cpu") -> dict:
    """A DeepSpeed config by path, or by name in `ds_configs/` (`zero3` -> ds_configs/zero3.json, or
    ds_configs/zero3_gpu.json on a CUDA `device`: `ds_config_path`)."""
    path = ds_config_path(name, device)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in DS_CONFIGS.glob("*.json")))
        raise ConfigError(f"deepspeed: no config file {name!r} (a path, or one of: {known})")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed: {path} is not valid JSON: {e}") from e
    missing = REQUIRED - config.keys()
    if missing:
        raise ConfigError(f"deepspeed: {path} must set {sorted(missing)} explicitly")
    return config
