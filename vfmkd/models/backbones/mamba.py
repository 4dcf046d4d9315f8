"""VMamba backbone: visual state-space (VSS) blocks with a four-direction 2D selective scan.

Liu, Tian, Zhao, Yu, Xie, Wang, Ye and Liu, "VMamba: Visual State Space Model", NeurIPS
2024, arXiv:2401.10166; reference code https://github.com/MzeroMiko/VMamba
(``classification/models/vmamba.py``, the original "v0" SS2D). Written here from the paper
and that code's structure:

- a stride-4 patch embedding (4x4 convolution, LayerNorm);
- four stages of VSS blocks (``x + DropPath(SS2D(LayerNorm(x)))``, optionally followed by
  ``x + DropPath(MLP(LayerNorm(x)))`` as in VMamba v2), with 2x2 patch merging (stride 2)
  between stages;
- SS2D: linear in-projection into a branch ``x`` and a gate ``z``; a 3x3 depthwise
  convolution and SiLU on ``x``; the 2D selective scan (cross-scan ``x`` into four
  sequences - row-major, column-major, and both reversed - run one batched selective scan
  over the four directions, each with its own projections and state parameters, map each
  output back to its pixel and sum); LayerNorm; multiply by ``silu(z)``; out-projection.

The selective scan is :func:`vfmkd.ops.selective_scan.selective_scan`: mamba_ssm's CUDA
kernel when installed, a chunked pure-PyTorch scan otherwise.

Sizes (all with VMamba v0's SS2D settings: state size 16, expansion 2, 3x3 depthwise
convolution, no MLP): ``tiny`` and ``small`` are VMamba-T and VMamba-S of the paper's first
version (depths 2-2-9-2 and 2-2-27-2, width 96); ``nano`` (1-1-3-1, width 48) and ``micro``
(2-2-5-2, width 64) are smaller members of the same family for fast students and CPU tests.
Outputs ``p3``, ``p4``, ``p5`` are the stage 2, 3 and 4 outputs (strides 8, 16, 32, widths
2x, 4x and 8x the embedding width), each after its own LayerNorm as in VMamba's detection
backbone.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from types import MappingProxyType
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vfmkd.models.backbones.base import BaseBackbone
from vfmkd.ops.selective_scan import selective_scan
from vfmkd.registry import BACKBONES

__all__ = [
    "MAMBA_SIZES",
    "DropPath",
    "MambaBackbone",
    "MambaSize",
    "PatchEmbedding",
    "PatchMerging",
    "SS2D",
    "VSSBlock",
    "cross_scan",
    "cross_scan_inverse",
    "get_mamba_size",
]

NUM_DIRECTIONS = 4
_OUTPUT_LEVELS = ("p3", "p4", "p5")
_OUTPUT_STRIDES = {"p3": 8, "p4": 16, "p5": 32}


@dataclasses.dataclass(frozen=True)
class MambaSize:
    """Architecture of one VMamba size.

    Attributes:
        depths: VSS blocks in each of the four stages.
        embed_dim: Width of stage 1; each later stage doubles it.
        state_dim: SSM state size ``N`` per channel.
        expansion: SS2D inner width as a multiple of the block width.
        mlp_ratio: Hidden width of the MLP after each SS2D as a multiple of the block width;
            0 for no MLP.
        neck_scale: YOLOv8 PAFPN scale of the default neck.
    """

    depths: tuple[int, int, int, int]
    embed_dim: int
    state_dim: int = 16
    expansion: float = 2.0
    mlp_ratio: float = 0.0
    neck_scale: str = "n"

    @property
    def dims(self) -> tuple[int, int, int, int]:
        """Width of each stage."""
        return tuple(self.embed_dim * 2**stage for stage in range(4))  # type: ignore[return-value]


MAMBA_SIZES: Mapping[str, MambaSize] = MappingProxyType(
    {
        "nano": MambaSize(depths=(1, 1, 3, 1), embed_dim=48, neck_scale="n"),
        "micro": MambaSize(depths=(2, 2, 5, 2), embed_dim=64, neck_scale="n"),
        "tiny": MambaSize(depths=(2, 2, 9, 2), embed_dim=96, neck_scale="s"),
        "small": MambaSize(depths=(2, 2, 27, 2), embed_dim=96, neck_scale="m"),
    }
)


def get_mamba_size(size: str) -> MambaSize:
    """Look up a VMamba size by name (``nano``, ``micro``, ``tiny`` or ``small``)."""
    try:
        return MAMBA_SIZES[size]
    except KeyError:
        raise ValueError(f"unknown mamba size '{size}'; choose one of {', '.join(MAMBA_SIZES)}") from None


def cross_scan(features: torch.Tensor) -> torch.Tensor:
    """Unfold a map into VMamba's four scan orders.

    Direction 0 reads row by row (row-major), 1 column by column (column-major), 2 and 3
    are 0 and 1 reversed. Pixel ``(h, w)`` of an ``H x W`` map sits at sequence position
    ``h * W + w``, ``w * H + h``, ``L - 1 - (h * W + w)`` and ``L - 1 - (w * H + h)``.

    Args:
        features: ``[B, D, H, W]`` map.

    Returns:
        ``[B, 4, D, H * W]`` sequences.
    """
    row_major = features.flatten(2)
    column_major = features.transpose(2, 3).flatten(2)
    forward = torch.stack([row_major, column_major], dim=1)
    return torch.cat([forward, forward.flip(-1)], dim=1)


def cross_scan_inverse(sequences: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Put every element of the four scan sequences back at its pixel (inverse of :func:`cross_scan`).

    Args:
        sequences: ``[B, 4, D, H * W]`` per-direction sequences.
        height: Map height ``H``.
        width: Map width ``W``.

    Returns:
        ``[B, 4, D, H, W]`` per-direction maps; summing over the direction axis is VMamba's
        cross-merge.
    """
    batch, directions, channels, length = sequences.shape
    if directions != NUM_DIRECTIONS or length != height * width:
        raise ValueError(
            f"cross_scan_inverse: expected [B, {NUM_DIRECTIONS}, D, {height * width}] for a {height}x{width} map, "
            f"got {tuple(sequences.shape)}"
        )
    forward = torch.cat([sequences[:, :2], sequences[:, 2:].flip(-1)], dim=1)
    row_major = forward[:, 0::2].reshape(batch, 2, channels, height, width)
    column_major = forward[:, 1::2].reshape(batch, 2, channels, width, height).transpose(3, 4)
    return torch.stack([row_major[:, 0], column_major[:, 0], row_major[:, 1], column_major[:, 1]], dim=1)


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch per sample in training, scaling the survivors.

    Args:
        drop_probability: Probability of dropping the branch for a sample.
    """

    def __init__(self, drop_probability: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_probability < 1.0:
            raise ValueError(f"drop_probability must be in [0, 1), got {drop_probability}")
        self.drop_probability = drop_probability

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[B, ...]`` to ``[B, ...]``."""
        if not self.training or self.drop_probability == 0.0:
            return x
        keep_probability = 1.0 - self.drop_probability
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep_probability)
        return x * mask / keep_probability

    def extra_repr(self) -> str:
        return f"drop_probability={self.drop_probability}"


class PatchEmbedding(nn.Module):
    """4x4 stride-4 convolution and LayerNorm; inputs are zero-padded to a multiple of 4.

    Args:
        in_channels: Input image channels.
        embed_dim: Output channels.
        patch_size: Kernel size and stride.
    """

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int = 4) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.projection = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Map ``[B, C, H, W]`` to channels-last ``[B, ceil(H / 4), ceil(W / 4), embed_dim]``."""
        height, width = images.shape[-2:]
        pad_height, pad_width = -height % self.patch_size, -width % self.patch_size
        if pad_height or pad_width:
            images = F.pad(images, (0, pad_width, 0, pad_height))
        return self.norm(self.projection(images).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """Swin / VMamba patch merging: concatenate each 2x2 neighbourhood, LayerNorm, linear to 2x width.

    Odd heights or widths are zero-padded by one, so the output is ``ceil(H / 2) x ceil(W / 2)``.

    Args:
        dim: Input channels; the output has ``2 * dim``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map channels-last ``[B, H, W, C]`` to ``[B, ceil(H / 2), ceil(W / 2), 2 * C]``."""
        height, width = x.shape[1:3]
        if height % 2 or width % 2:
            x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        # NOTE: the order (even, even), (odd, even), (even, odd), (odd, odd) of Swin and VMamba.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class SS2D(nn.Module):
    """VMamba's 2D selective-scan mixer (the "v0" form with a multiplicative gate).

    Parameter names map to VMamba's as ``input_projection``: ``in_proj``,
    ``depthwise_conv``: ``conv2d``, ``parameter_projection_weight``: ``x_proj_weight``,
    ``step_projection_weight`` / ``step_projection_bias``: ``dt_projs_weight`` /
    ``dt_projs_bias``, ``log_decay_rates``: ``A_logs`` (``A = -exp(log_decay_rates)``),
    ``skip_gains``: ``Ds``, ``output_norm``: ``out_norm``, ``output_projection``: ``out_proj``.
    The per-direction parameters are stacked along a leading axis of size 4 (or flattened
    into ``4 * inner_dim`` rows, direction-major).

    Args:
        dim: Block width ``C``.
        state_dim: SSM state size ``N``.
        expansion: Inner width ``D = expansion * C``.
        step_rank: Rank of the low-rank step-size projection; default ``ceil(C / 16)``.
        conv_kernel_size: Depthwise convolution kernel size.
        step_min: Smallest initial step size.
        step_max: Largest initial step size.
        dropout: Dropout on the output.
    """

    def __init__(
        self,
        dim: int,
        state_dim: int = 16,
        expansion: float = 2.0,
        step_rank: int | None = None,
        conv_kernel_size: int = 3,
        step_min: float = 1e-3,
        step_max: float = 0.1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.state_dim = state_dim
        self.inner_dim = int(expansion * dim)
        self.step_rank = step_rank if step_rank is not None else math.ceil(dim / 16)
        inner, rank, directions = self.inner_dim, self.step_rank, NUM_DIRECTIONS

        self.input_projection = nn.Linear(dim, 2 * inner, bias=False)
        self.depthwise_conv = nn.Conv2d(
            inner, inner, conv_kernel_size, padding=(conv_kernel_size - 1) // 2, groups=inner, bias=True
        )
        self.activation = nn.SiLU()
        # Per direction: project each position to (step-size rank, B, C).
        self.parameter_projection_weight = nn.Parameter(
            torch.empty(directions, rank + 2 * state_dim, inner).uniform_(-(inner**-0.5), inner**-0.5)
        )
        # Per direction: low-rank step size back to the inner width; bias so that
        # softplus(bias) is log-uniform in [step_min, step_max] (Mamba's initialisation).
        self.step_projection_weight = nn.Parameter(
            torch.empty(directions, inner, rank).uniform_(-(rank**-0.5), rank**-0.5)
        )
        initial_steps = torch.exp(
            torch.rand(directions, inner) * (math.log(step_max) - math.log(step_min)) + math.log(step_min)
        ).clamp(min=1e-4)
        self.step_projection_bias = nn.Parameter(initial_steps + torch.log(-torch.expm1(-initial_steps)))
        # S4D-real initialisation A[:, n] = -(n + 1), one copy per direction.
        self.log_decay_rates = nn.Parameter(
            torch.log(torch.arange(1, state_dim + 1, dtype=torch.float32)).repeat(directions * inner, 1)
        )
        self.skip_gains = nn.Parameter(torch.ones(directions * inner))
        self.output_norm = nn.LayerNorm(inner)
        self.output_projection = nn.Linear(inner, dim, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def scan_directions(self, x: torch.Tensor) -> torch.Tensor:
        """The 2D selective scan, per direction, mapped back to pixels.

        Args:
            x: ``[B, D, H, W]`` inner features (after the depthwise convolution).

        Returns:
            ``[B, 4, D, H, W]`` float32; entry ``k`` at a pixel is direction ``k``'s scan output
            there, which depends only on pixels before it in that direction's order.
        """
        batch, inner, height, width = x.shape
        length = height * width
        sequences = cross_scan(x).float()  # [B, 4, D, L]
        projected = torch.einsum("bkdl,kcd->bkcl", sequences, self.parameter_projection_weight.float())
        step_low_rank, input_matrix, output_matrix = projected.split(
            [self.step_rank, self.state_dim, self.state_dim], dim=2
        )
        steps = torch.einsum("bkrl,kdr->bkdl", step_low_rank, self.step_projection_weight.float())
        # NOTE: everything enters the scan in float32, as in VMamba: under autocast the einsums
        # return float16, and mamba_ssm's kernel needs delta, B and C in u's dtype.
        outputs = selective_scan(
            sequences.reshape(batch, NUM_DIRECTIONS * inner, length),
            steps.float().reshape(batch, NUM_DIRECTIONS * inner, length),
            -torch.exp(self.log_decay_rates.float()),
            input_matrix.float().contiguous(),
            output_matrix.float().contiguous(),
            self.skip_gains.float(),
            delta_bias=self.step_projection_bias.float().reshape(-1),
            delta_softplus=True,
        )
        return cross_scan_inverse(outputs.view(batch, NUM_DIRECTIONS, inner, length), height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map channels-last ``[B, H, W, C]`` to ``[B, H, W, C]``."""
        branch, gate = self.input_projection(x).chunk(2, dim=-1)
        branch = self.activation(self.depthwise_conv(branch.permute(0, 3, 1, 2)))
        mixed = self.scan_directions(branch).sum(dim=1).permute(0, 2, 3, 1)  # [B, H, W, D]
        mixed = self.output_norm(mixed) * F.silu(gate)
        return self.dropout(self.output_projection(mixed))


class VSSBlock(nn.Module):
    """Visual state-space block: pre-norm SS2D residual, then an optional pre-norm MLP residual.

    Args:
        dim: Block width.
        drop_path: Stochastic-depth probability of both residual branches.
        state_dim: SSM state size.
        expansion: SS2D inner width multiple.
        mlp_ratio: MLP hidden width multiple; 0 for no MLP.
    """

    def __init__(
        self, dim: int, drop_path: float = 0.0, state_dim: int = 16, expansion: float = 2.0, mlp_ratio: float = 0.0
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mixer = SS2D(dim, state_dim=state_dim, expansion=expansion)
        self.drop_path = DropPath(drop_path)
        self.mlp: nn.Module | None = None
        if mlp_ratio > 0:
            hidden = int(dim * mlp_ratio)
            self.mlp_norm = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(
                OrderedDict(
                    input_layer=nn.Linear(dim, hidden), activation=nn.GELU(), output_layer=nn.Linear(hidden, dim)
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map channels-last ``[B, H, W, C]`` to ``[B, H, W, C]``."""
        x = x + self.drop_path(self.mixer(self.norm(x)))
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.mlp_norm(x)))
        return x


@BACKBONES.register("mamba")
class MambaBackbone(BaseBackbone):
    """VMamba backbone with outputs ``p3``, ``p4``, ``p5`` at strides 8, 16, 32.

    Any input size works: levels are ``ceil(H / stride) x ceil(W / stride)`` (zero padding at
    the bottom and right where a size is not even).

    Args:
        size: ``nano``, ``micro``, ``tiny`` or ``small`` (see :data:`MAMBA_SIZES`).
        in_channels: Input image channels.
        drop_path_rate: Stochastic depth of the last block; it rises linearly from 0 over
            the blocks (VMamba trained tiny with 0.2; 0 here, the usual choice for a
            distilled student).
        mlp_ratio: Override the size's MLP ratio (VMamba v2 blocks use 4.0).
        grad_checkpointing: Recompute each VSS block in the backward pass instead of keeping
            its activations (the cross-scanned sequences and projections, several
            ``[B, 4D, H*W]`` tensors per block): less memory for one more forward.

    Example:
        >>> backbone = MambaBackbone("nano")
        >>> {k: tuple(v.shape[1:]) for k, v in backbone(torch.zeros(1, 3, 64, 64)).items()}
        {'p3': (96, 8, 8), 'p4': (192, 4, 4), 'p5': (384, 2, 2)}
    """

    def __init__(
        self,
        size: str = "nano",
        in_channels: int = 3,
        drop_path_rate: float = 0.0,
        mlp_ratio: float | None = None,
        grad_checkpointing: bool = False,
    ) -> None:
        variant = get_mamba_size(size)
        dims = variant.dims
        super().__init__(
            feature_dims={"p3": dims[1], "p4": dims[2], "p5": dims[3]},
            feature_strides=dict(_OUTPUT_STRIDES),
        )
        self.size = size
        self.grad_checkpointing = grad_checkpointing
        self.neck_scale = variant.neck_scale
        block_mlp_ratio = variant.mlp_ratio if mlp_ratio is None else mlp_ratio
        num_blocks = sum(variant.depths)
        drop_paths = [drop_path_rate * block / max(num_blocks - 1, 1) for block in range(num_blocks)]

        self.patch_embedding = PatchEmbedding(in_channels, dims[0])
        self.stages = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        first_block = 0
        for stage, (depth, dim) in enumerate(zip(variant.depths, dims)):
            if stage > 0:
                self.downsamples.append(PatchMerging(dims[stage - 1]))
            self.stages.append(
                nn.Sequential(
                    *(
                        VSSBlock(
                            dim,
                            drop_path=drop_paths[first_block + block],
                            state_dim=variant.state_dim,
                            expansion=variant.expansion,
                            mlp_ratio=block_mlp_ratio,
                        )
                        for block in range(depth)
                    )
                )
            )
            first_block += depth
        self.output_norms = nn.ModuleDict({level: nn.LayerNorm(self.feature_dims[level]) for level in _OUTPUT_LEVELS})
        self.apply(_init_weights)

    @classmethod
    def small_config(cls) -> dict[str, Any]:
        """Constructor kwargs of a small instance (for contract tests and examples)."""
        return {"size": "nano"}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Compute the three pyramid levels.

        Args:
            images: ``[B, in_channels, H, W]`` images (RGB in ``[0, 1]`` throughout vfmkd).

        Returns:
            ``p3 [B, 2E, H/8, W/8]``, ``p4 [B, 4E, H/16, W/16]``, ``p5 [B, 8E, H/32, W/32]``
            with ``E`` the embedding width (sizes rounded up).
        """
        x = self._run_stage(self.stages[0], self.patch_embedding(images))
        features: dict[str, torch.Tensor] = {}
        for level, downsample, stage in zip(_OUTPUT_LEVELS, self.downsamples, list(self.stages)[1:]):
            x = self._run_stage(stage, downsample(x))
            features[level] = self.output_norms[level](x).permute(0, 3, 1, 2).contiguous()
        return features

    def _run_stage(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return stage(x)
        for block in stage:
            x = checkpoint(block, x, use_reentrant=False)
        return x

    def default_neck_config(self) -> dict[str, Any]:
        """YOLOv8's PAFPN (``n`` for nano and micro, ``s`` for tiny, ``m`` for small)."""
        return {"type": "yolov8_pafpn", "scale": self.neck_scale}


def _init_weights(module: nn.Module) -> None:
    """VMamba's initialisation of linear and LayerNorm layers (SS2D's own parameters keep theirs)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
