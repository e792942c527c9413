"""The student wait (`OptimConfig.wait_steps` on MPL's student, MPL-pytorch's practice) and the feedback
ablation (`mpl.feedback="none"`), against independent computations (float64):

- the schedule: lr 0 while waiting, then warm-up and decay shifted by the wait (closed forms);
- a waiting step is a UDA step of the teacher and leaves the student and h's baseline untouched;
- the first step after the wait is the step a fresh MPL run takes at step 0 from the same models;
- resuming from a checkpoint inside and after the wait is exact;
- h = 0 makes the teacher's update a UDA step and leaves the student's update as it was;
- the logged MPL/UDA ratio is |MPL term| / |UDA weight * UDA loss|.
"""

import copy
import math

import pytest
import torch
from torch.nn.utils import parameters_to_vector

from images import image_folder
from mpl_large.config import ConfigError, FinetuneConfig, MPLConfig, OptimConfig, TrainConfig
from mpl_large.optim import build_learner, lr_factor
from mpl_large.steps import MPLStep, UDAStep
from mpl_large.trainer import train
from test_checkpoint import assert_same_weights, resume_copy, small_config
from test_mpl_step import batch, mlp

UDA = MPLConfig(feedback="cosine", uda_factor=2.0, uda_temperature=0.5, uda_ramp_steps=1)


def sgd(model, lr, momentum=0.9, **kw):
    return build_learner(model, OptimConfig(name="sgd", lr=lr, momentum=momentum, nesterov=False, **kw))


def flat(model) -> torch.Tensor:
    return torch.cat([parameters_to_vector(model.parameters()), *[b.reshape(-1).double() for b in model.buffers()]])


def test_wait_schedule_against_closed_forms():
    cos = OptimConfig(schedule="cosine", wait_steps=5, warmup_steps=10, total_steps=115)
    assert [lr_factor(s, cos) for s in (0, 4)] == [0.0, 0.0]
    assert [lr_factor(s, cos) for s in (5, 9, 14)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(65, cos) == pytest.approx(0.5)  # 50 of the 100 cosine steps left after wait + warm-up
    assert lr_factor(40, cos) == pytest.approx(0.5 * (1 + math.cos(math.pi * 25 / 100)))
    assert lr_factor(115, cos) == pytest.approx(0.0)
    exp = OptimConfig(schedule="exponential", wait_steps=3, decay_rate=0.97, decay_steps=3, total_steps=20)
    assert [lr_factor(s, exp) for s in (2, 3, 5, 6, 10)] == pytest.approx([0, 1, 1, 0.97, 0.97**2])


@pytest.mark.parametrize("wait", [-1, 10])
def test_bad_wait_names_the_field(wait):
    with pytest.raises(ConfigError, match="optim.wait_steps"):
        OptimConfig(wait_steps=wait, total_steps=10)


def test_wait_is_mpl_only():
    with pytest.raises(ConfigError, match="student_optim.wait_steps"):
        TrainConfig(method="uda", student_optim=OptimConfig(wait_steps=2, total_steps=10))


def test_waiting_step_is_a_uda_step_and_leaves_the_student(float64):
    teacher, student = mlp(1, bn=True), mlp(2, bn=True)
    reference = copy.deepcopy(teacher)
    s0 = flat(student)
    step = MPLStep(sgd(teacher, 0.1), sgd(student, 0.05, wait_steps=2, total_steps=10), UDA, student_wait_steps=2)
    uda = UDAStep(sgd(reference, 0.1), UDA)
    step.baseline.value = 0.25
    for t in range(2):
        x_l, y_l, x_u, x_u_aug = batch(t)
        assert step.student.lr == 0.0
        result = step(x_l, y_l, x_u, x_u_aug, step=t)
        expected = uda(x_l, y_l, x_u, x_u_aug, step=t)
        assert torch.equal(parameters_to_vector(teacher.parameters()), parameters_to_vector(reference.parameters()))
        assert result.student_waiting and result.h == 0.0 and result.teacher_mpl_loss == 0.0
        assert result.teacher_loss == expected.loss and result.mpl_to_uda == 0.0
        assert math.isnan(result.student_loss)
    assert torch.equal(flat(student), s0), "the waiting student was fed or stepped"
    assert float(step.baseline.value) == 0.25
    assert step.student.lr == 0.05  # the constant schedule, after the wait


def test_first_step_after_the_wait_is_a_fresh_mpl_step(float64):
    """After N waiting steps, MPL at step N from (teacher_N, student_0) is MPL at step 0 of a run without a
    wait started from the same two models: the student's schedule is shifted by N, and the baseline is as
    fresh as the student."""
    teacher, student = mlp(3, bn=True), mlp(4, bn=True)
    optim = {"warmup_steps": 3, "schedule": "cosine"}
    waiting = MPLStep(sgd(teacher, 0.1, momentum=0.0), sgd(student, 0.05, wait_steps=2, total_steps=12, **optim), UDA,
                      student_wait_steps=2)
    for t in range(2):
        waiting(*batch(t), step=t)
    fresh = MPLStep(sgd(copy.deepcopy(teacher), 0.1, momentum=0.0), sgd(copy.deepcopy(student), 0.05, total_steps=10, **optim), UDA)
    for t in range(4):  # through the warm-up and into the decay
        torch.manual_seed(t)
        a = waiting(*batch(10 + t), step=2 + t)
        torch.manual_seed(t)
        b = fresh(*batch(10 + t), step=t)
        assert not a.student_waiting and a.h != 0.0
        assert (a.h, a.teacher_loss, a.student_loss) == (b.h, b.teacher_loss, b.student_loss)
        assert waiting.student.lr == fresh.student.lr
    assert torch.equal(flat(waiting.student.model), flat(fresh.student.model))
    assert torch.equal(flat(waiting.teacher.model), flat(fresh.teacher.model))


def test_resume_inside_and_after_the_wait_is_exact(tmp_path):
    data = image_folder(tmp_path / "data", 24, size=8)
    student_optim = OptimConfig(name="sgd", lr=0.05, momentum=0.9, schedule="cosine", wait_steps=3, total_steps=6)
    changes = {"student_optim": student_optim, "finetune": FinetuneConfig(steps=0)}
    whole = tmp_path / "whole"
    train(small_config(whole, data, **changes))
    for step in ("step-00000002", "step-00000004"):  # inside the wait, after it
        out = resume_copy(whole, tmp_path / step, step)
        train(small_config(out, data, resume=True, **changes))
        assert_same_weights(whole, out)


def test_no_feedback_teacher_is_uda_and_student_unchanged(float64):
    """feedback="none": the teacher takes exactly UDA's step; the student's update is MPL's (it does not
    depend on h), so with the same pseudo-label draw the students agree and only the teachers differ."""
    x_l, y_l, x_u, x_u_aug = batch(5)
    models = {}
    for feedback in ("none", "cosine"):
        teacher, student = mlp(5, bn=True), mlp(6, bn=True)
        torch.manual_seed(0)
        result = MPLStep(sgd(teacher, 0.1), sgd(student, 0.05), MPLConfig(**{**vars(UDA), "feedback": feedback}))(
            x_l, y_l, x_u, x_u_aug, step=0)
        models[feedback] = teacher, student, result
    reference = mlp(5, bn=True)
    UDAStep(sgd(reference, 0.1), UDA)(x_l, y_l, x_u, x_u_aug, step=0)
    teacher, student, result = models["none"]
    assert result.h == 0.0 and result.teacher_mpl_loss == 0.0 and result.mpl_to_uda == 0.0
    assert torch.equal(parameters_to_vector(teacher.parameters()), parameters_to_vector(reference.parameters()))
    assert torch.equal(flat(student), flat(models["cosine"][1]))
    assert not torch.equal(parameters_to_vector(teacher.parameters()),
                           parameters_to_vector(models["cosine"][0].parameters()))


def test_mpl_to_uda_ratio(float64):
    teacher, student = mlp(7), mlp(8)
    step = MPLStep(sgd(teacher, 0.1), sgd(student, 0.05), MPLConfig(**{**vars(UDA), "uda_ramp_steps": 4}))
    step.baseline.value = 0.5  # so that h - b is far from 0
    result = step(*batch(6), step=1)
    weight = 2.0 * 2 / 4
    assert result.mpl_to_uda == pytest.approx(abs(result.teacher_mpl_loss) / (weight * result.teacher_uda_loss))
    assert result.mpl_to_uda > 0
    no_uda = MPLStep(sgd(mlp(7), 0.1), sgd(mlp(8), 0.05), MPLConfig())(*batch(6), step=1)
    assert math.isnan(no_uda.mpl_to_uda)
