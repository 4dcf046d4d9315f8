import math

import pytest
import torch
from torch import nn

from vfmkd.config import TrainConfig
from vfmkd.core.optim import LRSchedule, build_optimizer, build_param_groups


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.embedding = nn.Embedding(5, 4)
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 2, 2))
        self.scale = nn.Parameter(torch.ones(4))
        self.linear = nn.Linear(4, 2, bias=False)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def _names(model: nn.Module, group: dict) -> set[str]:
    by_id = {id(parameter): name for name, parameter in model.named_parameters()}
    return {by_id[id(parameter)] for parameter in group["params"]}


def test_param_groups_split_weights_norms_and_biases():
    model = _Net()
    weights, no_decay, biases = build_param_groups(model, weight_decay=0.05)
    assert [g["name"] for g in (weights, no_decay, biases)] == ["weights", "no_decay", "biases"]
    assert _names(model, weights) == {"conv.weight", "linear.weight"}
    assert _names(model, no_decay) == {"norm.weight", "embedding.weight", "pos_embed", "scale"}
    assert _names(model, biases) == {"conv.bias", "norm.bias"}
    assert (weights["weight_decay"], no_decay["weight_decay"], biases["weight_decay"]) == (0.05, 0.0, 0.0)


def test_build_optimizer_sgd_nesterov_and_adamw_betas():
    config = TrainConfig(optimizer="sgd", lr=0.02, momentum=0.9)
    optimizer = build_optimizer(_Net(), config)
    assert isinstance(optimizer, torch.optim.SGD)
    assert all(group["nesterov"] and group["momentum"] == 0.9 for group in optimizer.param_groups)
    optimizer = build_optimizer(_Net(), TrainConfig(optimizer="adamw", momentum=0.85))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["betas"] == (0.85, 0.999)


def test_schedule_warmup_starts_from_bias_lr_and_low_momentum():
    schedule = LRSchedule(base_lr=0.01, total_steps=100, warmup_steps=10, warmup_bias_lr=0.1, momentum=0.937)
    start = schedule.values(0)
    assert start["lr"] == 0.0
    assert start["bias_lr"] == pytest.approx(0.1)
    assert start["momentum"] == pytest.approx(0.8)
    middle = schedule.values(5)
    target = 0.01 * schedule.decay_factor(5)
    assert middle["lr"] == pytest.approx(0.5 * target)
    assert middle["bias_lr"] == pytest.approx(0.1 + 0.5 * (target - 0.1))
    after = schedule.values(10)
    assert after["lr"] == after["bias_lr"] == pytest.approx(0.01 * schedule.decay_factor(10))
    assert after["momentum"] == pytest.approx(0.937)


@pytest.mark.parametrize("scheduler", ["cosine", "linear"])
def test_schedule_decays_monotonically_to_final_ratio(scheduler):
    schedule = LRSchedule(base_lr=0.01, total_steps=50, warmup_steps=0, scheduler=scheduler, final_lr_ratio=0.05)
    rates = [schedule.values(step)["lr"] for step in range(50)]
    assert rates[0] == pytest.approx(0.01)
    assert rates[-1] == pytest.approx(0.01 * 0.05)
    assert all(later <= earlier + 1e-15 for earlier, later in zip(rates, rates[1:]))
    if scheduler == "linear":
        assert rates[25] == pytest.approx(0.01 * (0.05 + 0.95 * (1 - 25 / 49)))
    else:
        assert rates[25] == pytest.approx(0.01 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 25 / 49))))


def test_schedule_from_config_and_apply_sets_groups():
    config = TrainConfig(optimizer="sgd", lr=0.01, warmup_epochs=2.0, warmup_bias_lr=0.1)
    schedule = LRSchedule.from_config(config, steps_per_epoch=5, total_steps=40)
    assert schedule.warmup_steps == 10
    assert LRSchedule.from_config(TrainConfig(warmup_steps=3), steps_per_epoch=5, total_steps=40).warmup_steps == 3
    optimizer = build_optimizer(_Net(), config)
    values = schedule.apply(optimizer, 2)
    rates = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert rates == {"weights": values["lr"], "no_decay": values["lr"], "biases": values["bias_lr"]}
    assert all(group["momentum"] == pytest.approx(values["momentum"]) for group in optimizer.param_groups)
    # a pure function of the step: same answer whatever was applied before
    schedule.apply(optimizer, 30)
    assert schedule.apply(optimizer, 2) == values
