"""RT-DETR's decoder: encoder proposals, top-K query selection, deformable decoder layers with
iterative box refinement, and contrastive denoising queries in training.

Zhao et al., "DETRs Beat YOLOs on Real-time Object Detection", CVPR 2024, arXiv:2304.08069;
official code github.com/lyuwenyu/RT-DETR (Apache-2.0). The computation follows Ultralytics'
``RTDETRDecoder`` step for step (``tests/models/test_rtdetr_decoder.py`` compares the two,
denoising draws included), so its weights load through :func:`convert_ultralytics_rtdetr_decoder`.

Steps of :meth:`RTDETRDecoder.forward`:

1. Each level ``[B, C_l, H_l, W_l]`` goes through a 1x1 convolution and BatchNorm to
   ``hidden_dim``; the levels are flattened and concatenated into ``memory [B, N, hidden_dim]``.
2. Every pixel is an anchor box (its centre, side ``0.05 * 2**level``); anchors within ``eps`` of
   the image border are invalid (memory zeroed, box logit ``inf``).
3. Encoder proposals: Linear + LayerNorm of the memory, a class head and a box head (a delta to
   the anchor's logit). The ``num_queries`` proposals with the highest class logit become the
   decoder's reference boxes; their features are the query content (or learnt embeddings).
4. In training with targets, denoising queries (noised ground-truth boxes and labels, positive
   and negative per group) are put in front of them, with an attention mask that keeps groups
   and matching queries apart.
5. Each decoder layer: self-attention, multi-scale deformable cross-attention around the
   reference boxes, FFN; then its box head refines the boxes (``sigmoid(delta + logit(ref))``),
   which are detached before they become the next layer's reference (training).
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vfmkd.models.heads.rtdetr_denoising import DenoisingQueries, contrastive_denoising_queries
from vfmkd.ops.deformable_attention import MultiScaleDeformableAttention

__all__ = [
    "RTDETR_PRESETS",
    "MLP",
    "RTDETRDecoder",
    "RTDETRDecoderLayer",
    "ULTRALYTICS_RTDETR_DECODER_KEYS",
    "convert_ultralytics_rtdetr_decoder",
    "inverse_sigmoid",
    "proposal_anchors",
]


def _preset(layers: int, channels: int = 256, eval_idx: int = -1) -> Mapping[str, Any]:
    return MappingProxyType(
        {
            "in_channels": (channels,) * 3,
            "hidden_dim": 256,
            "num_queries": 300,
            "num_heads": 8,
            "num_points": 4,
            "num_decoder_layers": layers,
            "ffn_dim": 1024,
            "eval_idx": eval_idx,
        }
    )


RTDETR_PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "r18": _preset(3),  # official rtdetr_r18vd_6x_coco.yml
        "r34": _preset(4),  # rtdetr_r34vd_6x_coco.yml
        "r50": _preset(6),  # rtdetr_r50vd_6x_coco.yml
        "r50m": _preset(6, eval_idx=2),  # rtdetr_r50vd_m_6x_coco.yml: trained with 6 layers, runs 3
        "r101": _preset(6, channels=384),  # rtdetr_r101vd_6x_coco.yml
        "l": _preset(6),  # Ultralytics rtdetr-l.yaml
        "x": _preset(6, channels=384),  # Ultralytics rtdetr-x.yaml
    }
)
"""Decoder settings of the published RT-DETR models (keyword arguments of :class:`RTDETRDecoder`)."""

_CLASS_PRIOR = 0.01  # initial probability of every class (focal-loss prior)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``log(x / (1 - x))`` with ``x`` clamped to ``[0, 1]`` and both terms to at least ``eps``."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (none after the last)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        widths = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in_dim]`` -> ``[..., out_dim]``."""
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


def proposal_anchors(
    level_shapes: Sequence[tuple[int, int]], like: torch.Tensor, base_size: float = 0.05, eps: float = 1e-2
) -> tuple[torch.Tensor, torch.Tensor]:
    """One anchor box per pixel of each level, as box logits.

    Args:
        level_shapes: ``(H_l, W_l)`` of each level, finest first.
        like: Tensor whose dtype and device the anchors take.
        base_size: Side of level 0's anchors (normalised); level ``l`` uses ``base_size * 2**l``.
        eps: Anchors with a coordinate within ``eps`` of 0 or 1 are invalid.

    Returns:
        ``anchors [1, N, 4]``: ``logit(cx, cy, w, h)``, ``inf`` where invalid, and
        ``valid [1, N, 1]`` (bool), with ``N = sum(H_l * W_l)`` in the memory's order.
    """
    boxes = []
    for level, (height, width) in enumerate(level_shapes):
        ys = (torch.arange(height).type_as(like) + 0.5) / height
        xs = (torch.arange(width).type_as(like) + 0.5) / width
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        centres = torch.stack((grid_x, grid_y), dim=-1).reshape(-1, 2)
        sizes = torch.full_like(centres, base_size * 2.0**level)
        boxes.append(torch.cat((centres, sizes), dim=-1))
    anchors = torch.cat(boxes)[None]
    valid = ((anchors > eps) & (anchors < 1 - eps)).all(-1, keepdim=True)
    anchors = torch.log(anchors / (1 - anchors)).masked_fill(~valid, float("inf"))
    return anchors, valid


class RTDETRDecoderLayer(nn.Module):
    """Self-attention, deformable cross-attention and a ReLU FFN, each with residual and post-LayerNorm."""

    def __init__(
        self, hidden_dim: int, num_heads: int, ffn_dim: int, dropout: float, num_levels: int, num_points: int
    ) -> None:
        super().__init__()
        self.self_attention = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)
        self.self_attention_dropout = nn.Dropout(dropout)
        self.self_attention_norm = nn.LayerNorm(hidden_dim)
        self.cross_attention = MultiScaleDeformableAttention(hidden_dim, num_heads, num_levels, num_points)
        self.cross_attention_dropout = nn.Dropout(dropout)
        self.cross_attention_norm = nn.LayerNorm(hidden_dim)
        self.ffn_expand = nn.Linear(hidden_dim, ffn_dim)
        self.ffn_hidden_dropout = nn.Dropout(dropout)
        self.ffn_reduce = nn.Linear(ffn_dim, hidden_dim)
        self.ffn_dropout = nn.Dropout(dropout)
        self.ffn_norm = nn.LayerNorm(hidden_dim)

    def forward(
        self,
        queries: torch.Tensor,
        reference: torch.Tensor,
        memory: torch.Tensor,
        level_shapes: Sequence[tuple[int, int]],
        position: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Update the queries.

        Args:
            queries: ``[B, Q, hidden_dim]``.
            reference: ``[B, Q, 4]`` boxes ``(cx, cy, w, h)`` in ``[0, 1]``.
            memory: ``[B, N, hidden_dim]`` flattened levels.
            level_shapes: ``(H_l, W_l)`` of each level.
            position: ``[B, Q, hidden_dim]`` position embedding of the reference boxes.
            attention_mask: Optional ``[Q, Q]`` bool, True where query ``i`` may not see ``j``.

        Returns:
            ``[B, Q, hidden_dim]``.
        """
        keyed = queries + position
        attended = self.self_attention(keyed, keyed, queries, attn_mask=attention_mask, need_weights=False)[0]
        queries = self.self_attention_norm(queries + self.self_attention_dropout(attended))
        attended = self.cross_attention(queries + position, reference, memory, level_shapes)
        queries = self.cross_attention_norm(queries + self.cross_attention_dropout(attended))
        hidden = self.ffn_hidden_dropout(F.relu(self.ffn_expand(queries)))
        return self.ffn_norm(queries + self.ffn_dropout(self.ffn_reduce(hidden)))


class RTDETRDecoder(nn.Module):
    """RT-DETR's query selection and decoder over a neck's levels (e.g. P3, P4, P5).

    Args:
        in_channels: Channels of each input level, finest first.
        num_classes: Number of classes C.
        hidden_dim: Width of the queries and the projected memory.
        num_queries: Matching queries K (top-K encoder proposals).
        num_heads: Attention heads (self- and cross-attention).
        num_points: Deformable sampling points per head and level.
        num_decoder_layers: Decoder layers L.
        ffn_dim: Hidden width of each layer's FFN.
        dropout: Dropout in the decoder layers.
        eval_idx: Decoder layer whose boxes are the predictions (negative: from the end). It
            can be changed after training (``decoder.eval_idx = 2``): eval then stops there.
        num_denoising: Denoising query budget (0: no denoising).
        label_noise_ratio, box_noise_scale: See :func:`contrastive_denoising_queries`.
        learnt_init_query: Learnt query content instead of the selected proposals' features.

    Example::

        decoder = RTDETRDecoder.from_preset("r18", num_classes=80)
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int = 80,
        *,
        hidden_dim: int = 256,
        num_queries: int = 300,
        num_heads: int = 8,
        num_points: int = 4,
        num_decoder_layers: int = 6,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        eval_idx: int = -1,
        num_denoising: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
        learnt_init_query: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.num_queries = num_queries
        self.num_denoising = num_denoising
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.input_projections = nn.ModuleList(
            nn.Sequential(
                OrderedDict(conv=nn.Conv2d(channels, hidden_dim, 1, bias=False), norm=nn.BatchNorm2d(hidden_dim))
            )
            for channels in in_channels
        )
        self.encoder_output = nn.Sequential(
            OrderedDict(linear=nn.Linear(hidden_dim, hidden_dim), norm=nn.LayerNorm(hidden_dim))
        )
        self.encoder_class_head = nn.Linear(hidden_dim, num_classes)
        self.encoder_box_head = MLP(hidden_dim, hidden_dim, 4, num_layers=3)
        self.denoising_class_embedding = nn.Embedding(num_classes, hidden_dim)
        self.query_content = nn.Embedding(num_queries, hidden_dim) if learnt_init_query else None
        self.query_position_head = MLP(4, 2 * hidden_dim, hidden_dim, num_layers=2)
        self.layers = nn.ModuleList(
            RTDETRDecoderLayer(hidden_dim, num_heads, ffn_dim, dropout, len(in_channels), num_points)
            for _ in range(num_decoder_layers)
        )
        self.class_heads = nn.ModuleList(nn.Linear(hidden_dim, num_classes) for _ in range(num_decoder_layers))
        self.box_heads = nn.ModuleList(MLP(hidden_dim, hidden_dim, 4, num_layers=3) for _ in range(num_decoder_layers))
        self.eval_idx = eval_idx
        self.reset_parameters()

    @classmethod
    def from_preset(cls, name: str, num_classes: int = 80, **overrides: Any) -> RTDETRDecoder:
        """A decoder with the settings of :data:`RTDETR_PRESETS` ``[name]``, updated by ``overrides``."""
        if name not in RTDETR_PRESETS:
            raise KeyError(f"unknown RT-DETR preset '{name}'; known: {', '.join(RTDETR_PRESETS)}")
        return cls(num_classes=num_classes, **{**RTDETR_PRESETS[name], **overrides})

    @property
    def eval_idx(self) -> int:
        """Index (from 0) of the decoder layer that gives the predictions."""
        return self._eval_idx

    @eval_idx.setter
    def eval_idx(self, index: int) -> None:
        depth = len(self.layers)
        if not -depth <= index < depth:
            raise ValueError(f"eval_idx {index} is outside the {depth} decoder layers (use {-depth}..{depth - 1})")
        self._eval_idx = index % depth

    def reset_parameters(self) -> None:
        """RT-DETR's start: class logits at a 1% prior, zero box deltas, Xavier projections.

        NOTE: the prior is the official code's; Ultralytics scales its logit by
        ``num_classes / 80`` (a 49% prior for one class).
        """
        prior = math.log(_CLASS_PRIOR / (1 - _CLASS_PRIOR))
        class_heads = [self.encoder_class_head, *self.class_heads]
        for class_head, box_head in zip(class_heads, [self.encoder_box_head, *self.box_heads]):
            nn.init.constant_(class_head.bias, prior)
            nn.init.zeros_(box_head.layers[-1].weight)
            nn.init.zeros_(box_head.layers[-1].bias)
        nn.init.xavier_uniform_(self.encoder_output.linear.weight)
        if self.query_content is not None:
            nn.init.xavier_uniform_(self.query_content.weight)
        for layer in self.query_position_head.layers:
            nn.init.xavier_uniform_(layer.weight)
        for projection in self.input_projections:
            nn.init.xavier_uniform_(projection.conv.weight)

    def forward(
        self, features: Sequence[torch.Tensor], targets: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, Any]:
        """Detect objects from the neck's levels.

        Args:
            features: ``[B, C_l, H_l, W_l]`` per level, finest first.
            targets: Ground truth for the denoising queries (training only, ignored in eval):
                ``cls [N]``, ``bboxes [N, 4]`` normalised ``(cx, cy, w, h)``, ``batch_idx [N]``.
                Without it, or when the batch has no object, training runs without denoising.

        Returns:
            A dict, the same keys in both modes (``K = min(num_queries, sum(H_l * W_l))``,
            ``D`` denoising queries, 0 without denoising):

            - ``layer_boxes [L, B, D + K, 4]``: boxes ``(cx, cy, w, h)`` in ``[0, 1]`` of every
              decoder layer in training; in eval ``L = 1``, the ``eval_idx`` layer only (the
              later layers are not run). Denoising queries come first.
            - ``layer_logits [L, B, D + K, C]``: class logits, likewise.
            - ``encoder_boxes [B, K, 4]``, ``encoder_logits [B, K, C]``: the selected proposals.
            - ``dn_meta``: None without denoising, else ``dn_pos_idx`` (per image, the positive
              denoising queries' indices among the D, group after group, ``[G * n_i]`` on CPU),
              ``dn_gt_idx`` (per image, the ``targets`` rows they reconstruct, ``[n_i]`` on CPU),
              ``dn_num_group`` (G) and ``dn_num_split`` (``[D, K]``).
            - ``predictions [B, K, 4 + C]``: the ``eval_idx`` layer's boxes and class
              probabilities (sigmoid) of the matching queries: Ultralytics' inference output
              before its top-k.
        """
        memory, level_shapes = self._flatten_levels(features)
        denoising = None
        if self.training and targets is not None:
            denoising = contrastive_denoising_queries(
                targets,
                memory.shape[0],
                self.denoising_class_embedding.weight,
                min(self.num_queries, memory.shape[1]),
                self.num_denoising,
                self.label_noise_ratio,
                self.box_noise_scale,
            )
        queries, reference, encoder_boxes, encoder_logits = self._select_queries(memory, level_shapes, denoising)
        mask = None if denoising is None else denoising.attention_mask
        layer_boxes, layer_logits = self._decode(queries, reference, memory, level_shapes, mask)
        if self.training and denoising is None:
            # Keep the denoising embedding in the graph so DDP finds a gradient for it.
            layer_boxes = layer_boxes + 0 * self.denoising_class_embedding.weight.sum()
        num_dn = 0 if denoising is None else denoising.meta["dn_num_split"][0]
        shown = self.eval_idx if self.training else 0
        predictions = torch.cat((layer_boxes[shown, :, num_dn:], layer_logits[shown, :, num_dn:].sigmoid()), dim=-1)
        return {
            "layer_boxes": layer_boxes,
            "layer_logits": layer_logits,
            "encoder_boxes": encoder_boxes,
            "encoder_logits": encoder_logits,
            "dn_meta": None if denoising is None else denoising.meta,
            "predictions": predictions,
        }

    def _flatten_levels(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """``memory [B, N, hidden_dim]`` (projected levels, row-major, finest first) and ``(H_l, W_l)``."""
        if len(features) != len(self.input_projections):
            raise ValueError(f"RTDETRDecoder takes {len(self.input_projections)} levels, got {len(features)}")
        projected = [projection(level) for projection, level in zip(self.input_projections, features)]
        level_shapes = [(level.shape[2], level.shape[3]) for level in projected]
        memory = torch.cat([level.flatten(2).transpose(1, 2) for level in projected], dim=1)
        return memory, level_shapes

    def _select_queries(
        self, memory: torch.Tensor, level_shapes: list[tuple[int, int]], denoising: DenoisingQueries | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoder input from the top-K encoder proposals (after the denoising queries, if any).

        Returns:
            ``queries [B, D + K, hidden_dim]``, reference box logits ``[B, D + K, 4]``,
            ``encoder_boxes [B, K, 4]`` (sigmoid) and ``encoder_logits [B, K, C]``.
        """
        batch = memory.shape[0]
        anchors, valid = proposal_anchors(level_shapes, memory)
        proposals = self.encoder_output(valid * memory)
        proposal_logits = self.encoder_class_head(proposals)
        count = min(self.num_queries, proposals.shape[1])
        chosen = proposal_logits.max(-1).values.topk(count, dim=1).indices  # [B, K]
        chosen_features = proposals.gather(1, chosen[..., None].expand(-1, -1, proposals.shape[-1]))
        reference = self.encoder_box_head(chosen_features) + anchors[0, chosen]
        encoder_boxes = reference.sigmoid()
        encoder_logits = proposal_logits.gather(1, chosen[..., None].expand(-1, -1, proposal_logits.shape[-1]))
        if self.query_content is not None:
            queries = self.query_content.weight[:count].unsqueeze(0).expand(batch, -1, -1)
        else:
            queries = chosen_features
        if self.training:
            # NOTE: the decoder's losses do not flow back into the selected proposals; the
            # encoder and its heads learn from encoder_boxes / encoder_logits only.
            reference = reference.detach()
            queries = queries if self.query_content is not None else queries.detach()
        if denoising is not None:
            reference = torch.cat((denoising.reference, reference), dim=1)
            queries = torch.cat((denoising.embeddings, queries), dim=1)
        return queries, reference, encoder_boxes, encoder_logits

    def _decode(
        self,
        queries: torch.Tensor,
        reference_logits: torch.Tensor,
        memory: torch.Tensor,
        level_shapes: list[tuple[int, int]],
        attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the layers, refining the boxes; ``[L, B, Q, 4]`` boxes and ``[L, B, Q, C]`` logits."""
        reference = reference_logits.sigmoid()
        previous = None  # the previous layer's refined boxes, gradient kept
        all_boxes, all_logits = [], []
        for index, (layer, box_head, class_head) in enumerate(zip(self.layers, self.box_heads, self.class_heads)):
            position = self.query_position_head(reference)
            queries = layer(queries, reference, memory, level_shapes, position, attention_mask)
            delta = box_head(queries)
            refined = torch.sigmoid(delta + inverse_sigmoid(reference))
            if self.training:
                # NOTE: DINO's "look forward twice": the box a layer outputs is its delta on the
                # previous layer's undetached box, so that box's head also learns from this layer.
                all_boxes.append(refined if previous is None else torch.sigmoid(delta + inverse_sigmoid(previous)))
                all_logits.append(class_head(queries))
            elif index == self.eval_idx:
                all_boxes.append(refined)
                all_logits.append(class_head(queries))
                break
            previous = refined
            reference = refined.detach() if self.training else refined
        return torch.stack(all_boxes), torch.stack(all_logits)


# Ultralytics RTDETRDecoder name -> vfmkd RTDETRDecoder name. "{level}" stands for each input
# level, "{layer}" for each decoder layer, "{i}" for each Linear of an MLP.
_WEIGHT_BIAS = ("weight", "bias")
_BATCH_NORM = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_DECODER_LAYER = (
    ("self_attn.", "self_attention.", ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")),
    ("norm1.", "self_attention_norm.", _WEIGHT_BIAS),
    ("cross_attn.sampling_offsets.", "cross_attention.sampling_offsets.", _WEIGHT_BIAS),
    ("cross_attn.attention_weights.", "cross_attention.attention_weights.", _WEIGHT_BIAS),
    ("cross_attn.value_proj.", "cross_attention.value_projection.", _WEIGHT_BIAS),
    ("cross_attn.output_proj.", "cross_attention.output_projection.", _WEIGHT_BIAS),
    ("norm2.", "cross_attention_norm.", _WEIGHT_BIAS),
    ("linear1.", "ffn_expand.", _WEIGHT_BIAS),
    ("linear2.", "ffn_reduce.", _WEIGHT_BIAS),
    ("norm3.", "ffn_norm.", _WEIGHT_BIAS),
)
_KEY_GROUPS = (
    ("input_proj.{level}.0.", "input_projections.{level}.conv.", ("weight",)),
    ("input_proj.{level}.1.", "input_projections.{level}.norm.", _BATCH_NORM),
    ("enc_output.0.", "encoder_output.linear.", _WEIGHT_BIAS),
    ("enc_output.1.", "encoder_output.norm.", _WEIGHT_BIAS),
    ("enc_score_head.", "encoder_class_head.", _WEIGHT_BIAS),
    ("enc_bbox_head.layers.{i}.", "encoder_box_head.layers.{i}.", _WEIGHT_BIAS),
    ("denoising_class_embed.", "denoising_class_embedding.", ("weight",)),
    ("tgt_embed.", "query_content.", ("weight",)),
    ("query_pos_head.layers.{i}.", "query_position_head.layers.{i}.", _WEIGHT_BIAS),
    ("dec_score_head.{layer}.", "class_heads.{layer}.", _WEIGHT_BIAS),
    ("dec_bbox_head.{layer}.layers.{i}.", "box_heads.{layer}.layers.{i}.", _WEIGHT_BIAS),
    *(("decoder.layers.{layer}." + theirs, "layers.{layer}." + ours, names) for theirs, ours, names in _DECODER_LAYER),
)
ULTRALYTICS_RTDETR_DECODER_KEYS: tuple[tuple[str, str], ...] = tuple(
    (theirs + name, ours + name) for theirs, ours, names in _KEY_GROUPS for name in names
)
"""(Ultralytics key pattern, vfmkd key pattern) of every RTDETRDecoder tensor."""
_MLP_DEPTH = {"enc_bbox_head": 3, "query_pos_head": 2, "dec_bbox_head": 3}
_LEVEL_KEY = re.compile(r"^input_proj\.(\d+)\.")
_LAYER_KEY = re.compile(r"^(?:decoder\.layers|dec_score_head|dec_bbox_head)\.(\d+)\.")


def convert_ultralytics_rtdetr_decoder(
    state_dict: Mapping[str, torch.Tensor], prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Rename an Ultralytics ``RTDETRDecoder`` state dict to :class:`RTDETRDecoder`'s names.

    The tensors are used as they are. Renamed prefixes (``N`` a level or layer index):

    ==========================================  ==========================================
    Ultralytics                                 vfmkd
    ==========================================  ==========================================
    ``input_proj.N.0`` / ``input_proj.N.1``     ``input_projections.N.conv`` / ``.norm``
    ``enc_output.0`` / ``enc_output.1``         ``encoder_output.linear`` / ``.norm``
    ``enc_score_head``, ``enc_bbox_head``       ``encoder_class_head``, ``encoder_box_head``
    ``denoising_class_embed``                   ``denoising_class_embedding``
    ``tgt_embed`` (``learnt_init_query``)       ``query_content``
    ``query_pos_head``                          ``query_position_head``
    ``dec_score_head.N``, ``dec_bbox_head.N``   ``class_heads.N``, ``box_heads.N``
    ``decoder.layers.N.self_attn``, ``norm1``   ``layers.N.self_attention``, ``self_attention_norm``
    ``decoder.layers.N.cross_attn``, ``norm2``  ``layers.N.cross_attention``, ``cross_attention_norm``
    ``...cross_attn.value_proj/output_proj``    ``...cross_attention.value_projection/output_projection``
    ``decoder.layers.N.linear1/linear2/norm3``  ``layers.N.ffn_expand/ffn_reduce/ffn_norm``
    ==========================================  ==========================================

    MLP sub-keys (``layers.i``) keep their names; :data:`ULTRALYTICS_RTDETR_DECODER_KEYS`
    lists every key.

    Args:
        state_dict: ``RTDETRDecoder.state_dict()`` from Ultralytics, or a whole model's with
            ``prefix`` set to the decoder's (``"model.28."`` in ``rtdetr-l.yaml``).
        prefix: Only keys that start with it are read (the prefix removed).

    Returns:
        The state dict for ``RTDETRDecoder(...).load_state_dict(..., strict=True)`` built with
        the same sizes.

    Raises:
        ValueError: naming every key without a counterpart and every key missing for the
            levels and decoder layers the state dict has (a truncated or foreign file).
    """
    source = {key[len(prefix) :]: tensor for key, tensor in state_dict.items() if key.startswith(prefix)}
    num_levels = 1 + max((int(m.group(1)) for m in map(_LEVEL_KEY.match, source) if m), default=-1)
    num_layers = 1 + max((int(m.group(1)) for m in map(_LAYER_KEY.match, source) if m), default=-1)
    if not num_levels or not num_layers:
        raise ValueError(
            f"no Ultralytics RTDETRDecoder keys under prefix '{prefix}' "
            "(expected input_proj.N.* and decoder.layers.N.*); "
            f"first keys: {list(source)[:5]}"
        )
    renames = dict(_expand_keys(num_levels, num_layers, learnt_query="tgt_embed.weight" in source))
    unknown = [key for key in source if key not in renames]
    missing = [key for key in renames if key not in source]
    if unknown or missing:
        raise ValueError(
            f"Ultralytics RTDETRDecoder state dict ({num_levels} levels, {num_layers} decoder layers) does not match "
            f"vfmkd's RTDETRDecoder: unknown keys {unknown[:20]}{' ...' if len(unknown) > 20 else ''}, "
            f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}"
        )
    return {renames[key]: tensor for key, tensor in source.items()}


def _expand_keys(num_levels: int, num_layers: int, learnt_query: bool) -> list[tuple[str, str]]:
    pairs = []
    for theirs, ours in ULTRALYTICS_RTDETR_DECODER_KEYS:
        if theirs.startswith("tgt_embed.") and not learnt_query:
            continue
        depth = _MLP_DEPTH[theirs.split(".")[0]] if "{i}" in theirs else 1
        levels = range(num_levels) if "{level}" in theirs else (0,)
        layers = range(num_layers) if "{layer}" in theirs else (0,)
        for level in levels:
            for layer in layers:
                for i in range(depth):
                    names = {"level": level, "layer": layer, "i": i}
                    pairs.append((theirs.format(**names), ours.format(**names)))
    return pairs
