"""VMamba backbone: declared levels, the four-direction cross-scan, SS2D causality, training in a model."""

from __future__ import annotations

import math

import pytest
import torch

from vfmkd.models import build_model
from vfmkd.models.backbones.mamba import (
    MAMBA_SIZES,
    SS2D,
    DropPath,
    MambaBackbone,
    VSSBlock,
    cross_scan,
    cross_scan_inverse,
    get_mamba_size,
)
from vfmkd.models.necks import YOLOv8PAFPN


@pytest.mark.parametrize("size", ["nano", "micro"])
def test_outputs_match_declared_dims_and_strides(size: str) -> None:
    backbone = MambaBackbone(size).eval()
    embed_dim = MAMBA_SIZES[size].embed_dim
    assert backbone.feature_dims == {"p3": 2 * embed_dim, "p4": 4 * embed_dim, "p5": 8 * embed_dim}
    assert backbone.feature_strides == {"p3": 8, "p4": 16, "p5": 32}
    for height, width in ((64, 64), (100, 76)):
        with torch.no_grad():
            features = backbone(torch.rand(1, 3, height, width))
        assert set(features) == {"p3", "p4", "p5"}
        for level, feature in features.items():
            stride = backbone.feature_strides[level]
            expected = (1, backbone.feature_dims[level], math.ceil(height / stride), math.ceil(width / stride))
            assert feature.shape == expected, level


def test_sizes_depths_and_unknown_size() -> None:
    with torch.device("meta"):
        tiny, small = MambaBackbone("tiny"), MambaBackbone("small")
    assert [len(stage) for stage in tiny.stages] == [2, 2, 9, 2]
    assert [len(stage) for stage in small.stages] == [2, 2, 27, 2]
    assert tiny.feature_dims == {"p3": 192, "p4": 384, "p5": 768}
    block = tiny.stages[0][0]
    assert isinstance(block, VSSBlock) and block.mlp is None
    assert block.mixer.inner_dim == 192 and block.mixer.state_dim == 16 and block.mixer.step_rank == 6
    with pytest.raises(ValueError, match="unknown mamba size 'huge'.*nano"):
        get_mamba_size("huge")
    with torch.device("meta"):
        with_mlp = MambaBackbone("nano", mlp_ratio=4.0)
    assert with_mlp.stages[0][0].mlp is not None


def test_cross_scan_orders_pixels_in_the_four_directions() -> None:
    height, width = 3, 5
    length = height * width
    positions = torch.arange(length, dtype=torch.float32).view(1, 1, height, width)  # value = h * W + w
    sequences = cross_scan(positions)
    assert sequences.shape == (1, 4, 1, length)
    row_major = [h * width + w for h in range(height) for w in range(width)]
    column_major = [h * width + w for w in range(width) for h in range(height)]
    assert sequences[0, 0, 0].tolist() == row_major
    assert sequences[0, 1, 0].tolist() == column_major
    assert sequences[0, 2, 0].tolist() == row_major[::-1]
    assert sequences[0, 3, 0].tolist() == column_major[::-1]


def test_cross_scan_inverse_undoes_cross_scan_and_is_its_adjoint() -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 4, 6, generator=generator)
    restored = cross_scan_inverse(cross_scan(features), 4, 6)
    assert restored.shape == (2, 4, 3, 4, 6)
    for direction in range(4):
        torch.testing.assert_close(restored[:, direction], features)
    # Summing the restored directions (VMamba's cross-merge) is the adjoint of the cross-scan.
    sequences = torch.randn(2, 4, 3, 24, generator=generator)
    merged = cross_scan_inverse(sequences, 4, 6).sum(dim=1)
    torch.testing.assert_close((cross_scan(features) * sequences).sum(), (features * merged).sum())
    with pytest.raises(ValueError, match="expected"):
        cross_scan_inverse(sequences, 5, 5)


def test_each_scan_direction_only_sees_pixels_before_it_in_its_order() -> None:
    torch.manual_seed(0)
    height, width = 4, 5
    mixer = SS2D(dim=8, state_dim=4, expansion=1.0)
    inputs = torch.randn(1, 8, height, width, requires_grad=True)
    outputs = mixer.scan_directions(inputs)
    assert outputs.shape == (1, 4, 8, height, width)
    target_h, target_w = 2, 1
    rank = {
        0: lambda h, w: h * width + w,
        1: lambda h, w: w * height + h,
        2: lambda h, w: -(h * width + w),
        3: lambda h, w: -(w * height + h),
    }
    for direction, order in rank.items():
        (gradient,) = torch.autograd.grad(outputs[0, direction, :, target_h, target_w].sum(), inputs, retain_graph=True)
        influence = gradient.abs().sum(dim=(0, 1))
        for h in range(height):
            for w in range(width):
                reachable = order(h, w) <= order(target_h, target_w)
                assert (influence[h, w] > 0) == reachable, (direction, h, w)


def test_drop_path_is_random_in_training_only() -> None:
    drop = DropPath(0.5)
    x = torch.ones(64, 3)
    dropped = drop(x)
    assert set(dropped[:, 0].tolist()) <= {0.0, 2.0} and 0 < (dropped[:, 0] == 0).sum() < 64
    assert torch.equal(drop.eval()(x), x)
    backbone = MambaBackbone("nano", drop_path_rate=0.3)
    assert backbone.stages[0][0].drop_path.drop_probability == 0.0
    assert backbone.stages[3][-1].drop_path.drop_probability == pytest.approx(0.3)


def test_trains_in_a_detection_model_from_the_shipped_config() -> None:
    torch.manual_seed(0)
    model = build_model(
        {
            "backbone": {"config": "configs/backbones/mamba.yaml"},
            "heads": {"detection": {"type": "yolo_head", "num_classes": 3}},
        }
    )
    assert isinstance(model.backbone, MambaBackbone) and model.backbone.size == "nano"
    assert isinstance(model.neck, YOLOv8PAFPN) and model.config["neck"] == {"type": "yolov8_pafpn", "scale": "n"}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.rand(2, 3, 64, 64)
    targets = {
        "batch_idx": torch.tensor([0, 1]),
        "cls": torch.tensor([1, 2]),
        "boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [10.0, 10.0, 60.0, 30.0]]),
    }
    mixer = model.backbone.stages[0][0].mixer
    before = mixer.log_decay_rates.detach().clone()
    for _ in range(3):
        losses = model.loss(model(images), targets)
        total = sum(losses.values())
        assert torch.isfinite(total)
        optimizer.zero_grad()
        total.backward()
        for name in ("parameter_projection_weight", "step_projection_weight", "step_projection_bias", "skip_gains"):
            gradient = getattr(mixer, name).grad
            assert gradient is not None and torch.isfinite(gradient).all() and gradient.abs().sum() > 0, name
        optimizer.step()
    assert not torch.equal(before, mixer.log_decay_rates.detach())


def test_scan_inputs_are_float32_under_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    # mamba_ssm's kernel needs delta, B and C in u's dtype; SS2D feeds it float32 throughout.
    from vfmkd.models.backbones import mamba as mamba_module

    seen: list[torch.dtype] = []
    real_scan = mamba_module.selective_scan

    def recording_scan(*args: torch.Tensor, **kwargs: object) -> torch.Tensor:
        seen.extend(tensor.dtype for tensor in args)
        return real_scan(*args, **kwargs)

    monkeypatch.setattr(mamba_module, "selective_scan", recording_scan)
    mixer = SS2D(dim=16, state_dim=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = mixer(torch.randn(1, 3, 5, 16))
    assert output.dtype == torch.bfloat16 and torch.isfinite(output).all()
    assert seen and set(seen) == {torch.float32}


def test_small_config_is_the_nano_size() -> None:
    assert MambaBackbone.small_config() == {"size": "nano"}
    assert MambaBackbone(**MambaBackbone.small_config()).size == "nano"


def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_less() -> None:
    torch.manual_seed(0)
    plain = MambaBackbone("nano", drop_path_rate=0.2)
    checkpointed = MambaBackbone("nano", drop_path_rate=0.2, grad_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    images = torch.rand(2, 3, 64, 64)
    gradients, saved_elements = [], []
    for backbone in (plain, checkpointed):
        saved: list[int] = []

        def pack(tensor: torch.Tensor, saved: list[int] = saved) -> torch.Tensor:
            saved.append(tensor.numel())
            return tensor

        torch.manual_seed(1)  # the same stochastic depth draws; checkpointing replays them
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = sum(level.square().mean() for level in backbone(images).values())
        loss.backward()
        gradients.append(backbone.stages[0][0].mixer.input_projection.weight.grad)
        saved_elements.append(sum(saved))
    torch.testing.assert_close(gradients[1], gradients[0])
    assert saved_elements[1] < saved_elements[0] / 2
