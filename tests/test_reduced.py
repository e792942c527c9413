"""Reduced MPL (Appendix E) against independent computations (float64 where formulas are checked).

- The reduced teacher is a 5-layer ReLU perceptron that starts as the identity on distributions.
- The reduced step's h and teacher update equal a brute-force computation: theta_T' - lr * (h - b) *
  grad CE(y_hat, T'(p)), with h the cosine of explicitly flattened student gradients.
- The fixed-teacher baseline never changes its teacher, and is Reduced MPL with the teacher's adaptation
  switched off: with teacher lr 0 both train bitwise the same student (so the labeled probe never reaches it).
- The precompute stores exactly the large teacher's softmax of the selected images, and a killed precompute
  resumed gives the same distributions; fp16/bf16 shards are read back exactly.
- Both recipes run a few steps end to end on generated images (Reduced MPL and the baseline), and a stored
  set that is not the unlabeled data is refused by name.
"""

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import mpl_large.select as select
from mpl_large.config import ConfigError, MPLConfig, OptimConfig
from mpl_large.data.sources import IMAGE, decode_image, load_images
from mpl_large.feedback import CosineFeedback
from mpl_large.optim import build_learner
from mpl_large.reduced import ReducedMPLStep, ReducedTeacher, main, noisy_student_step
from mpl_large.selection_store import StoredDistributions, probability_rows, read_progress
from images import image_folder

K = 3  # classes
RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def student_net(seed: int, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(dropout), nn.Linear(6, K))


def reduced_teacher(seed: int) -> ReducedTeacher:
    """A reduced teacher already moved away from the identity, so every layer gets a gradient."""
    torch.manual_seed(seed)
    teacher = ReducedTeacher(K, hidden=8, layers=5)
    nn.init.normal_(teacher.mlp[-1].weight, std=0.5)
    return teacher


def sgd(model: nn.Module, lr: float, **kw):
    return build_learner(model, OptimConfig(name="sgd", lr=lr, momentum=0.0, nesterov=False, **kw))


def batch(seed: int, n_l: int = 5, n_u: int = 4):
    g = torch.Generator().manual_seed(seed)
    x_l = torch.randn(n_l, 2, generator=g)
    y_l = torch.randint(0, K, (n_l,), generator=g)
    p_u = (2 * torch.randn(n_u, K, generator=g)).softmax(-1)  # the large teacher's stored distributions
    x_u_aug = torch.randn(n_u, 2, generator=g)
    return x_l, y_l, p_u, x_u_aug


def flat_grad(loss, params, **kw) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params), **kw)])


# ---------------------------------------------------------------------------------------------- the step


def test_reduced_teacher_is_a_five_layer_perceptron_starting_as_the_identity():
    teacher = ReducedTeacher(10, hidden=128)
    linears = [m for m in teacher.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(10, 128)] + [(128, 128)] * 3 + [(128, 10)]
    assert sum(isinstance(m, nn.ReLU) for m in teacher.mlp) == 4
    p = (3 * torch.randn(6, 10)).softmax(-1)
    assert torch.allclose(teacher(p).softmax(-1), p, atol=1e-6)


def test_teacher_update_is_advantage_times_ce(float64):
    teacher, student = reduced_teacher(1), student_net(2)
    t0, s0 = copy.deepcopy(teacher), copy.deepcopy(student)
    x_l, y_l, p_u, x_u_aug = batch(0)
    lr_t, lr_s = 0.3, 0.05
    step = ReducedMPLStep(sgd(teacher, lr_t), sgd(student, lr_s),
                          MPLConfig(feedback="cosine", pseudo_labels="argmax", baseline_decay=0.9))
    step.baseline.value = 0.3  # as if earlier steps had left it there
    result = step(x_l, y_l, p_u, x_u_aug, step=0)

    # Independent: y_hat from the pre-step teacher, the student moved by hand along its flattened gradient.
    t_logits = t0(p_u)
    y_hat = t_logits.argmax(-1)
    params = list(s0.parameters())
    g_u = flat_grad(F.cross_entropy(s0(x_u_aug), y_hat), params)
    with torch.no_grad():
        vector_to_parameters(parameters_to_vector(params) - lr_s * g_u, params)
    g_l = flat_grad(F.cross_entropy(s0(x_l), y_l), params)
    h = (g_l @ g_u / (g_l.norm() * g_u.norm())).item()
    g_ce = flat_grad(F.cross_entropy(t_logits, y_hat), t0.parameters())
    expected = parameters_to_vector(t0.parameters()) - lr_t * (h - 0.3) * g_ce

    assert result.h == pytest.approx(h, rel=1e-9)
    assert result.baseline == 0.3
    assert torch.allclose(parameters_to_vector(teacher.parameters()), expected, rtol=0, atol=1e-12)
    assert (lr_t * (h - 0.3) * g_ce).norm() > 1e-3  # the feedback really moves the teacher
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(F.cross_entropy(t0(p_u), y_hat), t0.parameters()))
    assert float(step.baseline.value) == pytest.approx(0.9 * 0.3 + 0.1 * h)
    kl = (p_u * (p_u.log() - t_logits.log_softmax(-1))).sum(-1).mean().item()
    assert result.teacher_shift == pytest.approx(kl, rel=1e-9)


def test_non_finite_h_leaves_the_teacher_and_baseline(float64, monkeypatch):
    monkeypatch.setattr(CosineFeedback, "combine", staticmethod(lambda dots, lr: dots[0] * float("nan")))
    teacher = reduced_teacher(3)
    t0 = copy.deepcopy(teacher)
    step = ReducedMPLStep(sgd(teacher, 0.1), sgd(student_net(4), 0.1), MPLConfig(feedback="cosine"))
    step.baseline.value = 0.25
    result = step(*batch(1), step=0)
    assert result.h_skipped and result.teacher_loss == 0.0
    assert float(step.baseline.value) == 0.25
    assert torch.equal(parameters_to_vector(teacher.parameters()), parameters_to_vector(t0.parameters()))


def test_uda_is_refused():
    with pytest.raises(ConfigError, match="mpl.uda_factor"):
        ReducedMPLStep(sgd(reduced_teacher(0), 0.1), sgd(student_net(0), 0.1), MPLConfig(uda_factor=1.0))


@pytest.mark.parametrize("feedback", ["cosine", "taylor"])
def test_fixed_teacher_baseline_is_reduced_mpl_without_adaptation(feedback):
    """Same seeds, same data: Reduced MPL with teacher lr 0 and the NoisyStudent baseline train the same
    student bit for bit; the baseline's teacher never changes; with teacher lr > 0 the students part."""
    opt = OptimConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    cfg = MPLConfig(feedback=feedback, label_smoothing=0.1)
    batches = [batch(10 + i, n_u=16) for i in range(4)]

    def run(kind: str, teacher_lr: float = 0.0):
        teacher, student = reduced_teacher(5), build_learner(student_net(6, dropout=0.3), opt)
        initial = copy.deepcopy(teacher.state_dict())
        if kind == "baseline":
            step = noisy_student_step(teacher, student, cfg)
            call = lambda x_l, y_l, p_u, x_u_aug, t: step(p_u, x_u_aug, t)  # noqa: E731
        else:
            step = ReducedMPLStep(build_learner(teacher, OptimConfig(name="sgd", lr=teacher_lr)), student, cfg)
            call = step
        torch.manual_seed(7)
        for t, data in enumerate(batches):
            call(*data, t)
        moved = any(not torch.equal(v, teacher.state_dict()[k]) for k, v in initial.items())
        return student.model.state_dict(), moved, teacher

    reduced, reduced_moved, _ = run("reduced")
    baseline, baseline_moved, frozen = run("baseline")
    adaptive, adaptive_moved, _ = run("reduced", teacher_lr=50.0)

    assert not reduced_moved and not baseline_moved and adaptive_moved
    assert not any(p.requires_grad for p in frozen.parameters())
    for name, value in reduced.items():
        assert torch.equal(value, baseline[name]), name
    assert any(not torch.equal(value, adaptive[name]) for name, value in reduced.items())


# ------------------------------------------------------------------------------------------- precompute


def precompute_args(tmp_path: Path, data: Path, out: Path, size: int = 16, top_k: int = 20) -> list[str]:
    """A random tiny teacher puts most images in one class: top_k keeps every image, so all are checked."""
    weights = tmp_path / "teacher.safetensors"
    if not weights.exists():
        torch.manual_seed(0)
        save_file(timm.create_model("test_resnet", num_classes=K).state_dict(), str(weights))
    return ["precompute", "--model", "test_resnet", "--weights", str(weights), "--num-classes", str(K),
            "--data", str(data), "--image-size", str(size), "--batch-size", "4", "--top-k", str(top_k),
            "--out", str(out), "--shard-size", "3", "--probs-dtype", "float32", "--workers", "0",
            "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]


def test_precompute_is_exact_and_resumable(tmp_path, monkeypatch):
    data = image_folder(tmp_path / "unlabeled", 11, size=20)
    main(precompute_args(tmp_path, data, tmp_path / "whole"))
    stored = StoredDistributions(tmp_path / "whole")
    probs = stored[torch.arange(len(stored))]

    # Independent: the teacher on each selected image alone, preprocessed by timm's eval transform.
    teacher = select.load_teacher("test_resnet", K, tmp_path / "teacher.safetensors").eval()
    config = timm.data.resolve_model_data_config(teacher)
    transform = timm.data.create_transform(**{**config, "input_size": (3, 16, 16), "crop_mode": "center"})
    # Row i of the selected images is example i of the stored distributions (what the training stream uses).
    images = stored.images(load_images(data, labeled=False))
    with torch.no_grad():
        expected = torch.cat([teacher(transform(decode_image(row[IMAGE], where="test"))[None]).softmax(-1)
                              for row in images])
    assert len(stored) == 11 and sorted(stored.index.tolist()) == list(range(11))
    assert torch.allclose(probs, expected, rtol=0, atol=1e-6)
    assert torch.equal(stored.label, probs.argmax(-1))

    # Killed after the first batch (a checkpoint at 3 examples), then resumed: the same distributions.
    readable = select._readable

    def killed_after_one(loader, unreadable):
        for b, item in enumerate(readable(loader, unreadable)):
            if b == 1:
                raise KeyboardInterrupt("killed")
            yield item

    monkeypatch.setattr(select, "_readable", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        main(precompute_args(tmp_path, data, tmp_path / "killed"))
    assert read_progress(tmp_path / "killed")["consumed"] == 3
    with pytest.raises(ValueError, match="did not finish"):
        StoredDistributions(tmp_path / "killed")
    monkeypatch.setattr(select, "_readable", readable)
    main(precompute_args(tmp_path, data, tmp_path / "killed") + ["--resume"])
    resumed = StoredDistributions(tmp_path / "killed")
    assert torch.equal(resumed.index, stored.index)
    assert torch.equal(resumed[torch.arange(len(resumed))], probs)
    with pytest.raises(IndexError, match="positions"):
        resumed[torch.tensor([len(resumed)])]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_memory_mapped_shards_read_exactly(tmp_path, dtype):
    path = tmp_path / "shard.safetensors"
    tensors = {"index": torch.arange(7), "probs": torch.rand(7, 5).to(dtype)}
    save_file(tensors, str(path))
    rows = probability_rows(path, "probs")[[4, 0, 6]]
    assert torch.equal(rows, load_file(str(path))["probs"][[4, 0, 6]])


# -------------------------------------------------------------------------------------- trainer, recipes


def recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Labeled, unlabeled and evaluation folders, and a precompute over the unlabeled one."""
    root = tmp_path_factory.mktemp("reduced")
    folders = {"train": image_folder(root / "train", 30), "unlabeled": image_folder(root / "unlabeled", 16, seed=2),
               "eval": image_folder(root / "eval", 6, seed=3)}
    main(precompute_args(root, folders["unlabeled"], root / "stored", size=32))
    return root, folders


def run_recipe(name: str, root: Path, folders: dict, out: str, extra: list[str]) -> dict:
    module = recipe(name)
    argv = ["--data", str(folders["train"]), "--unlabeled", str(folders["unlabeled"]), "--eval", str(folders["eval"]),
            "--distributions", str(root / "stored"), "--out", str(root / out), "--steps", "2",
            "--set", "batch_size=4", "--set", "student.num_classes=3", "--set", "data.image_size=32",
            "--set", "log_every=1", "--no-progress", *extra]
    return module.recipe_main(module.config, module.__doc__, argv)


def test_cifar10_recipe_reduced_mpl_end_to_end(generated):
    root, folders = generated
    results = run_recipe("reduced_mpl_cifar10", root, folders, "cifar", [
        "--finetune-steps", "1", "--set", "finetune.batch_size=4", "--set", "data.num_dropped=3",
        "--set", "data.num_labeled=20"])
    assert results["method"] == "reduced_mpl" and 0 <= results["finetune"]["eval_top1"] <= 1
    records = [json.loads(line) for line in (root / "cifar" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == ["train", "train", "eval", "finetune", "eval"]
    assert {"h", "baseline", "teacher_shift", "student_accuracy"} <= records[0].keys()
    assert records[0]["teacher_shift"] < 1e-5  # the reduced teacher starts as the large one
    config = json.loads((root / "cifar" / "config.json").read_text())
    assert config["student"]["name"] == "efficientnet_b0" and config["reduced"]["hidden"] == 128
    student = timm.create_model("efficientnet_b0", num_classes=3)
    student.load_state_dict(load_file(root / "cifar" / "model.safetensors"))


def test_imagenet_recipe_noisy_student_baseline(generated):
    root, folders = generated
    assert recipe("reduced_mpl_imagenet").config().student.name == "efficientnet_b7"
    results = run_recipe("reduced_mpl_imagenet", root, folders, "imagenet", [
        "--method", "noisy_student", "--finetune-steps", "0", "--set", "student.name=efficientnet_b0",
        "--set", "data.eval_batch_size=4"])
    assert results["method"] == "noisy_student" and "finetune" not in results
    assert {"loss", "accuracy", "eval_top1"} <= results["main"].keys()


def test_distributions_of_other_data_are_refused(generated):
    root, folders = generated
    with pytest.raises(ConfigError, match="data.unlabeled"):
        run_recipe("reduced_mpl_cifar10", root, {**folders, "unlabeled": folders["eval"]}, "wrong", [
            "--set", "data.num_dropped=3", "--set", "data.num_labeled=20"])
