"""One rank of the multi-node test (tests/test_zero.py::test_two_nodes_of_one_rank_equal_one_node_of_two),
started by torchrun: the ZeRO-3 MPL steps of tests/workers/zero_parity.py (tiny conv nets, float64), then rank 0 writes h and both models' weights to
OUT/mpl.safetensors and every rank's (RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, host) to OUT/layout.json.
argv: OUT."""

import json
import os
import socket
import sys

import torch.distributed as dist
from safetensors.torch import save_file

from ds_float64 import use_float64
from mpl_large.zero import init_distributed
from zero_parity import mpl_case

if __name__ == "__main__":
    out = sys.argv[1]
    rank, world = init_distributed()
    use_float64()
    result = mpl_case("zero3", "cosine", rank, world)
    layout = [None] * dist.get_world_size()
    dist.all_gather_object(layout, {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                                    "GROUP_RANK")} | {"host": socket.gethostname()})
    if dist.get_rank() == 0:
        save_file(result, f"{out}/mpl.safetensors")
        with open(f"{out}/layout.json", "w") as f:
            json.dump(layout, f)
    dist.barrier()
    dist.destroy_process_group()
