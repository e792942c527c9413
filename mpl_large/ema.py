"""An exponential moving average of the evaluated model's weights (the student of MPL): K's `--ema`,
timm's `--model-ema`.

After every step, avg <- decay * avg + (1 - decay) * w, in float32, over the tensors this rank holds: under
ZeRO-3 the parameter partitions (`param.ds_tensor`), so the average is partitioned exactly like the model and
costs each rank 1/N of a model (in fp32); otherwise the whole parameters. Floating buffers (BatchNorm
statistics) are averaged too. `applied()` puts the average into the live model for an evaluation or a
gathered export and puts the trained weights back after. The average is checkpointed per rank (`save`/`load`,
as a learner is), so a resume continues it exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn


def local_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The weights this rank holds: ZeRO-3 partitions where a parameter has one, else the parameter; then the
    floating buffers."""
    params = [getattr(p, "ds_tensor", p) for p in model.parameters()]
    return [t for t in params + list(model.buffers()) if t.is_floating_point()]


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"ema_decay: must be in (0, 1), got {decay}")
        self.model, self.decay = model, decay
        self.average = [t.detach().float().clone() for t in local_tensors(model)]

    @torch.no_grad()
    def update(self) -> None:
        for avg, live in zip(self.average, local_tensors(self.model), strict=True):
            avg.lerp_(live.detach().float(), 1 - self.decay)

    @contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """The average in the model's tensors for the duration (in place: a ZeRO-3 gather reads the
        partitions), the trained weights restored after."""
        live = local_tensors(self.model)
        kept = [t.detach().clone() for t in live]
        for t, avg in zip(live, self.average, strict=True):
            t.copy_(avg)
        try:
            yield
        finally:
            for t, saved in zip(live, kept, strict=True):
                t.copy_(saved)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        save_file({str(i): t.cpu().contiguous() for i, t in enumerate(self.average)},
                  str(directory / f"ema-rank{_rank()}.safetensors"))

    def load(self, directory: Path) -> None:
        stored = load_file(directory / f"ema-rank{_rank()}.safetensors")
        if len(stored) != len(self.average):
            raise ValueError(f"{directory}: the stored EMA has {len(stored)} tensors, the model {len(self.average)}")
        for i, avg in enumerate(self.average):
            avg.copy_(stored[str(i)])


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0
