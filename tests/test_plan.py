"""The memory planner (mpl_large.memory.plan): its model profiles against real models, its per-engine formulas
against hand-written ones, and its planned peaks against peaks measured on real DeepSpeed engines doing
MPL steps at world sizes 1 and 2 (mpl_large.memory.measure: separate processes over gloo), within 20 %."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import timm
import torch

import mpl_large.models  # noqa: F401  (registers wrn_28_2)
from mpl_large.memory.measure import StepSpec, rss_bytes, run_ranks
from mpl_large.memory.plan import (
    GiB, Activations, ModelProfile, Workload, ZeroSettings, main, model_memory, plan, profile_model,
)

# ---------------------------------------------------------------------------------------------------
# Profiles


@pytest.mark.parametrize("name", ["resnet18", "wrn_28_2"])
def test_meta_profile_matches_the_real_model(name):
    """Parameters, buffers and the bytes autograd saves, counted on a real CPU forward at a batch the
    meta-device fit (batches 2 and 4) never saw."""
    prof = profile_model(name, 10, 32)
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert prof.params == sum(p.numel() for p in params)
    assert prof.buffer_bytes == sum(b.numel() * b.element_size() for b in model.buffers())
    assert prof.largest_module == max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())

    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(3, 3, 32, 32))
    assert Activations.at(prof.activations.saved, 3) == pytest.approx(sum(saved.values()), abs=64)
    assert Activations.at(prof.activations.largest_tensor, 3) == max(saved.values())


def test_efficientnet_l2_is_profiled_on_the_meta_device():
    before = rss_bytes()
    prof = profile_model("efficientnet_l2", 1000, 64)
    assert prof.params == 480_309_308  # timm's count (480.3 M)
    assert rss_bytes() - before < 0.2 * 4 * prof.params  # its fp32 weights alone would be 1.9 GB


# ---------------------------------------------------------------------------------------------------
# Formulas


def _profile(params: int = 1000) -> ModelProfile:
    zero = (0.0, 0.0)
    return ModelProfile("toy", params, (params - 10, 10), params - 10, 40, Activations(zero, zero, zero, zero, zero))


def test_engine_bytes_per_stage():
    """Per-rank state of one SGD-momentum model, P = 1000 on 4 ranks (partition 250), written out."""
    p, part, buffers = 1000, 250, 40
    settings = dict(reduce_bucket_size=100, prefetch_bucket_size=50, max_live_parameters=0, max_reuse_distance=0,
                    param_persistence_threshold=0)
    ddp = model_memory("m", _profile(), "sgd", ZeroSettings(stage=0, **settings), 4)
    assert ddp.state == 4 * p + 4 * p + buffers  # parameters, momentum
    assert ddp.gradients == 4 * p and ddp.backward_transient == 4 * p  # and the flattened copy
    assert ddp.step_transient == 4 * p  # Nesterov's temporary
    zero2 = model_memory("m", _profile(), "rmsprop", ZeroSettings(stage=2, **settings), 4, probe=True)
    # parameters whole; master, square average and momentum partitions; the probe's gradient partition
    assert zero2.state == 4 * p + 4 * part + 2 * 4 * part + buffers + 4 * part
    zero3 = model_memory("m", _profile(), "sgd", ZeroSettings(stage=3, **settings), 4)
    # parameter, master, gradient and momentum partitions, the reduce bucket
    assert zero3.state == 4 * (part + part + part + part) + 4 * 100 + buffers
    assert zero3.working == 4 * (990 + 50) and zero3.keep == 0
    # Steps: ZeRO-3 on a flat fp32 copy of the partition plus Nesterov's temporary, per sub-group;
    # ZeRO-2 in fp32 on the averaged partition itself, plus RMSprop's two temporaries.
    assert zero3.step_transient == 4 * (part + part)
    assert model_memory("m", _profile(), "sgd", ZeroSettings(stage=3, sub_group_size=100), 4).step_transient == 4 * 200
    assert zero2.step_transient == 4 * 2 * part
    bf16 = model_memory("m", _profile(), "sgd", ZeroSettings(stage=3, bf16=True, **settings), 4)
    assert bf16.state == 2 * part + 4 * part + 2 * part + 4 * part + 2 * 100 + buffers // 2
    offload = model_memory("m", _profile(), "sgd", ZeroSettings(stage=3, offload_optimizer=True, offload_param=True,
                                                                 **settings), 4)
    # master, momentum, the step's Nesterov temporary, parameters and gradients on the host
    assert offload.state == 4 * 100 + buffers and offload.host == 4 * (part + part + part + part + part)
    # DeepSpeed's defaults keep every parameter gathered from the forward to the backward.
    assert model_memory("m", _profile(), "sgd", ZeroSettings(stage=3), 4).keep == 4 * p


def test_zero3_state_halves_on_two_ranks():
    workload = Workload(teacher="resnet18", student="resnet18", num_classes=10, image_size=32)
    zero = ZeroSettings(stage=3, reduce_bucket_size=10**6)
    one, two = plan(workload, zero, 1), plan(workload, zero, 2)
    assert two.state / one.state <= 0.55
    assert plan(Workload(**{**workload.__dict__, "spatial": 2}), zero, 2).activations["teacher"][0] == \
        two.activations["teacher"][0] // 2


def test_settings_from_a_deepspeed_config():
    zero = ZeroSettings.from_ds_config({
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3, "reduce_bucket_size": 5e7, "stage3_max_live_parameters": 1e8,
                              "offload_optimizer": {"device": "cpu"}},
    })
    assert (zero.stage, zero.bf16, zero.reduce_bucket_size, zero.max_live_parameters) == (3, True, 5 * 10**7, 10**8)
    assert zero.offload_optimizer and not zero.offload_param
    assert zero.prefetch_bucket_size == ZeroSettings().prefetch_bucket_size
    with pytest.raises(ValueError, match="zero_optimization.stage"):
        ZeroSettings(stage=4)
    with pytest.raises(ValueError, match="teacher_optimizer"):
        Workload(teacher_optimizer="adagrad")


def test_data_parallel_cannot_hold_two_efficientnet_l2_on_12_gib_per_rank():
    """The benchmark's verdict: 2 x 480 M parameters, fp32 SGD, 2 ranks of a 24 GiB machine."""
    workload = Workload(image_size=64)
    small = dict(reduce_bucket_size=10**7, prefetch_bucket_size=10**7, max_live_parameters=10**7, max_reuse_distance=0)
    ddp = plan(workload, ZeroSettings(stage=0), 2)
    zero3 = plan(workload, ZeroSettings(stage=3, **small), 2)
    # parameters and momentum of both models alone: 2 x 480 M x 8 bytes
    assert ddp.state > 2 * 480e6 * 8 and not ddp.fits(12 * GiB)
    assert zero3.fits(12 * GiB)


def test_command_line_prints_the_verdicts(capsys):
    main(["--teacher", "resnet18", "--student", "wrn_28_2", "--num-classes", "10", "--image-size", "32",
          "--labeled-batch", "4", "--unlabeled-batch", "8", "--world-size", "2", "--zero-stage", "3",
          "--budget-gib", "0.2"])
    out = capsys.readouterr().out
    for name in ("DDP", "ZeRO-2", "ZeRO-3", "ZeRO-3+offload", "teacher backward", "no"):
        assert name in out


# ---------------------------------------------------------------------------------------------------
# Planned against measured


SMALL_ZERO3 = {"reduce_bucket_size": 5 * 10**6, "stage3_prefetch_bucket_size": 5 * 10**6,
               "stage3_max_live_parameters": 5 * 10**6, "stage3_max_reuse_distance": 0, "sub_group_size": 5 * 10**6}
BASE = dict(teacher="resnet18", student="resnet18", num_classes=10, image_size=32, labeled_batch=4, unlabeled_batch=8)
MEASURED = {
    1: [StepSpec(**BASE, ds_config="ddp"), StepSpec(**BASE, ds_config="zero2"),
        StepSpec(**BASE, ds_config="zero3", ds_overrides=SMALL_ZERO3),
        # Checkpointing, with the feedback that needs no probe backward (see the report of issue 4).
        StepSpec(**{**BASE, "image_size": 64}, ds_config="zero2", checkpointing=True, feedback="taylor")],
    2: [StepSpec(**BASE, ds_config="ddp"), StepSpec(**BASE, ds_config="zero2"),
        StepSpec(**BASE, ds_config="zero3", ds_overrides=SMALL_ZERO3),
        StepSpec(**BASE, ds_config="zero3")],
}


@pytest.fixture(scope="module")
def measured():
    # The two launches overlap: each rank measures only its own process.
    with ThreadPoolExecutor(2) as pool:
        futures = {world: pool.submit(run_ranks, specs, world) for world, specs in MEASURED.items()}
        return {world: f.result() for world, f in futures.items()}


def _planned(spec: StepSpec, world: int):
    return plan(spec, ZeroSettings.from_ds_config(spec.deepspeed_config()), world)


@pytest.mark.parametrize("world,index", [(w, i) for w, specs in MEASURED.items() for i in range(len(specs))])
def test_planned_peak_within_20_percent_of_measured(measured, world, index):
    spec = MEASURED[world][index]
    planned = _planned(spec, world)
    for rank in measured[world][index]:
        assert rank["teacher_params"] == profile_model(spec.teacher, spec.num_classes, spec.image_size).params
        ratio = rank["peak"] / planned.peak
        assert 0.8 <= ratio <= 1.2, (spec, rank["rank"], rank["peak"], planned.peak, rank["phases"])
        assert 0.8 <= rank["state"] / planned.state <= 1.2, (spec, rank["rank"], rank["state"], planned.state)
