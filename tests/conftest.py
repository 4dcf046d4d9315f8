"""Fixtures shared by every test directory: the standard small synthetic data set."""

from __future__ import annotations

from pathlib import Path

import pytest

from vfmkd.datasets.synthetic import generate_synthetic_dataset

SYNTHETIC_TRAIN_IMAGES = 6
SYNTHETIC_VAL_IMAGES = 3


@pytest.fixture(scope="session")
def synthetic_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project root whose ``datasets/shapes`` holds the standard small synthetic data set:
    :data:`SYNTHETIC_TRAIN_IMAGES` training and :data:`SYNTHETIC_VAL_IMAGES` validation
    images, seed 0, in the YOLO and COCO layouts of
    :func:`~vfmkd.datasets.synthetic.generate_synthetic_dataset`.

    Generated once per session and shared by every test that uses it: read it, never
    write into it (outputs go to the test's own ``tmp_path``).
    """
    root = tmp_path_factory.mktemp("project")
    generate_synthetic_dataset(
        root / "datasets" / "shapes", num_train=SYNTHETIC_TRAIN_IMAGES, num_val=SYNTHETIC_VAL_IMAGES
    )
    return root


@pytest.fixture(scope="session")
def synthetic_data_yaml(synthetic_project: Path) -> Path:
    """The ``data.yaml`` of the shared synthetic data set (see :func:`synthetic_project`)."""
    return synthetic_project / "datasets" / "shapes" / "data.yaml"
