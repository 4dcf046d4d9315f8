"""The student as deployed: Conv-BN folding computes what the pair computed; deploy_model leaves
the model it copies alone and gives the same outputs with no BatchNorm after a convolution."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.export.export_models import calibrate, images, student
from vfmkd.export.fuse import deploy_model, fold_batch_norms, fuse_conv_bn


def _batch_norm(channels: int, seed: int) -> nn.BatchNorm2d:
    generator = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=generator))
        bn.running_var.copy_(torch.rand(channels, generator=generator) + 0.1)
        bn.weight.copy_(torch.randn(channels, generator=generator))
        bn.bias.copy_(torch.randn(channels, generator=generator))
    return bn.eval()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("groups", [1, 4])
def test_fuse_conv_bn_computes_the_pair(bias, groups) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=groups, bias=bias)
    bn = _batch_norm(12, seed=1)
    x = torch.randn(2, 8, 9, 11)
    with torch.no_grad():
        expected = bn(conv(x))
        fused = fuse_conv_bn(conv, bn)
        assert fused is conv and conv.bias is not None
        torch.testing.assert_close(fused(x), expected, atol=1e-5, rtol=1e-5)


class _SharedOutput(nn.Module):
    """A convolution whose output a BatchNorm and a residual both read: not foldable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = _batch_norm(4, seed=2)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = _batch_norm(4, seed=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + self.conv2(y) + self.bn2(self.conv2(x))


def test_fold_batch_norms_leaves_a_read_twice_output_and_a_shared_conv_alone() -> None:
    model = _SharedOutput().eval()
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        expected = model(x)
        assert fold_batch_norms(model, lambda module: module(x)) == 0
        torch.testing.assert_close(model(x), expected)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(model.train(), lambda module: module(x))


@pytest.mark.parametrize("backbone", ["yolov8n", "timm_resnet18"])
def test_deploy_model_folds_every_batch_norm_and_keeps_the_outputs(backbone) -> None:
    model = student(backbone)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    deployed = deploy_model(model, 64)
    assert not any(isinstance(module, nn.BatchNorm2d) for module in deployed.modules())
    assert not any(parameter.requires_grad for parameter in deployed.parameters()) and not deployed.training
    batch = images(2)
    with torch.no_grad():
        expected, got = model(batch), deployed(batch)
    for level in expected["features"]:
        torch.testing.assert_close(got["features"][level], expected["features"][level], atol=1e-3, rtol=1e-3)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    assert any(isinstance(module, nn.BatchNorm2d) for module in model.modules())


def test_deploy_model_re_parameterises_repvit_and_resamples_the_vit_table() -> None:
    repvit = calibrate(student("repvit_m0_9"))
    deployed = deploy_model(repvit, 64)
    assert deployed.backbone.is_fused and not repvit.backbone.is_fused
    assert sum(p.numel() for p in deployed.parameters()) < sum(p.numel() for p in repvit.parameters())
    vit = student("vit_tiny")
    deployed = deploy_model(vit, 128)
    assert deployed.backbone.vit.pos_embed.shape[1] == 1 + (128 // 16) ** 2
    batch = images(1, 128)
    with torch.no_grad():
        expected, got = vit(batch)["features"], deployed(batch)["features"]
    for level in expected:
        torch.testing.assert_close(got[level], expected[level], atol=1e-4, rtol=1e-4)
