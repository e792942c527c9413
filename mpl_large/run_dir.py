"""Who owns a run directory, and what a resumed run may change.

A run owns its `out_dir`. A fresh run into a directory that already holds a run's files (`RUN_FILES`) is
refused unless `overwrite` (which removes them), so two runs never mix metrics or checkpoints; other files
(a recipe's data, say) are left alone. A run with `resume` and no checkpoint to resume starts afresh only in a directory that is
empty or holds the same run (the saved `config.json` differs at most in `RESUMABLE` fields).

A checkpoint stores the run's resolved config. A resume compares it with this run's field by field: only
the fields in `RESUMABLE` (run length, reporting, evaluation data, where the run lives) may differ, and a
mismatch in any other raises naming each field with both values. The fields that did change are returned
and recorded in the results (`resumes`). All of this happens before `config.json` is written: a refused
resume leaves the directory as it was.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from mpl_large.checkpoint import CheckpointError, remove_partial_checkpoints, select_checkpoint
from mpl_large.config import ConfigError

RUN_FILES = ("config.json", "metrics.jsonl", "results.json", "model.safetensors", "checkpoints", "tensorboard")
"""What the trainer writes into `out_dir`: what `overwrite` removes."""

RESUMABLE = frozenset({
    "name", "out_dir", "resume", "overwrite", "progress", "log_every", "eval_every", "checkpoint_every",
    "max_nonfinite_steps", "steps", "finetune.steps", "data.eval", "data.eval_split", "data.eval_batch_size",
    "data.real_labels", "data.workers", "teacher_optim.total_steps", "student_optim.total_steps", "trackers",
})
"""Fields a resumed run may change: how long it runs (within the checkpoint's phase; a longer run may stretch
its schedules, `*_optim.total_steps`, which changes the learning rate from the resumed step on), what it
reports and evaluates, and where it lives. Everything else (models, optimizers, data, seed, method,
parallelism) is the run's identity."""


@dataclass
class Resume:
    path: Path
    manifest: dict
    changes: dict[str, list]
    """Fields this run changed, as {dotted name: [the checkpoint's value, this run's]}."""

    @property
    def step(self) -> int:
        return self.manifest["step"]


def resolved(cfg) -> dict:
    """The config as JSON data: what `config.json` and every checkpoint hold, and what resumes compare."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict, current: dict) -> dict[str, list]:
    old, new = flatten(saved), flatten(current)
    return {k: [old.get(k), new.get(k)] for k in sorted(old.keys() | new.keys())
            if k not in old or k not in new or old[k] != new[k]}


def check_resume(path: Path, manifest: dict, config: dict) -> dict[str, list]:
    """The fields `config` changes from the checkpoint's; raises `CheckpointError` naming every field a
    resume cannot change, or a run length the checkpoint is already past."""
    where = path / "checkpoint.json"
    saved = manifest.get("config")
    if saved is None:
        raise CheckpointError(f"{where}: holds no config (written by an older version); start a fresh run")
    changes = config_changes(saved, config)
    fixed = [k for k in changes if k not in RESUMABLE]
    if fixed:
        listed = "; ".join(f"{k} is {changes[k][0]!r} in the checkpoint but {changes[k][1]!r} in this run"
                           for k in fixed)
        raise CheckpointError(f"{where}: {listed}. A resume may change only {sorted(RESUMABLE)}; resume with "
                              f"the checkpoint's values or start a fresh run (overwrite, or a new out_dir)")
    step, phase, steps = manifest["step"], manifest["phase"], config["steps"]
    if phase == "train" and step > steps:
        raise CheckpointError(f"{where}: steps: the checkpoint is at step {step}, past this run's {steps}")
    if phase == "finetune" and "steps" in changes:
        raise CheckpointError(f"{where}: steps: the checkpoint is in the finetune phase, which starts after "
                              f"{changes['steps'][0]} main steps; keep steps={changes['steps'][0]}")
    if phase == "finetune" and step - steps > config["finetune"]["steps"]:
        raise CheckpointError(f"{where}: finetune.steps: the checkpoint is at finetune step {step - steps}, "
                              f"past this run's {config['finetune']['steps']}")
    return changes


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def open_run_dir(cfg, config: dict) -> Resume | None:
    """Collective, before anything is written into `cfg.out_dir`: the checkpoint to resume (checked against
    `config`, this run's resolved config), or None for a fresh start, after making the directory this run's
    (partial checkpoints of killed saves removed; with `overwrite`, the previous run's files)."""
    out = Path(cfg.out_dir)
    main_process = not dist.is_initialized() or dist.get_rank() == 0
    found = select_checkpoint(out / "checkpoints") if cfg.resume else None
    if found is not None:
        path, manifest = found
        resume = Resume(path, manifest, check_resume(path, manifest, config))
    else:
        resume = None
        _check_fresh(cfg, out, config)
    _barrier()  # every rank has looked before rank 0 changes anything
    if main_process:
        remove_partial_checkpoints(out / "checkpoints")
        if resume is None:
            for name in RUN_FILES:
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
    _barrier()
    return resume


def _check_fresh(cfg, out: Path, config: dict) -> None:
    entries = [name for name in RUN_FILES if (out / name).exists()]
    if not entries or cfg.overwrite:
        return
    if cfg.resume and _same_run(out / "config.json", config):
        return  # nothing to resume yet: the same run starts over
    raise ConfigError(f"out_dir: {out} holds another run ({', '.join(entries)}); a fresh run will not mix with it. "
                      f"Pass --overwrite "
                      f"(overwrite=true) to replace the run there, --resume to continue it, or a new --out")


def _same_run(saved_config: Path, config: dict) -> bool:
    try:
        saved = json.loads(saved_config.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return all(k in RESUMABLE for k in config_changes(saved, config))
