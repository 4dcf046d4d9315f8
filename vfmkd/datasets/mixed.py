"""Labelled and unlabelled images in one training set (``data.unlabeled``, ``data.label_fraction``).

:func:`build_train_dataset` builds the labelled split as :func:`~vfmkd.datasets.build_dataset`
does, then, when the config asks for it, adds unlabelled images and returns a
:class:`MixedDataset`: the labelled samples first (indices ``0 .. labeled_count - 1``),
then each unlabelled set. Unlabelled samples say ``has_labels`` False, so the heads mask
their task losses per sample and they contribute only the distillation terms.

- ``data.unlabeled``: image folders, globs or data sets (data yaml, COCO json, a named
  set) whose labels are ignored. Their sample ids are namespaced
  (``unlabeled<k>:<id>``, ``k`` the entry's position), so they never collide with the
  labelled ids in a feature store.
- ``data.label_fraction``: keep the labels of that fraction of the labelled set (chosen
  with the run's seed); the rest become unlabelled samples with their own ids (same
  images, same store rows).

A mosaic draws its tiles from its own part, so a sample is wholly labelled or not.
"""

from __future__ import annotations

import bisect
import dataclasses
import glob
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch.utils.data import Dataset

from vfmkd.datasets.folder import ImageDataset, ImageRecord, check_image_files, find_images, sample_id
from vfmkd.datasets.image_io import DatasetError, Problem, is_image_file
from vfmkd.datasets.transforms import EvalTransform, TrainTransform, config_value

__all__ = [
    "MixedDataset",
    "UnlabeledImages",
    "build_train_dataset",
    "build_unlabeled",
    "split_labels",
    "unlabeled_entry_problem",
    "unlabeled_id",
]

logger = logging.getLogger(__name__)

UNLABELED_ID_PREFIX = "unlabeled"
_GLOB_CHARACTERS = ("*", "?", "[")


def unlabeled_id(entry_index: int, local_id: str) -> str:
    """Sample id of image ``local_id`` of the ``entry_index``-th ``data.unlabeled`` entry."""
    return f"{UNLABELED_ID_PREFIX}{entry_index}:{local_id}"


class UnlabeledImages(ImageDataset):
    """Images without labels (targets always empty, ``has_labels`` False), from records.

    Args:
        records: the images; their targets are dropped.
        names: class names (of the labelled set, for the heads).
        **kwargs: see :class:`~vfmkd.datasets.folder.ImageDataset`.
    """

    has_labels = False

    def __init__(self, records: Sequence[ImageRecord], names: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__([_without_targets(record) for record in records], names, **kwargs)


def _without_targets(record: ImageRecord, new_id: str | None = None) -> ImageRecord:
    return dataclasses.replace(
        record,
        id=record.id if new_id is None else new_id,
        boxes=np.zeros((0, 4), dtype=np.float32),
        cls=np.zeros((0,), dtype=np.int64),
        segments=None,
        areas=None,
        crowd=[],
        object_ids=None,
    )


class MixedDataset(Dataset):
    """A labelled data set followed by unlabelled ones, as one map-style training set.

    Args:
        labeled: the labelled part (indices ``0 .. len(labeled) - 1``).
        unlabeled: the unlabelled parts, in order after it.

    Raises:
        DatasetError: a sample id appears in two parts (the store would mix them up).
    """

    def __init__(self, labeled: ImageDataset, unlabeled: Sequence[ImageDataset]) -> None:
        self.parts = [labeled, *unlabeled]
        self.labeled_count = len(labeled)
        self.unlabeled_count = sum(len(part) for part in unlabeled)
        self._starts = list(np.cumsum([0, *(len(part) for part in self.parts)]))[:-1]
        self.ids = [sample for part in self.parts for sample in part.ids]
        self.names = labeled.names
        self.problems: list[Problem] = [problem for part in self.parts for problem in part.problems]
        seen: set[str] = set()
        clashes = [sample for sample in self.ids if sample in seen or seen.add(sample)]  # type: ignore[func-returns-value]
        if clashes:
            raise DatasetError(
                f"{len(clashes)} sample id(s) appear in two of the training sets (first: '{clashes[0]}'); "
                "the feature store keys samples by id, so each image must be listed once"
            )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def has_labels(self) -> bool:
        """Whether the labelled part has labels (the heads then train on it)."""
        return bool(self.parts[0].has_labels)

    def _locate(self, index: int) -> tuple[ImageDataset, int]:
        part = bisect.bisect_right(self._starts, index) - 1
        return self.parts[part], index - int(self._starts[part])

    def __getitem__(self, index: int) -> dict[str, Any]:
        dataset, local = self._locate(index)
        return dataset[local]

    def load_raw(self, index: int) -> dict[str, Any]:
        """The part's :meth:`~vfmkd.datasets.folder.ImageDataset.load_raw` of sample ``index``."""
        dataset, local = self._locate(index)
        return dataset.load_raw(local)

    @property
    def mosaic_active(self) -> bool:
        """Whether any part may make mosaics."""
        return any(part.mosaic_active for part in self.parts)

    def close_mosaic(self) -> None:
        """Stop every part's mosaics."""
        for part in self.parts:
            part.close_mosaic()


def split_labels(
    dataset: ImageDataset, fraction: float, seed: int, *, cache_images: bool = False
) -> tuple[ImageDataset, ImageDataset | None]:
    """Keep the labels of ``round(fraction * N)`` images (at least one), chosen with ``seed``.

    Returns:
        The labelled part (the kept images, in data set order) and the rest without labels
        (same sample ids; None when every image keeps its labels).
    """
    count = len(dataset.records)
    keep = min(max(int(round(fraction * count)), 1), count)
    if keep == count:
        return dataset, None
    chosen = np.sort(np.random.default_rng(seed).permutation(count)[:keep])
    rest = np.setdiff1d(np.arange(count), chosen)
    options = {"transform": dataset.transform, "load_masks": dataset.load_masks, "cache_images": cache_images}
    labeled = ImageDataset(
        [dataset.records[index] for index in chosen.tolist()],
        dataset.names,
        eval_category_ids=dataset.eval_category_ids,
        source=f"{dataset.source} (labels kept: {keep} of {count})",
        **options,
    )
    unlabeled = UnlabeledImages(
        [dataset.records[index] for index in rest.tolist()],
        dataset.names,
        source=f"{dataset.source} (labels dropped: {count - keep} of {count})",
        **options,
    )
    return labeled, unlabeled


def _is_glob(entry: str) -> bool:
    return any(character in entry for character in _GLOB_CHARACTERS)


def _glob_images(entry: str) -> tuple[Path, list[Path]]:
    """The images a glob names (folders it matches are searched recursively) and the
    folder ids are relative to (the glob's part before its first wildcard)."""
    parts = Path(entry).expanduser().parts
    fixed = next(index for index, part in enumerate(parts) if _is_glob(part))
    root = Path(*parts[:fixed]) if fixed else Path(".")
    found: list[Path] = []
    for match in sorted(glob.glob(str(Path(entry).expanduser()), recursive=True)):
        path = Path(match)
        if path.is_dir():
            found += find_images(path)
        elif is_image_file(path):
            found.append(path)
    return root, sorted(set(found))


def unlabeled_entry_problem(entry: str) -> str | None:
    """What is wrong with a ``data.unlabeled`` entry (checked when the config loads), or None.

    A glob must match images; a path must exist and a plain folder hold images (a data
    yaml or COCO json is checked when it is read). A bare name (``shapes``, ``coco128``)
    is resolved as ``data.dataset`` is.
    """
    if _is_glob(entry):
        return None if _glob_images(entry)[1] else "the glob matches no image"
    path = Path(entry).expanduser()
    if not path.exists():
        bare_name = "/" not in entry and "\\" not in entry and not path.suffix
        return None if bare_name else "no such file or folder"
    if path.is_dir() and not any((path / name).is_file() for name in ("data.yaml", "data.yml")):
        if (path / "annotations").is_dir():
            return None
        if not any(is_image_file(file) and file.is_file() for file in path.rglob("*")):
            return "the folder holds no images"
    return None


def _part_options(data_cfg: Any) -> dict[str, Any]:
    return {
        "load_masks": bool(config_value(data_cfg, "load_masks", False)),
        "cache_images": bool(config_value(data_cfg, "cache_images", False)),
    }


def _transform(data_cfg: Any, train: bool) -> Any:
    img_size = int(config_value(data_cfg, "img_size", 640))
    return TrainTransform(img_size, config_value(data_cfg, "augment", None)) if train else EvalTransform(img_size)


def build_unlabeled(
    data_cfg: Any, split: str, *, train: bool, names: Sequence[str] = ()
) -> list[UnlabeledImages]:
    """One :class:`UnlabeledImages` per ``data.unlabeled`` entry, ids namespaced by position.

    A data set entry (yaml, json, named set, folder with ``<split>``) gives its ``split``;
    its labels are ignored.
    """
    from vfmkd.datasets import build_dataset

    entries = config_value(data_cfg, "unlabeled", None) or []
    sets = []
    for position, entry in enumerate([entries] if isinstance(entries, str) else entries):
        where = f"data.unlabeled[{position}] '{entry}'"
        problem = unlabeled_entry_problem(str(entry))
        if problem:
            raise DatasetError(f"{where}: {problem}")
        if _is_glob(str(entry)):
            root, paths = _glob_images(str(entry))
            problems: list[Problem] = []
            records = [ImageRecord(path, sample_id(path, root), h, w) for path, h, w in check_image_files(paths, problems)]
        else:
            root_cfg = {"root": config_value(data_cfg, "root", None) or "."}
            read = build_dataset({**root_cfg, "dataset": str(entry)}, split, train=False)
            records, problems = read.records, []
        records = [dataclasses.replace(record, id=unlabeled_id(position, record.id)) for record in records]
        if not records:
            raise DatasetError(f"{where}: no usable images")
        sets.append(
            UnlabeledImages(
                records, names, transform=_transform(data_cfg, train), problems=problems, source=where,
                **_part_options(data_cfg),
            )
        )
    return sets


def build_train_dataset(data_cfg: Any, split: str, *, train: bool = True, seed: int = 0) -> Dataset:
    """The training split with ``data.unlabeled`` and ``data.label_fraction`` applied.

    Args:
        data_cfg: the ``data`` section (mapping or object), see
            :func:`~vfmkd.datasets.build_dataset`.
        split: the labelled split (unlabelled data sets give the same split name).
        train: training augmentation or letterbox only (extraction).
        seed: chooses which images keep their labels, unless ``data.label_seed`` is set.

    Returns:
        The labelled data set alone, or a :class:`MixedDataset`.
    """
    from vfmkd.datasets import build_dataset

    labeled = build_dataset(data_cfg, split, train=train)
    unlabeled: list[ImageDataset] = []
    fraction = float(config_value(data_cfg, "label_fraction", 1.0) or 1.0)
    if fraction < 1.0:
        label_seed = config_value(data_cfg, "label_seed", None)
        seed = seed if label_seed is None else int(label_seed)
        labeled, rest = split_labels(labeled, fraction, seed, cache_images=_part_options(data_cfg)["cache_images"])
        if rest is not None:
            unlabeled.append(rest)
    unlabeled += build_unlabeled(data_cfg, split, train=train, names=labeled.names)
    if not unlabeled:
        return labeled
    mixed = MixedDataset(labeled, unlabeled)
    logger.info("training data: %d labelled and %d unlabelled images", mixed.labeled_count, mixed.unlabeled_count)
    return mixed
