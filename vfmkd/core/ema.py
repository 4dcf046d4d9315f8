"""Exponential moving average of model weights.

The EMA copy is what gets evaluated and exported. Its decay ramps up from 0 so the early,
randomly initialised weights are forgotten quickly (the scheme of Mean Teacher / YOLOv5):
``d = decay * (1 - exp(-updates / tau))``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from vfmkd.utils.distributed import unwrap_model

__all__ = ["ModelEMA"]


class ModelEMA:
    """A frozen copy of a model whose parameters track the model's running average.

    Parameters are averaged; buffers (BatchNorm running statistics, counters) are copied
    from the model at every update, so they always match the live model's statistics.

    Args:
        model: the model to track (a DDP wrapper is unwrapped).
        decay: the decay reached after the ramp, e.g. ``0.9999``.
        tau: ramp length in updates; after ``tau`` updates the decay is ``0.63 * decay``.
        updates: updates already done (when resuming).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0) -> None:
        self.module = copy.deepcopy(unwrap_model(model)).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.decay = decay
        self.tau = tau
        self.updates = updates

    def current_decay(self) -> float:
        """Decay the next :meth:`update` uses."""
        return self.decay * (1.0 - math.exp(-(self.updates + 1) / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the model's current parameters in and copy its buffers."""
        decay = self.current_decay()
        self.updates += 1
        source = unwrap_model(model)
        ema_parameters = [p for p in self.module.parameters()]
        model_parameters = [p.detach() for p in source.parameters()]
        floating = [
            (ema, live) for ema, live in zip(ema_parameters, model_parameters) if ema.dtype.is_floating_point
        ]
        if floating:
            ema_list, live_list = zip(*floating)
            torch._foreach_lerp_(list(ema_list), list(live_list), 1.0 - decay)
        for ema_buffer, live_buffer in zip(self.module.buffers(), source.buffers()):
            ema_buffer.copy_(live_buffer)

    def state_dict(self) -> dict[str, Any]:
        """``{"module": state dict of the averaged model, "updates": int}``."""
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the averaged weights and the update count from :meth:`state_dict`'s output."""
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
