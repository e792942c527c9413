"""One rank of the ZeRO parity test (tests/test_zero.py): MPL (and Reduced MPL) steps on DeepSpeed engines.

For every case (ZeRO config, feedback mode) it runs STEPS MPL steps on the same global batches, each rank
taking its contiguous shard, and rank 0 writes h per step and the full teacher and student weights to
OUT/{case}.safetensors. At world size 2 it also checks that the probe gradient never reaches an update:
OUT/probe_{config}.safetensors holds the student after the same updates with and without `grad_dots`.

The MPL cases run in float64 (tests/workers/ds_float64.py): 1 and 2 ranks sum in different orders, and over
several MPL steps fp32 round-off grows into differences that depend on the CPU; in float64 they agree to ~1e-8.
The probe cases compare one layout with itself, bit for bit, in fp32.
"""

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from mpl_large.config import MPLConfig, OptimConfig
from mpl_large.losses import cross_entropy
from mpl_large.reduced import ReducedMPLStep, ReducedTeacher
from mpl_large.steps import MPLStep
from mpl_large.ds_config import load_ds_config
from mpl_large.zero import ZeroLearner, init_distributed

STEPS = 5
BATCH = 8
"""Global batch of each of x_l, x_u, x_u_aug."""
CASES = [("ddp", "cosine"), ("zero2", "cosine"), ("zero3", "cosine"), ("zero3", "dot"), ("zero3", "taylor"),
         ("zero3_offload", "cosine"), ("zero3", "reduced")]
"""(DeepSpeed config, feedback mode); `reduced`: Reduced MPL's step (cosine h), its small teacher reading
stored class distributions."""


def net(seed: int) -> nn.Module:
    """No BatchNorm and no dropout: per-rank batch statistics would make 1 and 2 ranks differ by design."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(100 + step)
    x_l, x_u, x_u_aug = (torch.randn(BATCH, 3, 8, 8, generator=g) for _ in range(3))
    y_l = torch.randint(0, 5, (BATCH,), generator=g)
    shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    return x_l[shard], y_l[shard], x_u[shard], x_u_aug[shard]


def optim(lr: float) -> OptimConfig:
    return OptimConfig(name="sgd", lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="cosine",
                       warmup_steps=2, total_steps=STEPS)


def stored_distributions(step: int, rank: int, world: int) -> torch.Tensor:
    probs = torch.randn(BATCH, 5, generator=torch.Generator().manual_seed(200 + step)).mul(2).softmax(-1)
    return probs[rank * BATCH // world:(rank + 1) * BATCH // world]


def mpl_case(config: str, feedback: str, rank: int, world: int) -> dict[str, torch.Tensor]:
    ds = load_ds_config(config)
    student = ZeroLearner(net(1), optim(0.2), ds, BATCH // world)
    if feedback == "reduced":
        torch.manual_seed(0)
        teacher = ZeroLearner(ReducedTeacher(5, hidden=16), optim(0.1), ds, BATCH // world)
        step = ReducedMPLStep(teacher, student, MPLConfig(pseudo_labels="argmax", uda_factor=0.0))

        def run(t):
            x_l, y_l, _, x_u_aug = batch(t, rank, world)
            return step(x_l, y_l, stored_distributions(t, rank, world), x_u_aug, step=t).h
    else:
        teacher = ZeroLearner(net(0), optim(0.1), ds, BATCH // world)
        step = MPLStep(teacher, student, MPLConfig(feedback=feedback, pseudo_labels="argmax", uda_factor=1.0,
                                                  uda_threshold=0.0, uda_ramp_steps=1))

        def run(t):
            return step(*batch(t, rank, world), step=t).h
    from ds_float64 import check_float64  # a sibling module: this file runs as a script (test_zero imports it too)

    check_float64(teacher)
    check_float64(student)
    hs = [run(t) for t in range(STEPS)]
    state = {f"teacher.{k}": v for k, v in (teacher.full_state_dict() or {}).items()}
    state.update({f"student.{k}": v for k, v in (student.full_state_dict() or {}).items()})
    return {"h": torch.tensor(hs, dtype=torch.float64), **state}


def probe_case(config: str, rank: int, world: int, probe: bool) -> dict[str, torch.Tensor]:
    """Student updates only; with `probe`, a labeled-loss gradient is measured between them."""
    student = ZeroLearner(net(1), optim(0.2), load_ds_config(config), BATCH // world)
    for t in range(3):
        x_l, y_l, _, x_u_aug = batch(t, rank, world)
        student.update(cross_entropy(student(x_u_aug), y_l), stash_grad=probe)
        if probe:
            student.grad_dots(cross_entropy(student.probe_logits(x_l), y_l))
    return student.full_state_dict() or {}


def main(out: str) -> None:
    from ds_float64 import use_float64

    rank, world = init_distributed()
    if world > 1:
        # Probe isolation once per config, in fp32 (the production dtype; with and without on one layout).
        for config in dict.fromkeys(c for c, _ in CASES):
            with_probe = probe_case(config, rank, world, probe=True)
            without = probe_case(config, rank, world, probe=False)
            if rank == 0:
                save_file({**{f"with.{k}": v for k, v in with_probe.items()},
                           **{f"without.{k}": v for k, v in without.items()}}, f"{out}/probe_{config}.safetensors")
    use_float64()
    for config, feedback in CASES:
        result = mpl_case(config, feedback, rank, world)
        if rank == 0:
            save_file(result, f"{out}/{config}_{feedback}.safetensors")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
