"""Model parallelism of paper §4: spatial partitioning (each image split along its width over a group of
ranks, halo exchange at every windowed layer) and tensor-parallel channel sharding, applied to a plain
model by `parallelize` over the mesh of `ParallelDims`; data parallelism and ZeRO-3 on top."""

from mpl_large.parallel.dims import ParallelDims
from mpl_large.parallel.parallelize import parallelize, reduce_gradients
from mpl_large.parallel.spatial import split_width

__all__ = ["ParallelDims", "parallelize", "reduce_gradients", "split_width"]
