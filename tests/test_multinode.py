"""Two "nodes" on localhost: torchrun --nnodes 2 (one rank each, c10d rendezvous on 127.0.0.1) runs ZeRO-3 MPL
steps (tests/workers/multinode_mpl.py) and ends equal to torchrun with one node of two ranks."""

import json
import os
import signal
import subprocess
import sys

import torch
from safetensors.torch import load_file

from multiproc import ROOT, WORKERS, free_port

SCRIPT = str(WORKERS / "multinode_mpl.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
       "PYTHONPATH": f"{ROOT}:{WORKERS}"}


def torchrun(nnodes: int, nproc: int, node_rank: int, port: int, out) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
         f"--node-rank={node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
         f"--rdzv-id=mpl{port}", "--max-restarts=0", SCRIPT, str(out)],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(*runs: subprocess.Popen) -> None:
    try:
        outputs = [run.communicate(timeout=300)[0] for run in runs]
    finally:
        for run in runs:  # a hung rendezvous must not outlive the test: the agent and its ranks
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
    assert all(run.returncode == 0 for run in runs), "\n".join(o[-3000:] for o in outputs)


def test_two_nodes_of_one_rank_equal_one_node_of_two(tmp_path):
    nodes, node = tmp_path / "nodes", tmp_path / "node"
    nodes.mkdir(), node.mkdir()
    port = free_port()
    finish(torchrun(2, 1, 0, port, nodes), torchrun(2, 1, 1, port, nodes))
    finish(torchrun(1, 2, 0, free_port(), node))
    layout = json.loads((nodes / "layout.json").read_text())
    assert sorted(r["GROUP_RANK"] for r in layout) == ["0", "1"]  # two agents ("nodes") ...
    assert all(r["LOCAL_RANK"] == "0" and r["LOCAL_WORLD_SIZE"] == "1" for r in layout)  # ... one rank each
    one = json.loads((node / "layout.json").read_text())
    assert [r["GROUP_RANK"] for r in one] == ["0", "0"] and {r["LOCAL_RANK"] for r in one} == {"0", "1"}
    a, b = load_file(nodes / "mpl.safetensors"), load_file(node / "mpl.safetensors")
    assert a.keys() == b.keys() and a["h"].dtype == torch.float64 and (a["h"] != 0).all()
    # The same ranks run the same arithmetic over the same gloo collectives: measured difference 0.
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max().item())
