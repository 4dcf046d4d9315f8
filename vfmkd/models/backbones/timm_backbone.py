"""Any timm model with feature outputs as a vfmkd backbone (``type: timm``).

timm, "PyTorch Image Models" (Wightman, https://github.com/huggingface/pytorch-image-models),
builds a feature extractor from most of its models with ``features_only=True``; each one
declares its outputs in ``feature_info`` (channels and reduction, i.e. stride, per stage).
This wrapper picks, for strides 8, 16 and 32, the last stage at that stride and returns them
as ``p3``, ``p4``, ``p5``. Dimensions and strides come from ``feature_info`` (read from a
model built on the meta device), never from a dummy forward.

Inputs are RGB in ``[0, 1]``, normalised inside with the mean and std of the model's timm
pretrained config (a name with a tag, e.g. ``convnext_atto.d2_in1k``, picks that tag's)
unless ``normalize_input`` is off.

Weights: ``pretrained: false`` (the default) keeps timm's random init; ``checkpoint: PATH``
loads a local file (``.safetensors``, or a torch file read with ``weights_only=True``) in
timm's key names or in the original authors' names that the model's timm module converts
(its ``checkpoint_filter_fn``). Loading is strict except for the classifier, which the
feature extractor does not have. ``pretrained: true`` asks timm to download its default
weights (Hugging Face hub), so it needs internet access.

Example config::

    backbone: {type: timm, name: convnext_atto, checkpoint: weights/convnext_atto.safetensors}
"""

from __future__ import annotations

import difflib
import importlib
import logging
import math
import pickle
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vfmkd.models.backbones.base import BaseBackbone
from vfmkd.registry import BACKBONES
from vfmkd.utils.state_dict import check_state_dict, list_keys, load_state_dict_strict

__all__ = [
    "LEVEL_STRIDES",
    "TimmBackbone",
    "convert_timm_state_dict",
    "load_timm_checkpoint",
    "read_checkpoint",
    "select_out_indices",
]

logger = logging.getLogger(__name__)

# Level name -> stride of the levels the timm backbone returns.
LEVEL_STRIDES: dict[str, int] = {"p3": 8, "p4": 16, "p5": 32}
# create_model arguments the backbone sets itself.
_RESERVED_MODEL_KWARGS = ("features_only", "out_indices", "pretrained", "pretrained_cfg_overlay", "num_classes")


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file with timm's loader, without unpickling Python objects.

    ``.safetensors`` files are read with safetensors; other files with
    ``torch.load(weights_only=True)``. A training checkpoint's EMA weights
    (``state_dict_ema`` / ``model_ema``) are preferred over ``state_dict`` / ``model``, and
    ``module.`` prefixes (DDP) are removed.

    Args:
        path: The file.

    Returns:
        Name to tensor, on the CPU.
    """
    from timm.models import load_state_dict

    path = Path(path).expanduser()
    if path.suffix.lower() in (".npz", ".npy"):
        raise ValueError(
            f"{path}: NumPy (JAX/Flax) checkpoints are not read here; use the PyTorch or safetensors file of "
            "the same weights (timm publishes them on the Hugging Face hub under timm/<model>)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path} (resolved to {path.resolve()})")
    try:
        state_dict = load_state_dict(str(path), use_ema=True, device="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as error:
        # NOTE: timm re-raises torch's UnpicklingError as a RuntimeError.
        if not isinstance(error, pickle.UnpicklingError) and not isinstance(error.__cause__, pickle.UnpicklingError):
            raise
        raise ValueError(
            f"{path} contains pickled Python objects, which vfmkd does not unpickle for safety; save the "
            "state dict instead: torch.save(model.state_dict(), path)"
        ) from error
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path} does not hold a state dict (name -> tensor); found {type(state_dict).__name__}")
    not_tensors = sorted(key for key, value in state_dict.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise ValueError(
            f"{path} is not a plain state dict: entries [{list_keys(not_tensors)}] are not tensors (a training "
            "checkpoint should keep the weights under 'state_dict' or 'model')"
        )
    return dict(state_dict)


def convert_timm_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Bring a checkpoint into ``model``'s key names and drop a classifier it does not have.

    Applies the ``checkpoint_filter_fn`` of the timm module that defines ``model`` (it turns
    original authors' keys into timm's and, for ViTs, resamples the position table to the
    model's grid) and removes the weights of the classifier named in the model's pretrained
    config when the model has none (``num_classes=0``).

    Args:
        state_dict: Checkpoint tensors.
        model: A full timm model (not a ``features_only`` wrapper).

    Returns:
        The converted tensors.
    """
    module = importlib.import_module(type(model).__module__)
    filter_fn: Callable[..., dict[str, torch.Tensor]] | None = getattr(module, "checkpoint_filter_fn", None)
    # NOTE: some timm filters pop keys from their argument; give them a copy.
    converted = dict(filter_fn(dict(state_dict), model)) if filter_fn is not None else dict(state_dict)
    classifiers = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    if isinstance(classifiers, str):
        classifiers = (classifiers,)
    expected = model.state_dict()
    for classifier in classifiers:
        for key in [key for key in converted if key.startswith(f"{classifier}.") and key not in expected]:
            del converted[key]
    return converted


def load_timm_checkpoint(model: nn.Module, path: str | Path, *, description: str) -> None:
    """Read, convert and strictly load a checkpoint into a full timm model.

    Args:
        model: The timm model to fill.
        path: Weights file (see :func:`read_checkpoint`).
        description: The model, for error messages (e.g. ``"ViT backbone 'small'"``).

    Raises:
        ValueError: when keys or shapes do not match (classifier weights excepted).
    """
    state_dict = convert_timm_state_dict(read_checkpoint(path), model)
    load_state_dict_strict(model, state_dict, source=f"checkpoint {path} for {description}")
    logger.info("loaded %s weights from %s (%d tensors)", description, path, len(state_dict))


def select_out_indices(model_name: str, feature_info: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Pick, for each level of :data:`LEVEL_STRIDES`, the last feature stage at its stride.

    Args:
        model_name: The timm model, for the error message.
        feature_info: timm's list of feature stages (``reduction``, ``num_chs``, ``module``).

    Returns:
        Level name to index into ``feature_info``.

    Raises:
        ValueError: naming the model and its strides when one of 8, 16, 32 is missing.
    """
    reductions = [int(info["reduction"]) for info in feature_info]
    indices: dict[str, int] = {}
    for level, stride in LEVEL_STRIDES.items():
        at_stride = [index for index, reduction in enumerate(reductions) if reduction == stride]
        if at_stride:
            indices[level] = at_stride[-1]
    missing = [stride for level, stride in LEVEL_STRIDES.items() if level not in indices]
    if missing:
        stages = ", ".join(f"{info['module']} (stride {info['reduction']})" for info in feature_info)
        raise ValueError(
            f"timm model '{model_name}' has no feature output at stride {', '.join(map(str, missing))}; the timm "
            f"backbone needs strides {sorted(set(LEVEL_STRIDES.values()))}. Its feature stages: {stages}. Pick a "
            "hierarchical model such as convnext_atto, resnet18 or efficientnet_b0"
        )
    return indices


@BACKBONES.register("timm")
class TimmBackbone(BaseBackbone):
    """A timm feature extractor returning ``p3``, ``p4``, ``p5`` at strides 8, 16, 32.

    Inputs whose sides are not multiples of 32 are zero-padded at the bottom and right to
    the next multiple, and each level is cropped back to ``ceil(side / stride)``, so every
    timm model meets the backbone contract whatever its padding rules.

    Args:
        name: timm model name, e.g. ``convnext_atto``, ``resnet18``, ``efficientnet_b0``.
        checkpoint: Local weights file (timm or original key names); ``None`` for random init.
        pretrained: Let timm download its default weights (needs internet); exclusive with
            ``checkpoint``.
        model_kwargs: More ``timm.create_model`` arguments, e.g. ``{drop_path_rate: 0.1}``.
        normalize_input: Map ``[0, 1]`` RGB to the model's mean and std inside the backbone;
            turn off for inputs that are already normalised.

    Example:
        >>> backbone = TimmBackbone("convnext_atto")
        >>> backbone.feature_dims, backbone.feature_strides
        ({'p3': 80, 'p4': 160, 'p5': 320}, {'p3': 8, 'p4': 16, 'p5': 32})
    """

    def __init__(
        self,
        name: str,
        checkpoint: str | Path | None = None,
        pretrained: bool = False,
        model_kwargs: Mapping[str, Any] | None = None,
        normalize_input: bool = True,
    ) -> None:
        import timm

        model_kwargs = dict(model_kwargs or {})
        reserved = sorted(set(_RESERVED_MODEL_KWARGS) & set(model_kwargs))
        if reserved:
            raise ValueError(f"timm backbone: model_kwargs may not set {reserved}; the backbone sets them")
        if checkpoint is not None and pretrained:
            raise ValueError("timm backbone: give either 'checkpoint' (a local file) or 'pretrained: true', not both")
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"unknown timm model '{name}'.{hint} See timm.list_models() for all names")

        try:
            probe = _build_on_meta(
                lambda: timm.create_model(name, pretrained=False, features_only=True, **model_kwargs),
                description=f"timm model '{name}' with features_only=True",
            )
        except TypeError as error:
            raise ValueError(f"timm model '{name}' rejected model_kwargs {model_kwargs}: {error}") from error
        feature_info = probe.feature_info.info
        indices = select_out_indices(name, feature_info)
        super().__init__(
            feature_dims={level: int(feature_info[index]["num_chs"]) for level, index in indices.items()},
            feature_strides=dict(LEVEL_STRIDES),
        )
        self.name = name

        overlay = None
        if checkpoint is not None:
            overlay = {"state_dict": _checked_state_dict(name, checkpoint, model_kwargs), "custom_load": False}
        # NOTE: with an in-memory state dict timm loads into the full model before wrapping
        # it as a feature extractor, so its own key handling (classifier, feature wrapper
        # names) applies; the state dict was checked strictly against the full model above.
        self.model = timm.create_model(
            name,
            pretrained=pretrained or overlay is not None,
            pretrained_cfg_overlay=overlay,
            features_only=True,
            out_indices=tuple(indices.values()),
            **model_kwargs,
        )
        self._channels_last_output = getattr(self.model, "output_fmt", "NCHW") == "NHWC"
        self.normalize_input = normalize_input
        mean, std = self.model.pretrained_cfg["mean"], self.model.pretrained_cfg["std"]
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    @classmethod
    def small_config(cls) -> dict[str, Any]:
        """Constructor kwargs of a small instance (for contract tests and examples)."""
        return {"name": "mobilenetv3_small_050"}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Compute the three levels.

        Args:
            images: ``[B, 3, H, W]`` RGB in ``[0, 1]`` (already normalised when
                ``normalize_input`` is off).

        Returns:
            ``p3 [B, C3, ceil(H/8), ceil(W/8)]``, ``p4 [B, C4, ceil(H/16), ceil(W/16)]``,
            ``p5 [B, C5, ceil(H/32), ceil(W/32)]``.
        """
        height, width = images.shape[-2:]
        if self.normalize_input:
            images = (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)
        multiple = max(self.feature_strides.values())
        pad_bottom, pad_right = -height % multiple, -width % multiple
        if pad_bottom or pad_right:
            images = F.pad(images, (0, pad_right, 0, pad_bottom))
        outputs = self.model(images)
        features: dict[str, torch.Tensor] = {}
        for level, output in zip(self.feature_strides, outputs):
            if self._channels_last_output:
                output = output.permute(0, 3, 1, 2)
            stride = self.feature_strides[level]
            features[level] = output[..., : math.ceil(height / stride), : math.ceil(width / stride)]
        return features

    def default_neck_config(self) -> dict[str, Any]:
        """YOLOv8's PAFPN at scale ``n`` (64, 128, 256 channels); set ``neck:`` for wider."""
        return {"type": "yolov8_pafpn", "scale": "n"}

    def extra_repr(self) -> str:
        return f"name={self.name!r}, normalize_input={self.normalize_input}"


def _checked_state_dict(name: str, checkpoint: str | Path, model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint in timm's key names, checked against the full model ``name``."""
    import timm

    reference = _build_on_meta(
        lambda: timm.create_model(name, pretrained=False, num_classes=0, **model_kwargs),
        description=f"timm model '{name}'",
    )
    state_dict = convert_timm_state_dict(read_checkpoint(checkpoint), reference)
    check_state_dict(reference, state_dict, source=f"checkpoint {checkpoint} for timm model '{name}'")
    logger.info("loading timm model '%s' weights from %s (%d tensors)", name, checkpoint, len(state_dict))
    return state_dict


def _build_on_meta(create: Callable[[], nn.Module], *, description: str) -> nn.Module:
    """Build a model on the meta device (no memory, no init cost), on the CPU if that fails."""
    try:
        with torch.device("meta"):
            return create()
    except (NotImplementedError, RuntimeError) as error:
        # NOTE: a few models compute values from tensors at init, which meta tensors cannot give.
        logger.debug("building %s on the meta device failed (%s); building it on the CPU", description, error)
        return create()

