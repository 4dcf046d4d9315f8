"""Adapters: map a student level's channels to a teacher feature's channels, per cell.

Every adapter maps ``[B, Cs, H, W] -> [B, Ct, H, W]`` without changing the grid (the
distiller resamples separately). Built by name with :func:`build_adapter`; the name is a
distillation entry's ``adapter`` key:

```yaml
distillation:
  losses:
    sam2_embed_p4:
      type: mse
      teacher: sam2
      feature: embed
      student: p4
      adapter: conv_norm_conv
```

Kinds: ``conv1x1`` (default; FitNets' regressor, Romero et al., ICLR 2015), ``conv_norm_conv``
(1x1 conv, BatchNorm, ReLU, 1x1 conv), ``mlp`` (a per-cell two-layer MLP with GELU, as
1x1 convolutions) and ``identity`` / ``none`` (no parameters; channels must already match).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from vfmkd.registry import Registry

__all__ = [
    "ADAPTERS",
    "DEFAULT_ADAPTER",
    "Conv1x1Adapter",
    "ConvNormConvAdapter",
    "IdentityAdapter",
    "MLPAdapter",
    "build_adapter",
]

ADAPTERS = Registry("adapter")
DEFAULT_ADAPTER = "conv1x1"

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}


def _check_channels(kind: str, in_channels: int, out_channels: int) -> None:
    if in_channels < 1 or out_channels < 1:
        raise ValueError(
            f"adapter '{kind}' needs positive channel counts, got in_channels={in_channels}, "
            f"out_channels={out_channels}"
        )


def _hidden_channels(kind: str, hidden_channels: int | None, default: int) -> int:
    hidden = default if hidden_channels is None else int(hidden_channels)
    if hidden < 1:
        raise ValueError(f"adapter '{kind}' hidden_channels must be >= 1, got {hidden}")
    return hidden


@ADAPTERS.register("conv1x1")
class Conv1x1Adapter(nn.Module):
    """One 1x1 convolution with bias: a per-cell linear map ``Cs -> Ct``.

    Args:
        in_channels: Cs.
        out_channels: Ct.
        bias: Whether the convolution has a bias.
    """

    def __init__(self, in_channels: int, out_channels: int, *, bias: bool = True) -> None:
        super().__init__()
        _check_channels("conv1x1", in_channels, out_channels)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.projection = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Map ``[B, Cs, H, W]`` to ``[B, Ct, H, W]``."""
        return self.projection(features)


@ADAPTERS.register("conv_norm_conv")
class ConvNormConvAdapter(nn.Module):
    """``conv1x1(Cs -> hidden) -> BatchNorm -> activation -> conv1x1(hidden -> Ct)``.

    A non-linear per-cell adapter. ReLU by default: the conventional conv-BN-ReLU
    connector of feature-distillation codebases (e.g. mmrazor's ``ConvModuleConnector``);
    ``activation: gelu`` is available. The first convolution has no bias (BatchNorm
    follows); the last one has a bias.

    Args:
        in_channels: Cs.
        out_channels: Ct.
        hidden_channels: Width of the middle layer; default ``max(Cs, Ct)``.
        activation: ``relu`` or ``gelu``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        hidden_channels: int | None = None,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        _check_channels("conv_norm_conv", in_channels, out_channels)
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"adapter 'conv_norm_conv' activation '{activation}' is unknown; known: {', '.join(_ACTIVATIONS)}"
            )
        hidden = _hidden_channels("conv_norm_conv", hidden_channels, max(in_channels, out_channels))
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.layers = nn.Sequential(
            OrderedDict(
                input_conv=nn.Conv2d(in_channels, hidden, kernel_size=1, bias=False),
                norm=nn.BatchNorm2d(hidden),
                activation=_ACTIVATIONS[activation](),
                output_conv=nn.Conv2d(hidden, out_channels, kernel_size=1),
            )
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Map ``[B, Cs, H, W]`` to ``[B, Ct, H, W]``."""
        return self.layers(features)


@ADAPTERS.register("mlp")
class MLPAdapter(nn.Module):
    """A per-cell two-layer MLP with GELU, as 1x1 convolutions (both with bias).

    Args:
        in_channels: Cs.
        out_channels: Ct.
        hidden_ratio: Hidden width as a multiple of ``max(Cs, Ct)`` (rounded, at least 1).
        hidden_channels: Hidden width; overrides ``hidden_ratio``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        hidden_ratio: float = 1.0,
        hidden_channels: int | None = None,
    ) -> None:
        super().__init__()
        _check_channels("mlp", in_channels, out_channels)
        if hidden_ratio <= 0:
            raise ValueError(f"adapter 'mlp' hidden_ratio must be > 0, got {hidden_ratio}")
        default_hidden = max(1, round(hidden_ratio * max(in_channels, out_channels)))
        hidden = _hidden_channels("mlp", hidden_channels, default_hidden)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.layers = nn.Sequential(
            OrderedDict(
                input_conv=nn.Conv2d(in_channels, hidden, kernel_size=1),
                activation=nn.GELU(),
                output_conv=nn.Conv2d(hidden, out_channels, kernel_size=1),
            )
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Map ``[B, Cs, H, W]`` to ``[B, Ct, H, W]``."""
        return self.layers(features)


@ADAPTERS.register("identity", aliases=("none",))
class IdentityAdapter(nn.Module):
    """No adapter: the student map is passed through; channels must already match.

    Args:
        in_channels: Cs.
        out_channels: Ct; must equal Cs.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        _check_channels("identity", in_channels, out_channels)
        if in_channels != out_channels:
            raise ValueError(
                f"adapter 'identity'/'none' passes the student map through unchanged, so it needs equal channels, "
                f"but the student has {in_channels} and the teacher {out_channels}; use adapter conv1x1, "
                "conv_norm_conv or mlp"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return ``[B, C, H, W]`` unchanged."""
        return features


def build_adapter(kind: str | None, in_channels: int, out_channels: int, **params: Any) -> nn.Module:
    """Build the adapter ``kind`` mapping ``[B, in_channels, H, W] -> [B, out_channels, H, W]``.

    Args:
        kind: A registered kind (``conv1x1``, ``conv_norm_conv``, ``mlp``, ``identity``,
            ``none``); None means ``conv1x1``.
        in_channels: Student channels Cs.
        out_channels: Teacher channels Ct.
        **params: Keyword arguments of that adapter (e.g. ``hidden_channels``).

    Returns:
        The adapter module. An unknown kind raises ``KeyError`` listing the known kinds.
    """
    return ADAPTERS.build(kind or DEFAULT_ADAPTER, in_channels=in_channels, out_channels=out_channels, **params)
