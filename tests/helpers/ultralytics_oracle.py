"""Import Ultralytics as a test oracle (AGPL: tests only, never from vfmkd)."""

from __future__ import annotations

import os
from types import ModuleType

import pytest


def import_ultralytics(module: str) -> ModuleType:
    """``module`` (e.g. ``"ultralytics.nn.modules.head"``), or skip the calling test module.

    Ultralytics runs offline and quiet, and the ``PIL.Image.open`` it replaces on import is put back.
    """
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    imported = pytest.importorskip(module)
    _undo_pil_patch()
    return imported


def _undo_pil_patch() -> None:
    # NOTE: importing ultralytics replaces PIL.Image.open process-wide with a wrapper that
    # pip-installs a HEIF plugin on any unidentified image; other tests feed corrupt images on
    # purpose, so put Pillow's own function back.
    from PIL import Image

    patches = __import__("ultralytics.utils.patches", fromlist=["_image_open"])
    original = getattr(patches, "_image_open", None)
    if original is not None:
        Image.open = original
