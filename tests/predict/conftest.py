"""Fixtures of the predict tests: small checkpoints written with ``save_checkpoint`` and a
folder of non-square images with one unreadable file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.predict.predict_models import BAD_IMAGE, IMAGE_SIZES, build_student, write_checkpoint


@pytest.fixture(scope="session")
def detector_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A detector (YOLOv8n + yolo_head, 6 classes) trained on the built-in ``shapes`` set at 64 px."""
    return write_checkpoint(tmp_path_factory.mktemp("detector") / "best.pt", build_student())


@pytest.fixture(scope="session")
def segmenter_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The detector with a small SAM 2 mask head."""
    return write_checkpoint(tmp_path_factory.mktemp("segmenter") / "best.pt", build_student(segmentation=True))


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``wide.png`` (48 x 100), ``sub/tall.jpg`` (90 x 36) and an unreadable ``broken.jpg``; read only."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, (height, width) in IMAGE_SIZES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / name)
    (folder / BAD_IMAGE).write_bytes(b"not a jpeg")
    return folder
