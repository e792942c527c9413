"""Nothing lost, nothing silently wrong (issue 14): one test per finding of the hostile-user review.

1. a corrupt checkpoint file (same size) is found by its SHA-256, named, and resume falls back to the one before;
2. non-finite losses skip updates, are logged visibly, and stop the run before a non-finite weight is written;
3. a pickle payload planted in a DeepSpeed checkpoint is refused, naming the file, and never runs;
4. a fresh run refuses a non-empty out dir unless told to overwrite;
5. a resume with a changed config names the fields, leaves config.json alone, and records allowed changes;
6. every config section is checked before any compute, naming the field;
7. labels outside [0, num_classes) (and ignore_index -100) are refused when the data is opened, naming the row;
8. a failed write (disk full) names the path and leaves no partial checkpoint; skipped images are reported.
(9, export test-loading every registered model, is in tests/test_export.py.)
"""

import json
import math
import shutil

import datasets
import pytest
import torch
from safetensors.torch import load_file, save_file

import mpl_large.checkpoint
import mpl_large.learner
from images import image_folder
from mpl_large.checkpoint import CheckpointError, WriteError, complete_checkpoints, sha256
from mpl_large.config import ConfigError, MPLConfig, OptimConfig, apply_override
from mpl_large.data.sources import DataError
from mpl_large.export import ExportError, export
from mpl_large.guard import NonFiniteError
from mpl_large.learner import Learner
from mpl_large.tracking import RunLog
from mpl_large.config import DataConfig, FinetuneConfig, ModelConfig, TrainConfig
from mpl_large.trainer import _save_weights, train
from multiproc import launch


def mpl_config(out, data, **changes) -> TrainConfig:
    model = ModelConfig("digits_cnn", num_classes=3)
    optim = OptimConfig(name="sgd", lr=0.05, momentum=0.9, schedule="cosine", total_steps=6)
    return TrainConfig(**{
        "name": "integrity", "out_dir": str(out), "method": "mpl", "seed": 1, "steps": 6, "batch_size": 4,
        "teacher": model, "student": model, "teacher_optim": optim, "student_optim": optim,
        "mpl": MPLConfig(uda_factor=1.0, uda_ramp_steps=2),
        "data": DataConfig(labeled=str(data), unlabeled=str(data), augment="svhn", image_size=8),
        "finetune": FinetuneConfig(steps=0), "progress": False, "checkpoint_every": 2, "log_every": 1, **changes,
    })


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted 6-step MPL run, checkpointed at steps 2 and 4."""
    root = tmp_path_factory.mktemp("integrity")
    data = image_folder(root / "data", 24, size=8)
    train(mpl_config(root / "whole", data))
    assert [p.name for p in complete_checkpoints(root / "whole" / "checkpoints")] == ["step-00000002",
                                                                                      "step-00000004"]
    return root / "whole", data


def copy_run(whole, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(whole, out)
    return out


def same_weights(a, b) -> bool:
    a, b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def flip_bytes(path, count=64):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


# 1 ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("victim", ["student/learner.pt", "rng-rank0.safetensors"])
def test_1_corrupt_checkpoint_is_named_and_resume_falls_back(whole, tmp_path, victim):
    whole, data = whole
    out = copy_run(whole, tmp_path)
    corrupt = out / "checkpoints" / "step-00000004" / victim
    size = corrupt.stat().st_size
    flip_bytes(corrupt)
    assert corrupt.stat().st_size == size
    with pytest.warns(UserWarning, match=rf"not resuming from .*step-00000004: {corrupt}: corrupt"):
        results = train(mpl_config(out, data, resume=True))
    assert results["resumes"][0]["step"] == 2  # the previous complete checkpoint
    assert same_weights(whole, out)  # and from there the resume is exact

    # Every checkpoint corrupt: refused, naming each file, instead of training on them.
    flip_bytes(out / "checkpoints" / "step-00000002" / "teacher" / "learner.pt")
    flip_bytes(out / "checkpoints" / "step-00000004" / victim)
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match=r"no checkpoint .* can be resumed.*teacher"):
        train(mpl_config(out, data, resume=True))


def test_1_export_verifies_the_weights_hash(whole, tmp_path):
    whole, _ = whole
    out = copy_run(whole, tmp_path)
    flip_bytes(out / "model.safetensors", 8)
    with pytest.raises(ExportError, match=rf"{out / 'model.safetensors'}: corrupt"):
        export(out, tmp_path / "export")


# 2 ---------------------------------------------------------------------------------------------------------
def test_2_nonfinite_update_is_skipped_and_counted():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    learner = Learner(model, optimizer, scheduler)
    learner.update(model(torch.randn(4, 3)).sum())  # one finite step: momentum buffers exist
    before = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    learner.update(model(torch.full((4, 3), math.inf)).sum())  # inf input: NaN gradients
    assert learner.skipped_updates == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(m, optimizer.state[p]["momentum_buffer"]) for m, p in zip(momentum, model.parameters()))
    assert learner.lr == pytest.approx(0.1 / 3)  # the schedule still advanced


def test_2_diverging_run_stops_before_writing_nonfinite_weights(tmp_path):
    """lr 1e6: from step 4 the gradients overflow (each update is skipped) and BatchNorm's running variances
    overflow in the forwards. The run stops after 3 skipped steps in a row, or at a checkpoint that would hold
    an inf, and never writes one."""
    data = image_folder(tmp_path / "data", 12, size=8)
    cfg = TrainConfig(
        name="nan", out_dir=str(tmp_path / "run"), method="supervised", steps=12, batch_size=4, seed=0,
        teacher=ModelConfig("digits_cnn", num_classes=3), teacher_optim=OptimConfig(lr=1e6),
        data=DataConfig(labeled=str(data), augment="svhn", image_size=8), finetune=FinetuneConfig(steps=0),
        progress=False, log_every=1, max_nonfinite_steps=3)
    with pytest.warns(UserWarning, match="non-finite loss or gradient"), \
            pytest.raises(NonFiniteError, match=r"step 6: 3 steps in a row had a non-finite loss or gradient \(model"):
        train(cfg)
    out = tmp_path / "run"
    assert not (out / "model.safetensors").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped"]) for r in records if r["phase"] == "nonfinite"] == [(4, "model"), (5, "model"),
                                                                                        (6, "model")]

    cfg.checkpoint_every, cfg.overwrite = 1, True
    with pytest.raises(NonFiniteError, match=r"not writing the checkpoint of step \d: .* \(model.stages.*running_var"):
        train(cfg)
    for checkpoint in complete_checkpoints(out / "checkpoints"):  # every weight written is finite
        state = torch.load(checkpoint / "model" / "learner.pt", weights_only=True)["model"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_2_weights_file_refuses_nonfinite_tensors(tmp_path):
    """The one writer of the final, best and EMA weights names the file and the bad tensor, and writes nothing."""
    state = {"ok": torch.ones(2), "steps": torch.tensor([3]), "w": torch.tensor([1.0, float("inf")])}
    with pytest.raises(NonFiniteError, match=r"not writing .*model.safetensors: 1 tensors hold NaN or inf \(w\)"):
        _save_weights(state, tmp_path / "model.safetensors", "the final weights")
    assert not (tmp_path / "model.safetensors").exists()
    state["w"] = torch.tensor([1.0, 2.0])
    assert _save_weights(state, tmp_path / "model.safetensors", "the final weights") == sha256(
        tmp_path / "model.safetensors")


def test_2_metrics_keep_nonfinite_values_visible(tmp_path):
    log = RunLog(tmp_path, trackers=["tensorboard"])
    log.log(1, "train", {"loss": math.nan, "h": math.inf, "accuracy": 0.5})
    log.log(2, "train", {"loss": -math.inf, "h": 0.1, "accuracy": 0.75})
    log.close()

    def refuse(constant):
        raise ValueError(f"bare {constant} in metrics.jsonl")
    records = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["loss"], r["h"]) for r in records] == [("nan", "inf"), ("-inf", 0.1)]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(next((tmp_path / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert len(losses) == 2 and math.isnan(losses[0]) and losses[1] == -math.inf


def test_2_export_refuses_nonfinite_weights(whole, tmp_path):
    whole, _ = whole
    out = copy_run(whole, tmp_path)
    state = load_file(out / "model.safetensors")
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name][0] = math.nan
    save_file(state, str(out / "model.safetensors"))
    results = json.loads((out / "results.json").read_text())
    results["model_sha256"] = sha256(out / "model.safetensors")  # the hash matches: only finiteness is wrong
    (out / "results.json").write_text(json.dumps(results))
    with pytest.raises(ExportError, match=rf"1 tensors hold NaN or inf \({name}\)"):
        export(out, tmp_path / "export")


# 3 ---------------------------------------------------------------------------------------------------------
class Payload:
    """Unpickling this writes a marker file: what an attacker's checkpoint would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return self.marker.write_text, ("pickle ran",)


@pytest.mark.parametrize("deepspeed", ["ddp", "zero3"])
def test_3_pickle_payload_in_a_deepspeed_checkpoint_is_refused(tmp_path, deepspeed):
    data = image_folder(tmp_path / "data", 12, size=8)
    out = tmp_path / "run"
    launch("ds_payload_run.py", 1, str(out), str(data), deepspeed)
    checkpoint = out / "checkpoints" / "step-00000002"
    name = "model/engine/" + ("mp_rank_00_model_states.pt" if deepspeed == "ddp"
                              else "zero_pp_rank_0_mp_rank_00_model_states.pt")
    victim, marker = checkpoint / name, tmp_path / "marker"
    state = torch.load(victim, weights_only=False)  # our own file, to rewrite
    state["payload"] = Payload(marker)
    torch.save(state, victim)
    # A hostile folder comes with a matching manifest: the hash check alone would not stop it.
    manifest = json.loads((checkpoint / "checkpoint.json").read_text())
    manifest["files"][name] = {"bytes": victim.stat().st_size, "sha256": sha256(victim)}
    (checkpoint / "checkpoint.json").write_text(json.dumps(manifest))
    shutil.rmtree(out / "checkpoints" / "step-00000004", ignore_errors=True)  # a finished run keeps step 4 too

    with pytest.raises(AssertionError) as failure:
        launch("ds_payload_run.py", 1, str(out), str(data), deepspeed, "--resume")
    assert f"{victim}: refused to load" in str(failure.value)
    assert not marker.exists(), "the planted pickle ran"


# 4 ---------------------------------------------------------------------------------------------------------
def test_4_fresh_run_refuses_a_non_empty_out_dir(whole, tmp_path):
    whole, data = whole
    out = copy_run(whole, tmp_path)
    metrics = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match=rf"out_dir: {out} holds another run \(config.json, metrics.jsonl, "
                                          r"results.json, model.safetensors, checkpoints, tensorboard\).*--overwrite"):
        train(mpl_config(out, data, steps=3))
    assert (out / "metrics.jsonl").read_bytes() == metrics
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["step-00000002", "step-00000004"]

    (out / "checkpoints" / "tmp-step-00000006").mkdir()  # a killed save's leftovers
    train(mpl_config(out, data, steps=3, overwrite=True))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]  # only the new run's
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


# 5 ---------------------------------------------------------------------------------------------------------
def test_5_resume_names_changed_fields_and_records_allowed_changes(whole, tmp_path):
    whole, data = whole
    out = copy_run(whole, tmp_path)
    config = (out / "config.json").read_bytes()
    changed = mpl_config(out, data, resume=True, seed=2)
    changed.teacher_optim.lr = 0.1
    changed.data.image_size = 16
    with pytest.raises(CheckpointError, match=r"data.image_size is 8 in the checkpoint but 16 in this run; "
                                              r"seed is 1 .* but 2 .*; teacher_optim.lr is 0.05 .* but 0.1"):
        train(changed)
    assert (out / "config.json").read_bytes() == config  # a refused resume changes nothing

    results = train(mpl_config(out, data, resume=True, log_every=2, name="renamed"))
    assert results["resumes"] == [{"step": 4, "checkpoint": "step-00000004",
                                   "changed": {"log_every": [1, 2], "name": ["integrity", "renamed"],
                                               "out_dir": [str(whole), str(out)], "resume": [False, True]}}]
    assert json.loads((out / "results.json").read_text())["resumes"] == results["resumes"]
    assert json.loads((out / "config.json").read_text())["log_every"] == 2
    assert same_weights(whole, out)


# 6 ---------------------------------------------------------------------------------------------------------
BAD_VALUES = [  # (field, bad value, the name the error gives: the section's, as in config.py)
    ("finetune.batch_size", 0, "finetune.batch_size"), ("data.eval_batch_size", 0, "data.eval_batch_size"),
    ("data.image_size", 0, "data.image_size"), ("teacher.num_classes", 0, "model.num_classes"),
    ("student.drop_rate", 1.5, "model.drop_rate"), ("teacher_optim.lr", math.inf, "optim.lr"),
    ("finetune.steps", -5, "finetune.steps"), ("checkpoint_every", -1, "checkpoint_every"),
    ("finetune.optim.lr", math.nan, "optim.lr"), ("data.num_dropped", -1, "data.num_dropped"),
    ("eval_every", -2, "eval_every"), ("max_nonfinite_steps", 0, "max_nonfinite_steps"),
]


@pytest.mark.parametrize("field,value,named", BAD_VALUES)
def test_6_every_section_is_validated_before_any_compute(tmp_path, field, value, named):
    *path, name = field.split(".")
    with pytest.raises(ConfigError, match=rf"^{named}: "):
        apply_override(TrainConfig(), f"{field}={value}")

    cfg = TrainConfig(out_dir=str(tmp_path / "run"), data=DataConfig(labeled=str(tmp_path / "absent")))
    section = cfg
    for part in path:
        section = getattr(section, part)
    setattr(section, name, value)  # set after construction, as a recipe does: train() checks again
    with pytest.raises(ConfigError, match=rf"{named}: "):
        train(cfg)
    assert not (tmp_path / "run").exists()


# 7 ---------------------------------------------------------------------------------------------------------
def test_7_out_of_range_labels_are_refused_naming_row_and_file(tmp_path):
    data = image_folder(tmp_path / "four", 8, classes=4, size=8)  # classes 0-3, the model has 3
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), method="supervised", steps=1, batch_size=4, progress=False,
                      teacher=ModelConfig("digits_cnn", num_classes=3), finetune=FinetuneConfig(steps=0),
                      data=DataConfig(labeled=str(data), augment="svhn", image_size=8))
    with pytest.raises(DataError, match=rf"{data}: row \d+ \(.*class3/0000[37].png\) has label 3, a class id past "
                                        r"teacher.num_classes=3; .* 2 rows"):
        train(cfg)

    rows = datasets.load_dataset("imagefolder", data_dir=str(image_folder(tmp_path / "three", 8, size=8)),
                                 split="train", cache_dir=str(tmp_path / "cache"))
    labels = list(rows["label"])
    labels[5] = -100  # an ignore_index label: half a batch would silently not be learned
    rows = rows.remove_columns("label").add_column("label", labels)
    rows.to_parquet(str(tmp_path / "train.parquet"))
    cfg.data.labeled, cfg.overwrite = str(tmp_path / "train.parquet"), True
    with pytest.raises(DataError, match=r"train.parquet: row 5 .*has label -100, a negative label"):
        train(cfg)


# 8 ---------------------------------------------------------------------------------------------------------
def test_8_full_disk_names_the_path_and_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    data = image_folder(tmp_path / "data", 12, size=8)
    (data / "class0" / "broken.png").write_bytes(b"not a png")
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), method="supervised", steps=3, batch_size=4, progress=False,
                      teacher=ModelConfig("digits_cnn", num_classes=3), finetune=FinetuneConfig(steps=0),
                      data=DataConfig(labeled=str(data), eval=str(data), augment="svhn", image_size=8),
                      checkpoint_every=2)
    save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        save(obj, f, *args, **kwargs)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 2971")
    monkeypatch.setattr(mpl_large.learner.torch, "save", full_disk)
    checkpoints = tmp_path / "run" / "checkpoints"
    with pytest.raises(WriteError, match=rf"{checkpoints / 'tmp-step-00000002' / 'model'}: cannot write model's "
                                         r"checkpoint state \(RuntimeError: .*unexpected pos"):
        train(cfg)
    assert list(checkpoints.iterdir()) == []  # the failed save's tmp-step-00000002 is gone
    monkeypatch.undo()

    (checkpoints / "tmp-step-00000002" / "model").mkdir(parents=True)  # what a killed save leaves
    cfg.overwrite = True
    results = train(cfg)
    assert [p.name for p in checkpoints.iterdir()] == ["step-00000002"]
    assert results["skipped_images"] >= 2  # the broken file, in training and in evaluation
