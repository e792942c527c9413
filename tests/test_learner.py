import copy
import inspect
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpl_large.config import OptimConfig
from mpl_large.learner import Learner, LearnerInterface, measurement_mode
from mpl_large.memory.measure import MemoryTracker, _Marked
from mpl_large.optim import build_learner
from mpl_large.steps import FinetuneStep, PseudoLabelStep
from mpl_large.zero import ZeroLearner


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))


def test_measurement_mode_uses_batch_stats_keeps_running_stats_and_disables_dropout():
    model = net().train()
    model[1].running_mean.fill_(3.0)  # far from the batch mean: eval-mode BN would give other outputs
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(16, 4)
    with measurement_mode(model):
        a, b = model(x), model(x)
    assert torch.equal(a, b)  # no dropout noise
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert model.training and model[1].training and model[3].training
    h = model[0](x)
    expected = model[4](F.relu(F.batch_norm(h, None, None, model[1].weight, model[1].bias, training=True)))
    assert torch.allclose(a, expected, atol=1e-6)


def test_measurement_mode_keeps_the_graph_for_backward():
    model = net().train()
    with measurement_mode(model):
        loss = model(torch.randn(8, 4)).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_grad_dots_needs_a_stash():
    learner = build_learner(net(), OptimConfig())
    with pytest.raises(RuntimeError, match="stash"):
        learner.grad_dots(learner(torch.randn(4, 4)).sum())


def test_grad_dots_against_explicit_gradients():
    model = net()
    learner = Learner(model, torch.optim.SGD(model.parameters(), lr=0.0))
    x_u, x_l = torch.randn(8, 4), torch.randn(8, 4)
    with measurement_mode(model):  # fixes dropout so the two computations see the same function
        u = torch.autograd.grad(model(x_u).sum(), list(model.parameters()))
        learner.update(model(x_u).sum(), stash_grad=True)
        g = torch.autograd.grad(model(x_l).square().sum(), list(model.parameters()))
        dots = learner.grad_dots(model(x_l).square().sum())
    u, g = torch.cat([t.reshape(-1) for t in u]), torch.cat([t.reshape(-1) for t in g])
    assert torch.allclose(dots, torch.stack([g @ u, g @ g, u @ u]), rtol=1e-5)


def test_grad_dots_accumulate_in_float64():
    """The three dot products of 4M fp32 gradient elements: summed in fp32 they are off by ~1e-6 (g.u) to
    ~2e-5 (g.g) here, and h, a cosine near 1e-3, moves by as much. Summed in float64 and rounded once to the
    fp32 they are returned in, each is within an ulp (2^-23 relative) of the exact value."""
    model = nn.Linear(2000, 2000, bias=False)
    learner = Learner(model, torch.optim.SGD(model.parameters(), lr=0.0))
    gen = torch.Generator().manual_seed(0)
    u, g = (torch.randn(2000, 2000, generator=gen) for _ in range(2))  # the gradients of the two losses below
    learner.update((model.weight * u).sum(), stash_grad=True)
    dots = learner.grad_dots((model.weight * g).sum())
    assert dots.dtype == torch.float32
    u, g = u.double().reshape(-1), g.double().reshape(-1)
    exact = torch.stack([g @ u, g @ g, u @ u])
    torch.testing.assert_close(dots.double(), exact, rtol=2**-23, atol=0)

    learner.update((model.weight * 1.0).sum().double(), stash_grad=True)
    assert learner.grad_dots((model.weight * 2.0).sum().double()).dtype == torch.float64


def test_finetune_step_is_one_sgd_step_on_labeled_ce():
    model = nn.Linear(4, 3)
    reference = copy.deepcopy(model)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    step = FinetuneStep(build_learner(model, OptimConfig(lr=0.5, momentum=0.0, nesterov=False)), label_smoothing=0.1)
    result = step(x, y, step=0)
    loss = F.cross_entropy(reference(x), y, label_smoothing=0.1)
    loss.backward()
    assert result.loss == pytest.approx(loss.item())
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p, q - 0.5 * q.grad)


def test_pseudo_label_step_keeps_teacher_fixed_and_trains_student_on_its_labels():
    teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
    t0, reference = copy.deepcopy(teacher), copy.deepcopy(student)
    x_u = torch.randn(8, 4)
    x_u_aug = x_u + 0.1
    step = PseudoLabelStep(teacher, build_learner(student, OptimConfig(lr=0.5, momentum=0.0)), "argmax")
    step(x_u, x_u_aug, step=0)
    assert all(torch.equal(p, q) for p, q in zip(teacher.parameters(), t0.parameters()))
    F.cross_entropy(reference(x_u_aug), t0(x_u).argmax(-1)).backward()
    for p, q in zip(student.parameters(), reference.parameters()):
        assert torch.allclose(p, q - 0.5 * q.grad)


def test_activation_checkpointing_changes_nothing():
    """Checkpointing recomputes forwards inside the backwards (the student's update and the probe's): h,
    the weights and the BatchNorm statistics (updated once per forward, never by a measurement) are the
    same as without it."""
    import timm

    import mpl_large.models  # noqa: F401
    from mpl_large.config import MPLConfig, OptimConfig
    from mpl_large.optim import build_learner
    from mpl_large.steps import MPLStep

    def run(checkpointing: bool):
        torch.manual_seed(0)
        models = [timm.create_model("wrn_28_2", num_classes=3) for _ in range(2)]
        for m in models:
            m.set_grad_checkpointing(checkpointing)
        teacher, student = (build_learner(m, OptimConfig(name="sgd", lr=0.1, momentum=0.9)) for m in models)
        step = MPLStep(teacher, student, MPLConfig(feedback="cosine", pseudo_labels="argmax"))
        g = torch.Generator().manual_seed(1)
        x_l, x_u, x_u_aug = (torch.randn(4, 3, 16, 16, generator=g) for _ in range(3))
        hs = [step(x_l, torch.tensor([0, 1, 2, 0]), x_u, x_u_aug, t).h for t in range(2)]
        return hs, {**student.model.state_dict(), **{f"t.{k}": v for k, v in teacher.model.state_dict().items()}}

    (h_plain, plain), (h_ckpt, ckpt) = run(False), run(True)
    assert h_plain == pytest.approx(h_ckpt, rel=1e-5)
    assert plain["blocks.0.bn1.num_batches_tracked"] == 2  # two steps: one update per forward
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-6, msg=k)


def interface_members() -> set[str]:
    return {n for n in vars(LearnerInterface) if not n.startswith("_") or n == "__call__"} | set(
        LearnerInterface.__annotations__)


def test_learner_and_its_wrappers_provide_the_interface():
    learner = build_learner(net(), OptimConfig())
    assert {"__call__", "lr", "update", "probe_logits", "grad_dots", "model", "params"} <= interface_members()
    assert isinstance(learner, LearnerInterface)
    learner.engine = SimpleNamespace(step=lambda: None)  # _Marked wraps an engine's step
    assert isinstance(_Marked(learner, "student", MemoryTracker(), [0]), LearnerInterface)
    assert not isinstance(net(), LearnerInterface)
    # A ZeroLearner needs a process group; its methods are on the class, its data set in __init__.
    init = inspect.getsource(ZeroLearner.__init__)
    for name in interface_members():
        assert hasattr(ZeroLearner, name) or f"self.{name} =" in init, name
