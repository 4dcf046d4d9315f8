"""Shared fixtures: tiny images, their folder data set, the toy teacher."""

import pytest

from toy_feature_teacher import ToyPoolTeacher, write_images
from vfmkd.datasets import build_dataset

NUM_IMAGES = 12


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    write_images(folder, NUM_IMAGES)
    return folder


@pytest.fixture
def dataset(image_folder):
    return build_dataset({"dataset": str(image_folder), "img_size": 64}, "train", train=False)


@pytest.fixture
def teacher():
    return ToyPoolTeacher(image_size=32)
