"""Where a run computes: the one place that picks the device, and the one function that moves a batch there.

`choose_device` is called once, by the trainer, before any process group or DeepSpeed engine exists:
`cuda:LOCAL_RANK` when CUDA is available (made the current device, so NCCL and DeepSpeed bind this rank's GPU),
else the CPU; `TrainConfig.device` overrides it. Everything else reads the device from the model or from
`collective_device`:

- `Learner` moves its model; a DeepSpeed engine moves its own (to `cuda:LOCAL_RANK`, never its inputs);
- `to_device` moves every tensor of a batch once per step, `non_blocking=True` (asynchronous from pinned
  host memory; a plain copy otherwise);
- collectives run on tensors on `collective_device()`: NCCL reduces CUDA tensors only, gloo CPU ones.

On the CPU the trainer also calls `keep_freed_host_memory` once (see there).
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import sys

import torch
import torch.distributed as dist

from mpl_large.config import ConfigError


def choose_device(requested: str = "auto") -> torch.device:
    """The device of this process. `auto`: `cuda:LOCAL_RANK` if CUDA is available, else `cpu`. A CUDA device is
    made current (`torch.cuda.set_device`) here, before any process group or engine: NCCL and DeepSpeed take
    the current device as this rank's."""
    if requested == "auto":
        requested = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ConfigError(f"device: {requested!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {requested!r}, but CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"device: {device} does not exist ({torch.cuda.device_count()} CUDA devices; "
                              f"LOCAL_RANK={os.environ.get('LOCAL_RANK', 'unset')})")
        torch.cuda.set_device(device)
    return device


def is_cuda(requested: str) -> bool:
    """Whether a `TrainConfig.device` setting resolves to a CUDA device (without making it current)."""
    return requested.startswith("cuda") or (requested == "auto" and torch.cuda.is_available())


def to_device(batch, device: torch.device):
    """`batch` with every tensor on `device`: a tensor, a dataclass (`TrainBatch`), or a tuple/list/dict of them,
    rebuilt with the moved tensors; other values as they are. One copy per tensor, `non_blocking=True`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: to_device(getattr(batch, f.name), device)
                                             for f in dataclasses.fields(batch) if f.init})
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(x, device) for x in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def collective_device() -> torch.device:
    """The device of the tensors a collective of the default process group takes: the current CUDA device
    under NCCL, the CPU under gloo (or with no process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_host_memory() -> bool:
    """Make this process's malloc keep the memory a step frees for the next step, instead of handing it back.

    By default glibc serves large allocations (above a threshold that rises to at most 32 MiB; a CPU step's
    activations: 120 MiB for one first-stage WRN-28-2 activation at 960 images) with their own mmap and unmaps
    them on free, so every step faults its activation memory in again and the kernel zeroes it: the most-used
    PyTorch MPL port's step at B=64, mu=7 spent 13.5 s of its 38 s in system time on the 2-core machine, even
    with THP_MEM_ALLOC_ENABLE=1 (README, "Benchmarks"). With mmap off
    (M_MMAP_MAX=0) and no trimming, freed blocks return to malloc's heap and the next step reuses them: the
    process stays at its peak resident size between steps (it reaches that peak every step anyway).
    Process-wide, so it is called once, by the CPU trainer (and the step benchmark); data-loader workers
    forked later inherit it. False where the C library has no glibc `mallopt` (nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # -1 is read as SIZE_MAX: never trim the heap's top.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))
