import math

import pytest
import torch
from timm.optim import Lars, RMSpropTF
from torch import nn

from mpl_large.config import ConfigError, MPLConfig, OptimConfig
from mpl_large.optim import build_learner, build_optimizer, lr_factor, param_groups


def test_no_weight_decay_on_biases_and_norm_parameters():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    decay, no_decay = param_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert len(no_decay["params"]) == 4  # conv bias, BN weight and bias, linear bias


def test_schedules_against_closed_forms():
    cos = OptimConfig(lr=1.0, schedule="cosine", warmup_steps=10, total_steps=110)
    assert [lr_factor(s, cos) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(10, cos) == pytest.approx(1.0)
    assert lr_factor(60, cos) == pytest.approx(0.5)
    assert lr_factor(35, cos) == pytest.approx(0.5 * (1 + math.cos(math.pi * 25 / 100)))
    assert lr_factor(500, cos) == pytest.approx(0.0)
    exp = OptimConfig(schedule="exponential", decay_rate=0.97, decay_steps=3)
    assert [lr_factor(s, exp) for s in (0, 2, 3, 7)] == pytest.approx([1, 1, 0.97, 0.97**2])
    assert lr_factor(1000, OptimConfig()) == 1.0


def test_learner_lr_follows_schedule():
    learner = build_learner(nn.Linear(2, 2), OptimConfig(lr=0.4, schedule="cosine", warmup_steps=2, total_steps=4))
    lrs = []
    for _ in range(4):
        lrs.append(learner.lr)
        learner.update(learner(torch.randn(3, 2)).sum())
    assert lrs == pytest.approx([0.2, 0.4, 0.4, 0.2])


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("rmsprop", RMSpropTF), ("lars", Lars)])
def test_paper_optimizers(name, cls):
    opt = build_optimizer(nn.Linear(2, 2), OptimConfig(name=name, lr=0.01, weight_decay=1e-4))
    assert isinstance(opt, cls)
    assert opt.param_groups[0]["momentum"] == 0.9
    if name == "sgd":
        assert opt.param_groups[0]["nesterov"]


@pytest.mark.parametrize("cls, kwargs, field", [
    (OptimConfig, {"name": "adamw"}, "optim.name"),
    (OptimConfig, {"lr": -1.0}, "optim.lr"),
    (OptimConfig, {"schedule": "linear"}, "optim.schedule"),
    (MPLConfig, {"feedback": "cos"}, "mpl.feedback"),
    (MPLConfig, {"baseline_decay": 1.0}, "mpl.baseline_decay"),
    (MPLConfig, {"uda_threshold": 2.0}, "mpl.uda_threshold"),
])
def test_bad_config_names_the_field(cls, kwargs, field):
    with pytest.raises(ConfigError, match=field):
        cls(**kwargs)
