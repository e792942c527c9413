"""The device mesh of paper §4: data-parallel replicas, and within each replica a spatial group (every image
split along its width, one strip per rank) and optionally a tensor-parallel group (wide 1x1 convs and the
classifier split by channel).

Rank layout, tensor-parallel fastest, data-parallel slowest:

    rank = (dp_rank * sp + sp_rank) * tp + tp_rank

so the ranks of a tensor-parallel group (one collective per layer pair) are adjacent, then those of a
spatial group (halo exchanges between neighbours at every conv): on a multi-GPU host the chattiest groups
share a node. With dp=2, sp=2, tp=1 the replicas are ranks {0, 1} and {2, 3}; rank 1 holds the right half
of replica 0's images.

Groups built by `ParallelDims.build` (each rank keeps the ones it belongs to):

    sp_group    the sp ranks of one replica that share a tp_rank: halo exchanges, pooled sums, BN stats
    tp_group    the tp ranks that share (dp_rank, sp_rank): channel-sharded layer pairs
    dp_group    the dp ranks that share (sp_rank, tp_rank)
    grad_group  the dp * sp ranks that share a tp_rank: they hold the same parameters (or the same shard of
                a tensor-parallel one), so gradients are averaged over it (see `parallelize`)
    bn_group    sp_group, or grad_group with `sync_bn` (statistics over every replica's images)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch.distributed as dist

from mpl_large.config import ConfigError


@dataclass
class ParallelDims:
    """Sizes of the mesh; `build()` checks them against the process group and creates the groups."""

    dp: int = -1
    """Data-parallel replicas, each with its own images. -1: whatever the world size leaves,
    world_size / (sp * tp)."""
    sp: int = 1
    """Spatial degree: ranks per replica that split each image along its width (the paper's 16 strips of
    512x32 per 512x512 image)."""
    tp: int = 1
    """Tensor-parallel degree: ranks per replica that split the channels of wide 1x1 conv pairs and the
    classifier."""
    sync_bn: bool = False
    """BatchNorm statistics over all replicas' images (SyncBN); otherwise over one replica's images, which
    is what the unsplit layer computes on that replica's batch."""

    rank: int = field(default=0, init=False)
    """This process's global rank (set by `build`)."""
    groups: dict = field(default_factory=dict, init=False, repr=False)
    """Process groups by name (set by `build`); absent when the group has one rank."""
    members: dict = field(default_factory=dict, init=False, repr=False)
    """Global ranks of this rank's groups by name, ordered by the group's own index."""

    def __post_init__(self) -> None:
        for name in ("sp", "tp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}: must be >= 1, got {getattr(self, name)}")
        if self.dp == 0 or self.dp < -1:
            raise ConfigError(f"parallel.dp: must be >= 1 or -1 (inferred), got {self.dp}")

    def resolve(self, world_size: int) -> None:
        """Fill in an inferred dp and check dp * sp * tp == world_size."""
        if self.dp == -1:
            if world_size % (self.sp * self.tp):
                raise ConfigError(
                    f"parallel: world size {world_size} is not divisible by sp ({self.sp}) * tp ({self.tp})"
                )
            self.dp = world_size // (self.sp * self.tp)
        if self.dp * self.sp * self.tp != world_size:
            raise ConfigError(
                f"parallel: dp ({self.dp}) * sp ({self.sp}) * tp ({self.tp}) = {self.dp * self.sp * self.tp} "
                f"ranks, but the process group has {world_size} (WORLD_SIZE)"
            )

    def check_node(self, local_world_size: int) -> None:
        """A replica's spatial (and tensor-parallel) ranks must share a node: they exchange halos at every conv.
        Ranks are laid out contiguously, node by node, so the groups of sp * tp ranks fit within nodes of
        `local_world_size` ranks exactly when it divides by sp * tp."""
        group = self.sp * self.tp
        if group > 1 and local_world_size % group:
            raise ConfigError(
                f"parallel.spatial: a replica's group of sp ({self.sp}) * tp ({self.tp}) = {group} ranks does not fit "
                f"within one node of {local_world_size} ranks (LOCAL_WORLD_SIZE): its halo exchanges at every conv "
                f"would cross nodes; choose a degree that divides {local_world_size}"
            )

    def build(self) -> ParallelDims:
        """Check the sizes against the initialised process group (and that a replica's groups stay within a node,
        `check_node`) and create every group. Collective: all ranks must call it, in the same order relative to
        other group creations. Returns self."""
        initialised = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if initialised else 1
        self.resolve(world_size)
        # Launchers (torchrun, accelerate, deepspeed) set LOCAL_WORLD_SIZE; without it, one node is assumed.
        self.check_node(int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
        self.rank = dist.get_rank() if initialised else 0
        index = {
            "sp_group": lambda d, s, t: ((d, t), s),
            "tp_group": lambda d, s, t: ((d, s), t),
            "dp_group": lambda d, s, t: ((s, t), d),
            "grad_group": lambda d, s, t: (t, d * self.sp + s),
        }
        for name, key_of in index.items():
            layout: dict = {}
            for rank in range(world_size):
                key, position = key_of(*self.coords(rank))
                layout.setdefault(key, []).append((position, rank))
            for key in sorted(layout):  # the same creation order on every rank
                ranks = [r for _, r in sorted(layout[key])]
                # new_group is collective over the world even for groups this rank is not in.
                group = dist.new_group(ranks) if len(ranks) > 1 else None
                if self.rank in ranks:
                    self.members[name] = ranks
                    if group is not None:
                        self.groups[name] = group
        bn = "grad_group" if self.sync_bn else "sp_group"
        self.members["bn_group"] = self.members[bn]
        if bn in self.groups:
            self.groups["bn_group"] = self.groups[bn]
        return self

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(dp_rank, sp_rank, tp_rank) of a global rank."""
        return rank // (self.sp * self.tp), rank // self.tp % self.sp, rank % self.tp

    @property
    def world_size(self) -> int:
        return self.dp * self.sp * self.tp

    @property
    def dp_rank(self) -> int:
        """Which replica this rank serves: the index of its shard of the data."""
        return self.coords(self.rank)[0]

    @property
    def sp_rank(self) -> int:
        """Which width strip of its replica's images this rank holds."""
        return self.coords(self.rank)[1]

    @property
    def tp_rank(self) -> int:
        """Which channel shard of the tensor-parallel layers this rank holds."""
        return self.coords(self.rank)[2]

    def group(self, name: str) -> dist.ProcessGroup | None:
        """A process group of this rank by name (None when it has a single rank)."""
        if name not in self.members:
            raise RuntimeError("ParallelDims.build() must run before the process groups are used")
        return self.groups.get(name)

    def __deepcopy__(self, memo: dict) -> ParallelDims:
        # Modules hold the mesh; copies of a module (an EMA model, say) talk over the same groups.
        return self
