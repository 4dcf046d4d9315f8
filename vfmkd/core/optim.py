"""Optimizer parameter groups and the learning-rate schedule.

Parameters fall into three groups, as in YOLOv5/YOLOv8:

* ``weights``: conv / linear weights, with weight decay;
* ``no_decay``: normalisation weights, other 1-D parameters, embeddings and tokens,
  without weight decay;
* ``biases``: biases, without weight decay, with their own warm-up learning rate.

The schedule is a pure function of the optimizer-step counter, so a resumed run sets
exactly the learning rate and momentum the uninterrupted run would have set:
a linear warm-up (weights from 0, biases from ``warmup_bias_lr``, SGD momentum from 0.8)
towards the decayed rate, then cosine or linear decay to ``lr * final_lr_ratio``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["LRSchedule", "build_optimizer", "build_param_groups"]

logger = logging.getLogger(__name__)

WARMUP_MOMENTUM = 0.8

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.modules.instancenorm._InstanceNorm,
)
# NOTE: positional embeddings and class / mask tokens are nn.Parameters hanging off a
# module (ViT style); decaying them towards zero hurts, as timm's no_weight_decay() says.
_NO_DECAY_NAME_PARTS = ("pos_embed", "position_embedding", "cls_token", "mask_token", "register_tokens", "rel_pos")


def build_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into the ``weights``, ``no_decay`` and ``biases`` groups.

    Args:
        model: the (unwrapped) model.
        weight_decay: decay of the ``weights`` group.

    Returns:
        Optimizer parameter groups, each with ``name``, ``params`` and ``weight_decay``
        (empty groups are kept, so the group order is fixed: weights, no_decay, biases).
    """
    weights: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    biases: list[nn.Parameter] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for parameter_name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            full_name = f"{module_name}.{parameter_name}" if module_name else parameter_name
            if parameter_name == "bias":
                biases.append(parameter)
            elif (
                isinstance(module, (*_NORM_TYPES, nn.Embedding))
                or parameter.ndim <= 1
                or any(part in full_name for part in _NO_DECAY_NAME_PARTS)
            ):
                no_decay.append(parameter)
            else:
                weights.append(parameter)
    return [
        {"name": "weights", "params": weights, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
        {"name": "biases", "params": biases, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, train_cfg: Any) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW over :func:`build_param_groups`.

    Args:
        model: the (unwrapped) model.
        train_cfg: the ``train`` config section (``optimizer``, ``lr``, ``momentum``,
            ``weight_decay``). For AdamW, ``momentum`` is beta1, as in YOLOv8.
    """
    groups = build_param_groups(model, train_cfg.weight_decay)
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train_cfg.lr, momentum=train_cfg.momentum, nesterov=True)
    if train_cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=(train_cfg.momentum, 0.999))
    raise ValueError(f"train.optimizer: unknown optimizer '{train_cfg.optimizer}'; use sgd or adamw")


@dataclass(frozen=True)
class LRSchedule:
    """Learning rate and momentum for every optimizer step.

    Args:
        base_lr: peak learning rate (``train.lr``).
        total_steps: optimizer steps of the whole run.
        warmup_steps: optimizer steps of linear warm-up (0 disables it).
        warmup_bias_lr: learning rate of the ``biases`` group at step 0.
        scheduler: ``cosine`` or ``linear`` decay after warm-up.
        final_lr_ratio: the rate at the last step is ``base_lr * final_lr_ratio``.
        momentum: SGD momentum after warm-up.
        warmup_momentum: SGD momentum at step 0.
    """

    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    warmup_bias_lr: float = 0.1
    scheduler: str = "cosine"
    final_lr_ratio: float = 0.01
    momentum: float = 0.937
    warmup_momentum: float = WARMUP_MOMENTUM

    def __post_init__(self) -> None:
        if self.scheduler not in ("cosine", "linear"):
            raise ValueError(f"train.scheduler: unknown scheduler '{self.scheduler}'; use cosine or linear")
        if self.total_steps < 1:
            raise ValueError(f"the run has {self.total_steps} optimizer steps; it needs at least 1")

    @classmethod
    def from_config(cls, train_cfg: Any, *, steps_per_epoch: int, total_steps: int) -> "LRSchedule":
        """The schedule of a ``train`` config section.

        Args:
            train_cfg: the ``train`` config section.
            steps_per_epoch: optimizer steps per epoch (converts ``warmup_epochs``).
            total_steps: optimizer steps of the run.
        """
        if train_cfg.warmup_steps is not None:
            warmup = train_cfg.warmup_steps
        else:
            warmup = int(round(train_cfg.warmup_epochs * steps_per_epoch))
        return cls(
            base_lr=train_cfg.lr,
            total_steps=total_steps,
            warmup_steps=min(warmup, total_steps),
            # NOTE: as YOLOv8, a high starting bias LR suits SGD only; AdamW starts biases at 0.
            warmup_bias_lr=(
                train_cfg.warmup_bias_lr
                if train_cfg.warmup_bias_lr is not None
                else (0.1 if train_cfg.optimizer == "sgd" else 0.0)
            ),
            scheduler=train_cfg.scheduler,
            final_lr_ratio=train_cfg.final_lr_ratio,
            momentum=train_cfg.momentum,
        )

    def decay_factor(self, step: int) -> float:
        """Multiplier of ``base_lr`` at ``step`` ignoring warm-up: 1 at step 0, ``final_lr_ratio`` at the end."""
        progress = min(max(step / max(self.total_steps - 1, 1), 0.0), 1.0)
        if self.scheduler == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return self.final_lr_ratio + (1.0 - self.final_lr_ratio) * shape

    def values(self, step: int) -> dict[str, float]:
        """``{"lr", "bias_lr", "momentum"}`` for the optimizer step with 0-based index ``step``."""
        target = self.base_lr * self.decay_factor(step)
        if step >= self.warmup_steps:
            return {"lr": target, "bias_lr": target, "momentum": self.momentum}
        fraction = step / self.warmup_steps
        return {
            "lr": fraction * target,
            "bias_lr": self.warmup_bias_lr + fraction * (target - self.warmup_bias_lr),
            "momentum": self.warmup_momentum + fraction * (self.momentum - self.warmup_momentum),
        }

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> dict[str, float]:
        """Set every group's learning rate (and SGD momentum) for ``step``; returns the values."""
        values = self.values(step)
        for group in optimizer.param_groups:
            group["lr"] = values["bias_lr"] if group.get("name") == "biases" else values["lr"]
            if "momentum" in group:
                group["momentum"] = values["momentum"]
        return values

    def state_dict(self) -> dict[str, Any]:
        """Plain values, stored in checkpoints to check a resumed run uses the same schedule."""
        return asdict(self)
