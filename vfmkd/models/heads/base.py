"""The head contract: what a task head gives the model, the trainer and the evaluators.

A head is built from the neck's levels (``feature_dims`` / ``feature_strides`` keyword
arguments plus its own config keys) and registered in ``vfmkd.registry.HEADS``. The rest
of vfmkd talks to it only through :class:`BaseHead`:

- ``forward(features, **inputs)``: its raw outputs from the neck's maps (``inputs`` are
  extra batch inputs such as prompts; a head ignores those it does not use).
- ``loss(outputs, targets)``: a dict of scalar losses whose names start with
  :attr:`loss_prefix` (``det/``, ``seg/``). ``targets`` holds every label of the batch
  on the device, including ``has_labels [B]`` (bool): samples without labels must not
  contribute, so a labelled and an unlabelled image can share a batch.
- ``predict(outputs, batch, **options)``: one dict per image; with a ``batch`` that has
  ``frames``, in original image pixels.
- :attr:`evaluators`: names in ``vfmkd.registry.EVALUATORS`` that score its predictions.
- :attr:`predicts_boxes` / :attr:`prompted_by_boxes`: a head that predicts boxes and one
  that answers box prompts pair up into instance segmentation: without ``prompts`` the
  model gives the second the first one's detections (:mod:`vfmkd.models.instance_masks`),
  and asks for the second one's :attr:`instance_evaluators` too.
- :attr:`map_specs` and :meth:`named_maps`: maps the head exposes for distillation
  (``<head name>.<map>`` in the model, e.g. ``segmentation.embed``).
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import nn

__all__ = ["BaseHead", "MapSpec", "has_labels_mask", "original_frames"]

# (channels, stride in input pixels) of a named map.
MapSpec = tuple[int, int]


class BaseHead(nn.Module, abc.ABC):
    """Base class of every task head.

    Subclasses set :attr:`loss_prefix` and :attr:`evaluators`, and implement
    :meth:`forward`, :meth:`loss` and :meth:`predict`.
    """

    #: Every loss name of :meth:`loss` starts with this (``det/``).
    loss_prefix: ClassVar[str] = ""
    #: Evaluator names (``vfmkd.registry.EVALUATORS``) that score this head's predictions.
    evaluators: ClassVar[tuple[str, ...]] = ()
    #: Whether the head trains on instance masks (the builder then loads them with the data).
    needs_masks: ClassVar[bool] = False
    #: Whether :meth:`forward` takes the batch's ``targets`` in training (a DETR head builds its
    #: denoising queries from them); the model passes them to such heads only.
    wants_targets: ClassVar[bool] = False
    #: Whether :meth:`predict` gives per image ``boxes [K, 4]`` xyxy (original pixels when the
    #: batch has frames), ``scores [K]`` and ``labels [K]``: detections that can prompt a head
    #: that is :attr:`prompted_by_boxes`.
    predicts_boxes: ClassVar[bool] = False
    #: Whether :meth:`predict` takes ``prompts`` (per image ``{"boxes": [K, 4]}`` xyxy input
    #: pixels) and answers each box with one row of every entry it returns (``masks [K, H, W]``,
    #: ...). Without ``prompts`` the model then prompts it with the detections of a head that
    #: :attr:`predicts_boxes`.
    prompted_by_boxes: ClassVar[bool] = False
    #: Evaluators that score this head's answers to a box head's detections (``coco_segm``);
    #: asked for only when the model also has a head that :attr:`predicts_boxes`.
    instance_evaluators: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def forward(self, features: Mapping[str, torch.Tensor], **inputs: Any) -> Any:
        """Raw outputs from the neck's level maps (same structure in train and eval mode)."""

    @abc.abstractmethod
    def loss(self, outputs: Any, targets: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Scalar losses named ``<loss_prefix><term>``, gains applied; the trainer sums them."""

    @abc.abstractmethod
    def predict(self, outputs: Any, batch: Mapping[str, Any] | None = None, **options: Any) -> list[dict[str, Any]]:
        """One result dict per image (original image pixels when ``batch`` has ``frames``)."""

    @property
    def map_specs(self) -> dict[str, MapSpec]:
        """Maps this head exposes for distillation: name to ``(channels, stride)``; none by default."""
        return {}

    def named_maps(self, outputs: Any) -> dict[str, torch.Tensor]:
        """The exposed maps of one forward's ``outputs``, ``[B, C, H / stride, W / stride]`` each."""
        return {}


def has_labels_mask(targets: Mapping[str, Any], batch_size: int, device: torch.device) -> torch.Tensor | None:
    """``[B]`` float mask of the labelled samples, or None when every sample is labelled.

    Heads multiply per-sample loss terms by it (None: nothing to mask, the loss is
    computed exactly as without the flag).
    """
    flags = targets.get("has_labels")
    if flags is None:
        return None
    flags = torch.as_tensor(flags, device=device).reshape(-1)
    if flags.numel() != batch_size:
        raise ValueError(f"targets['has_labels'] has {flags.numel()} entries for a batch of {batch_size}")
    if bool(flags.all()):
        return None
    return flags.float()


def original_frames(batch: Mapping[str, Any] | None, batch_size: int) -> Sequence[Any] | None:
    """Each image's frame (input pixels to original pixels) from a collated batch, or None."""
    if batch is None or batch.get("frames") is None:
        return None
    frames = [image_frames[0] for image_frames in batch["frames"]]
    if len(frames) != batch_size:
        raise ValueError(f"the batch has {len(frames)} frames for {batch_size} images")
    return frames
