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


def load_ds_config(name: str) -> dict:
    """A DeepSpeed config by path, or by name in `ds_configs/` (`zero3` -> ds_configs/zero3.json)."""
    path = Path(name)
    if not path.exists() and not path.suffix:
        path = DS_CONFIGS / f"{name}.json"
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
