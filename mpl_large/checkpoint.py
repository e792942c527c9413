"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a directory `OUT/checkpoints/step-NNNNNNNN/` holding, for the phase being trained, each
learner's state (a DeepSpeed engine's partitions on every rank, or model + optimizer + schedule), and per
rank the step objects' state (the h baseline), the data streams' positions and the torch RNG state
(pseudo-label sampling, dropout); `checkpoint.json`, written last, lists every file with its size.

Atomicity: all ranks write into `tmp-step-N/`; after a barrier rank 0 writes the manifest, syncs, and
renames the directory to `step-N` (a rename is atomic). A save killed at any point leaves the previous
checkpoint untouched, and a `tmp-*` directory that resume ignores. Resume takes the newest `step-*`
with a manifest and refuses, naming the file, one whose files are missing or truncated or which was
written by a different run (world size, method, models, DeepSpeed config).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

MANIFEST = "checkpoint.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the file and what is wrong."""


class Saveable(Protocol):
    def save(self, directory: Path) -> None: ...
    def load(self, directory: Path) -> None: ...


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Resumed:
    step: int
    """Global step the checkpoint was taken after."""
    phase: str
    """The phase it belongs to (`train` or `finetune`)."""
    results: dict
    """The run's results so far (the main phase's, when resuming the finetune phase)."""
    path: Path


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: Path, step: int, phase: str, learners: dict[str, Saveable],
                    state: dict[str, Stateful], identity: dict[str, Any], results: dict, keep: int = 2) -> Path:
    """Collective: write a checkpoint of `phase` after global `step`; keep the newest `keep`."""
    rank, world = _rank_world()
    final, tmp = root / f"step-{step:08d}", root / f"tmp-step-{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    for name, learner in learners.items():
        learner.save(tmp / name)
    (tmp / f"state-rank{rank}.json").write_text(json.dumps({k: v.state_dict() for k, v in state.items()}))
    save_file({"torch": torch.get_rng_state()}, str(tmp / f"rng-rank{rank}.safetensors"))
    _barrier()
    if rank == 0:
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        for name in files:
            _fsync(tmp / name)
        manifest = {"step": step, "phase": phase, "world_size": world, "identity": identity,
                    "results": results, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync(tmp / MANIFEST)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _fsync(root)
        for old in sorted(complete_checkpoints(root))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """`step-*` directories with a manifest, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / MANIFEST).is_file())


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def read_manifest(path: Path, identity: dict[str, Any]) -> dict:
    """The checkpoint's manifest, after checking that it belongs to this run and that no file is missing
    or truncated."""
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable checkpoint manifest ({e})") from e
    _, world = _rank_world()
    if manifest.get("world_size") != world:
        raise CheckpointError(f"{manifest_path}: written by {manifest.get('world_size')} ranks, this run has "
                              f"{world}; ZeRO partitions cannot be re-split, resume with the same world size")
    for key, value in identity.items():
        saved = manifest.get("identity", {}).get(key)
        if saved != value:
            raise CheckpointError(f"{manifest_path}: {key} is {saved!r} in the checkpoint but {value!r} in this run")
    for name, size in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing from the checkpoint")
        if file.stat().st_size != size:
            raise CheckpointError(f"{file}: truncated or changed ({file.stat().st_size} bytes, the manifest "
                                  f"says {size})")
    return manifest


def load_checkpoint(path: Path, learners: dict[str, Saveable], state: dict[str, Stateful],
                    identity: dict[str, Any]) -> Resumed:
    """Collective: restore a checkpoint written by `save_checkpoint` into this run's objects."""
    rank, _ = _rank_world()
    manifest = read_manifest(path, identity)
    for name, learner in learners.items():
        try:
            learner.load(path / name)
        except Exception as e:
            raise CheckpointError(f"{path / name}: cannot load {name}'s state: {e}") from e
    state_file = path / f"state-rank{rank}.json"
    saved = json.loads(state_file.read_text())
    if saved.keys() != state.keys():
        raise CheckpointError(f"{state_file}: holds {sorted(saved)}, this phase needs {sorted(state)}")
    for key, obj in state.items():
        obj.load_state_dict(saved[key])
    torch.set_rng_state(load_file(str(path / f"rng-rank{rank}.safetensors"))["torch"])
    return Resumed(step=manifest["step"], phase=manifest["phase"], results=manifest["results"], path=path)
