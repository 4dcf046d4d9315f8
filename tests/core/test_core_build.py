"""The builder's config preparation: masks for heads that need them, init_from: teacher."""

from __future__ import annotations

import logging

import pytest
import torch

from vfmkd.config import ConfigError, validate_config
from vfmkd.core.build import prepare_config


def _config(tmp_path, teachers: dict, init_from="teacher", decoder="sam2"):
    return validate_config(
        {
            "model": {"backbone": {"type": "yolov8", "scale": "n"},
                      "heads": {"detection": {"type": "yolo_head", "num_classes": 6},
                                "segmentation": {"type": "sam_mask_head", "decoder": decoder, "init_from": init_from}}},
            "teachers": teachers,
            "train": {"output_dir": str(tmp_path)},
        }
    )


def test_mask_heads_load_masks_and_take_the_teachers_weights(tmp_path, caplog):
    weights = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": {}}, weights)
    teachers = {"dino": {"name": "dinov2_vits14", "allow_random_init": True},
                "sam2": {"name": "sam2.1_hiera_t", "model_path": str(weights)}}
    config = _config(tmp_path, teachers)
    assert config.data.load_masks is False
    prepared = prepare_config(config)
    assert prepared.data.load_masks is True
    assert prepared.model.heads["segmentation"]["init_from"] == str(weights)
    assert config.model.heads["segmentation"]["init_from"] == "teacher"  # the caller's config is left alone

    random = {"sam2": {"name": "sam2.1_hiera_t", "allow_random_init": True}}
    with caplog.at_level(logging.WARNING):
        assert prepare_config(_config(tmp_path, random)).model.heads["segmentation"]["init_from"] is None
    assert "random weights" in caplog.text
    unchanged = prepare_config(_config(tmp_path, random, init_from=None, decoder="sam"))
    assert unchanged.model.heads["segmentation"]["init_from"] is None


def test_init_from_teacher_without_a_teacher_of_the_family_is_a_config_error(tmp_path):
    teachers = {"sam2": {"name": "sam2.1_hiera_t", "allow_random_init": True}}
    with pytest.raises(ConfigError, match=r"model\.heads\.segmentation\.init_from: 'teacher' needs an enabled SAM-family"):
        prepare_config(_config(tmp_path, teachers, decoder="sam"))
