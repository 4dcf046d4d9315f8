"""The class names and COCO category ids of a checkpoint's detector.

Checkpoints written by ``vfmkd train`` store them (``names``, ``category_ids``, from the
validation data set; :func:`checkpoint_classes` reads them). Older checkpoints do not: a
checkpoint stores the experiment config, whose ``data.dataset`` names the data set the
detector was trained on; its classes come from there without building the data set: the
built-in ``shapes`` set's list, a data yaml's ``names``, or a COCO json's ``categories``
(the validation split's file, the smaller one). When the data set is not on this machine
the classes are ``class0``, ``class1``, ... with category ids ``label + 1``, and a warning
says how to name them (``--config`` with a ``data.dataset`` that is here).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from vfmkd.datasets import BUILTIN_SYNTHETIC, DatasetError, resolve_dataset
from vfmkd.datasets.coco import read_coco_categories, sibling_json
from vfmkd.datasets.synthetic import SHAPE_CLASSES
from vfmkd.datasets.transforms import config_value
from vfmkd.datasets.yolo import read_data_yaml

__all__ = ["Classes", "checkpoint_classes", "dataset_classes"]

logger = logging.getLogger(__name__)

#: Class names by label, and the COCO category id of each label.
Classes = tuple[list[str], list[int]]
_HINT = "naming them class0, class1, ...; give --config with a data.dataset that is on this machine to name them"


def checkpoint_classes(checkpoint: Mapping[str, Any], num_classes: int, data: Any = None) -> Classes:
    """The classes a checkpoint stores, else those of its (or ``data``'s) data set.

    Args:
        checkpoint: :func:`~vfmkd.core.checkpoint.load_checkpoint`'s result.
        num_classes: the detector's classes.
        data: a ``data`` config section that overrides the checkpoint's (``--config``): its
            data set names the classes then.

    Returns:
        ``(names, category_ids)``, ``num_classes`` each.
    """
    names = checkpoint.get("names")
    if data is None and names and len(names) == num_classes:
        category_ids = checkpoint.get("category_ids") or list(range(1, num_classes + 1))
        return [str(name) for name in names], [int(value) for value in category_ids]
    if data is None:
        data = (checkpoint.get("config") or {}).get("data")
    return dataset_classes(data, num_classes)


def dataset_classes(data: Any, num_classes: int) -> Classes:
    """The class names and category ids of the data set a ``data`` config section names.

    Args:
        data: the ``data`` section (a mapping or a :class:`~vfmkd.config.DataConfig`):
            ``dataset``, ``val_split`` and optionally ``root``; None when unknown.
        num_classes: the detector's classes; names that do not match them in number are
            not used (generic names instead, with a warning).

    Returns:
        ``(names, category_ids)``, ``num_classes`` each.
    """
    dataset = config_value(data, "dataset", None)
    found = _found_classes(str(dataset), data) if dataset is not None else None
    if dataset is None:
        logger.warning("class names unknown: the checkpoint stores no data set; %s", _HINT)
    elif found is not None and len(found[0]) != num_classes:
        logger.warning(
            "the data set '%s' has %d classes but the detector predicts %d; %s",
            dataset,
            len(found[0]),
            num_classes,
            _HINT,
        )
        found = None
    if found is None:
        return [f"class{label}" for label in range(num_classes)], list(range(1, num_classes + 1))
    return found


def _found_classes(dataset: str, data: Any) -> Classes | None:
    """The data set's classes; None (with a warning) when it is not here, or for a folder of images."""
    try:
        return _read_classes(dataset, data)
    except DatasetError as error:
        logger.warning("class names unknown (%s); %s", error, _HINT)
        return None


def _read_classes(dataset: str, data: Any) -> Classes | None:
    """The data set's classes, read from its label files' headers; None for a folder of images."""
    if dataset == BUILTIN_SYNTHETIC:
        # NOTE: not resolved: resolve_dataset would generate the set when it is missing.
        return list(SHAPE_CLASSES), list(range(1, len(SHAPE_CLASSES) + 1))
    spec = resolve_dataset(dataset, Path(config_value(data, "root", None) or "."))
    if spec.kind == "yolo":
        names = read_data_yaml(spec.source)["names"]
        return names, list(range(1, len(names) + 1))
    if spec.kind == "coco":
        annotation_file = sibling_json(spec.source, str(config_value(data, "val_split", "val")))
        return read_coco_categories(annotation_file)
    return None
