"""DeepSpeed engines: world size 2 equals world size 1 for the same global batch, for ZeRO stages 0, 2, 3
and 3 with offload, in float64; the feedback dot product from gradient partitions is the full one and the
same as a single-process `Learner`'s; the probe gradient never reaches an update; the trainer with spatial
partitioning equals one process. Real 2-rank runs over gloo (tests/workers/zero_parity.py,
tests/workers/spatial_train.py)."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mpl_large.config import ConfigError, OptimConfig
from mpl_large.ds_config import DS_CONFIGS, load_ds_config
from mpl_large.progress import TIMING_KEYS
from mpl_large.zero import engine_config
from multiproc import launch
from workers.zero_parity import CASES, STEPS


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for world in (1, 2):
        out[world] = tmp_path_factory.mktemp(f"world{world}")
        launch("zero_parity.py", world, str(out[world]))
    return out


@pytest.mark.parametrize("config,feedback", CASES)
def test_two_ranks_equal_one(runs, config, feedback):
    one = load_file(runs[1] / f"{config}_{feedback}.safetensors")
    two = load_file(runs[2] / f"{config}_{feedback}.safetensors")
    assert one.keys() == two.keys()
    assert len(one["h"]) == STEPS and (one["h"] != 0).all()
    # Float64 runs (tests/workers/ds_float64.py). Measured here (2-core AMD EPYC, AVX2) over the 5 steps of all
    # cases: |h2 - h1| <= 2.4e-8 (zero2 cosine; h is a cosine, dot product or loss difference, |h| 0.01-0.9),
    # weights <= 2.1e-8: the fp32 gradient communication DeepSpeed keeps. Tolerances 1e-6: 40x and 50x that.
    torch.testing.assert_close(two["h"], one["h"], rtol=0, atol=1e-6)
    weights = [k for k in one if k != "h"]
    assert any(k.startswith("teacher.") for k in weights) and any(k.startswith("student.") for k in weights)
    for k in weights:
        assert one[k].dtype == torch.float64, k
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-6, msg=k)

def test_two_nodes_of_one_rank_equal_one_node_of_two(runs, tmp_path):
    """Two "nodes" on localhost: two torchrun agents, `--nnodes 2`, one rank each, c10d rendezvous on 127.0.0.1
    (tests/workers/multinode_mpl.py), run the ZeRO-3 cosine MPL case of `runs` and equal its one-node, two-rank
    run bit for bit: the global ranks are the same, so are the arithmetic and the gloo collectives (measured
    difference 0)."""
    import os
    import signal
    import subprocess
    import sys

    from multiproc import ROOT, WORKERS, free_port

    port = free_port()
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={node}",
         "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=mpl{port}", "--max-restarts=0",
         str(WORKERS / "multinode_mpl.py"), str(tmp_path)],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
                       "PYTHONPATH": f"{ROOT}:{WORKERS}"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True) for node in (0, 1)]
    try:
        outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    finally:
        for agent in agents:  # a hung rendezvous must not outlive the test: the agent and its rank
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
    assert all(agent.returncode == 0 for agent in agents), "\n".join(o[-3000:] for o in outputs)
    layout = json.loads((tmp_path / "layout.json").read_text())
    assert sorted(r["GROUP_RANK"] for r in layout) == ["0", "1"]  # two agents ("nodes") ...
    assert all(r["LOCAL_RANK"] == "0" and r["LOCAL_WORLD_SIZE"] == "1" for r in layout)  # ... one rank each
    nodes, node = load_file(tmp_path / "mpl.safetensors"), load_file(runs[2] / "zero3_cosine.safetensors")
    assert nodes.keys() == node.keys() and nodes["h"].dtype == torch.float64 and (nodes["h"] != 0).all()
    for k in node:
        assert torch.equal(nodes[k], node[k]), (k, (nodes[k] - node[k]).abs().max().item())



@pytest.mark.parametrize("config", list(dict.fromkeys(c for c, _ in CASES)))
def test_probe_gradient_never_reaches_the_update(runs, config):
    state = load_file(runs[2] / f"probe_{config}.safetensors")
    names = [k.removeprefix("with.") for k in state if k.startswith("with.")]
    assert names
    for k in names:
        assert torch.equal(state[f"with.{k}"], state[f"without.{k}"]), k


def test_every_shipped_config_states_clipping_and_optimizer_policy():
    for path in DS_CONFIGS.glob("*.json"):
        config = load_ds_config(path.stem)
        assert config["gradient_clipping"] == 0.0, path
    assert {"ddp", "zero2", "zero3", "zero3_offload"} <= {p.stem for p in DS_CONFIGS.glob("*.json")}


def test_bad_configs_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no config file 'zero9'"):
        load_ds_config("zero9")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ConfigError, match="broken.json is not valid JSON"):
        load_ds_config(str(broken))
    silent = tmp_path / "silent.json"
    silent.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match=r"silent.json must set \['gradient_clipping'"):
        load_ds_config(str(silent))


def test_engine_config_fills_batch_bookkeeping_without_touching_the_file():
    config = load_ds_config("zero3")
    filled = engine_config(config, micro_batch=4, world_size=2)
    assert filled["train_batch_size"] == 8 and filled["gradient_accumulation_steps"] == 1
    assert "train_batch_size" not in config


def test_recipe_under_accelerate_launch_zero3_bf16_checkpointing(tmp_path):
    """The CIFAR-10 recipe end to end on 2 ranks: `accelerate launch`, both models in ZeRO-3 bf16
    engines, the student with activation checkpointing, MPL then finetune (a fresh engine), distributed
    evaluation and the gathered weights saved by rank 0."""
    import subprocess
    import sys
    from pathlib import Path

    import timm

    from multiproc import ROOT, free_port
    from images import image_folder

    train, test = image_folder(tmp_path / "train", 48), image_folder(tmp_path / "test", 9, seed=1)
    out = tmp_path / "run"
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "recipes/cifar10_4k.py", "--data", str(train), "--eval", str(test), "--out", str(out),
        "--steps", "2", "--finetune-steps", "1", "--deepspeed", "zero3_bf16", "--no-progress",
        "--set", "log_every=1", "--set", "batch_size=4", "--set", "finetune.batch_size=4",
        "--set", "data.num_dropped=6", "--set", "data.num_labeled=12", "--set", "teacher.num_classes=3",
        "--set", "student.num_classes=3", "--set", "student.grad_checkpointing=true",
    ]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["finetune"]["eval_top1"] <= 1
    assert json.loads((out / "config.json").read_text())["parallel"]["deepspeed"] == "zero3_bf16"
    weights = load_file(out / "model.safetensors")
    assert weights["head.fc.weight"].dtype == torch.bfloat16
    model = timm.create_model("wrn_28_2", num_classes=3)
    model.load_state_dict({k: v.float() for k, v in weights.items()})  # strict: every tensor gathered


SPATIAL_TOL = 1e-6
"""Float64 trainer runs, one process vs spatial: each weight tensor and each logged metric, relative to
max(1, its scale). Measured here (2-core AMD EPYC, AVX2), two sessions: weights <= 3.2e-9 (norm.running_var),
metrics <= 1.1e-8 (step 3 teacher_loss), h <= 2.3e-9; ~100x margin. Not ~1e-13: DeepSpeed communicates
gradients in fp32 and ZeRO-3 hands out fp32 gradient pieces for h; rounding nearly equal values alike, that
costs ~1e-9, not a divergence."""
FIRST_STEP_RTOL = 1e-4
"""fp32 runs, one process vs spatial, at step 1 (the same initial weights and batches): the losses of
forwards that no update has touched yet. Measured here: <= 1.7e-7 (teacher_supervised_loss); ~600x margin."""


@pytest.fixture(scope="module")
def spatial_runs(tmp_path_factory) -> dict[str, Path]:
    """Each layout runs in fp32, then in float64 (one launch each)."""
    from images import image_folder

    root = tmp_path_factory.mktemp("spatial_trainer")
    data, test = image_folder(root / "data", 24), image_folder(root / "test", 9, seed=1)
    for mode, world in (("single", 1), ("spatial", 2)):
        launch("spatial_train.py", world, str(root / mode), str(data), str(test), mode, "float32,float64")
    return {"single": root / "single" / "float64", "spatial": root / "spatial" / "float64",
            "single_fp32": root / "single" / "float32", "spatial_fp32": root / "spatial" / "float32"}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_trainer_with_spatial_partitioning_matches_one_process(spatial_runs):
    """§4's layout through the trainer, in float64 (tests/workers/ds_float64.py): each image split along
    width across 2 ranks (one replica), both models in ZeRO-3 engines; every MPL step's h and losses, the
    finetune step, evaluation and the final weights equal a single process on the same batches."""
    single, spatial = (load_file(spatial_runs[run] / "model.safetensors") for run in ("single", "spatial"))
    assert single.keys() == spatial.keys()
    assert all(v.dtype == torch.float64 for v in single.values() if v.is_floating_point())
    for k in single:
        scale = max(1.0, single[k].double().abs().max().item())
        assert (spatial[k].double() - single[k].double()).abs().max().item() <= SPATIAL_TOL * scale, k
    one, two = _metrics(spatial_runs["single"]), _metrics(spatial_runs["spatial"])
    assert [(r["step"], r["phase"]) for r in one] == [(r["step"], r["phase"]) for r in two]
    assert sum(r["phase"] == "train" for r in one) == 3 and all(r["h"] != 0 for r in one if r["phase"] == "train")
    for a, b in zip(one, two):
        for k, v in a.items():
            if isinstance(v, float) and k not in TIMING_KEYS:
                assert abs(b[k] - v) <= SPATIAL_TOL * max(1.0, abs(v)), (a["step"], a["phase"], k, b[k], v)


def test_trainer_with_spatial_partitioning_in_fp32_runs_end_to_end(spatial_runs):
    """The same runs in fp32 (the production dtype) as a smoke test. After a few fp32 MPL steps two layouts
    are not comparable (h, a cosine near 1e-3, steers the teacher with its round-off: measured here, 68 of
    the 155 final tensors differ by more than 1e-5, stem.weight by 4.7e-4): so the spatial run is checked
    for keys, shapes, dtype and finiteness, and against one process only at step 1, forwards of the same
    initial weights on the same batches."""
    ref, fp32 = (load_file(spatial_runs[run] / "model.safetensors") for run in ("single_fp32", "spatial_fp32"))
    assert ref.keys() == fp32.keys()
    for k, v in fp32.items():
        assert v.shape == ref[k].shape and (not v.is_floating_point() or v.dtype == torch.float32), k
        assert torch.isfinite(v.double()).all(), k
    results = json.loads((spatial_runs["spatial_fp32"] / "results.json").read_text())
    for phase in ("main", "finetune"):
        assert 0 <= results[phase]["eval_top1"] <= 1 and math.isfinite(results[phase]["eval_loss"]), phase
    records = _metrics(spatial_runs["spatial_fp32"])
    assert [(r["step"], r["phase"]) for r in records] == [(r["step"], r["phase"]) for r in
                                                          _metrics(spatial_runs["single_fp32"])]
    assert all(math.isfinite(v) for r in records for v in r.values() if isinstance(v, float))
    first, first_ref = records[0], _metrics(spatial_runs["single_fp32"])[0]
    for k in ("teacher_supervised_loss", "teacher_uda_loss", "student_loss"):
        assert first[k] == pytest.approx(first_ref[k], rel=FIRST_STEP_RTOL), k


def _both_learners_dots(rank: int, world_size: int) -> list[list[float]]:
    """The same update and probe through a `Learner` and a ZeRO-3 `ZeroLearner` (each rank's gradient piece
    is a partition); every rank feeds the whole batch, so the averaged gradient is the single process's bit
    for bit and only the dot products' summation differs."""
    import copy
    import os

    from mpl_large.optim import build_learner
    from mpl_large.zero import ZeroLearner

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1000, 500), torch.nn.Tanh(), torch.nn.Linear(500, 1000))
    optim = OptimConfig(name="sgd", lr=0.1, momentum=0.9)
    single = build_learner(copy.deepcopy(model), optim)
    zero = ZeroLearner(model, optim, load_ds_config("zero3"), 16)
    gen = torch.Generator().manual_seed(1)
    x_u, x_l = (torch.randn(16, 1000, generator=gen) for _ in range(2))
    y_u, y_l = (torch.randint(0, 1000, (16,), generator=gen) for _ in range(2))
    dots = []
    for learner in (single, zero):
        learner.update(torch.nn.functional.cross_entropy(learner(x_u), y_u), stash_grad=True)
        dots.append(learner.grad_dots(torch.nn.functional.cross_entropy(learner.probe_logits(x_l), y_l)).tolist())
    return dots


def test_learner_and_zero_learner_give_the_same_h():
    """Both learners sum [g.u, g.g, u.u] over 1M parameters in float64 and round once to fp32: the same to
    2 ulps (summed in fp32 by the single-process learner they were ~1e-6 apart), so h, their cosine, is too."""
    from mpl_large.zero import skip_shm_comm_build

    skip_shm_comm_build()  # imports DeepSpeed once here, not in every forked rank, and no op build

    from parallel_harness import run_ranks

    for single, zero in run_ranks(_both_learners_dots, 2):
        torch.testing.assert_close(torch.tensor(zero), torch.tensor(single), rtol=2**-22, atol=0)
        h_single, h_zero = (d[0] / (d[1] * d[2]) ** 0.5 for d in (single, zero))
        assert abs(h_zero - h_single) <= 2**-21 * abs(h_single), (h_zero, h_single)


def _block_leaf_run(rank: int, world_size: int) -> dict:
    """One student update and feedback probe of the demo's EfficientNet under `zero3` and `zero3_blocks`
    (the same seed, data and order): which modules DeepSpeed fetches whole, the dot products, the weights."""
    import os

    import timm

    import mpl_large.models  # noqa: F401  (registers efficientnet_l2_demo)
    from mpl_large.zero import ZeroLearner

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    gen = torch.Generator().manual_seed(1)
    x_u, x_l = (torch.randn(8, 3, 32, 32, generator=gen) for _ in range(2))
    y_u, y_l = (torch.randint(0, 10, (8,), generator=gen) for _ in range(2))
    shard = slice(rank * 4, rank * 4 + 4)
    out = {}
    for config in ("zero3", "zero3_blocks"):
        torch.manual_seed(0)
        model = timm.create_model("efficientnet_l2_demo", num_classes=10, drop_rate=0.0)
        learner = ZeroLearner(model, OptimConfig(name="sgd", lr=0.1, momentum=0.9), load_ds_config(config), 4)
        leaves = sorted(type(m).__name__ for m in learner.model.modules() if getattr(m, "_z3_leaf", False))
        learner.update(torch.nn.functional.cross_entropy(learner(x_u[shard]), y_u[shard]), stash_grad=True)
        dots = learner.grad_dots(torch.nn.functional.cross_entropy(learner.probe_logits(x_l[shard]), y_l[shard]))
        state = learner.full_state_dict()  # numpy: tensors would travel through shared memory the rank frees
        out[config] = (leaves, dots.tolist(), state and {k: v.numpy() for k, v in state.items()})
    return out


def test_zero3_blocks_fetches_whole_efficientnet_blocks_with_the_same_results():
    """`zero3_blocks` (the demo's config) makes each EfficientNet block one ZeRO-3 leaf (its parameters
    gathered in one fetch, no hooks on its ~20 submodules); the update and h stay zero3's bit for bit."""
    from mpl_large.zero import skip_shm_comm_build

    skip_shm_comm_build()

    from parallel_harness import run_ranks

    results = run_ranks(_block_leaf_run, 2)
    for out in results:
        assert out["zero3"][0] == []
        assert out["zero3_blocks"][0] == ["DepthwiseSeparableConv"] + ["InvertedResidual"] * 12
        assert out["zero3_blocks"][1] == out["zero3"][1]
    plain, blocks = results[0]["zero3"][2], results[0]["zero3_blocks"][2]
    assert plain.keys() == blocks.keys()
    for k in plain:
        assert (blocks[k] == plain[k]).all(), k


def test_cpu_start_never_builds_deepspeeds_shared_memory_all_reduce():
    # DeepSpeed's CPU comm backend compiles this op at start-up (minutes of g++ here) unless its compatibility
    # table says no; init_distributed says no on CPU, and every collective of ours stays on gloo.
    from deepspeed.comm.torch import build_shm_op

    from mpl_large.zero import skip_shm_comm_build

    skip_shm_comm_build()
    assert build_shm_op() is None
