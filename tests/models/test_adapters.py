"""Adapters: shapes for every registered kind, identity pass-through and the error messages."""

from __future__ import annotations

import pytest
import torch

from vfmkd.models.adapters import ADAPTERS, build_adapter


@pytest.mark.parametrize("kind", ADAPTERS.names())
def test_adapter_maps_channels_and_keeps_the_grid(kind: str) -> None:
    in_channels = 6
    out_channels = in_channels if kind in ("identity", "none") else 10
    adapter = build_adapter(kind, in_channels, out_channels)
    features = torch.randn(2, in_channels, 5, 7, requires_grad=True)
    output = adapter(features)
    assert output.shape == (2, out_channels, 5, 7)
    output.sum().backward()
    assert features.grad is not None
    for name, parameter in adapter.named_parameters():
        assert parameter.requires_grad, name
        assert parameter.grad is not None, name


@pytest.mark.parametrize("kind", ["conv1x1", "conv_norm_conv", "mlp"])
def test_learned_adapters_have_trainable_parameters(kind: str) -> None:
    adapter = build_adapter(kind, 4, 8)
    parameters = list(adapter.parameters())
    assert parameters and all(parameter.requires_grad for parameter in parameters)


def test_default_kind_is_conv1x1() -> None:
    adapter = build_adapter(None, 4, 8)
    assert type(adapter) is ADAPTERS.get("conv1x1")
    assert adapter.projection.kernel_size == (1, 1) and adapter.projection.bias is not None


@pytest.mark.parametrize("kind", ["identity", "none"])
def test_identity_passes_through_and_needs_equal_channels(kind: str) -> None:
    adapter = build_adapter(kind, 8, 8)
    features = torch.randn(1, 8, 3, 3)
    assert adapter(features) is features
    assert not list(adapter.parameters())
    with pytest.raises(ValueError, match=r"student has 8 and the teacher 16"):
        build_adapter(kind, 8, 16)


def test_hidden_widths() -> None:
    assert build_adapter("conv_norm_conv", 4, 8).layers.input_conv.out_channels == 8  # max(in, out)
    assert build_adapter("conv_norm_conv", 4, 8, hidden_channels=3).layers.input_conv.out_channels == 3
    assert build_adapter("mlp", 4, 8).layers.input_conv.out_channels == 8
    assert build_adapter("mlp", 4, 8, hidden_ratio=2.0).layers.input_conv.out_channels == 16
    assert isinstance(build_adapter("conv_norm_conv", 4, 8, activation="gelu").layers.activation, torch.nn.GELU)


def test_unknown_kind_and_bad_parameters_are_named() -> None:
    with pytest.raises(KeyError, match=r"conv1x1.*conv_norm_conv.*identity.*mlp.*none"):
        build_adapter("conv3x3", 4, 8)
    with pytest.raises(ValueError, match="activation 'swish'"):
        build_adapter("conv_norm_conv", 4, 8, activation="swish")
    with pytest.raises(ValueError, match="positive channel counts"):
        build_adapter("conv1x1", 0, 8)
    with pytest.raises(TypeError, match="hidden_ratio"):
        build_adapter("conv1x1", 4, 8, hidden_ratio=2.0)
