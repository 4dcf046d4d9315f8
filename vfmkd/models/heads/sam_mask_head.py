"""A SAM-style promptable mask head on any student: its own image embedding, SAM's prompt encoder and decoder.

From the student's neck levels the head builds a 256-channel, stride-16 image embedding
(each level projected to 256 channels, brought to stride 16 and summed, then SAM's neck:
1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d, as EdgeSAM does on its RepViT encoder). The
embedding is exposed as the named map ``<head>.embed`` so a distillation term can pull it
toward the teacher's ``embed``. With ``decoder: sam2`` it also builds the two
high-resolution maps SAM 2's decoder consumes (``hires_s8``: 64 channels at stride 8,
``hires_s4``: 32 channels at stride 4), exposed and distillable too.

The prompt encoder and mask decoder are the official modules (``segment_anything`` or
``sam2``), built with the official sizes so an official checkpoint's
``prompt_encoder.*`` / ``mask_decoder.*`` (SAM) or ``sam_prompt_encoder.*`` /
``sam_mask_decoder.*`` (SAM 2) load into them (``init_from``). The prompt encoder is
frozen by default, the decoder trained. Prompts are in network-input pixels, pixel
centres at ``i + 0.5`` (vfmkd's convention; half a pixel is taken off before SAM's
prompt encoder, which adds it back); any input size that is a multiple of 32 works (the prompt encoder's grid follows the
embedding).

Training: per labelled image up to ``max_instances`` instances, each prompted by its box
or by one point inside its mask (:func:`~vfmkd.models.heads.prompts.sample_prompts`);
loss ``bce_weight`` x BCE + ``dice_weight`` x Dice on the mask logits upsampled to the
input (EdgeSAM's 5 : 5), and ``iou_weight`` x MSE of the predicted IoU against the
mask's real IoU: ``seg/bce``, ``seg/dice``, ``seg/iou``. Then ``refine_iters`` rounds of
SAM's interactive training: a click drawn where the mask is wrong (positive in a miss,
negative in an over-segmentation) is added, the low-res mask is fed back as mask input,
and the losses are averaged over the rounds (so refinement clicks help at inference).

Example (experiment YAML)::

    heads:
      detection: {type: yolo_head, num_classes: 80}
      segmentation: {type: sam_mask_head, decoder: sam2, init_from: weights/sam2.1_hiera_tiny.pt}
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vfmkd.models.heads.base import BaseHead, MapSpec
from vfmkd.models.heads.prompts import Prompts, add_points, sample_prompts
from vfmkd.ops.masks import masks_to_original, refinement_points
from vfmkd.ops.prompt_decoder import (
    FAMILIES,
    PromptDecoder,
    checkpoint_state,
    load_prompt_modules,
    official_prompt_modules,
    prompt_count,
    to_official_coordinates,
)
from vfmkd.registry import HEADS

__all__ = ["SAMMaskHead", "dice_loss"]

logger = logging.getLogger(__name__)

EMBED_STRIDE = 16


class _LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a ``[B, C, H, W]`` map (SAM's ``LayerNorm2d``)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        variance = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(variance + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``1 - (2 |p t| + 1) / (|p| + |t| + 1)`` per mask, ``p = sigmoid(logits)``; ``[N]``."""
    probabilities = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    overlap = (probabilities * targets).sum(1)
    return 1.0 - (2.0 * overlap + 1.0) / (probabilities.sum(1) + targets.sum(1) + 1.0)


@HEADS.register("sam_mask_head")
class SAMMaskHead(BaseHead):
    """Promptable mask head: student maps -> SAM image embedding -> official prompt encoder and decoder.

    Args:
        feature_dims: Channels of every neck level.
        feature_strides: Stride of every neck level.
        decoder: ``sam`` (segment_anything's modules) or ``sam2`` (SAM 2's, with the
            stride-4 and stride-8 maps).
        in_features: Levels fused into the embedding.
        init_from: An official SAM / SAM 2 checkpoint whose prompt encoder and decoder
            are loaded (strictly), or None for random init. In an experiment config,
            ``teacher`` means the ``model_path`` of the enabled SAM-family teacher.
        train_prompt_encoder: Optimise the prompt encoder (frozen by default).
        train_decoder: Optimise the mask decoder.
        multimask: Decode three masks per prompt and train the best one (SAM's
            ambiguity-aware loss); else one mask per prompt.
        max_instances: Most prompted instances per image in training.
        point_probability: Share of point prompts (the rest are box prompts).
        bce_weight: Weight of the BCE term.
        dice_weight: Weight of the Dice term.
        iou_weight: Weight of the IoU-prediction MSE.
        refine_iters: Refinement rounds per step (SAM's interactive training): a click
            drawn where the mask is wrong is added and the low-res mask fed back, the
            losses averaged over the rounds; 0 trains the first prompt only.
        transformer_depth: Two-way transformer layers of the decoder (official: 2).
        mlp_dim: Its MLP width (official: 2048).
    """

    loss_prefix = "seg/"
    evaluators = ("prompt_miou",)
    needs_masks = True
    prompted_by_boxes = True
    instance_evaluators = ("coco_segm",)

    def __init__(
        self,
        feature_dims: Mapping[str, int],
        feature_strides: Mapping[str, int],
        *,
        decoder: str = "sam",
        in_features: Sequence[str] = ("p3", "p4", "p5"),
        init_from: str | None = None,
        train_prompt_encoder: bool = False,
        train_decoder: bool = True,
        multimask: bool = False,
        max_instances: int = 8,
        point_probability: float = 0.5,
        bce_weight: float = 5.0,
        dice_weight: float = 5.0,
        iou_weight: float = 1.0,
        refine_iters: int = 1,
        transformer_depth: int = 2,
        mlp_dim: int = 2048,
    ) -> None:
        super().__init__()
        if decoder not in FAMILIES:
            raise ValueError(f"sam_mask_head: decoder must be one of {FAMILIES}, got '{decoder}'")
        missing = [level for level in in_features if level not in feature_dims]
        if missing:
            raise ValueError(f"sam_mask_head fuses {list(in_features)} but the neck lacks {missing} ({sorted(feature_dims)})")
        self.decoder_type = decoder
        self.in_features = tuple(in_features)
        self.level_strides = {level: int(feature_strides[level]) for level in self.in_features}
        self.embed_dim = 256
        self.multimask = multimask
        self.max_instances = max_instances
        self.point_probability = point_probability
        if refine_iters < 0:
            raise ValueError(f"sam_mask_head: refine_iters must be >= 0, got {refine_iters}")
        self.refine_iters = refine_iters
        self.weights = {"bce": bce_weight, "dice": dice_weight, "iou": iou_weight}
        self.projections = nn.ModuleDict(
            {level: nn.Conv2d(int(feature_dims[level]), self.embed_dim, 1) for level in self.in_features}
        )
        self.neck = nn.Sequential(
            nn.Conv2d(self.embed_dim, self.embed_dim, 1, bias=False),
            _LayerNorm2d(self.embed_dim),
            nn.Conv2d(self.embed_dim, self.embed_dim, 3, padding=1, bias=False),
            _LayerNorm2d(self.embed_dim),
        )
        if decoder == "sam2":
            finest = min(self.in_features, key=lambda level: self.level_strides[level])
            self.hires_source = finest
            self.hires_s8 = nn.Conv2d(int(feature_dims[finest]), self.embed_dim // 4, 1)
            self.hires_s4 = nn.Sequential(
                nn.ConvTranspose2d(int(feature_dims[finest]), self.embed_dim // 8, 2, stride=2),
                nn.Conv2d(self.embed_dim // 8, self.embed_dim // 8, 3, padding=1),
            )
        self.prompt_encoder, self.mask_decoder = official_prompt_modules(
            decoder, embed_dim=self.embed_dim, depth=transformer_depth, mlp_dim=mlp_dim
        )
        if init_from:
            self.load_official(init_from)
        self.prompt_encoder.requires_grad_(train_prompt_encoder)
        self.mask_decoder.requires_grad_(train_decoder)

    @classmethod
    def small_config(cls) -> dict[str, Any]:
        """A small build for tests (one transformer layer, narrow MLP)."""
        return {"transformer_depth": 1, "mlp_dim": 64, "max_instances": 4}

    # ---------------------------------------------------------------- weights
    def load_official(self, path: str | Path) -> None:
        """Load the prompt encoder and mask decoder of an official SAM / SAM 2 checkpoint (strictly)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sam_mask_head.init_from: no file {path}")
        load_prompt_modules(
            self.decoder_type, checkpoint_state(path), self.prompt_encoder, self.mask_decoder, source=str(path)
        )
        logger.info("sam_mask_head: prompt encoder and decoder loaded from %s", path)

    # ----------------------------------------------------------------- maps
    @property
    def map_specs(self) -> dict[str, MapSpec]:
        specs = {"embed": (self.embed_dim, EMBED_STRIDE)}
        if self.decoder_type == "sam2":
            specs["hires_s8"] = (self.embed_dim // 4, 8)
            specs["hires_s4"] = (self.embed_dim // 8, 4)
        return specs

    def named_maps(self, outputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return {name: outputs[name] for name in self.map_specs}

    def forward(self, features: Mapping[str, torch.Tensor], **inputs: Any) -> dict[str, Any]:
        """The image embedding (and SAM 2's high-resolution maps) of each image.

        Returns:
            ``embed [B, 256, H / 16, W / 16]``; with ``decoder: sam2`` also ``hires_s8
            [B, 64, H / 8, W / 8]`` and ``hires_s4 [B, 32, H / 4, W / 4]``; and
            ``input_size`` ``(H, W)``.
        """
        reference = features[self.in_features[0]]
        stride = self.level_strides[self.in_features[0]]
        input_size = (reference.shape[-2] * stride, reference.shape[-1] * stride)
        grid = (input_size[0] // EMBED_STRIDE, input_size[1] // EMBED_STRIDE)
        fused = 0
        for level in self.in_features:
            projected = self.projections[level](features[level])
            if projected.shape[-2:] != grid:
                ratio = EMBED_STRIDE // self.level_strides[level]
                if ratio > 1 and projected.shape[-2] == grid[0] * ratio:
                    projected = F.avg_pool2d(projected, ratio)
                else:
                    projected = F.interpolate(projected, size=grid, mode="bilinear", align_corners=False)
            fused = fused + projected
        outputs: dict[str, Any] = {"embed": self.neck(fused), "input_size": input_size}
        if self.decoder_type == "sam2":
            source = features[self.hires_source]
            outputs["hires_s8"] = self.hires_s8(source)
            outputs["hires_s4"] = self.hires_s4(source)
        return outputs

    # ---------------------------------------------------------------- decoding
    def segment(self, outputs: Mapping[str, Any], prompts: Sequence[Mapping[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Masks for per-image prompts.

        Args:
            outputs: :meth:`forward`'s outputs.
            prompts: per image, any of ``boxes [N, 4]`` xyxy input pixels, ``points
                [N, K, 2]`` xy input pixels with ``point_labels [N, K]`` (1 positive, 0
                negative, -1 padding), ``mask_input [N, 1, H / 4, W / 4]`` (a previous
                ``low_res``).

        Returns:
            Per image ``masks [N, H, W]`` logits at input resolution, ``low_res [N, 1,
            H / 4, W / 4]`` logits and ``iou [N]`` predicted IoU (the best of three masks
            by predicted IoU when ``multimask``).
        """
        results = []
        height, width = outputs["input_size"]
        for index, image_prompts in enumerate(prompts):
            count = prompt_count(image_prompts)
            if count == 0:
                embedding = outputs["embed"]
                results.append(
                    {
                        "masks": embedding.new_zeros((0, height, width), dtype=torch.float32),
                        "low_res": embedding.new_zeros((0, 1, height // 4, width // 4), dtype=torch.float32),
                        "iou": embedding.new_zeros((0,), dtype=torch.float32),
                    }
                )
                continue
            low_res, iou = self.decode_prompts(outputs, index, image_prompts)
            if low_res.shape[1] > 1:
                best = iou.argmax(dim=1)
                rows = torch.arange(low_res.shape[0], device=low_res.device)
                low_res, iou = low_res[rows, best][:, None], iou[rows, best][:, None]
            masks = F.interpolate(low_res.float(), size=outputs["input_size"], mode="bilinear", align_corners=False)
            results.append({"masks": masks[:, 0], "low_res": low_res, "iou": iou[:, 0]})
        return results

    def decode_prompts(
        self, outputs: Mapping[str, Any], index: int | torch.Tensor, prompts: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-resolution logits ``[N, M, H / 4, W / 4]`` and IoUs ``[N, M]`` of prompts.

        Args:
            outputs: :meth:`forward`'s outputs.
            index: the batch image of every prompt (an int), or of each (``[N]`` int64).
            prompts: ``boxes``, ``points`` / ``point_labels``, ``mask_input`` (input pixels).
        """
        count = prompt_count(prompts)
        device = outputs["embed"].device
        image_index = torch.full((count,), index, dtype=torch.int64, device=device) if isinstance(index, int) else index
        # NOTE: float32 maps, so decoding outside the autocast region of the forward (evaluation) works.
        features = {name: outputs[name].float() for name in self.map_specs}
        points = None
        if prompts.get("points") is not None:
            points = (to_official_coordinates(prompts["points"].float()), prompts["point_labels"])
        boxes = prompts.get("boxes")
        # NOTE: a view on this head's own modules, made per call so they are registered once.
        decoder = PromptDecoder(self.decoder_type, self.prompt_encoder, self.mask_decoder)
        return decoder.decode(
            features,
            image_index=image_index,
            boxes=None if boxes is None else to_official_coordinates(boxes.float()),
            points=points,
            mask_input=prompts.get("mask_input"),
            multimask=self.multimask,
            clamp=False,
        )

    # ------------------------------------------------------------------ loss
    def loss(self, outputs: Mapping[str, Any], targets: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """BCE + Dice on the masks of sampled prompts, MSE of the predicted IoU.

        Args:
            outputs: :meth:`forward`'s outputs.
            targets: the batch's targets on the device, with ``masks`` (per image ``[n_i,
                H, W]`` uint8), ``boxes``, ``batch_idx`` and ``has_labels``.
        """
        with torch.autocast(device_type=outputs["embed"].device.type, enabled=False):
            prompts = sample_prompts(targets, max_instances=self.max_instances, point_probability=self.point_probability)
            # NOTE: a zero-weighted tie gives every trainable parameter a gradient (an exact
            # zero when unused), which DDP needs when a batch has no instance to prompt.
            tie = 0.0 * sum(p.float().sum() for p in self.parameters() if p.requires_grad)
            tie = tie + 0.0 * sum(outputs[name].float().sum() for name in self.map_specs)
            if prompts.image_index.numel() == 0:
                return {f"seg/{name}": tie for name in ("bce", "dice", "iou")}
            totals = {"bce": tie, "dice": tie, "iou": tie}
            mask_input = None
            for iteration in range(self.refine_iters + 1):
                logits, iou, targets_hw, low_res = self._prompted_masks(outputs, prompts, targets, mask_input)
                bce = F.binary_cross_entropy_with_logits(logits, targets_hw, reduction="none").flatten(1).mean(1)
                with torch.no_grad():
                    real_iou = _binary_iou(logits > 0, targets_hw > 0.5)
                totals["bce"] = totals["bce"] + bce.mean()
                totals["dice"] = totals["dice"] + dice_loss(logits, targets_hw).mean()
                totals["iou"] = totals["iou"] + F.mse_loss(iou, real_iou)
                if iteration < self.refine_iters:
                    # SAM's interactive training: a click where the mask is wrong, the mask fed back.
                    points, labels = refinement_points(logits.detach() > 0, targets_hw > 0.5, torch.default_generator)
                    prompts = add_points(prompts, points, labels)
                    mask_input = low_res.detach()
            rounds = self.refine_iters + 1
            return {f"seg/{name}": self.weights[name] * value / rounds for name, value in totals.items()}

    def _prompted_masks(
        self,
        outputs: Mapping[str, Any],
        prompts: Prompts,
        targets: Mapping[str, Any],
        mask_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits ``[P, H, W]``, predicted IoUs ``[P]``, target masks ``[P, H, W]`` and low-res
        logits ``[P, 1, H / 4, W / 4]`` of the prompts, in prompt order.

        With ``multimask`` the output with the lowest BCE + Dice is trained (SAM's rule).
        """
        all_logits, all_iou, all_targets, all_low, order = [], [], [], [], []
        # NOTE: box prompts and point prompts are decoded apart, as the official predictors
        # take them (SAM embeds a box through its prompt encoder's box path only).
        for has_box in prompts.has_box.unique().tolist():
            rows = (prompts.has_box == has_box).nonzero().flatten()
            image_prompts = _image_prompts(prompts, rows)
            if mask_input is not None:
                image_prompts["mask_input"] = mask_input[rows]
            low_res, iou = self.decode_prompts(outputs, prompts.image_index[rows], image_prompts)
            logits = F.interpolate(low_res.float(), size=outputs["input_size"], mode="bilinear", align_corners=False)
            pairs = zip(prompts.image_index[rows].tolist(), prompts.instance[rows].tolist())
            target = torch.stack([targets["masks"][image][instance] for image, instance in pairs]).float()
            picked = torch.arange(len(rows), device=logits.device)
            best = torch.zeros_like(picked)
            if logits.shape[1] > 1:
                per_output = [
                    F.binary_cross_entropy_with_logits(logits[:, k], target, reduction="none").flatten(1).mean(1)
                    + dice_loss(logits[:, k], target)
                    for k in range(logits.shape[1])
                ]
                best = torch.stack(per_output, 1).argmin(1)
            all_logits.append(logits[picked, best])
            all_iou.append(iou[picked, best].float())
            all_low.append(low_res[picked, best][:, None])
            all_targets.append(target)
            order.append(rows)
        restore = torch.cat(order).argsort()
        return (
            torch.cat(all_logits)[restore],
            torch.cat(all_iou)[restore],
            torch.cat(all_targets)[restore],
            torch.cat(all_low)[restore],
        )

    # --------------------------------------------------------------- predict
    @torch.no_grad()
    def predict(
        self,
        outputs: Mapping[str, Any],
        batch: Mapping[str, Any] | None = None,
        *,
        prompts: Sequence[Mapping[str, torch.Tensor]] | None = None,
    ) -> list[dict[str, Any]]:
        """Masks for given prompts; one empty dict per image without them.

        Args:
            outputs: :meth:`forward`'s outputs.
            batch: the collated batch; with ``frames``, masks are mapped to the original
                images.
            prompts: per image prompts as for :meth:`segment` (input pixels).

        Returns:
            Per image ``masks`` (bool ``[N, H, W]``: original pixels with frames, else
            input pixels) and ``mask_scores [N]`` (predicted IoU).
        """
        batch_size = outputs["embed"].shape[0]
        if prompts is None:
            return [{} for _ in range(batch_size)]
        results = []
        frames = None if batch is None or batch.get("frames") is None else [f[0] for f in batch["frames"]]
        for index, decoded in enumerate(self.segment(outputs, prompts)):
            masks = decoded["masks"]
            masks = masks_to_original(masks, frames[index]) if frames is not None else masks > 0
            results.append({"masks": masks, "mask_scores": decoded["iou"]})
        return results


def _image_prompts(prompts: Prompts, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The prompts of rows that all have a box or all have none, as :meth:`SAMMaskHead.segment` takes them.

    Point columns that are padding in every row are dropped (no points at all: none given).
    """
    image_prompts: dict[str, torch.Tensor] = {}
    if bool(prompts.has_box[rows].all()):
        image_prompts["boxes"] = prompts.boxes[rows]
    labels = prompts.point_labels[rows]
    used = (labels != -1).any(dim=0)
    if bool(used.any()):
        image_prompts["points"] = prompts.points[rows][:, used]
        image_prompts["point_labels"] = labels[:, used]
    return image_prompts


def _binary_iou(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of bool masks ``[N, H, W]`` pairwise; 1 when both are empty."""
    intersection = (predicted & target).flatten(1).sum(1).float()
    union = (predicted | target).flatten(1).sum(1).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))
