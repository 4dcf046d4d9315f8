"""A DETR-style detection head on any student: RT-DETR's decoder, NMS-free.

The neck's levels (default p3 / p4 / p5) go through an optional AIFI layer on the
coarsest level (RT-DETR's single-scale transformer encoder layer with 2-D sine-cosine
positions; the neck already fuses the scales, as RT-DETR's CCFF does) into
:class:`~vfmkd.models.heads.rtdetr_decoder.RTDETRDecoder`: input projections, IoU-aware
selection of the top ``num_queries`` encoder proposals, multi-scale deformable attention
layers with iterative box refinement, and contrastive denoising queries in training.
Training: Hungarian matching and the varifocal + L1 + GIoU loss on every decoder layer,
the encoder proposals and the denoising queries
(:class:`~vfmkd.models.heads.rtdetr_loss.RTDETRLoss`), logged as ``det/...``.
Prediction: the top ``max_det`` (query, class) pairs by score, no NMS, in original pixels.

The denoising queries are built from the batch's labels, so the model passes ``targets``
to this head's forward in training (:attr:`wants_targets`). Unlabelled images
(``has_labels`` False) give no denoising queries and no classification loss.

Example (experiment YAML)::

    heads:
      detection: {type: rtdetr_head, num_classes: 80, preset: r18}
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from vfmkd.models.heads.base import BaseHead, has_labels_mask, original_frames
from vfmkd.models.heads.rtdetr_decoder import RTDETR_PRESETS, RTDETRDecoder
from vfmkd.models.heads.rtdetr_loss import RTDETRLoss
from vfmkd.models.heads.yolo_head import boxes_to_original
from vfmkd.registry import HEADS

__all__ = ["AIFI", "RTDETRHead", "select_top"]


def sine_cosine_positions(height: int, width: int, channels: int, temperature: float = 10000.0) -> torch.Tensor:
    """2-D sine-cosine position embedding ``[1, H * W, C]`` (``C`` divisible by 4), row-major cells."""
    if channels % 4:
        raise ValueError(f"AIFI: the channels ({channels}) must be divisible by 4 for 2-D sine-cosine positions")
    grid_y, grid_x = torch.meshgrid(
        torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij"
    )
    quarter = channels // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    out_x = grid_x.flatten()[:, None] * omega[None]
    out_y = grid_y.flatten()[:, None] * omega[None]
    return torch.cat([out_x.sin(), out_x.cos(), out_y.sin(), out_y.cos()], dim=1)[None]


class AIFI(nn.Module):
    """RT-DETR's attention-based intra-scale feature interaction: one transformer encoder
    layer over the cells of one map, positions added to queries and keys only.

    Args:
        channels: channels of the map (the attention width).
        num_heads: attention heads (must divide ``channels``).
        ffn_dim: feed-forward width.
        dropout: dropout in attention and feed-forward.
    """

    def __init__(self, channels: int, num_heads: int = 8, ffn_dim: int = 1024, dropout: float = 0.0) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"AIFI: {num_heads} heads do not divide {channels} channels; set aifi_heads")
        self.attention = nn.MultiheadAttention(channels, num_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(
            nn.Linear(channels, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, channels)
        )
        self.norm2 = nn.LayerNorm(channels)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        positions = sine_cosine_positions(height, width, channels).to(tokens)
        query = tokens + positions
        attended = self.attention(query, query, tokens, need_weights=False)[0]
        tokens = self.norm1(tokens + self.dropout(attended))
        tokens = self.norm2(tokens + self.dropout(self.ffn(tokens)))
        return tokens.transpose(1, 2).reshape(batch, channels, height, width)


@HEADS.register("rtdetr_head")
class RTDETRHead(BaseHead):
    """RT-DETR detection head (see the module docstring).

    Args:
        feature_dims: channels of every neck level.
        feature_strides: stride of every neck level.
        num_classes: object classes.
        in_features: levels fed to the decoder, finest first.
        preset: a key of :data:`~vfmkd.models.heads.rtdetr_decoder.RTDETR_PRESETS`
            (``r18``: 3 decoder layers, ``l``: 6, ...): its decoder sizes, then any size
            given here overrides them.
        hidden_dim: decoder width (preset or 256).
        num_queries: object queries kept from the encoder proposals (preset or 300).
        num_decoder_layers: decoder depth (preset or 6).
        num_heads: attention heads (preset or 8).
        num_points: sampling points per head and level (preset or 4).
        ffn_dim: decoder feed-forward width (preset or 1024).
        dropout: decoder dropout (0).
        eval_idx: decoder layer used at inference (-1: the last); may be changed after
            training to run fewer layers.
        num_denoising: denoising queries in training (100; 0 turns denoising off).
        label_noise_ratio: share of denoising labels flipped (0.5).
        box_noise_scale: scale of the denoising box noise (1.0).
        aifi: one AIFI layer on the coarsest level.
        aifi_heads: its attention heads (8).
        aifi_ffn_dim: its feed-forward width (1024).
        class_weight: varifocal classification loss weight (1).
        bbox_weight: L1 box loss weight (5).
        giou_weight: GIoU loss weight (2).
    """

    loss_prefix = "det/"
    evaluators = ("coco_bbox",)
    predicts_boxes = True
    #: The model passes the batch's ``targets`` to :meth:`forward` in training (denoising queries).
    wants_targets = True

    def __init__(
        self,
        feature_dims: Mapping[str, int],
        feature_strides: Mapping[str, int],
        *,
        num_classes: int,
        in_features: Sequence[str] = ("p3", "p4", "p5"),
        preset: str | None = None,
        aifi: bool = True,
        aifi_heads: int = 8,
        aifi_ffn_dim: int = 1024,
        class_weight: float = 1.0,
        bbox_weight: float = 5.0,
        giou_weight: float = 2.0,
        **decoder_sizes: Any,
    ) -> None:
        super().__init__()
        missing = [level for level in in_features if level not in feature_dims]
        if missing:
            raise ValueError(f"rtdetr_head reads {list(in_features)} but the neck lacks {missing} ({sorted(feature_dims)})")
        if preset is not None and preset not in RTDETR_PRESETS:
            raise ValueError(f"rtdetr_head.preset: unknown '{preset}'; known: {', '.join(RTDETR_PRESETS)}")
        self.num_classes = num_classes
        self.in_features = tuple(in_features)
        self.strides = [int(feature_strides[level]) for level in self.in_features]
        channels = [int(feature_dims[level]) for level in self.in_features]
        settings = {key: value for key, value in (RTDETR_PRESETS[preset] if preset else {}).items() if key != "in_channels"}
        settings.update(decoder_sizes)
        self.aifi = AIFI(channels[-1], aifi_heads, aifi_ffn_dim) if aifi else None
        self.decoder = RTDETRDecoder(channels, num_classes, **settings)
        self.criterion = RTDETRLoss(
            num_classes, class_weight=class_weight, bbox_weight=bbox_weight, giou_weight=giou_weight
        )

    @classmethod
    def small_config(cls) -> dict[str, Any]:
        """A small build for tests."""
        return {
            "hidden_dim": 32, "num_queries": 30, "num_decoder_layers": 2, "num_heads": 4, "num_points": 2,
            "ffn_dim": 64, "num_denoising": 10, "aifi_heads": 4, "aifi_ffn_dim": 64,
        }

    # ---------------------------------------------------------------- forward
    def forward(self, features: Mapping[str, torch.Tensor], **inputs: Any) -> dict[str, Any]:
        """The decoder's outputs (see ``RTDETRDecoder.forward``), batch first (``layer_boxes [B,
        L, D + K, 4]``, ``layer_logits [B, L, D + K, C]``), plus ``input_size`` ``(H, W)``.

        Args:
            features: the neck's levels.
            **inputs: ``targets`` (the batch's, training only) make the denoising queries.
        """
        levels = [features[level] for level in self.in_features]
        input_size = (levels[0].shape[-2] * self.strides[0], levels[0].shape[-1] * self.strides[0])
        if self.aifi is not None:
            levels[-1] = self.aifi(levels[-1])
        targets = inputs.get("targets")
        decoder_targets = _normalised_targets(targets, input_size) if self.training and targets is not None else None
        outputs = self.decoder(levels, decoder_targets)
        # NOTE: batch first, like every head output (the decoder and its loss use [L, B, ...]).
        outputs["layer_boxes"] = outputs["layer_boxes"].transpose(0, 1)
        outputs["layer_logits"] = outputs["layer_logits"].transpose(0, 1)
        outputs["input_size"] = input_size
        return outputs

    # ------------------------------------------------------------------ loss
    def loss(self, outputs: Mapping[str, Any], targets: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Hungarian-matched varifocal + L1 + GIoU on every layer, the proposals and the denoising queries."""
        with torch.autocast(device_type=outputs["layer_boxes"].device.type, enabled=False):
            predictions = (
                outputs["layer_boxes"].transpose(0, 1).float(),
                outputs["layer_logits"].transpose(0, 1).float(),
                outputs["encoder_boxes"].float(),
                outputs["encoder_logits"].float(),
            )
            batch_size = predictions[0].shape[1]
            labelled = has_labels_mask(targets, batch_size, predictions[0].device)
            return self.criterion(
                predictions,
                _normalised_targets(targets, outputs["input_size"]),
                outputs.get("dn_meta"),
                labelled=labelled,
            )

    # --------------------------------------------------------------- predict
    def decode(self, outputs: Mapping[str, Any], max_det: int = 300) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``max_det`` best (query, class) pairs of each image, before the score threshold
        (what an exported graph gives).

        Returns:
            ``boxes [B, K, 4]`` xyxy input pixels (clipped), ``scores [B, K]`` (decreasing)
            and ``labels [B, K]`` int64, ``K = min(max_det, queries * classes)``.
        """
        predictions = outputs["predictions"].float()
        height, width = outputs["input_size"]
        centres = predictions[..., :4] * predictions.new_tensor([width, height, width, height])
        x1, y1 = (centres[..., :2] - centres[..., 2:] / 2).unbind(-1)
        x2, y2 = (centres[..., :2] + centres[..., 2:] / 2).unbind(-1)
        boxes = torch.stack((x1.clamp(0, width), y1.clamp(0, height), x2.clamp(0, width), y2.clamp(0, height)), -1)
        scores = predictions[..., 4:].flatten(1)
        best, index = scores.topk(min(max_det, scores.shape[1]), dim=1)
        query = torch.div(index, self.num_classes, rounding_mode="floor")
        chosen = boxes.gather(1, query[..., None].expand(-1, -1, 4))
        return chosen, best, (index % self.num_classes).long()

    @torch.no_grad()
    def predict(
        self,
        outputs: Mapping[str, Any],
        batch: Mapping[str, Any] | None = None,
        *,
        conf_threshold: float = 0.001,
        max_det: int = 300,
    ) -> list[dict[str, torch.Tensor]]:
        """The ``max_det`` best (query, class) pairs per image above ``conf_threshold``, no NMS.

        Returns:
            One dict per image with ``boxes [K, 4]`` xyxy (input pixels, clipped; original
            pixels when the batch has frames), ``scores [K]`` and ``labels [K]`` int64,
            sorted by decreasing score.
        """
        return select_top(*self.decode(outputs, max_det), batch, conf_threshold=conf_threshold)


def select_top(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    batch: Mapping[str, Any] | None = None,
    *,
    conf_threshold: float = 0.001,
    max_det: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Per image, the decoded top pairs (:meth:`RTDETRHead.decode`) above ``conf_threshold``.

    Args:
        boxes: ``[B, K, 4]`` xyxy input pixels; ``scores [B, K]`` decreasing; ``labels [B, K]``.
        batch: the collated batch; with ``frames``, boxes in original pixels.
        conf_threshold: score floor.
        max_det: most kept per image (None: all K).

    Returns:
        One dict per image: ``boxes [k, 4]``, ``scores [k]``, ``labels [k]`` int64.
    """
    frames = original_frames(batch, boxes.shape[0])
    results = []
    for image in range(boxes.shape[0]):
        keep = scores[image][:max_det] > conf_threshold
        result = {
            "boxes": boxes[image][:max_det][keep],
            "scores": scores[image][:max_det][keep],
            "labels": labels[image][:max_det][keep].long(),
        }
        if frames is not None:
            result["boxes"] = boxes_to_original(result["boxes"], frames[image])
        results.append(result)
    return results


def _normalised_targets(targets: Mapping[str, Any], input_size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """vfmkd's targets (``boxes`` xyxy input pixels) as the decoder and loss take them: ``cls``,
    ``bboxes`` normalised ``(cx, cy, w, h)``, ``batch_idx``; objects of unlabelled images left out."""
    boxes = torch.as_tensor(targets["boxes"]).float().reshape(-1, 4)
    batch_idx = torch.as_tensor(targets["batch_idx"]).reshape(-1).long().to(boxes.device)
    classes = torch.as_tensor(targets["cls"]).reshape(-1).long().to(boxes.device)
    flags = targets.get("has_labels")
    if flags is not None:
        labelled = torch.as_tensor(flags).reshape(-1).bool().to(boxes.device)
        keep = labelled[batch_idx] if len(batch_idx) else torch.zeros(0, dtype=torch.bool, device=boxes.device)
        boxes, batch_idx, classes = boxes[keep], batch_idx[keep], classes[keep]
    height, width = input_size
    scale = boxes.new_tensor([width, height, width, height])
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    size = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)
    return {"cls": classes, "bboxes": torch.cat([centre, size], dim=1) / scale, "batch_idx": batch_idx}

