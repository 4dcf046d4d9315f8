"""The student model: backbone -> neck -> named task heads, built from a config dict.

Example model config (the ``model:`` section of an experiment YAML)::

    model:
      backbone: {type: yolov8, scale: n}          # or {type: yolov8, config: configs/backbones/yolov8.yaml}
      neck: {type: yolov8_pafpn}                  # optional; yolov8 defaults to yolov8_pafpn, same scale
      heads:
        detection: {type: yolo_head, num_classes: 80}
      weights: path/to/state_dict.pt              # optional; vfmkd or Ultralytics YOLOv8 keys
"""

from __future__ import annotations

import copy
import difflib
import inspect
import logging
import pickle
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import yaml

from vfmkd.utils.paths import PROJECT_ROOT, find_project_file
from torch import nn

# Importing the packages registers their classes.
from vfmkd.models import backbones as _backbones  # noqa: F401
from vfmkd.models import heads as _heads  # noqa: F401
from vfmkd.models import necks as _necks  # noqa: F401
from vfmkd.models.backbones.base import BaseBackbone
from vfmkd.models.heads.base import BaseHead
from vfmkd.models.instance_masks import DEFAULT_MASK_MAX_DET, box_prompts, top_detections
from vfmkd.models.ultralytics_compat import convert_ultralytics_state_dict, is_ultralytics_state_dict
from vfmkd.registry import BACKBONES, HEADS, NECKS, Registry
from vfmkd.utils.state_dict import load_state_dict_strict

__all__ = ["DETECTION_HEAD", "PassThroughNeck", "UnifiedModel", "build_model", "load_weights", "read_state_dict"]

logger = logging.getLogger(__name__)

DETECTION_HEAD = "detection"
FEATURES_KEY = "features"
MAPS_KEY = "maps"
_MODEL_KEYS = ("backbone", "neck", "heads", "weights")


class PassThroughNeck(nn.Module):
    """Neck for backbones used without one: returns the backbone's levels unchanged.

    Args:
        feature_dims: Channels of each level.
        feature_strides: Stride of each level.
    """

    def __init__(self, feature_dims: Mapping[str, int], feature_strides: Mapping[str, int]) -> None:
        super().__init__()
        self.feature_dims: dict[str, int] = dict(feature_dims)
        self.feature_strides: dict[str, int] = dict(feature_strides)

    def forward(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return ``features`` as a new dict."""
        return dict(features)


class UnifiedModel(nn.Module):
    """Backbone, neck and task heads (:class:`~vfmkd.models.heads.base.BaseHead`).

    Named maps: the neck's levels (``p3``, ``p4``, ``p5``), the backbone's stages
    (``backbone.p4``) and what each head exposes (``<head>.<map>``); any of them can be
    the student side of a distillation term (:attr:`map_dims`, :attr:`map_strides`).

    Args:
        backbone: Built backbone.
        neck: Built neck with ``feature_dims`` / ``feature_strides``.
        heads: Head name (``detection``, ...) to built head.
        config: The resolved model config, kept so checkpoints can rebuild the model.
    """

    def __init__(
        self,
        *,
        backbone: BaseBackbone,
        neck: nn.Module,
        heads: Mapping[str, nn.Module],
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        reserved = sorted(set(heads) & {FEATURES_KEY, MAPS_KEY, "backbone"})
        if reserved:
            raise ValueError(f"head names {reserved} are reserved (neck outputs, named maps); rename those heads")
        self.backbone = backbone
        self.neck = neck
        self.heads = nn.ModuleDict(dict(heads))
        self.config: dict[str, Any] = copy.deepcopy(dict(config)) if config is not None else {}

    @property
    def feature_dims(self) -> dict[str, int]:
        """Channels of each level in ``outputs["features"]``."""
        return dict(self.neck.feature_dims)

    @property
    def strides(self) -> dict[str, int]:
        """Stride of each level in ``outputs["features"]``, in input pixels."""
        return dict(self.neck.feature_strides)

    @property
    def map_dims(self) -> dict[str, int]:
        """Channels of every named map in ``outputs["maps"]``."""
        return {name: channels for name, (channels, _) in self._map_specs().items()}

    @property
    def map_strides(self) -> dict[str, int]:
        """Stride, in input pixels, of every named map in ``outputs["maps"]``."""
        return {name: stride for name, (_, stride) in self._map_specs().items()}

    def _map_specs(self) -> dict[str, tuple[int, int]]:
        specs = {level: (int(self.neck.feature_dims[level]), int(self.neck.feature_strides[level])) for level in self.neck.feature_dims}
        for level, channels in self.backbone.feature_dims.items():
            specs[f"backbone.{level}"] = (int(channels), int(self.backbone.feature_strides[level]))
        for head_name, head in self.heads.items():
            for map_name, spec in getattr(head, "map_specs", {}).items():
                specs[f"{head_name}.{map_name}"] = (int(spec[0]), int(spec[1]))
        return specs

    def forward(self, images: torch.Tensor, targets: Mapping[str, Any] | None = None, **inputs: Any) -> dict[str, Any]:
        """Run backbone, neck and every head.

        Args:
            images: ``[B, 3, H, W]`` float RGB in ``[0, 1]``.
            targets: the batch's targets (training), given to the heads that
                :attr:`~vfmkd.models.heads.base.BaseHead.wants_targets`.
            **inputs: Other batch inputs for the heads (prompts, ...).

        Returns:
            ``features``: level name to ``[B, C, H / stride, W / stride]`` neck output;
            ``maps``: every named map (see :attr:`map_dims`); and one entry per head with
            that head's raw outputs (``detection``: list of ``[B, 4 * 16 + num_classes,
            H_level, W_level]`` maps). The same keys and nesting in train and eval mode (sizes may
            differ: a DETR decoder runs only up to its ``eval_idx`` layer at inference).
        """
        stages = self.backbone(images)
        features = self.neck(stages)
        maps = dict(features)
        maps.update({f"backbone.{level}": value for level, value in stages.items()})
        outputs: dict[str, Any] = {FEATURES_KEY: features, MAPS_KEY: maps}
        for name, head in self.heads.items():
            head_inputs = dict(inputs)
            if targets is not None and getattr(head, "wants_targets", False):
                head_inputs["targets"] = targets
            outputs[name] = head(features, **head_inputs) if head_inputs else head(features)
            if isinstance(head, BaseHead):
                maps.update({f"{name}.{key}": value for key, value in head.named_maps(outputs[name]).items()})
        return outputs

    def loss(
        self,
        outputs: Mapping[str, Any],
        batch_targets: Mapping[str, Any],
        *,
        weights: Mapping[str, float] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Merge every head's loss dict.

        Args:
            outputs: The dict returned by :meth:`forward`.
            batch_targets: The collated targets on the device; each head reads the keys
                it needs (detection: ``batch_idx``, ``cls``, ``boxes``, ``has_labels``).
            weights: Multiplier of each head's losses by head name (default 1).

        Returns:
            Loss name (``det/box``, ``det/cls``, ``det/dfl``, ...) to scalar tensor; the
            trainer sums them.
        """
        losses: dict[str, torch.Tensor] = {}
        for name, head in self.heads.items():
            head_losses = head.loss(outputs[name], batch_targets)
            prefix = getattr(head, "loss_prefix", "")
            stray = sorted(key for key in head_losses if not key.startswith(prefix))
            if stray:
                raise ValueError(f"head '{name}' returns losses {stray} that do not start with its prefix '{prefix}'")
            clashes = sorted(set(head_losses) & set(losses))
            if clashes:
                raise ValueError(f"head '{name}' returns loss names already used by another head: {clashes}")
            weight = 1.0 if weights is None else float(weights.get(name, 1.0))
            losses.update({key: value * weight if weight != 1.0 else value for key, value in head_losses.items()})
        return losses

    def predict(
        self, outputs: Mapping[str, Any], batch: Mapping[str, Any] | None = None, **options: Any
    ) -> list[dict[str, Any]]:
        """Every head's predictions, merged per image.

        Instance segmentation: without ``prompts``, a head prompted by boxes
        (:attr:`~vfmkd.models.heads.base.BaseHead.prompted_by_boxes`, ``sam_mask_head``) is
        given the boxes of the head that predicts them
        (:attr:`~vfmkd.models.heads.base.BaseHead.predicts_boxes`, ``yolo_head``), one mask
        per detection (:mod:`vfmkd.models.instance_masks`). Only the ``mask_max_det``
        highest-scoring detections of an image are segmented, and the image's detections
        are cut to those same ones, so ``boxes``, ``scores``, ``labels``, ``masks`` and
        ``mask_scores`` stay aligned row for row. COCO scores at most 100 detections per
        image, its highest-scoring ones, so the default 100 leaves box AP unchanged.

        Args:
            outputs: The dict returned by :meth:`forward`.
            batch: The collated batch; with ``frames``, results are in original image
                pixels (else in input pixels).
            **options: Passed to each head's ``predict`` that takes them (detection:
                ``conf_threshold``, ``iou_threshold``, ``max_det``, ``multi_label``;
                promptable heads: ``prompts``, per image in input pixels, which they then
                answer instead of the detections); ``mask_max_det`` (default
                :data:`~vfmkd.models.instance_masks.DEFAULT_MASK_MAX_DET`, None for all):
                most detections segmented per image.

        Returns:
            One dict per image (detection: ``boxes [K, 4]`` ``xyxy``, ``scores [K]``,
            ``labels [K]`` int64; with a mask head and no ``prompts`` also ``masks`` bool
            ``[K, H, W]`` and ``mask_scores [K]``, K at most ``mask_max_det``).
        """
        if not self.heads:
            raise KeyError("predict() needs a task head; this model has none")
        mask_max_det = options.pop("mask_max_det", DEFAULT_MASK_MAX_DET)
        box_head, prompted = (None, []) if options.get("prompts") is not None else self._instance_heads()
        merged: list[dict[str, Any]] | None = None
        for name, head in self.heads.items():
            if name in prompted:
                continue
            results = head.predict(outputs[name], batch, **_accepted(head.predict, options))
            if name == box_head:
                results = [top_detections(result, mask_max_det) for result in results]
            merged = _merge_predictions(merged, results, name)
        for name in prompted:
            head = self.heads[name]
            prompts = box_prompts(merged or [], batch, _device_of(head))
            results = head.predict(outputs[name], batch, **_accepted(head.predict, {**options, "prompts": prompts}))
            merged = _merge_predictions(merged, results, name)
        return merged or []

    def _instance_heads(self) -> tuple[str | None, list[str]]:
        """The head whose boxes prompt the others, and the heads they prompt; ``(None, [])`` when none pair up."""
        box_heads = [name for name, head in self.heads.items() if getattr(head, "predicts_boxes", False)]
        prompted = [name for name, head in self.heads.items() if getattr(head, "prompted_by_boxes", False)]
        if not box_heads or not prompted:
            return None, []
        if len(box_heads) > 1:
            raise ValueError(
                f"heads {box_heads} all predict boxes, so it is ambiguous which prompt the mask heads {prompted}; "
                "keep one box-predicting head, or pass prompts= to predict()"
            )
        return box_heads[0], prompted

    def evaluator_names(self) -> list[str]:
        """The evaluators the heads ask for (``vfmkd.registry.EVALUATORS`` names), each once.

        A head prompted by boxes adds its ``instance_evaluators`` (``coco_segm``) when the
        model has a head predicting boxes to prompt it with.
        """
        names: list[str] = []
        for head in self.heads.values():
            names += [name for name in getattr(head, "evaluators", ()) if name not in names]
        for name in self._instance_heads()[1]:
            names += [name for name in getattr(self.heads[name], "instance_evaluators", ()) if name not in names]
        return names


def _merge_predictions(
    merged: list[dict[str, Any]] | None, results: Sequence[Mapping[str, Any]], head_name: str
) -> list[dict[str, Any]]:
    """``merged`` with each image's ``results`` of one head added; a key given twice is an error."""
    if merged is None:
        return [dict(result) for result in results]
    for image_result, result in zip(merged, results):
        clashes = sorted(set(image_result) & set(result))
        if clashes:
            raise ValueError(f"head '{head_name}' predicts keys another head already gives: {clashes}")
        image_result.update(result)
    return merged


def _device_of(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (the CPU when it has none)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def _accepted(function: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``options`` that ``function`` takes as keyword arguments."""
    parameters = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(options)
    return {key: value for key, value in options.items() if key in parameters}


def build_model(model_cfg: Mapping[str, Any]) -> UnifiedModel:
    """Build a :class:`UnifiedModel` from the ``model`` section of an experiment config.

    Args:
        model_cfg: ``backbone`` (``type`` plus kwargs, optionally ``config``: a YAML file of
            backbone kwargs, resolved against the working directory, whose keys the explicit
            ones override), ``neck`` (optional; default from the backbone), ``heads`` (name to
            ``type`` plus kwargs) and ``weights`` (optional state-dict file, vfmkd or
            Ultralytics YOLOv8 keys).

    Returns:
        The model, with ``model.config`` holding the resolved config (backbone YAML merged,
        default neck filled in, ``weights`` and heads' ``init_from`` dropped since they are
        in the model's state).
    """
    unknown = sorted(set(model_cfg) - set(_MODEL_KEYS))
    if unknown:
        raise KeyError(f"unknown model config keys {unknown}; valid keys: {list(_MODEL_KEYS)}")
    if "backbone" not in model_cfg:
        raise KeyError("model config needs a 'backbone' entry, e.g. {'type': 'yolov8', 'scale': 'n'}")

    backbone_cfg = _resolve_backbone_config(model_cfg["backbone"])
    backbone = _build(BACKBONES, "backbone", backbone_cfg)

    neck_cfg = model_cfg.get("neck")
    if neck_cfg is None:
        neck_cfg = backbone.default_neck_config()
    if neck_cfg is None:
        neck: nn.Module = PassThroughNeck(backbone.feature_dims, backbone.feature_strides)
    else:
        neck = _build(
            NECKS, "neck", neck_cfg, in_channels=backbone.feature_dims, in_strides=backbone.feature_strides
        )

    heads_cfg = model_cfg.get("heads") or {}
    heads: dict[str, nn.Module] = {}
    for name, head_cfg in heads_cfg.items():
        heads[name] = _build(
            HEADS, f"heads.{name}", head_cfg, feature_dims=neck.feature_dims, feature_strides=neck.feature_strides
        )

    # NOTE: like `weights`, a head's `init_from` is in the model's state once built.
    resolved_heads = {name: {k: v for k, v in head.items() if k != "init_from"} for name, head in heads_cfg.items()}
    resolved = {"backbone": backbone_cfg, "neck": copy.deepcopy(neck_cfg), "heads": copy.deepcopy(resolved_heads)}
    model = UnifiedModel(backbone=backbone, neck=neck, heads=heads, config=resolved)
    weights = model_cfg.get("weights")
    if weights:
        load_weights(model, weights)
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict with ``torch.load(weights_only=True)``.

    Accepts a plain state dict or a dict holding one under ``state_dict`` or ``model``.

    Args:
        path: The file.

    Returns:
        Parameter name to tensor, on the CPU.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path} (resolved to {path.resolve()})")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} contains pickled Python objects (for example a full Ultralytics checkpoint such as "
            "yolov8n.pt, which stores the whole model), which vfmkd does not unpickle for safety. Save the "
            "state dict instead: torch.save(model.state_dict(), path) - for an Ultralytics checkpoint, "
            "torch.save(YOLO('yolov8n.pt').model.state_dict(), 'yolov8n_state_dict.pt')."
        ) from error
    if isinstance(loaded, Mapping):
        for wrapper_key in ("state_dict", "model"):
            if isinstance(loaded.get(wrapper_key), Mapping):
                loaded = loaded[wrapper_key]
                break
    if not isinstance(loaded, Mapping) or not all(isinstance(value, torch.Tensor) for value in loaded.values()):
        raise ValueError(
            f"{path} does not hold a state dict (name -> tensor), nor one under 'state_dict' or 'model'; "
            f"found {type(loaded).__name__}"
        )
    return dict(loaded)


def load_weights(model: UnifiedModel, path: str | Path) -> None:
    """Load a state-dict file into ``model``, strictly.

    Ultralytics YOLOv8 detection keys (``model.<N>.*``) are renamed first (see
    :mod:`vfmkd.models.ultralytics_compat`).

    Args:
        model: The model to fill.
        path: A file readable by :func:`read_state_dict`.

    Raises:
        ValueError: listing missing, unexpected and shape-mismatched keys.
    """
    state_dict = read_state_dict(path)
    if is_ultralytics_state_dict(state_dict):
        state_dict = convert_ultralytics_state_dict(state_dict, head_name=DETECTION_HEAD)
        source = "Ultralytics YOLOv8"
    else:
        source = "vfmkd"
    load_state_dict_strict(
        model,
        state_dict,
        source=f"weights {path} ({source} keys)",
        hint=lambda problems: (
            "The class branches differ in shape: the file was trained with another num_classes."
            if any("class_branches" in entry for entry in problems.mismatched)
            else "Were they saved from a model built with this config?"
        ),
    )
    logger.info("loaded %s weights from %s (%d tensors)", source, path, len(state_dict))


def _resolve_backbone_config(backbone_cfg: Any) -> dict[str, Any]:
    if not isinstance(backbone_cfg, Mapping):
        raise TypeError(f"model.backbone must be a mapping with a 'type', got {backbone_cfg!r}")
    explicit = dict(backbone_cfg)
    config_path = explicit.pop("config", None)
    merged: dict[str, Any] = {}
    if config_path is not None:
        path = find_project_file(config_path)
        if path is None:
            raise FileNotFoundError(
                f"model.backbone.config: file '{config_path}' not found (looked in the working directory "
                f"{Path.cwd()} and in the vfmkd checkout {PROJECT_ROOT}); give an existing path"
            )
        with path.open() as file:
            loaded = yaml.safe_load(file) or {}
        if not isinstance(loaded, Mapping):
            raise ValueError(f"backbone config '{config_path}' must hold a mapping of backbone kwargs")
        merged.update(loaded)
    merged.update(explicit)
    if "type" not in merged:
        raise KeyError(
            "model.backbone needs a 'type' (e.g. 'yolov8')" + (f"; '{config_path}' has none" if config_path else "")
        )
    return merged


def _build(registry: Registry, where: str, cfg: Any, **built: Any) -> Any:
    """Build ``cfg['type']`` from ``registry`` with the other keys of ``cfg`` plus ``built``.

    Keys the constructor does not take are reported with the closest valid one.
    """
    if not isinstance(cfg, Mapping) or "type" not in cfg:
        raise KeyError(f"model.{where} must be a mapping with a 'type', got {cfg!r}")
    kwargs = dict(cfg)
    name = kwargs.pop("type")
    factory = registry.get(name)
    parameters = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        valid = [key for key in parameters if key not in built]
        for key in kwargs:
            if key not in parameters or key in built:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise KeyError(f"model.{where}: unknown key '{key}' for {name}.{hint} Valid keys: {valid}")
    return factory(**kwargs, **built)
