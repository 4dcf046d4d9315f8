"""The SAM-style mask head: maps, official modules and checkpoints, prompts in, masks out, training signal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vfmkd.models import build_model
from vfmkd.models.heads.sam_mask_head import SAMMaskHead
from vfmkd.ops.prompt_decoder import official_prompt_modules

SMALL = SAMMaskHead.small_config()


def _model(decoder: str, **head):
    torch.manual_seed(0)
    config = {"type": "sam_mask_head", "decoder": decoder, **SMALL, **head}
    return build_model({"backbone": {"type": "yolov8", "scale": "n"}, "heads": {"segmentation": config}})


@pytest.mark.parametrize("decoder", ["sam", "sam2"])
@pytest.mark.parametrize("size", [64, 96])
def test_maps_follow_the_input_size_and_are_named(decoder: str, size: int) -> None:
    model = _model(decoder)
    outputs = model(torch.rand(1, 3, size, size))["segmentation"]
    assert tuple(outputs["embed"].shape) == (1, 256, size // 16, size // 16)
    assert outputs["input_size"] == (size, size)
    expected = {"segmentation.embed": (256, 16)}
    if decoder == "sam2":
        assert tuple(outputs["hires_s8"].shape) == (1, 64, size // 8, size // 8)
        assert tuple(outputs["hires_s4"].shape) == (1, 32, size // 4, size // 4)
        expected.update({"segmentation.hires_s8": (64, 8), "segmentation.hires_s4": (32, 4)})
    named = {name: (model.map_dims[name], model.map_strides[name]) for name in model.map_dims if name.startswith("segmentation.")}
    assert named == expected


@pytest.mark.parametrize("decoder", ["sam", "sam2"])
def test_segment_takes_boxes_points_and_a_previous_mask(decoder: str) -> None:
    model = _model(decoder).eval()
    head = model.heads["segmentation"]
    with torch.no_grad():
        outputs = model(torch.rand(2, 3, 64, 64))["segmentation"]
        boxes = torch.tensor([[4.0, 4.0, 30.0, 40.0], [10.0, 12.0, 60.0, 50.0]])
        points = torch.tensor([[[20.0, 20.0], [5.0, 50.0]]])
        labels = torch.tensor([[1, 0]])
        first = head.segment(outputs, [{"boxes": boxes}, {"points": points, "point_labels": labels}])
        assert [tuple(r["masks"].shape) for r in first] == [(2, 64, 64), (1, 64, 64)]
        assert tuple(first[0]["low_res"].shape) == (2, 1, 16, 16) and tuple(first[1]["iou"].shape) == (1,)
        again = head.segment(outputs, [{"boxes": boxes, "mask_input": first[0]["low_res"]}, {"points": points, "point_labels": labels}])
        assert not torch.equal(again[0]["masks"], first[0]["masks"])  # the previous mask is used
        torch.testing.assert_close(again[1]["masks"], first[1]["masks"])
        predicted = model.predict(model(torch.rand(2, 3, 64, 64)), prompts=[{"boxes": boxes}, {"boxes": boxes[:1]}])
        assert [tuple(r["masks"].shape) for r in predicted] == [(2, 64, 64), (1, 64, 64)]
        assert predicted[0]["masks"].dtype == torch.bool
        assert model.predict(model(torch.rand(1, 3, 64, 64))) == [{}]
        nothing = head.segment(outputs, [{"boxes": boxes[:0]}, {}])
        assert [tuple(r["masks"].shape) for r in nothing] == [(0, 64, 64), (0, 64, 64)]


def test_prompt_encoder_is_frozen_and_the_decoder_learns_by_default() -> None:
    head = _model("sam").heads["segmentation"]
    assert not any(p.requires_grad for p in head.prompt_encoder.parameters())
    assert all(p.requires_grad for p in head.mask_decoder.parameters())
    trainable = _model("sam", train_prompt_encoder=True, train_decoder=False).heads["segmentation"]
    assert all(p.requires_grad for p in trainable.prompt_encoder.parameters())
    assert not any(p.requires_grad for p in trainable.mask_decoder.parameters())


@pytest.mark.parametrize("decoder", ["sam", "sam2"])
def test_official_prompt_encoder_and_decoder_load_from_a_checkpoint(decoder: str, tmp_path: Path) -> None:
    torch.manual_seed(3)
    prompt_encoder, mask_decoder = official_prompt_modules(decoder, depth=SMALL["transformer_depth"], mlp_dim=SMALL["mlp_dim"])
    prefixes = ("prompt_encoder.", "mask_decoder.") if decoder == "sam" else ("sam_prompt_encoder.", "sam_mask_decoder.")
    state = {"image_encoder.patch_embed.proj.weight": torch.zeros(2, 3)}
    for prefix, module in zip(prefixes, (prompt_encoder, mask_decoder)):
        state.update({prefix + key: value for key, value in module.state_dict().items()})
    path = tmp_path / f"{decoder}.pt"
    torch.save({"model": state} if decoder == "sam2" else state, path)
    head = _model(decoder, init_from=str(path)).heads["segmentation"]
    for key, value in mask_decoder.state_dict().items():
        assert torch.equal(head.mask_decoder.state_dict()[key], value), key
    for key, value in prompt_encoder.state_dict().items():
        assert torch.equal(head.prompt_encoder.state_dict()[key], value), key

    other = "sam2" if decoder == "sam" else "sam"
    with pytest.raises(ValueError, match=rf"{path.name}.*does not fit"):
        _model(other, init_from=str(path))
    with pytest.raises(FileNotFoundError, match="init_from"):
        _model(decoder, init_from=str(tmp_path / "missing.pt"))


def test_loss_terms_weights_and_gradients() -> None:
    model = _model("sam")
    outputs = model(torch.rand(1, 3, 64, 64))
    mask = torch.zeros(1, 64, 64, dtype=torch.uint8)
    mask[0, 10:40, 20:50] = 1
    targets = {"batch_idx": torch.tensor([0]), "cls": torch.tensor([0]), "boxes": torch.tensor([[20.0, 10.0, 50.0, 40.0]]),
               "has_labels": torch.tensor([True]), "masks": [mask]}
    torch.manual_seed(0)
    losses = model.loss(outputs, targets)
    assert set(losses) == {"seg/bce", "seg/dice", "seg/iou"}
    assert all(torch.isfinite(value) and value > 0 for value in losses.values())
    sum(losses.values()).backward()
    head = model.heads["segmentation"]
    assert head.mask_decoder.output_upscaling[0].weight.grad.abs().sum() > 0
    assert model.backbone.stem.conv.weight.grad.abs().sum() > 0  # the student learns through the embedding
    empty = {**targets, "has_labels": torch.tensor([False])}
    zeros = model.loss(model(torch.rand(1, 3, 64, 64)), empty)
    assert all(float(value.detach()) == 0.0 for value in zeros.values())
