"""Multi-scale deformable attention in pure PyTorch (bilinear sampling with ``grid_sample``).

Zhu et al., "Deformable DETR: Deformable Transformers for End-to-End Object Detection",
ICLR 2021, arXiv:2010.04159. Each query looks at a few learnt points around its reference
box on every feature level and mixes them with learnt softmax weights. No custom CUDA
kernel: the same code runs on CPU and GPU and exports (ONNX, ``torch.export``).

Layout shared with Deformable DETR, RT-DETR and Ultralytics (their checkpoints load as they
are): the offset projection's outputs are ordered ``(head, level, point, xy)`` and the
attention-weight projection's ``(head, level, point)``; the softmax runs over a head's
``levels * points`` weights together.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MultiScaleDeformableAttention", "sample_multi_scale"]


def sample_multi_scale(
    value: torch.Tensor,
    level_shapes: Sequence[tuple[int, int]],
    locations: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of bilinear samples of every head's values at the given locations.

    Args:
        value: ``[B, N, heads, head_dim]``, the levels' pixels flattened row by row and
            concatenated in level order (``N = sum(H_l * W_l)``).
        level_shapes: ``(H_l, W_l)`` of each level.
        locations: ``[B, Q, heads, levels * points, 2]`` sampling points as ``(x, y)`` in
            ``[0, 1]`` of each level (``0`` the left / top edge); level-major on axis 3.
            Points outside the map read zeros.
        weights: ``[B, Q, heads, levels * points]``, the weight of each sample.

    Returns:
        ``[B, Q, heads * head_dim]``.
    """
    batch, _, heads, head_dim = value.shape
    queries, total_points = locations.shape[1], locations.shape[3]
    points = total_points // len(level_shapes)
    # One grid_sample call per level over (batch * heads) maps of head_dim channels.
    level_values = value.split([height * width for height, width in level_shapes], dim=1)
    grids = (locations * 2 - 1).transpose(1, 2).reshape(batch * heads, queries, total_points, 2)
    weights = weights.transpose(1, 2).reshape(batch * heads, 1, queries, total_points)
    output = value.new_zeros(batch * heads, head_dim, queries)
    for level, (height, width) in enumerate(level_shapes):
        maps = level_values[level].permute(0, 2, 3, 1).reshape(batch * heads, head_dim, height, width)
        span = slice(level * points, (level + 1) * points)
        samples = F.grid_sample(maps, grids[:, :, span], mode="bilinear", padding_mode="zeros", align_corners=False)
        output = output + (samples * weights[..., span]).sum(-1)
    return output.view(batch, heads * head_dim, queries).transpose(1, 2)


class MultiScaleDeformableAttention(nn.Module):
    """Cross-attention from queries to multi-level feature maps around reference boxes or points.

    Args:
        hidden_dim: Width of queries and values (divisible by ``num_heads``).
        num_heads: Attention heads.
        num_levels: Feature levels attended to.
        num_points: Sampling points per head and level.
    """

    def __init__(self, hidden_dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4) -> None:
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim {hidden_dim} is not divisible by num_heads {num_heads}")
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(hidden_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(hidden_dim, num_heads * num_levels * num_points)
        self.value_projection = nn.Linear(hidden_dim, hidden_dim)
        self.output_projection = nn.Linear(hidden_dim, hidden_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's start: head ``h`` samples along direction ``2 pi h / heads``,
        point ``p`` at ``p + 1`` steps (a ring of rays); uniform weights over the samples."""
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2 * math.pi / self.num_heads)
        directions = torch.stack((angles.cos(), angles.sin()), dim=-1)
        # Scale so the larger of |x|, |y| is 1: the first point lands on a neighbouring cell.
        directions = directions / directions.abs().amax(dim=-1, keepdim=True)
        steps = torch.arange(1, self.num_points + 1, dtype=torch.float32)
        offsets = directions[:, None, None, :] * steps[None, None, :, None]
        offsets = offsets.expand(self.num_heads, self.num_levels, self.num_points, 2)
        with torch.no_grad():
            nn.init.zeros_(self.sampling_offsets.weight)
            self.sampling_offsets.bias.copy_(offsets.reshape(-1))
            nn.init.zeros_(self.attention_weights.weight)
            nn.init.zeros_(self.attention_weights.bias)
            for projection in (self.value_projection, self.output_projection):
                nn.init.xavier_uniform_(projection.weight)
                nn.init.zeros_(projection.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference: torch.Tensor,
        value: torch.Tensor,
        level_shapes: Sequence[tuple[int, int]],
        value_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from each query to points around its reference.

        Args:
            query: ``[B, Q, hidden_dim]`` (position embedding already added).
            reference: ``[B, Q, 4]`` boxes ``(cx, cy, w, h)`` in ``[0, 1]``: offsets are in
                units of ``w / (2 * num_points)`` and ``h / (2 * num_points)``; or ``[B, Q, 2]``
                points ``(x, y)``: offsets are in pixels of each level.
            value: ``[B, N, hidden_dim]`` flattened levels (see :func:`sample_multi_scale`).
            level_shapes: ``(H_l, W_l)`` of each level; ``sum(H_l * W_l) == N``.
            value_padding_mask: Optional ``[B, N]``, True where a value is padding (read as 0).

        Returns:
            ``[B, Q, hidden_dim]``.
        """
        batch, queries, _ = query.shape
        if sum(height * width for height, width in level_shapes) != value.shape[1]:
            raise ValueError(f"level shapes {list(level_shapes)} do not cover the {value.shape[1]} values")
        total_points = self.num_levels * self.num_points
        value = self.value_projection(value)
        if value_padding_mask is not None:
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        value = value.view(batch, value.shape[1], self.num_heads, self.hidden_dim // self.num_heads)
        offsets = self.sampling_offsets(query).view(batch, queries, self.num_heads, total_points, 2)
        weights = self.attention_weights(query).view(batch, queries, self.num_heads, total_points).softmax(-1)
        if reference.shape[-1] == 4:
            centre, size = reference[:, :, None, None, :2], reference[:, :, None, None, 2:]
            locations = centre + offsets / self.num_points * size * 0.5
        elif reference.shape[-1] == 2:
            level_sizes = torch.as_tensor(level_shapes, dtype=query.dtype, device=query.device).flip(-1)
            level_sizes = level_sizes.repeat_interleave(self.num_points, dim=0)  # [levels * points, 2] as (W, H)
            locations = reference[:, :, None, None, :] + offsets / level_sizes
        else:
            raise ValueError(f"reference must end in 4 (boxes) or 2 (points), got shape {tuple(reference.shape)}")
        return self.output_projection(sample_multi_scale(value, level_shapes, locations, weights))
