"""The student as deployed: a frozen eval copy, re-parameterised and with BatchNorm folded into convolutions.

- :func:`fuse_conv_bn`: a convolution followed by an eval-mode BatchNorm as one convolution
  (``W' = W * g / sqrt(v + eps)``, ``b' = (b - m) * g / sqrt(v + eps) + beta`` per output
  channel).
- :func:`fold_batch_norms`: every such pair of a model, found by one forward pass: a
  BatchNorm whose input is the very tensor a convolution returned, which no other module
  reads. Covers ``nn.Sequential`` blocks (YOLOv8's ``ConvBNAct``), attribute pairs
  (timm's ResNet ``conv1`` / ``bn1``) and timm's ``BatchNormAct2d`` (its activation stays).
- :func:`deploy_model`: what ``vfmkd export`` runs: a copy in eval mode without gradients,
  each component's own ``fuse()`` (RepViT's re-parameterisation), the ViT's position table
  resampled to the export size (``set_input_size``), then :func:`fold_batch_norms`.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["deploy_model", "fold_batch_norms", "fuse_conv_bn"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Fold an eval-mode BatchNorm into the convolution before it, in place.

    Args:
        conv: any ``nn.Conv2d`` (subclasses whose forward uses ``weight`` and ``bias`` too).
        bn: the BatchNorm applied to the convolution's output (running statistics used).

    Returns:
        ``conv``, now computing ``bn(conv(x))`` (a bias is added when it had none).
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fuse_conv_bn needs a BatchNorm with running statistics (track_running_stats=True)")
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    weight = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
    bias = shift if conv.bias is None else conv.bias.double() * scale + shift
    conv.weight.copy_(weight.to(conv.weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
    else:
        conv.bias.copy_(bias.to(conv.bias.dtype))
    return conv


def _after_batch_norm(bn: nn.BatchNorm2d) -> nn.Module | None:
    """What stays of a BatchNorm module once folded: nothing for a plain one, the dropout and
    activation of timm's ``BatchNormAct2d``; None for another subclass (left alone)."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if hasattr(bn, "act") and hasattr(bn, "drop") and type(bn).__name__ == "BatchNormAct2d":
        return nn.Sequential(bn.drop, bn.act)
    return None


@torch.no_grad()
def fold_batch_norms(model: nn.Module, run: Callable[[nn.Module], Any]) -> int:
    """Fold every BatchNorm that directly follows a convolution into it, in place (eval mode).

    A pair is found by running the model once: the BatchNorm's input must be the tensor
    the convolution returned, read by no other module, and each of the two must run once
    (a shared module is left alone).

    Args:
        model: the model, in eval mode.
        run: runs ``model`` once on a representative input (e.g. ``lambda m: m(images)``).

    Returns:
        How many BatchNorms were folded.
    """
    if model.training:
        raise ValueError("fold_batch_norms needs a model in eval mode (its running statistics are folded)")
    produced: dict[int, nn.Module] = {}
    readers: dict[int, list[nn.Module]] = {}
    calls: dict[int, int] = {}
    kept: list[torch.Tensor] = []  # NOTE: kept alive so that no tensor id is reused during the pass.

    def record(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        calls[id(module)] = calls.get(id(module), 0) + 1
        for tensor in inputs:
            if torch.is_tensor(tensor):
                readers.setdefault(id(tensor), []).append(module)
                kept.append(tensor)
        if isinstance(module, nn.Conv2d) and torch.is_tensor(output):
            produced[id(output)] = module
            kept.append(output)

    leaves = [module for module in model.modules() if not list(module.children()) or isinstance(module, nn.BatchNorm2d)]
    handles = [module.register_forward_hook(record) for module in leaves]
    try:
        run(model)
    finally:
        for handle in handles:
            handle.remove()
    pairs = []
    for tensor_id, conv in produced.items():
        tensor_readers = readers.get(tensor_id, [])
        if len(tensor_readers) != 1 or not isinstance(tensor_readers[0], nn.BatchNorm2d):
            continue
        bn = tensor_readers[0]
        if calls.get(id(conv)) == 1 and calls.get(id(bn)) == 1 and conv.out_channels == bn.num_features:
            pairs.append((conv, bn))
    return _replace_pairs(model, pairs)


def _replace_pairs(model: nn.Module, pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]]) -> int:
    """Fuse each pair and put what stays of the BatchNorm in its place."""
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for name, child in parent.named_children():
            places.setdefault(id(child), []).append((parent, name))
    folded = 0
    for conv, bn in pairs:
        remainder = _after_batch_norm(bn)
        where = places.get(id(bn), [])
        if remainder is None or len(where) != 1:
            continue
        fuse_conv_bn(conv, bn)
        parent, name = where[0]
        setattr(parent, name, remainder)
        folded += 1
    return folded


def deploy_model(model: nn.Module, img_size: int) -> nn.Module:
    """The student as deployed at ``img_size``: a frozen eval copy, re-parameterised, BatchNorm folded.

    Each component (backbone, neck, head) with a ``fuse()`` method is re-parameterised by
    it (RepViT); a backbone with ``set_input_size`` is set to the export size (the ViT's
    position table, resampled once instead of in every forward); then
    :func:`fold_batch_norms` on a ``[1, 3, img_size, img_size]`` input.

    Args:
        model: a :class:`~vfmkd.models.unified_model.UnifiedModel` (left unchanged).
        img_size: side of the square input the deployed model runs at.

    Returns:
        The deployed copy, on the CPU, in eval mode, without gradients.
    """
    deployed = copy.deepcopy(model).cpu().eval().requires_grad_(False)
    components = [deployed.backbone, deployed.neck, *deployed.heads.values()]
    for component in components:
        if callable(getattr(component, "fuse", None)):
            component.fuse()
    if callable(getattr(deployed.backbone, "set_input_size", None)):
        deployed.backbone.set_input_size(img_size)
    images = torch.rand(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    folded = fold_batch_norms(deployed, lambda module: module(images))
    logger.info("deployed model: %d BatchNorm layer(s) folded into convolutions", folded)
    return deployed.requires_grad_(False)
