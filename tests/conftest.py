"""Fixtures shared by every test directory: the standard small synthetic data set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from vfmkd.datasets.synthetic import generate_synthetic_dataset

SYNTHETIC_TRAIN_IMAGES = 6
SYNTHETIC_VAL_IMAGES = 3


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs ``-n 2``), the cores are shared out between the
    workers: each worker, and the processes its tests start, gets ``cores // workers`` torch
    threads, so two workers do not oversubscribe the CPU."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = max(1, (os.cpu_count() or 1) // int(workers))
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


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
