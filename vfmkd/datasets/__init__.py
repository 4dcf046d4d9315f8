"""Data sets with geometric frames.

Every data set (:class:`YoloDataset`, :class:`CocoDataset`, :class:`FolderDataset`)
returns samples after its transform as a dict:

- ``image``: uint8 ``[3, H, W]``;
- ``boxes``: float32 ``[N, 4]`` xyxy in input pixels; ``cls``: int64 ``[N]``;
- ``masks``: uint8 ``[N, H, W]``, or None unless built with ``load_masks=True``: each
  object's mask (COCO polygons or RLE, YOLO segmentation polygons; the box for a box-only
  label) warped with the image through its frame (nearest); a box cut by the edge of
  the visible region is the tight box of its visible mask;
- ``frame_index``: int64 ``[N]``, the index into ``frames`` of each object's source image;
- ``frames``: list of :class:`~vfmkd.geometry.Frame`, one per source image (up to 4
  for a mosaic; a mosaic tile that ends up invisible is left out);
- ``tiles``: (x0, y0, x1, y1) input region each source image may fill (the whole input
  for a single image), same order as ``frames``;
- ``source_ids`` / ``source_paths``: sample id and path of each source image, same
  order as ``frames`` (what an offline feature store is looked up by);
- ``id``: sample id of the primary image (image path relative to the split's image
  folder, no suffix, '/'-separated); ``path``; ``orig_size``: (h, w) of the primary image.

Data sets also have ``names``, ``ids``, ``load_raw(index)`` (image and targets in original
pixels), ``coco_ground_truth()`` (image ids ``0..len-1``; category ids
``eval_category_ids[label]``: ``label + 1``, or the original ids for COCO json) and
``problems`` (what was skipped while reading, see :mod:`vfmkd.datasets.check`).

:func:`resolve_dataset` turns the ``data.dataset`` string into a :class:`DatasetSpec`;
:func:`build_dataset` builds the split with the training or evaluation transform.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vfmkd.datasets.coco import CocoDataset, sibling_json
from vfmkd.datasets.collate import collate_samples
from vfmkd.datasets.folder import FolderDataset, ImageDataset, ImageRecord
from vfmkd.datasets.image_io import CorruptImageError, DatasetError, Problem, load_image_rgb
from vfmkd.datasets.synthetic import generate_synthetic_dataset
from vfmkd.utils.paths import PROJECT_ROOT
from vfmkd.datasets.transforms import EvalTransform, IdentityTransform, TrainTransform, config_value
from vfmkd.datasets.yolo import YoloDataset, dataset_root, read_data_yaml

logger = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_SYNTHETIC",
    "CocoDataset",
    "CorruptImageError",
    "DatasetError",
    "DatasetSpec",
    "EvalTransform",
    "FolderDataset",
    "IdentityTransform",
    "ImageDataset",
    "ImageRecord",
    "Problem",
    "TrainTransform",
    "YoloDataset",
    "build_dataset",
    "collate_samples",
    "generate_synthetic_dataset",
    "load_image_rgb",
    "resolve_dataset",
]

BUILTIN_SYNTHETIC = "shapes"
DOWNLOAD_HINT = (
    "run `bash scripts/download_datasets.sh` (needs internet), or use the built-in `shapes` data set"
)
# The checkout this package sits in, for configs/data/*.yaml when run from elsewhere.
_PACKAGE_PROJECT_ROOT = PROJECT_ROOT


@dataclass(frozen=True)
class DatasetSpec:
    """A resolved ``data.dataset`` entry.

    Attributes:
        kind: ``yolo`` (data yaml), ``coco`` (annotation json) or ``folder`` (images only).
        source: the data yaml, the annotation json of the training split, or the folder.
        name: the name or path it was resolved from.
        project_root: where relative paths in a data yaml are looked up (after the
            yaml's own folder).
    """

    kind: str
    source: Path
    name: str
    project_root: Path


def _ensure_synthetic(root: Path) -> Path:
    """``root/datasets/shapes/data.yaml``, generated on first use (safe against a
    concurrent generator: the set appears by an atomic rename)."""
    folder = root / "datasets" / BUILTIN_SYNTHETIC
    data_yaml = folder / "data.yaml"
    if data_yaml.is_file():
        return data_yaml
    if folder.exists() and any(folder.iterdir()):
        raise DatasetError(
            f"{folder} exists but has no data.yaml; remove it to regenerate the `shapes` data set"
        )
    logger.info("generating the built-in `%s` data set in %s", BUILTIN_SYNTHETIC, folder)
    try:
        if folder.exists():
            folder.rmdir()
        return generate_synthetic_dataset(folder)
    except OSError:
        # Another process renamed its finished copy into place first.
        if data_yaml.is_file():
            return data_yaml
        raise


def _check_split_exists(data_yaml: Path, root: Path, name: str) -> None:
    data = read_data_yaml(data_yaml)
    base = dataset_root(data, data_yaml, root)
    train = data.get("train")
    entries = train if isinstance(train, (list, tuple)) else [train]
    for entry in entries:
        if entry and not (Path(str(entry)) if Path(str(entry)).is_absolute() else base / str(entry)).exists():
            raise DatasetError(f"data set `{name}`: images not found at {base / str(entry)}; {DOWNLOAD_HINT}")


def resolve_dataset(name_or_path: str | Path, root: Path = Path(".")) -> DatasetSpec:
    """Resolve a ``data.dataset`` string.

    Accepted forms, in order: ``shapes`` (the built-in synthetic set under
    ``root/datasets/shapes``, generated on first use); a name with a
    ``configs/data/<name>.yaml`` (e.g. ``coco128``; its images must be present); a data
    ``.yaml``; a COCO ``.json``; a folder with ``data.yaml``; a folder with
    ``annotations/instances_*.json``; a folder of images.

    Args:
        name_or_path: the entry.
        root: project root (``datasets/`` and ``configs/data/`` are looked up under it,
            then under the checkout this package sits in).

    Raises:
        DatasetError: nothing matches, or a named set's images are missing (the message
            says how to get them).
    """
    root = Path(root)
    name = str(name_or_path)
    if name == BUILTIN_SYNTHETIC:
        return DatasetSpec("yolo", _ensure_synthetic(root), name, root)
    if "/" not in name and "\\" not in name and not name.endswith((".yaml", ".yml", ".json")):
        for project in (root, _PACKAGE_PROJECT_ROOT):
            config = project / "configs" / "data" / f"{name}.yaml"
            if config.is_file():
                _check_split_exists(config, project, name)
                return DatasetSpec("yolo", config, name, project)
    path = Path(name).expanduser()
    candidates = [path] if path.is_absolute() else [root / path, path]
    for candidate in candidates:
        if candidate.is_file() and candidate.suffix in (".yaml", ".yml"):
            return DatasetSpec("yolo", candidate, name, root)
        if candidate.is_file() and candidate.suffix == ".json":
            return DatasetSpec("coco", candidate, name, root)
        if candidate.is_dir():
            for data_name in ("data.yaml", "data.yml"):
                if (candidate / data_name).is_file():
                    return DatasetSpec("yolo", candidate / data_name, name, root)
            annotations = sorted((candidate / "annotations").glob("instances_*.json"))
            if annotations:
                train = [file for file in annotations if "train" in file.name]
                return DatasetSpec("coco", (train or annotations)[0], name, root)
            return DatasetSpec("folder", candidate, name, root)
    known = sorted({BUILTIN_SYNTHETIC, *(file.stem for file in (root / "configs" / "data").glob("*.yaml"))})
    raise DatasetError(
        f"data set `{name}` not found: not a known name ({', '.join(known)}), nor an existing "
        f"data .yaml, COCO .json or folder (looked in {root.resolve()} and the working folder)"
    )


def build_dataset(data_cfg: Any, split: str, train: bool) -> ImageDataset:
    """Build one split of the configured data set.

    Args:
        data_cfg: mapping or object with ``dataset``, ``img_size`` (640), ``augment``
            (see :class:`~vfmkd.datasets.transforms.TrainTransform`), ``load_masks``
            (False), ``cache_images`` (False) and optionally ``images`` (image folder of a
            COCO json) and ``root`` (project root, default the working folder).
        split: split name (``train``, ``val``, ...: a key of the data yaml, or the word
            swapped into a COCO json name; a folder data set uses ``<folder>/<split>``
            when it exists, else the whole folder).
        train: training augmentation (True) or letterbox only (False).

    Returns:
        The data set, with its transform.
    """
    root = Path(config_value(data_cfg, "root", None) or ".")
    spec = resolve_dataset(config_value(data_cfg, "dataset", BUILTIN_SYNTHETIC), root)
    img_size = int(config_value(data_cfg, "img_size", 640))
    transform = (
        TrainTransform(img_size, config_value(data_cfg, "augment", None))
        if train
        else EvalTransform(img_size)
    )
    options = {
        "transform": transform,
        "load_masks": bool(config_value(data_cfg, "load_masks", False)),
        "cache_images": bool(config_value(data_cfg, "cache_images", False)),
    }
    if spec.kind == "yolo":
        return YoloDataset(spec.source, split, project_root=spec.project_root, **options)
    if spec.kind == "coco":
        annotation_file = sibling_json(spec.source, split)
        images = config_value(data_cfg, "images", None) if annotation_file == spec.source else None
        return CocoDataset(annotation_file, images, **options)
    folder = spec.source / split if (spec.source / split).is_dir() else spec.source
    return FolderDataset(folder, **options)
