"""Proofs of the MPL step against independent computations (float64).

- h (dot, cosine, taylor) equals a brute-force computation with explicit flattened gradients.
- The teacher's update is exactly supervised + (h - b) * grad CE(y_hat, T(x_u_aug)).
- Sign: the expectation over y_hat of our teacher gradient points where autograd through an explicitly
  unrolled one-step student points.
- The labeled probe never reaches the student's update.
"""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import mpl_large.steps
from mpl_large.config import MPLConfig, OptimConfig
from mpl_large.feedback import CosineFeedback
from mpl_large.optim import build_learner
from mpl_large.steps import MPLStep

K = 3  # classes


def mlp(seed: int, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(2, 6)] + ([nn.BatchNorm1d(6)] if bn else []) + [nn.Tanh(), nn.Linear(6, K)]
    return nn.Sequential(*layers)


def sgd(model: nn.Module, lr: float, **kw):
    return build_learner(model, OptimConfig(name="sgd", lr=lr, momentum=0.0, nesterov=False, **kw))


def batch(seed: int, n_l: int = 5, n_u: int = 4):
    g = torch.Generator().manual_seed(seed)
    x_l = torch.randn(n_l, 2, generator=g)
    y_l = torch.randint(0, K, (n_l,), generator=g)
    x_u = torch.randn(n_u, 2, generator=g)
    x_u_aug = x_u + 0.3 * torch.randn(n_u, 2, generator=g)
    return x_l, y_l, x_u, x_u_aug


def flat_grad(loss, params, **kw) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params), **kw)])


@pytest.mark.parametrize("mode", ["dot", "cosine", "taylor"])
def test_h_matches_brute_force(float64, mode):
    teacher, student = mlp(1, bn=True), mlp(2, bn=True)
    t0, s0 = copy.deepcopy(teacher), copy.deepcopy(student)
    x_l, y_l, x_u, x_u_aug = batch(0)
    lr = 0.05
    step = MPLStep(sgd(teacher, 0.1), sgd(student, lr), MPLConfig(feedback=mode, pseudo_labels="argmax"))
    result = step(x_l, y_l, x_u, x_u_aug, step=0)

    # Brute force: the student moved by hand along an explicit flattened gradient. Train-mode BN (batch
    # statistics) as the step's measurement uses; the models have no dropout.
    y_hat = t0(torch.cat([x_l, x_u_aug]))[len(x_l):].argmax(-1)
    params = list(s0.parameters())
    loss_before = F.cross_entropy(s0(x_l), y_l)
    g_u = flat_grad(F.cross_entropy(s0(x_u_aug), y_hat), params)
    with torch.no_grad():
        vector_to_parameters(parameters_to_vector(params) - lr * g_u, params)
    loss_after = F.cross_entropy(s0(x_l), y_l)
    g_l = flat_grad(loss_after, params)
    expected = {
        "dot": lr * g_l @ g_u,
        "cosine": g_l @ g_u / (g_l.norm() * g_u.norm()),
        "taylor": loss_before - loss_after,
    }[mode].item()

    assert result.h == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert abs(expected) > 1e-6  # the comparison is not between two zeros
    assert torch.allclose(parameters_to_vector(student.parameters()), parameters_to_vector(params), atol=1e-12)


def test_teacher_update_is_supervised_plus_advantage_times_ce(float64):
    teacher, student = mlp(3, bn=True), mlp(4, bn=True)
    t0 = copy.deepcopy(teacher)
    x_l, y_l, x_u, x_u_aug = batch(1)
    lr_t = 0.1
    step = MPLStep(sgd(teacher, lr_t), sgd(student, 0.05),
                   MPLConfig(feedback="cosine", pseudo_labels="argmax", baseline_decay=0.9))
    step.baseline.value = 0.3  # as if earlier steps had left it there
    result = step(x_l, y_l, x_u, x_u_aug, step=0)

    # Independent: autograd of the two teacher losses on one copy of the pre-step teacher.
    t_l, t_ua = t0(torch.cat([x_l, x_u_aug])).split([len(x_l), len(x_u_aug)])
    y_hat = t_ua.argmax(-1)
    g_sup = flat_grad(F.cross_entropy(t_l, y_l), t0.parameters(), retain_graph=True)
    g_ce = flat_grad(F.cross_entropy(t_ua, y_hat), t0.parameters())
    advantage = result.h - 0.3
    expected = parameters_to_vector(t0.parameters()) - lr_t * (g_sup + advantage * g_ce)

    assert result.baseline == 0.3
    assert torch.allclose(parameters_to_vector(teacher.parameters()), expected, rtol=0, atol=1e-12)
    # The MPL term really moves the teacher (a detached or soft-label-constant term would not).
    assert (lr_t * advantage * g_ce).norm() > 1e-3
    assert float(step.baseline.value) == pytest.approx(0.9 * 0.3 + 0.1 * result.h)


def _mpl_teacher_gradient(monkeypatch, teacher, student, y_hat, data, eta, mode, g_sup):
    """The teacher's MPL gradient of one step of ours with pseudo labels forced to y_hat."""
    teacher, student = copy.deepcopy(teacher), copy.deepcopy(student)
    monkeypatch.setattr(mpl_large.steps, "sample_pseudo_labels", lambda logits, mode: y_hat)
    step = MPLStep(sgd(teacher, 1.0), sgd(student, eta), MPLConfig(feedback=mode, baseline_decay=0.0))
    before = parameters_to_vector(teacher.parameters()).detach().clone()
    step(*data, step=0)
    # SGD at lr 1 moves the teacher by minus its gradient; take away the supervised part.
    return (before - parameters_to_vector(teacher.parameters())).detach() - g_sup


@pytest.mark.parametrize("mode", ["dot", "taylor"])
def test_expected_teacher_gradient_matches_unrolled_student(float64, monkeypatch, mode):
    """Eq. 12's sign and direction, against autograd through an unrolled one-step student.

    With soft pseudo labels q = T(x_u_aug), the student's one-step update theta_S - eta * grad CE(q, S) is
    exactly the expected update over y_hat ~ q (CE is linear in its target), so autograd through it gives
    the true gradient of L_l(E[theta_S']) with respect to theta_T. Our estimator, averaged exactly over all
    K^B labelings, must point the same way. Its length is 1/B of it: eq. 12 uses the batch-mean CE(y_hat, T)
    where REINFORCE's log P(y_hat) is the batch sum; the constant is absorbed by the teacher's lr.
    """
    teacher, student = mlp(5), mlp(6)
    n_u, eta = 3, 1e-3
    x_l, y_l, x_u, x_u_aug = data = batch(2, n_l=6, n_u=n_u)

    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    q = functional_call(teacher, t_params, x_u_aug).softmax(-1)
    soft_ce = -(q * functional_call(student, s_params, x_u_aug).log_softmax(-1)).sum(-1).mean()
    g_u = torch.autograd.grad(soft_ce, list(s_params.values()), create_graph=True)
    unrolled = {name: p - eta * g for (name, p), g in zip(s_params.items(), g_u)}
    labeled_loss = F.cross_entropy(functional_call(student, unrolled, x_l), y_l)
    reference = flat_grad(labeled_loss, t_params.values())

    g_sup = flat_grad(F.cross_entropy(teacher(x_l), y_l), teacher.parameters())
    probs = q.detach()
    ours = torch.zeros_like(reference)
    for labels in itertools.product(range(K), repeat=n_u):
        y_hat = torch.tensor(labels)
        weight = probs[torch.arange(n_u), y_hat].prod()
        ours += weight * _mpl_teacher_gradient(monkeypatch, teacher, student, y_hat, data, eta, mode, g_sup)

    assert F.cosine_similarity(ours, reference, dim=0) > 0.99
    assert (ours.norm() / reference.norm()).item() == pytest.approx(1 / n_u, rel=0.05)


def test_taylor_h_approximates_dot_h(float64):
    """h_taylor = h_dot + O(eta^2): the relative gap shrinks linearly with eta."""
    gaps = []
    for eta in (1e-2, 1e-3):
        hs = {}
        for mode in ("dot", "taylor"):
            step = MPLStep(sgd(mlp(7), 0.1), sgd(mlp(8), eta), MPLConfig(feedback=mode, pseudo_labels="argmax"))
            hs[mode] = step(*batch(3), step=0).h
        gaps.append(abs(hs["taylor"] - hs["dot"]) / abs(hs["dot"]))
    assert gaps[1] < 0.02
    assert gaps[1] < 0.2 * gaps[0]


@pytest.fixture
def pseudo_labels(monkeypatch) -> list[torch.Tensor]:
    """The pseudo labels the step samples, recorded in order."""
    recorded = []
    sample = mpl_large.steps.sample_pseudo_labels

    def recording_sample(logits, mode):
        recorded.append(sample(logits, mode))
        return recorded[-1]

    monkeypatch.setattr(mpl_large.steps, "sample_pseudo_labels", recording_sample)
    return recorded


@pytest.mark.parametrize("mode", ["dot", "cosine", "taylor"])
def test_probe_never_reaches_student_update(pseudo_labels, mode):
    """The student after MPL steps equals a student trained only on the same pseudo labels.

    Nesterov momentum and weight decay carry any leaked gradient into later steps, and BN running
    statistics would show a probe that trained the student on labeled inputs.
    """
    opt = OptimConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    teacher, student = mlp(9, bn=True), mlp(10, bn=True)
    reference = build_learner(copy.deepcopy(student), opt)
    step = MPLStep(build_learner(teacher, opt), build_learner(student, opt), MPLConfig(feedback=mode))

    batches = [batch(10 + i) for i in range(3)]
    for i, data in enumerate(batches):
        step(*data, step=i)
    for data, y_hat in zip(batches, pseudo_labels):
        reference.update(F.cross_entropy(reference(data[3]), y_hat))

    for (name, ours), theirs in zip(student.state_dict().items(), reference.model.state_dict().values()):
        assert torch.equal(ours, theirs), name


def test_non_finite_h_skips_the_mpl_term(float64, monkeypatch):
    monkeypatch.setattr(CosineFeedback, "combine", staticmethod(lambda dots, lr: dots[0] * float("nan")))
    teacher = mlp(11)
    t0 = copy.deepcopy(teacher)
    x_l, y_l, x_u, x_u_aug = batch(4)
    step = MPLStep(sgd(teacher, 0.1), sgd(mlp(12), 0.1), MPLConfig(feedback="cosine"))
    step.baseline.value = 0.25
    result = step(x_l, y_l, x_u, x_u_aug, step=0)

    assert result.h_skipped and result.teacher_mpl_loss == 0.0
    assert float(step.baseline.value) == 0.25
    g_sup = flat_grad(F.cross_entropy(t0(x_l), y_l), t0.parameters())
    expected = parameters_to_vector(t0.parameters()) - 0.1 * g_sup
    assert torch.allclose(parameters_to_vector(teacher.parameters()), expected, atol=1e-12)


def test_uda_term_and_ramp(float64, pseudo_labels):
    """The teacher's UDA gradient enters with weight uda_factor * min(1, (step + 1) / ramp)."""
    teacher = mlp(13)
    t0 = copy.deepcopy(teacher)
    x_l, y_l, x_u, x_u_aug = batch(5)
    cfg = MPLConfig(feedback="cosine", baseline_decay=0.0, uda_factor=2.0, uda_temperature=0.5, uda_ramp_steps=4)
    step = MPLStep(sgd(teacher, 0.1), sgd(mlp(14), 0.1), cfg)
    result = step(x_l, y_l, x_u, x_u_aug, step=1)

    t_l, t_u, t_ua = t0(torch.cat([x_l, x_u, x_u_aug])).split([len(x_l), len(x_u), len(x_u_aug)])
    target = (t_u.detach() / 0.5).softmax(-1)
    uda = -(target * t_ua.log_softmax(-1)).sum(-1).mean()  # threshold 0: nothing masked
    loss = F.cross_entropy(t_l, y_l) + 2.0 * (2 / 4) * uda + result.h * F.cross_entropy(t_ua, pseudo_labels[0])
    expected = parameters_to_vector(t0.parameters()) - 0.1 * flat_grad(loss, t0.parameters())
    assert torch.allclose(parameters_to_vector(teacher.parameters()), expected, atol=1e-12)
    assert result.teacher_uda_loss == pytest.approx(uda.item())
    assert result.uda_mask_rate == 1.0
