"""The ``timm`` teacher against timm's own model and eval transform."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vfmkd.config import TeacherConfig
from vfmkd.geometry import resize_frame
from vfmkd.teachers import build_teacher, build_teacher_from_config

timm = pytest.importorskip("timm")
timm_data = pytest.importorskip("timm.data")


@pytest.mark.parametrize(("timm_model", "image_size"), [("convnext_atto", 64), ("resnet18", None)])
def test_features_equal_timm_on_its_own_transform(
    tmp_path: Path, non_square_image: np.ndarray, timm_model: str, image_size: int | None
) -> None:
    torch.manual_seed(0)
    model = timm.create_model(timm_model, pretrained=False).eval()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    config = TeacherConfig(name="timm", timm_model=timm_model, model_path=str(tmp_path / "weights.pt"), image_size=image_size)
    teacher = build_teacher_from_config("timm", config)

    data_config = timm_data.resolve_model_data_config(model)
    if image_size:
        data_config["input_size"] = (3, image_size, image_size)
    # NOTE: the teacher's documented frame: timm's eval transform without the centre crop.
    transform = timm_data.create_transform(**{**data_config, "crop_pct": 1.0, "crop_mode": "squash"})
    expected_pixels = transform(Image.fromarray(non_square_image))[None]
    pixels, frames = teacher.preprocess([non_square_image])
    torch.testing.assert_close(pixels, expected_pixels, atol=0, rtol=0)
    side = data_config["input_size"][1]
    assert frames[0] == resize_frame(non_square_image.shape[:2], (side, side))

    # timm's features_only wrapper of the same weights (the same seed builds the same model inside it).
    torch.manual_seed(0)
    features_model = timm.create_model(timm_model, pretrained=False, features_only=True).eval()
    with torch.no_grad():
        expected = features_model(expected_pixels)
    features = teacher.extract(pixels)
    assert list(features) == [f"stage{index}" for index in range(len(expected))]
    for (name, feature), reference in zip(features.items(), expected):
        spec = teacher.feature_specs[name]
        assert feature.shape == (1, spec.channels, spec.height, spec.width) == reference.shape
        torch.testing.assert_close(feature, reference, atol=1e-5, rtol=1e-5)
    assert teacher.input_mean_std() == (list(data_config["mean"]), list(data_config["std"]))


def test_vit_levels_and_a_chosen_subset() -> None:
    config = TeacherConfig(name="timm", timm_model="vit_tiny_patch16_224", allow_random_init=True, image_size=64,
                           features=["stage2", "stage11"])
    teacher = build_teacher_from_config("vit", config)
    assert teacher.random_init and list(teacher.feature_specs) == ["stage2", "stage11"]
    features = teacher.extract(torch.zeros(1, 3, 64, 64))
    assert features["stage11"].shape == (1, 192, 4, 4)


def test_bad_input_fails_before_any_work() -> None:
    with pytest.raises(ValueError, match="needs timm_model"):
        build_teacher_from_config("timm", TeacherConfig(name="timm", allow_random_init=True))
    with pytest.raises(ValueError, match="unknown timm_model 'convnext_atoo'; closest: convnext_atto"):
        build_teacher("timm", random_init=True, options={"timm_model": "convnext_atoo"})
    with pytest.raises(KeyError, match=r"no feature\(s\) \['stage9'\]; available: stage0, stage1, stage2, stage3"):
        build_teacher("timm", random_init=True, features=["stage9"], options={"timm_model": "convnext_atto"})
    with pytest.raises(ValueError, match="weights"):
        build_teacher_from_config("timm", TeacherConfig(name="timm", timm_model="convnext_atto", model_path="/nonexistent.pt"))
    from vfmkd.config import ConfigError

    with pytest.raises(ConfigError, match=r"teachers.sam2.timm_model: only a 'name: timm' teacher takes it"):
        build_teacher_from_config("sam2", TeacherConfig(name="sam2.1_hiera_t", timm_model="x", allow_random_init=True))
