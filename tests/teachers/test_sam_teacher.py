"""SAM teachers against the official ``segment_anything`` predictor, with random-init official weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vfmkd.registry import TEACHERS
from vfmkd.teachers.sam_teacher import (
    SAM_VARIANTS,
    SAMTeacher,
    build_sam_model,
    resize_relative_position_table,
    sam_vit_b,
    sam_vit_h,
)

SMALL_SIZE = 128  # 8x8 tokens in one padded 14x14 window; 256 px (several windows) costs 3x more
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def official_vit_b(randomise_constant_parameters: Callable[..., None]) -> Any:
    """The official SAM ViT-B at seeded random init, constant-initialised tables randomised."""
    from segment_anything import build_sam_vit_b

    torch.manual_seed(0)
    model = build_sam_vit_b(checkpoint=None)
    randomise_constant_parameters(model)
    return model.eval()


@pytest.fixture(scope="module")
def vit_b_checkpoint(official_vit_b: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The official ViT-B saved in the official format (a plain state dict) and loaded safely."""
    path: Path = tmp_path_factory.mktemp("sam") / "sam_vit_b_01ec64.pth"
    torch.save(official_vit_b.state_dict(), path)
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def small_teacher(vit_b_checkpoint: dict[str, torch.Tensor]) -> SAMTeacher:
    return sam_vit_b(checkpoint=vit_b_checkpoint, image_size=SMALL_SIZE)


def meta_teacher(image_size: int) -> SAMTeacher:
    """A ViT-B teacher without real weights, for geometry and preprocessing checks."""
    with torch.device("meta"):
        return SAMTeacher(build_sam_model(SAM_VARIANTS["sam_vit_b"], image_size), name="sam_vit_b")


def prompts(image_size: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Boxes ``[1, 3, 4]`` and points ``([1, 3, 2, 2], [1, 3, 2])`` in teacher-input pixels."""
    generator = torch.Generator().manual_seed(1)
    corners = torch.rand(1, 3, 2, 2, generator=generator) * image_size * 0.6
    boxes = torch.cat([corners.amin(2), corners.amax(2)], dim=-1)
    coords = torch.rand(1, 3, 2, 2, generator=generator) * image_size * 0.6
    labels = torch.tensor([[[1, 0], [1, 1], [1, -1]]])
    return boxes, (coords, labels)


ALL_PROMPT_KINDS = [(multimask, use_boxes, use_points) for multimask in (True, False)
                    for use_boxes, use_points in ((True, False), (False, True), (True, True))]


def assert_masks_match_predictor(
    teacher: SAMTeacher,
    features: dict[str, torch.Tensor],
    predictor: Any,
    max_abs_error: Callable,
    prompt_kinds: list[tuple[bool, bool, bool]] = ALL_PROMPT_KINDS,
) -> None:
    """``predict_masks`` equals ``predictor.predict_torch``'s low-resolution logits and IoUs for
    each (multimask, boxes, points) combination."""
    boxes, (coords, labels) = prompts(teacher.image_size)
    for multimask, use_boxes, use_points in prompt_kinds:
        kwargs = {
            "boxes": boxes if use_boxes else None,
            "points": (coords, labels) if use_points else None,
        }
        masks, scores = teacher.predict_masks(features, multimask_output=multimask, **kwargs)
        _, expected_scores, expected_masks = predictor.predict_torch(
            coords[0] if use_points else None,
            labels[0] if use_points else None,
            boxes=boxes[0] if use_boxes else None,
            multimask_output=multimask,
        )
        size = teacher.image_size // 4
        assert masks.shape == (1, 3, 3 if multimask else 1, size, size)
        assert max_abs_error(masks[0], expected_masks) <= TOLERANCE
        assert max_abs_error(scores[0], expected_scores) <= TOLERANCE


# --------------------------------------------------------------------------- registry and architecture
def test_registered_names_and_alias() -> None:
    for name in ("sam_vit_b", "sam_vit_l", "sam_vit_h"):
        assert name in TEACHERS
    assert TEACHERS.get("sam") is sam_vit_h is TEACHERS.get("sam_vit_h")


@pytest.mark.parametrize("name", ["sam_vit_b", "sam_vit_l", "sam_vit_h"])
def test_architecture_equals_official_builder(name: str) -> None:
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        official = sam_model_registry[name.removeprefix("sam_")](checkpoint=None)
        ours = build_sam_model(SAM_VARIANTS[name])
    assert {key: value.shape for key, value in ours.state_dict().items()} == {
        key: value.shape for key, value in official.state_dict().items()
    }
    assert [block.window_size for block in ours.image_encoder.blocks] == [
        block.window_size for block in official.image_encoder.blocks
    ]


# --------------------------------------------------------------------------- exactness
@pytest.mark.slow
def test_vit_b_at_1024_equals_official_predictor(
    official_vit_b: Any,
    vit_b_checkpoint: dict[str, torch.Tensor],
    non_square_image: np.ndarray,
    max_abs_error: Callable,
) -> None:
    from segment_anything import SamPredictor

    teacher = sam_vit_b(checkpoint=vit_b_checkpoint)
    pixels, frame = teacher.preprocess_image(non_square_image)
    features = teacher.extract(pixels[None])

    predictor = SamPredictor(official_vit_b)
    predictor.set_image(non_square_image)
    assert frame.valid == (0.0, 0.0, float(predictor.input_size[1]), float(predictor.input_size[0]))
    assert features["embed"].shape == (1, 256, 64, 64)
    assert max_abs_error(features["embed"], predictor.get_image_embedding()) <= TOLERANCE
    with torch.inference_mode():
        assert_masks_match_predictor(
            teacher, features, predictor, max_abs_error, prompt_kinds=[(True, True, True), (False, False, True)]
        )


@pytest.fixture(scope="module")
def small_reference(official_vit_b: Any) -> Any:
    """The official ViT-B at :data:`SMALL_SIZE` whose 1024-px relative position tables are
    interpolated at run time by the official ``get_rel_pos`` (position embedding resized)."""
    reference = build_sam_model(SAM_VARIANTS["sam_vit_b"], SMALL_SIZE)
    state = official_vit_b.state_dict()
    grid = SMALL_SIZE // 16
    pos_embed = state["image_encoder.pos_embed"].permute(0, 3, 1, 2)
    state["image_encoder.pos_embed"] = F.interpolate(
        pos_embed, size=(grid, grid), mode="bicubic", antialias=True
    ).permute(0, 2, 3, 1)
    long_tables = {key: value for key, value in state.items() if "rel_pos" in key and value.shape[0] != 27}
    assert len(long_tables) == 8  # rel_pos_h and rel_pos_w of the 4 global blocks
    missing, unexpected = reference.load_state_dict(
        {key: value for key, value in state.items() if key not in long_tables}, strict=False
    )
    assert sorted(missing) == sorted(long_tables) and not unexpected
    for key, table in long_tables.items():
        module_path, attribute = key.rsplit(".", 1)
        setattr(reference.get_submodule(module_path), attribute, torch.nn.Parameter(table.clone()))
    return reference.eval()


def test_smaller_input_equals_official_runtime_interpolation(
    small_reference: Any,
    small_teacher: SAMTeacher,
    non_square_image: np.ndarray,
    max_abs_error: Callable,
) -> None:
    """At a smaller size the teacher equals the official model with run-time interpolated tables."""
    from segment_anything import SamPredictor

    reference = small_reference
    predictor = SamPredictor(reference)
    predictor.set_image(non_square_image)
    pixels, frame = small_teacher.preprocess_image(non_square_image)
    expected_pixels = reference.preprocess(
        torch.as_tensor(predictor.transform.apply_image(non_square_image)).permute(2, 0, 1)[None]
    )
    assert torch.equal(pixels[None], expected_pixels)
    features = small_teacher.extract(pixels[None])
    assert max_abs_error(features["embed"], predictor.get_image_embedding()) <= TOLERANCE
    with torch.inference_mode():
        assert_masks_match_predictor(small_teacher, features, predictor, max_abs_error)


def test_decoder_alone_on_a_float32_store_equals_official_predictor(
    small_reference: Any,
    small_teacher: SAMTeacher,
    vit_b_checkpoint: dict[str, torch.Tensor],
    non_square_image: np.ndarray,
    cached_features: Callable,
    max_abs_error: Callable,
    tmp_path: Path,
) -> None:
    """mask_kd's offline teacher: the prompt encoder and decoder loaded alone from the checkpoint
    file, on features read back from a float32 store, give ``SamPredictor``'s low-res logits."""
    from segment_anything import SamPredictor

    from vfmkd.ops.prompt_decoder import PromptDecoder

    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(vit_b_checkpoint, path)
    decoder = PromptDecoder.from_checkpoint("sam", path, image_size=SMALL_SIZE)
    features = cached_features(small_teacher, non_square_image)
    predictor = SamPredictor(small_reference)
    predictor.set_image(non_square_image)
    boxes, (coords, labels) = prompts(SMALL_SIZE)
    with torch.inference_mode():
        for multimask in (True, False):
            for kwargs, official in (
                ({"boxes": boxes[0]}, {"boxes": boxes[0]}),
                ({"points": (coords[0], labels[0])}, {"point_coords": coords[0], "point_labels": labels[0]}),
                ({"boxes": boxes[0], "points": (coords[0], labels[0])},
                 {"boxes": boxes[0], "point_coords": coords[0], "point_labels": labels[0]}),
            ):
                masks, scores = decoder.decode(features, multimask=multimask, **kwargs)
                _, expected_scores, expected = predictor.predict_torch(
                    official.get("point_coords"), official.get("point_labels"), boxes=official.get("boxes"),
                    multimask_output=multimask,
                )
                assert max_abs_error(masks, expected) <= TOLERANCE
                assert max_abs_error(scores, expected_scores) <= TOLERANCE


def test_relative_position_resize_equals_official_get_rel_pos() -> None:
    from segment_anything.modeling.image_encoder import get_rel_pos

    table = torch.randn(127, 64)
    resized = resize_relative_position_table(table, 31)
    assert resized.shape == (31, 64)
    assert torch.equal(get_rel_pos(16, 16, resized), get_rel_pos(16, 16, table))


# --------------------------------------------------------------------------- declared shapes and geometry
def test_small_input_gives_declared_shapes(small_teacher: SAMTeacher, non_square_image: np.ndarray) -> None:
    spec = small_teacher.feature_specs["embed"]
    assert (spec.channels, spec.stride, spec.height, spec.width) == (256, 16, SMALL_SIZE // 16, SMALL_SIZE // 16)
    pixels, frames = small_teacher.preprocess([non_square_image, non_square_image[:, :100]])
    assert pixels.shape == (2, 3, SMALL_SIZE, SMALL_SIZE)
    features = small_teacher.extract(pixels)
    assert features["embed"].shape == (2, spec.channels, spec.height, spec.width)
    assert features["embed"].dtype == torch.float32
    assert frames[1].valid == (0.0, 0.0, round(100 * SMALL_SIZE / 150), float(SMALL_SIZE))
    boxes = torch.tensor([[[10.0, 10.0, 90.0, 60.0]], [[0.0, 5.0, 40.0, 100.0]]])
    with torch.inference_mode():
        masks, scores = small_teacher.predict_masks(features, boxes=boxes, multimask_output=True)
        single, single_scores = small_teacher.predict_masks(features)
    assert masks.shape == (2, 1, 3, SMALL_SIZE // 4, SMALL_SIZE // 4) and scores.shape == (2, 1, 3)
    assert single.shape == (2, 1, 1, SMALL_SIZE // 4, SMALL_SIZE // 4) and single_scores.shape == (2, 1, 1)


@pytest.mark.parametrize("image_size", [1024, SMALL_SIZE])
def test_preprocessing_equals_official_transform(image_size: int, non_square_image: np.ndarray) -> None:
    from segment_anything import sam_model_registry
    from segment_anything.utils.transforms import ResizeLongestSide

    with torch.device("meta"):
        official = sam_model_registry["vit_b"](checkpoint=None)  # its pixel mean and std stay on the CPU
    teacher = meta_teacher(image_size)
    for image in (non_square_image, non_square_image.transpose(1, 0, 2).copy()):
        pixels, frame = teacher.preprocess_image(image)
        resized = torch.as_tensor(ResizeLongestSide(image_size).apply_image(image)).permute(2, 0, 1)[None]
        normalised = (resized - official.pixel_mean) / official.pixel_std
        expected = F.pad(normalised, (0, image_size - resized.shape[-1], 0, image_size - resized.shape[-2]))
        if image_size == 1024:
            assert torch.equal(expected, official.preprocess(resized))
        assert pixels.dtype == torch.float32 and torch.equal(pixels[None], expected)
        assert frame.valid == (0.0, 0.0, float(resized.shape[-1]), float(resized.shape[-2]))
    assert teacher.preprocessing()["pixel_mean"] == official.pixel_mean.flatten().tolist()


@pytest.mark.parametrize("image_hw", [(150, 230), (480, 64), (333, 333), (1, 1000)])
def test_frame_matches_official_coordinate_transform(image_hw: tuple[int, int]) -> None:
    from segment_anything.utils.transforms import ResizeLongestSide

    teacher = meta_teacher(1024)
    transform = ResizeLongestSide(1024)
    frame = teacher.frame_for(image_hw)
    points = np.array([[0.0, 0.0], [image_hw[1] - 1.0, image_hw[0] - 1.0], [7.25, 0.5], [image_hw[1], image_hw[0]]])
    np.testing.assert_allclose(frame.apply_points(points), transform.apply_coords(points, image_hw), atol=1e-9)
    boxes = np.array([[1.0, 2.0, 30.5, 40.0]])
    np.testing.assert_allclose(frame.apply_boxes(boxes), transform.apply_boxes(boxes, image_hw), atol=1e-9)
    new_h, new_w = transform.get_preprocess_shape(*image_hw, 1024)
    assert frame.valid == (0.0, 0.0, float(new_w), float(new_h))
    assert frame.input_size == (1024, 1024) and frame.source_size == image_hw


# --------------------------------------------------------------------------- loading, freezing, fingerprint
def test_strict_loading_names_the_problem(vit_b_checkpoint: dict[str, torch.Tensor]) -> None:
    # NOTE: the meta device skips random init; loading fails before any weight is copied.
    meta = torch.device("meta")
    keys = sorted(vit_b_checkpoint)
    partial = {key: value for key, value in vit_b_checkpoint.items() if key not in keys[:12]}
    with meta, pytest.raises(ValueError, match="12 missing key") as error:
        sam_vit_b(checkpoint=partial, image_size=SMALL_SIZE)
    message = str(error.value)
    assert sum(key in message for key in keys[:12]) == 10 and "(+2 more)" in message
    assert "sam_vit_b_01ec64.pth" in message and "weights_only=True" in message

    extra = {**vit_b_checkpoint, "image_encoder.extra.weight": torch.zeros(1)}
    with meta, pytest.raises(ValueError, match="1 unexpected key.*image_encoder.extra.weight"):
        sam_vit_b(checkpoint=extra, image_size=SMALL_SIZE)

    wrong = {**vit_b_checkpoint, "mask_decoder.iou_token.weight": torch.zeros(2, 256)}
    mismatch = r"shape mismatch.*mask_decoder.iou_token.weight \(checkpoint \(2, 256\), model \(1, 256\)\)"
    with meta, pytest.raises(ValueError, match=mismatch):
        sam_vit_b(checkpoint=wrong, image_size=SMALL_SIZE)

    with meta, pytest.raises(ValueError, match="not tensors"):
        sam_vit_b(checkpoint={**vit_b_checkpoint, "epoch": 3}, image_size=SMALL_SIZE)


def test_teacher_is_frozen_and_always_in_eval_mode(small_teacher: SAMTeacher) -> None:
    assert all(not parameter.requires_grad for parameter in small_teacher.parameters())
    small_teacher.train()
    assert not small_teacher.training
    assert not any(module.training for module in small_teacher.modules())
    assert small_teacher.random_init is False


def test_fingerprint_follows_weights_and_preprocessing(
    vit_b_checkpoint: dict[str, torch.Tensor], small_teacher: SAMTeacher
) -> None:
    wrapped = sam_vit_b(checkpoint={"model": vit_b_checkpoint}, image_size=SMALL_SIZE)
    assert wrapped.fingerprint() == small_teacher.fingerprint()

    changed = dict(vit_b_checkpoint)
    changed["mask_decoder.iou_token.weight"] = changed["mask_decoder.iou_token.weight"] + 1e-3
    assert sam_vit_b(checkpoint=changed, image_size=SMALL_SIZE).fingerprint() != small_teacher.fingerprint()

    fields = small_teacher.fingerprint_fields()
    assert fields["teacher"] == "sam_vit_b" and fields["preprocessing"]["image_size"] == SMALL_SIZE
    assert meta_teacher(512).preprocessing() != fields["preprocessing"]


# --------------------------------------------------------------------------- errors
def test_invalid_arguments_fail_clearly(small_teacher: SAMTeacher) -> None:
    with torch.device("meta"):
        with pytest.raises(KeyError, match="no feature.*'patch'.*available: embed"):
            sam_vit_b(features=["patch"], image_size=SMALL_SIZE)
        with pytest.raises(ValueError, match="multiple of 16"):
            sam_vit_b(image_size=100)
        teacher = sam_vit_b(image_size=SMALL_SIZE)
    assert teacher.random_init is True
    with pytest.raises(ValueError, match=rf"pixels \[B, 3, {SMALL_SIZE}, {SMALL_SIZE}\]"):
        small_teacher.forward_features(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="RGB uint8"):
        small_teacher.preprocess_image(np.zeros((10, 10, 3), dtype=np.float32))
    features = {"embed": torch.zeros(1, 256, SMALL_SIZE // 16, SMALL_SIZE // 16)}
    with pytest.raises(ValueError, match="same number of prompts"):
        small_teacher.predict_masks(
            features, boxes=torch.zeros(1, 2, 4), points=(torch.zeros(1, 3, 1, 2), torch.ones(1, 3, 1))
        )
    with pytest.raises(ValueError, match=r"boxes must be \[B=1, K, 4\]"):
        small_teacher.predict_masks(features, boxes=torch.zeros(2, 1, 4))
    with pytest.raises(ValueError, match="needs the 'embed' feature"):
        small_teacher.predict_masks({}, boxes=torch.zeros(1, 1, 4))
