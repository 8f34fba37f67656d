import math

import pytest
import torch
from torch import nn

from training.config import TrainConfig
from training.models import build_model
from training.optim import LARS, build_optimizer, learning_rate_at, parameter_groups


def test_parameter_groups_exclude_bias_and_norm():
    model = build_model("resnet18", cifar_stem=True, proj_hidden_dim=32, proj_dim=16)
    decayed, excluded = parameter_groups(model, weight_decay=1e-4)
    decayed_ids = {id(p) for p in decayed["params"]}
    excluded_ids = {id(p) for p in excluded["params"]}

    assert decayed["weight_decay"] == 1e-4
    assert decayed["lars_adapt"] is True
    assert excluded["weight_decay"] == 0.0
    assert excluded["lars_adapt"] is False
    assert id(model.encoder.net.conv1.weight) in decayed_ids
    assert id(model.head.layers[0].weight) in decayed_ids
    assert id(model.head.layers[3].weight) in decayed_ids
    assert id(model.encoder.net.bn1.weight) in excluded_ids
    assert id(model.encoder.net.bn1.bias) in excluded_ids
    assert id(model.head.layers[1].weight) in excluded_ids
    assert id(model.head.layers[3].bias) in excluded_ids
    assert decayed_ids.isdisjoint(excluded_ids)
    assert len(decayed_ids) + len(excluded_ids) == len(list(model.parameters()))
    # In these ResNets, exactly the 1-D parameters are biases or norm weights.
    assert all(p.dim() == 1 for p in excluded["params"])
    assert all(p.dim() > 1 for p in decayed["params"])


def test_lars_step_matches_formula():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    weight = layer.weight.detach().clone()
    bias = layer.bias.detach().clone()
    layer.weight.grad = torch.randn(3, 4)
    layer.bias.grad = torch.randn(3)
    groups = [
        {"params": [layer.weight], "weight_decay": 0.1, "lars_adapt": True},
        {"params": [layer.bias], "weight_decay": 0.0, "lars_adapt": False},
    ]
    optimizer = LARS(groups, lr=0.5, momentum=0.9, eta=0.02)

    optimizer.step()

    direction = layer.weight.grad + 0.1 * weight
    ratio = 0.02 * weight.norm() / direction.norm()
    torch.testing.assert_close(layer.weight.detach(), weight - 0.5 * ratio * direction)
    # The excluded bias takes a plain momentum step, with no trust ratio.
    torch.testing.assert_close(layer.bias.detach(), bias - 0.5 * layer.bias.grad)


def test_lars_momentum_accumulates():
    parameter = nn.Parameter(torch.ones(2))
    optimizer = LARS(
        [{"params": [parameter], "lars_adapt": False}], lr=1.0, momentum=0.5
    )
    for _ in range(2):
        parameter.grad = torch.ones(2)
        optimizer.step()

    # Steps of 1 and then 0.5 * 1 + 1 = 1.5.
    torch.testing.assert_close(parameter.detach(), torch.full((2,), -1.5))


def test_lars_rejects_bad_arguments():
    parameter = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="lr must be > 0"):
        LARS([parameter], lr=0.0)
    with pytest.raises(ValueError, match="momentum"):
        LARS([parameter], lr=0.1, momentum=1.0)


@pytest.mark.parametrize(
    "name, kind",
    [("sgd", torch.optim.SGD), ("lars", LARS), ("adamw", torch.optim.AdamW)],
)
def test_build_optimizer_kinds(name, kind):
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    optimizer = build_optimizer(name, model, lr=0.1, weight_decay=1e-3)

    assert isinstance(optimizer, kind)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-3, 0.0]
    assert len(optimizer.param_groups[1]["params"]) == 3


def test_build_optimizer_rejects_unknown():
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        build_optimizer("adam", nn.Linear(2, 2), lr=0.1)


def test_schedule_key_points():
    base, warmup = 0.6, 0.2
    assert learning_rate_at(0.0, base, warmup) == 0.0
    assert learning_rate_at(0.1, base, warmup) == pytest.approx(0.3)
    assert learning_rate_at(0.2, base, warmup) == pytest.approx(base)
    # Halfway through the cosine part the LR is half the peak.
    assert learning_rate_at(0.6, base, warmup) == pytest.approx(0.3)
    assert learning_rate_at(0.9, base, warmup) == pytest.approx(
        base * 0.5 * (1 + math.cos(math.pi * 0.875))
    )
    assert learning_rate_at(1.0, base, warmup) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    "scaling, world_size, expected",
    [
        ("linear", 1, 0.15),
        ("linear", 4, 0.6),
        ("sqrt", 4, 0.3 * math.sqrt(2)),
        ("none", 4, 0.3),
    ],
)
def test_lr_scales_with_global_batch(scaling, world_size, expected):
    config = TrainConfig(lr=0.3, batch_size=128, lr_scaling=scaling)

    assert config.lr_for_world(world_size) == pytest.approx(expected)
