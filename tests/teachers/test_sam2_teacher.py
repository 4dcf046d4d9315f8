"""SAM 2 / 2.1 teachers against the official ``SAM2ImagePredictor``, with random-init official weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from vfmkd.registry import TEACHERS
from vfmkd.teachers.sam2_teacher import SAM2_VARIANTS, SAM2Teacher, sam2_1_hiera_b_plus, sam2_1_hiera_t

# SAM2Transforms (the official preprocessing the tests compare with) still uses torch.jit.script.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

TINY_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
SMALL_SIZE = 256
TOLERANCE = 1e-4
FEATURE_NAMES = ("embed", "hires_s8", "hires_s4")


def build_official(image_size: int = 1024) -> Any:
    from sam2.build_sam import build_sam2

    return build_sam2(
        TINY_CONFIG, ckpt_path=None, device="cpu", mode="eval",
        hydra_overrides_extra=[f"++model.image_size={image_size}"],
    )


def official_predictor(model: Any) -> Any:
    """``SAM2ImagePredictor`` on ``model``; its backbone sizes follow the model's input size."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(model)
    # NOTE: the predictor hard-codes the 1024-px grid sizes; other sizes need their own.
    predictor._bb_feat_sizes = [(model.image_size // stride,) * 2 for stride in (4, 8, 16)]
    return predictor


def predictor_features(predictor: Any) -> dict[str, torch.Tensor]:
    stored = predictor._features
    return {"embed": stored["image_embed"], "hires_s8": stored["high_res_feats"][1],
            "hires_s4": stored["high_res_feats"][0]}


@pytest.fixture(scope="module")
def official_tiny(randomise_constant_parameters: Callable[..., None]) -> Any:
    """The official SAM 2.1 Hiera-T at seeded random init, constant-initialised tensors randomised."""
    torch.manual_seed(0)
    model = build_official()
    randomise_constant_parameters(model)
    with torch.no_grad():
        # trunc_normal(std=0.02) at init; make the predictor's no_mem_embed addition count.
        model.no_mem_embed.normal_(0.0, 1.0)
    return model


@pytest.fixture(scope="module")
def tiny_checkpoint(official_tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The official Hiera-T saved in the official format (``{"model": state_dict}``), loaded safely."""
    path: Path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": official_tiny.state_dict()}, path)
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def random_teacher() -> SAM2Teacher:
    """Hiera-T at random init and the default 1024 px, for preprocessing and geometry checks."""
    torch.manual_seed(0)
    return sam2_1_hiera_t()


@pytest.fixture(scope="module")
def small_teacher(tiny_checkpoint: dict[str, Any]) -> SAM2Teacher:
    return sam2_1_hiera_t(checkpoint=tiny_checkpoint, image_size=SMALL_SIZE)


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
    teacher: SAM2Teacher,
    features: dict[str, torch.Tensor],
    predictor: Any,
    max_abs_error: Callable,
    prompt_kinds: list[tuple[bool, bool, bool]] = ALL_PROMPT_KINDS,
) -> None:
    """``predict_masks`` equals the predictor's ``_predict`` low-resolution logits and IoUs."""
    boxes, (coords, labels) = prompts(teacher.image_size)
    for multimask, use_boxes, use_points in prompt_kinds:
        masks, scores = teacher.predict_masks(
            features,
            boxes=boxes if use_boxes else None,
            points=(coords, labels) if use_points else None,
            multimask_output=multimask,
        )
        _, expected_scores, expected_masks = predictor._predict(
            coords[0] if use_points else None,
            labels[0].to(torch.int) if use_points else None,
            boxes=boxes[0] if use_boxes else None,
            multimask_output=multimask,
        )
        size = teacher.image_size // 4
        assert masks.shape == (1, 3, 3 if multimask else 1, size, size)
        assert max_abs_error(masks[0], expected_masks) <= TOLERANCE
        assert max_abs_error(scores[0], expected_scores) <= TOLERANCE


# --------------------------------------------------------------------------- registry and configs
def test_registered_names_alias_and_official_files() -> None:
    from hydra import compose
    from sam2.build_sam import HF_MODEL_ID_TO_FILENAMES

    for name in SAM2_VARIANTS:
        assert name in TEACHERS
    assert TEACHERS.get("sam2") is sam2_1_hiera_b_plus is TEACHERS.get("sam2.1_hiera_b+")
    assert {(variant.config_file, variant.checkpoint_file) for variant in SAM2_VARIANTS.values()} == set(
        HF_MODEL_ID_TO_FILENAMES.values()
    )
    for variant in SAM2_VARIANTS.values():
        assert compose(config_name=variant.config_file).model.image_size == 1024


# --------------------------------------------------------------------------- exactness
@pytest.mark.slow
def test_tiny_at_1024_equals_official_predictor(
    official_tiny: Any,
    tiny_checkpoint: dict[str, Any],
    non_square_image: np.ndarray,
    max_abs_error: Callable,
) -> None:
    teacher = sam2_1_hiera_t(checkpoint=tiny_checkpoint)
    pixels, _ = teacher.preprocess_image(non_square_image)
    features = teacher.extract(pixels[None])

    predictor = official_predictor(official_tiny)
    assert torch.equal(pixels, predictor._transforms(non_square_image))
    predictor.set_image(non_square_image)
    expected = predictor_features(predictor)
    for name, (channels, stride) in {"embed": (256, 16), "hires_s8": (64, 8), "hires_s4": (32, 4)}.items():
        assert features[name].shape == (1, channels, 1024 // stride, 1024 // stride)
        assert max_abs_error(features[name], expected[name]) <= TOLERANCE, name
    with torch.inference_mode():
        assert_masks_match_predictor(
            teacher, features, predictor, max_abs_error, prompt_kinds=[(True, True, True), (False, False, True)]
        )


def test_smaller_input_equals_official_predictor_at_that_size(
    tiny_checkpoint: dict[str, Any],
    small_teacher: SAM2Teacher,
    non_square_image: np.ndarray,
    max_abs_error: Callable,
) -> None:
    reference = build_official(SMALL_SIZE)
    reference.load_state_dict(tiny_checkpoint["model"], strict=True)
    assert reference.sam_prompt_encoder.image_embedding_size == (SMALL_SIZE // 16, SMALL_SIZE // 16)
    predictor = official_predictor(reference)
    predictor.set_image(non_square_image)
    expected = predictor_features(predictor)

    pixels, _ = small_teacher.preprocess_image(non_square_image)
    assert torch.equal(pixels, predictor._transforms(non_square_image))
    features = small_teacher.extract(pixels[None])
    for name in FEATURE_NAMES:
        assert max_abs_error(features[name], expected[name]) <= TOLERANCE, name
    with torch.inference_mode():
        assert_masks_match_predictor(small_teacher, features, predictor, max_abs_error)


class _StoreDecoder:
    """A prompt decoder on cached features, shaped like ``SAM2Teacher.predict_masks`` for the helper."""

    def __init__(self, decoder: Any, image_size: int) -> None:
        self.decoder, self.image_size = decoder, image_size

    def predict_masks(self, features, boxes=None, points=None, multimask_output=False):
        masks, scores = self.decoder.decode(
            features,
            boxes=None if boxes is None else boxes[0],
            points=None if points is None else (points[0][0], points[1][0]),
            multimask=multimask_output,
        )
        return masks[None], scores[None]


def test_decoder_alone_on_a_float32_store_equals_official_predictor(
    tiny_checkpoint: dict[str, Any],
    small_teacher: SAM2Teacher,
    non_square_image: np.ndarray,
    cached_features: Callable,
    max_abs_error: Callable,
    tmp_path: Path,
) -> None:
    """mask_kd's offline teacher: the prompt encoder and decoder loaded alone from the checkpoint
    file, on features read back from a float32 store, give the predictor's low-res logits."""
    from vfmkd.ops.prompt_decoder import PromptDecoder

    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save(tiny_checkpoint, path)
    decoder = PromptDecoder.from_checkpoint("sam2", path, image_size=SMALL_SIZE)
    features = cached_features(small_teacher, non_square_image)
    reference = build_official(SMALL_SIZE)
    reference.load_state_dict(tiny_checkpoint["model"], strict=True)
    predictor = official_predictor(reference)
    predictor.set_image(non_square_image)
    with torch.inference_mode():
        assert_masks_match_predictor(_StoreDecoder(decoder, SMALL_SIZE), features, predictor, max_abs_error)


def test_official_loader_accepts_the_test_checkpoint(tiny_checkpoint: dict[str, Any], tmp_path: Path) -> None:
    """The saved format is the official one: ``sam2``'s own loader takes it."""
    from sam2.build_sam import _load_checkpoint

    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save(tiny_checkpoint, path)
    model = build_official(SMALL_SIZE)
    _load_checkpoint(model, str(path))
    assert torch.equal(model.no_mem_embed, tiny_checkpoint["model"]["no_mem_embed"])


# --------------------------------------------------------------------------- declared shapes and geometry
def test_small_input_gives_declared_shapes(small_teacher: SAM2Teacher, non_square_image: np.ndarray) -> None:
    specs = small_teacher.feature_specs
    assert list(specs) == list(FEATURE_NAMES)
    assert [(spec.channels, spec.stride) for spec in specs.values()] == [(256, 16), (64, 8), (32, 4)]
    pixels, frames = small_teacher.preprocess([non_square_image, non_square_image[:, :100]])
    assert pixels.shape == (2, 3, SMALL_SIZE, SMALL_SIZE)
    assert frames[1].valid == (0.0, 0.0, float(SMALL_SIZE), float(SMALL_SIZE))
    features = small_teacher.extract(pixels)
    for name, spec in specs.items():
        assert features[name].shape == (2, spec.channels, spec.height, spec.width)
        assert spec.height == SMALL_SIZE // spec.stride
    boxes = torch.tensor([[[10.0, 10.0, 90.0, 60.0]], [[0.0, 5.0, 40.0, 200.0]]])
    with torch.inference_mode():
        masks, scores = small_teacher.predict_masks(features, boxes=boxes, multimask_output=True)
        single, single_scores = small_teacher.predict_masks(features)
    assert masks.shape == (2, 1, 3, SMALL_SIZE // 4, SMALL_SIZE // 4) and scores.shape == (2, 1, 3)
    assert single.shape == (2, 1, 1, SMALL_SIZE // 4, SMALL_SIZE // 4) and single_scores.shape == (2, 1, 1)
    only_embed = sam2_1_hiera_t(features=["embed"], image_size=SMALL_SIZE)
    assert list(only_embed.extract(pixels[:1])) == ["embed"]


def test_sam2_config_variant_builds_at_small_size() -> None:
    torch.manual_seed(0)
    teacher = TEACHERS.build("sam2_hiera_t", image_size=SMALL_SIZE)
    features = teacher.extract(torch.zeros(1, 3, SMALL_SIZE, SMALL_SIZE))
    assert {name: tuple(value.shape[1:]) for name, value in features.items()} == {
        name: (spec.channels, spec.height, spec.width) for name, spec in teacher.feature_specs.items()
    }
    assert teacher.random_init is True and teacher.name == "sam2_hiera_t"


@pytest.mark.parametrize("teacher_fixture", ["random_teacher", "small_teacher"])
def test_preprocessing_equals_official_transform(
    teacher_fixture: str, non_square_image: np.ndarray, request: pytest.FixtureRequest
) -> None:
    from sam2.utils.transforms import SAM2Transforms

    teacher: SAM2Teacher = request.getfixturevalue(teacher_fixture)
    image_size = teacher.image_size
    official = SAM2Transforms(resolution=image_size, mask_threshold=0.0)
    for image in (non_square_image, non_square_image.transpose(1, 0, 2).copy()):
        pixels, frame = teacher.preprocess_image(image)
        assert pixels.dtype == torch.float32 and torch.equal(pixels, official(image))
        assert frame.valid == (0.0, 0.0, float(image_size), float(image_size))
    bgr_view = non_square_image[..., ::-1]  # negative strides, which torch.from_numpy refuses
    assert torch.equal(teacher.preprocess_image(bgr_view)[0], official(bgr_view.copy()))
    assert teacher.preprocessing()["pixel_mean"] == official.mean
    assert teacher.preprocessing()["pixel_std"] == official.std


@pytest.mark.parametrize("image_hw", [(150, 230), (480, 64), (1, 1000)])
def test_frame_matches_official_coordinate_transform(random_teacher: SAM2Teacher, image_hw: tuple[int, int]) -> None:
    from sam2.utils.transforms import SAM2Transforms

    official = SAM2Transforms(resolution=1024, mask_threshold=0.0)
    frame = random_teacher.frame_for(image_hw)
    points = np.array([[0.0, 0.0], [image_hw[1] - 1.0, image_hw[0] - 1.0], [7.25, 0.5], [image_hw[1], image_hw[0]]])
    expected = official.transform_coords(torch.tensor(points), normalize=True, orig_hw=image_hw)
    np.testing.assert_allclose(frame.apply_points(points), expected.numpy(), atol=1e-9)
    boxes = np.array([[1.0, 2.0, 30.5, 40.0]])
    expected_boxes = official.transform_boxes(torch.tensor(boxes), normalize=True, orig_hw=image_hw).reshape(-1, 4)
    np.testing.assert_allclose(frame.apply_boxes(boxes), expected_boxes.numpy(), atol=1e-9)
    assert frame.input_size == (1024, 1024) and frame.source_size == image_hw


# --------------------------------------------------------------------------- loading, freezing, fingerprint
def test_strict_loading_names_the_problem(tiny_checkpoint: dict[str, Any]) -> None:
    state = tiny_checkpoint["model"]
    dropped = ["no_mem_embed", "sam_mask_decoder.conv_s0.weight"]
    partial = {"model": {key: value for key, value in state.items() if key not in dropped}}
    with pytest.raises(ValueError, match="2 missing key") as error:
        sam2_1_hiera_t(checkpoint=partial, image_size=SMALL_SIZE)
    message = str(error.value)
    assert all(key in message for key in dropped)
    assert "sam2.1_hiera_tiny.pt" in message and "weights_only=True" in message
    with pytest.raises(ValueError, match="1 unexpected key.*extra_head.weight"):
        sam2_1_hiera_t(checkpoint={"model": {**state, "extra_head.weight": torch.zeros(1)}}, image_size=SMALL_SIZE)
    with pytest.raises(ValueError, match="sam2_hiera_small.pt"):
        TEACHERS.build("sam2_hiera_s", checkpoint=tiny_checkpoint, image_size=SMALL_SIZE)


def test_teacher_is_frozen_and_always_in_eval_mode(small_teacher: SAM2Teacher) -> None:
    assert all(not parameter.requires_grad for parameter in small_teacher.parameters())
    small_teacher.train()
    assert not small_teacher.training
    assert not any(module.training for module in small_teacher.modules())
    assert small_teacher.random_init is False


def test_fingerprint_follows_weights_and_preprocessing(
    tiny_checkpoint: dict[str, Any], small_teacher: SAM2Teacher, random_teacher: SAM2Teacher
) -> None:
    plain = sam2_1_hiera_t(checkpoint=tiny_checkpoint["model"], image_size=SMALL_SIZE)
    assert plain.fingerprint() == small_teacher.fingerprint()
    changed = dict(tiny_checkpoint["model"])
    changed["no_mem_embed"] = changed["no_mem_embed"] + 1e-3
    assert sam2_1_hiera_t(checkpoint=changed, image_size=SMALL_SIZE).fingerprint() != small_teacher.fingerprint()
    assert random_teacher.preprocessing() != small_teacher.fingerprint_fields()["preprocessing"]
    assert random_teacher.random_init is True and small_teacher.random_init is False


# --------------------------------------------------------------------------- errors
def test_invalid_arguments_fail_clearly(small_teacher: SAM2Teacher) -> None:
    with pytest.raises(KeyError, match="no feature.*'patch'.*available: embed, hires_s8, hires_s4"):
        sam2_1_hiera_t(features=["patch"], image_size=SMALL_SIZE)
    with pytest.raises(ValueError, match="multiple of 32"):
        sam2_1_hiera_t(image_size=272)
    with pytest.raises(ValueError, match=rf"pixels \[B, 3, {SMALL_SIZE}, {SMALL_SIZE}\]"):
        small_teacher.forward_features(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="RGB uint8"):
        small_teacher.preprocess_image(np.zeros((10, 10), dtype=np.uint8))
    grid = SMALL_SIZE // 16
    with pytest.raises(ValueError, match=r"missing \['hires_s8', 'hires_s4'\]"):
        small_teacher.predict_masks({"embed": torch.zeros(1, 256, grid, grid)}, boxes=torch.zeros(1, 1, 4))
    features = {"embed": torch.zeros(1, 256, grid, grid), "hires_s8": torch.zeros(1, 64, 2 * grid, 2 * grid),
                "hires_s4": torch.zeros(1, 32, 4 * grid, 4 * grid)}
    with pytest.raises(ValueError, match=r"point labels must be \[B, K, P\]"):
        small_teacher.predict_masks(features, points=(torch.zeros(1, 2, 1, 2), torch.ones(1, 2)))
