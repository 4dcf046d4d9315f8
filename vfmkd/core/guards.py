"""Divergence guards of the trainer: which tensors went non-finite, and what to tell the user."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["divergence_advice", "nonfinite_names"]

# Tensors named in a divergence message.
NAMED_TENSORS = 5


def nonfinite_names(model: nn.Module, *, gradients: bool) -> list[str]:
    """Names of the first parameters' gradients, or of the parameters and buffers (batch-norm
    statistics go non-finite in the forward pass), holding NaN or infinity; one device sync."""
    if gradients:
        named = [(name, parameter.grad) for name, parameter in model.named_parameters() if parameter.grad is not None]
    else:
        named = [
            (name, tensor)
            for name, tensor in [*model.named_parameters(), *model.named_buffers()]
            if tensor.is_floating_point()
        ]
    if not named:
        return []
    # NOTE: a per-tensor sum is non-finite when any element is (or when finite values
    # overflow it, which only diverged weights reach).
    finite = torch.isfinite(torch.stack([tensor.detach().float().sum() for _, tensor in named])).tolist()
    broken = [name for (name, _), ok in zip(named, finite) if not ok]
    more = [f"... {len(broken) - NAMED_TENSORS} more"] if len(broken) > NAMED_TENSORS else []
    return broken[:NAMED_TENSORS] + more


def divergence_advice(
    last_finite_loss: tuple[int, float] | None,
    lr: float,
    grad_clip: float | None,
    autocast: bool,
    last_path: Path | None,
) -> str:
    """The last finite loss, what to try, and which checkpoint holds the last good state."""
    seen = (
        f"Last finite loss: {last_finite_loss[1]:.4g} at step {last_finite_loss[0]}. "
        if last_finite_loss else "No step had a finite loss. "
    )
    clip = "a lower train.grad_clip" if grad_clip else "train.grad_clip (e.g. 10)"
    fp32 = ", train.amp=false (fp32)" if autocast else ""
    saved = last_path if last_path is not None and last_path.is_file() else None
    kept = f"{saved} holds the last good state (resume with --resume)" if saved else "no checkpoint was written yet"
    return f"{seen}Try a lower train.lr (now {lr:.3g}), {clip}{fp32}, or check the data; {kept}."
