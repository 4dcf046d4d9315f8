"""Where shipped files (``configs/...``) are found."""

from __future__ import annotations

from pathlib import Path

# The checkout vfmkd runs from (an editable install); its configs/ hold the shipped files.
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def find_project_file(path: str | Path) -> Path | None:
    """Find ``path`` as given (relative to the working directory), else in the checkout.

    So ``configs/backbones/yolov8.yaml`` in an experiment YAML works from any folder.
    Returns None when neither exists.
    """
    path = Path(path).expanduser()
    if path.is_file() or path.is_absolute():
        return path if path.is_file() else None
    shipped = PROJECT_ROOT / path
    return shipped if shipped.is_file() else None
