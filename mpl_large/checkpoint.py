"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a directory `OUT/checkpoints/step-NNNNNNNN/` holding, for the phase being trained, each
learner's state (a DeepSpeed engine's partitions on every rank, or model + optimizer + schedule), and per
rank the step objects' state (the h baseline), the data streams' positions and the torch RNG state
(pseudo-label sampling, dropout); `checkpoint.json`, written last, lists every file with its size and
SHA-256, and holds the run's resolved config (what a resume is checked against, `mpl_large.run_dir`).

Atomicity: all ranks write into `tmp-step-N/`; after a barrier rank 0 writes the manifest, syncs, and
renames the directory to `step-N` (a rename is atomic). A save killed at any point leaves the previous
checkpoint untouched, and a `tmp-*` directory that resume ignores and the next start removes; a save that
fails (disk full, no permission) removes its `tmp-*` and raises `WriteError` naming the path.

Resume (`select_checkpoint`) takes the newest `step-*` whose files all match the manifest (present, same
size, same SHA-256); a corrupt one is reported by file in a warning and the previous complete one is taken.
No pickle is executed: our files are safetensors, JSON and `weights_only` torch files, and DeepSpeed's are
read by `mpl_large.zero`'s allow-listed loader.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

MANIFEST = "checkpoint.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the file and what is wrong."""


class WriteError(OSError):
    """A file of the run could not be written (disk full, no permission); the message names the path."""


@contextlib.contextmanager
def writing(path: Path, what: str) -> Iterator[None]:
    """Re-raise a failed write (torch's `RuntimeError: ... unexpected pos` on a full disk, an `OSError`) as a
    `WriteError` naming `path`."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if isinstance(e, WriteError):
            raise
        raise WriteError(f"{path}: cannot write {what} ({type(e).__name__}: {e}); check the free space and "
                         f"permissions there") from e


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
                    state: dict[str, Stateful], config: dict[str, Any], results: dict, keep: int = 2) -> Path:
    """Collective: write a checkpoint of `phase` after global `step`; keep the newest `keep`. `config`: the
    run's resolved config, what a resume is checked against."""
    rank, world = _rank_world()
    final, tmp = root / f"step-{step:08d}", root / f"tmp-step-{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        with writing(tmp, "a checkpoint directory"):
            tmp.mkdir(parents=True)
    _barrier()
    try:
        for name, learner in learners.items():
            with writing(tmp / name, f"{name}'s checkpoint state"):
                learner.save(tmp / name)
        with writing(tmp / f"state-rank{rank}.json", "the step state"):
            (tmp / f"state-rank{rank}.json").write_text(json.dumps({k: v.state_dict() for k, v in state.items()}))
        with writing(tmp / f"rng-rank{rank}.safetensors", "the RNG state"):
            save_file(rng_states(), str(tmp / f"rng-rank{rank}.safetensors"))
    except WriteError:
        shutil.rmtree(tmp, ignore_errors=True)  # frees what it took; the previous checkpoint is intact
        raise
    _barrier()
    if rank == 0:
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                _fsync(p)
                files[str(p.relative_to(tmp))] = {"bytes": p.stat().st_size, "sha256": sha256(p)}
        manifest = {"step": step, "phase": phase, "world_size": world, "config": config,
                    "results": results, "files": files}
        with writing(tmp / MANIFEST, "the checkpoint manifest"):
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


def remove_partial_checkpoints(root: Path) -> list[Path]:
    """Delete the `tmp-*` directories that killed or failed saves left; returns them."""
    partial = sorted(root.glob("tmp-*")) if root.is_dir() else []
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return partial


def read_manifest(path: Path) -> dict:
    """The checkpoint's manifest, after checking that it was written by as many ranks as this run has."""
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable checkpoint manifest ({e})") from e
    _, world = _rank_world()
    if manifest.get("world_size") != world:
        raise CheckpointError(f"{manifest_path}: written by {manifest.get('world_size')} ranks, this run has "
                              f"{world}; ZeRO partitions cannot be re-split, resume with the same world size")
    return manifest


def verify_files(path: Path, manifest: dict) -> None:
    """Every file the manifest lists is there with its size and SHA-256; raises naming the first that is not."""
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing from the checkpoint")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{file}: truncated or changed ({size} bytes, the manifest says "
                                  f"{expected['bytes']})")
        if sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file}: corrupt (its SHA-256 differs from the manifest's)")


def select_checkpoint(root: Path) -> tuple[Path, dict] | None:
    """Collective: the newest complete checkpoint whose files verify, and its manifest; None if there is none.

    Rank 0 verifies (every rank's files are in the one directory) and tells the others. A corrupt checkpoint
    is skipped with a warning naming the file, for the one before it; if every one is corrupt, raises with
    each one's problem."""
    rank, _ = _rank_world()
    chosen, problems = None, []
    if rank == 0:
        for path in reversed(complete_checkpoints(root)):
            try:
                manifest = read_manifest(path)
                verify_files(path, manifest)
            except CheckpointError as e:
                problems.append(str(e))
                warnings.warn(f"not resuming from {path}: {e}; trying the checkpoint before it", stacklevel=2)
                continue
            chosen = str(path)
            break
    if dist.is_initialized():
        shared = [chosen, problems]
        dist.broadcast_object_list(shared, src=0)  # our own two strings: no foreign pickle
        chosen, problems = shared
    if chosen is None:
        if problems:
            raise CheckpointError("no checkpoint in " + str(root) + " can be resumed: " + "; ".join(problems))
        return None
    return Path(chosen), read_manifest(Path(chosen))


def rng_states() -> dict[str, torch.Tensor]:
    """This process's generator states: the CPU's, and the current CUDA device's when CUDA is present (dropout,
    drop-path and pseudo-label sampling draw from it when the models are on the GPU)."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict[str, torch.Tensor]) -> None:
    """Restore `rng_states`. A checkpoint without a CUDA state (written on a CPU) loads anywhere; a CUDA state
    is restored where CUDA is present and has no generator to go to elsewhere."""
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def load_checkpoint(path: Path, manifest: dict, learners: dict[str, Saveable], state: dict[str, Stateful]) -> Resumed:
    """Collective: restore a checkpoint chosen by `select_checkpoint` into this run's objects."""
    rank, _ = _rank_world()
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
    set_rng_states(load_file(str(path / f"rng-rank{rank}.safetensors")))
    return Resumed(step=manifest["step"], phase=manifest["phase"], results=manifest["results"], path=path)
