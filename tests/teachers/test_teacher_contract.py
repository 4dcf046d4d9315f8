"""Contract tests for every teacher family: declared features, preprocessing, determinism, batching.

The families come from the registry: a registered name's family is its first ``_``-separated
part (``sam``, ``sam2``, ``sam2.1``, ``dino``, ``dinov2``, ``dinov3``), with variants that
hold registers (``..._reg``) as their own family. Each family is checked with its smallest
variant at random init and a small input, through :func:`build_teacher_from_config` (the
path an experiment's ``teachers:`` entry takes). The per-teacher files compare each
teacher with the official code; this file checks what every consumer relies on.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch

from vfmkd.config import TeacherConfig
from vfmkd.geometry import Frame
from vfmkd.models import build_model
from vfmkd.registry import TEACHERS
from vfmkd.teachers import BaseTeacher, build_teacher_from_config, canonical_teacher_name

# Batched and single-image forwards may differ by float rounding (other matmul blocking).
BATCH_TOLERANCE = 1e-4

Features = dict[str, torch.Tensor]
Forwards = tuple[Features, Features, list[Features]]


def _family(name: str) -> str:
    """``sam2.1_hiera_t`` -> ``sam2.1``; ``dinov2_vits14_reg`` -> ``dinov2_reg``."""
    prefix = name.split("_")[0]
    return f"{prefix}_reg" if name.endswith("_reg") else prefix


def _registered_families() -> list[str]:
    """The family of every name vfmkd registers that owns its architecture (aliases and the
    test helpers' teachers left out)."""
    return sorted(
        {
            _family(name)
            for name in TEACHERS.names()
            if canonical_teacher_name(name) == name and TEACHERS.get(name).__module__.split(".")[0] == "vfmkd"
        }
    )


# The smallest variant of each family and a small input size it accepts (a multiple of
# its patch size or stride that keeps a grid of at least 4 x 4 at the coarsest feature).
CONTRACT_CASES: dict[str, tuple[str, int]] = {
    "dino": ("dino_vits16", 64),
    "dinov2": ("dinov2_vits14", 56),
    "dinov2_reg": ("dinov2_vits14_reg", 56),
    "dinov3": ("dinov3_vits16", 64),
    "sam": ("sam_vit_b", 64),
    "sam2": ("sam2_hiera_t", 64),
    "sam2.1": ("sam2.1_hiera_t", 64),
    "timm": ("timm", 64),
    "vfmkd": ("vfmkd", 64),
}
# Further config keys of a family's case; the vfmkd teacher reads a checkpoint the fixture writes.
CONTRACT_OPTIONS: dict[str, dict[str, str]] = {"timm": {"timm_model": "convnext_atto"}}
FAMILIES = _registered_families()


def test_every_contract_case_names_a_registered_family_member() -> None:
    assert sorted(CONTRACT_CASES) == FAMILIES, (
        f"teacher families {FAMILIES} but contract cases for {sorted(CONTRACT_CASES)}; keep CONTRACT_CASES "
        f"in {__file__} to one entry per family"
    )
    for family, (name, _) in CONTRACT_CASES.items():
        assert name in TEACHERS and canonical_teacher_name(name) == name and _family(name) == family


@pytest.fixture(scope="module", params=FAMILIES)
def family_teacher(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, randomise_constant_parameters: Any
) -> tuple[BaseTeacher, int]:
    """The family's smallest variant at seeded random init and its input size."""
    family = request.param
    if family not in CONTRACT_CASES:
        pytest.fail(
            f"teacher family '{family}' has no contract case: add its smallest variant and a small input size "
            f"to CONTRACT_CASES in {__file__}"
        )
    name, size = CONTRACT_CASES[family]
    options = dict(CONTRACT_OPTIONS.get(family, {}))
    if family == "vfmkd":
        path = tmp_path_factory.mktemp("vfmkd_teacher") / "best.pt"
        torch.manual_seed(0)
        model = build_model({"backbone": {"type": "yolov8", "scale": "n"}})
        # NOTE: at init BatchNorm's scale of 1 shrinks activations towards zero stage by stage.
        randomise_constant_parameters(model, scale=1.0)
        torch.save({"format_version": 2, "model": model.state_dict(), "model_config": model.config}, path)
        options["model_path"] = str(path)
    config = TeacherConfig(name=name, allow_random_init=True, random_init_seed=0, image_size=size, **options)
    teacher = build_teacher_from_config("contract", config)
    if family == "vfmkd":
        teacher.random_init = True  # random weights from a file, as the other families' random init
    return teacher, size


@pytest.fixture(scope="module")
def forwards(family_teacher: tuple[BaseTeacher, int], images: list[np.ndarray]) -> Forwards:
    """Features of the two images as one batch, that batch again, and each image alone."""
    teacher, _ = family_teacher
    pixels, _ = teacher.preprocess(images)
    batched, again = teacher.extract(pixels), teacher.extract(pixels)
    return batched, again, [teacher.extract(pixels[index : index + 1]) for index in range(len(images))]


@pytest.fixture(scope="module")
def images(non_square_image: np.ndarray) -> list[np.ndarray]:
    """Two RGB uint8 images of different shapes and content: wide ``[150, 230]`` and tall ``[150, 100]``."""
    return [non_square_image, np.ascontiguousarray(non_square_image[:, 130:][:, ::-1])]


def test_teacher_is_built_frozen_from_its_config(family_teacher: tuple[BaseTeacher, int]) -> None:
    teacher, _ = family_teacher
    assert isinstance(teacher, BaseTeacher) and teacher.random_init is True
    assert not teacher.training and not any(parameter.requires_grad for parameter in teacher.parameters())
    assert teacher.train().training is False
    assert list(teacher.feature_specs) == list(teacher.available_specs)


def test_preprocessing_and_frames_are_described(
    family_teacher: tuple[BaseTeacher, int], images: list[np.ndarray]
) -> None:
    teacher, size = family_teacher
    settings = teacher.preprocessing()
    assert json.loads(json.dumps(settings)) == settings
    assert settings["image_size"] == size and isinstance(settings["resize"], str) and settings["resize"]
    mean, std = teacher.input_mean_std()
    assert len(mean) == len(std) == 3
    # Inputs in [0, 1]: a normalised teacher's mean and std, or none (vfmkd models: 0 and 1).
    assert all(0.0 <= value < 1.0 for value in mean) and all(0.0 < value <= 1.0 for value in std)
    assert teacher.fingerprint_fields()["preprocessing"] == settings

    pixels, frames = teacher.preprocess(images)
    assert pixels.dtype == torch.float32 and pixels.shape == (2, 3, size, size)
    assert torch.isfinite(pixels).all()
    for image, frame in zip(images, frames):
        height, width = image.shape[:2]
        assert isinstance(frame, Frame) and frame == teacher.frame_for((height, width))
        assert frame.input_size == (size, size) and frame.source_size == (height, width)
        x0, y0, x1, y1 = frame.valid
        assert 0.0 <= x0 < x1 <= size and 0.0 <= y0 < y1 <= size
        # The frame maps the whole image onto its valid region.
        corners = frame.matrix @ np.array([[0.0, 0.0, 1.0], [width, height, 1.0]]).T
        np.testing.assert_allclose(corners.T.ravel(), [x0, y0, x1, y1], atol=1e-6)

    online, online_frames = teacher.preprocess_tensor(torch.from_numpy(images[0]).permute(2, 0, 1)[None] / 255.0)
    assert online.dtype == torch.float32 and online.shape == (1, 3, size, size)
    assert online_frames == [frames[0]]


def test_features_match_their_declaration(family_teacher: tuple[BaseTeacher, int], forwards: Forwards) -> None:
    teacher, size = family_teacher
    specs = teacher.feature_specs
    features = forwards[0]
    assert list(features) == list(specs)
    for name, spec in specs.items():
        assert spec.name == name and spec.channels > 0 and isinstance(spec.description, str) and spec.description
        # A map covers the input with its stride; a global vector (stride 0) is one cell.
        covered = (spec.stride * spec.height, spec.stride * spec.width) if spec.stride else (spec.height, spec.width)
        assert covered == ((size, size) if spec.stride else (1, 1)), spec
        feature = features[name]
        assert feature.dtype == torch.float32
        assert feature.shape == (2, spec.channels, spec.height, spec.width), name
        assert torch.isfinite(feature).all(), name


def test_features_are_deterministic_and_batch_consistent(forwards: Forwards) -> None:
    batched, again, singles = forwards
    for name, feature in batched.items():
        assert torch.equal(feature, again[name]), f"{name}: two forwards of one batch differ"
        one_by_one = torch.cat([single[name] for single in singles])
        torch.testing.assert_close(feature, one_by_one, atol=BATCH_TOLERANCE, rtol=BATCH_TOLERANCE, msg=name)
        assert not torch.allclose(feature[0], feature[1]), f"{name}: two different images give one feature"
