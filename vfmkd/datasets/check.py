"""``vfmkd data check DATA``: list every problem of a data set without training.

Problems are the same ones the data sets skip (with a warning) when they are built:
unreadable images, malformed label lines (``file:line``), annotations that refer to
unknown images or categories, and the errors that stop a run (missing splits, empty
splits, class names that disagree with ``nc``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

from vfmkd.datasets import resolve_dataset
from vfmkd.datasets.coco import build_coco_records, find_image_dir, sibling_json
from vfmkd.datasets.folder import check_image_files, find_images
from vfmkd.datasets.image_io import DatasetError, Problem
from vfmkd.datasets.yolo import build_yolo_records, read_data_yaml

__all__ = ["Problem", "check_dataset", "format_problems"]

SPLITS = ("train", "val", "test")


def _check_yolo(data_yaml: Path, project_root: Path) -> list[Problem]:
    try:
        data = read_data_yaml(data_yaml)
    except DatasetError as error:
        return [Problem(str(data_yaml), None, str(error))]
    problems: list[Problem] = []
    splits = [split for split in SPLITS if data.get(split)]
    if "train" not in splits:
        problems.append(Problem(str(data_yaml), None, "no `train:` split; training needs one"))
    for split in splits:
        try:
            records, found = build_yolo_records(data, split, data_yaml, project_root)
        except DatasetError as error:
            problems.append(Problem(str(data_yaml), None, str(error)))
            continue
        problems += found
        if not records:
            problems.append(Problem(str(data_yaml), None, f"split `{split}` has no usable images"))
    return problems


def _check_coco(annotation_file: Path) -> list[Problem]:
    problems: list[Problem] = []
    files = sorted({sibling_json(annotation_file, split) for split in SPLITS})
    for file in files:
        try:
            records, _, _, found = build_coco_records(file, find_image_dir(file))
        except DatasetError as error:
            problems.append(Problem(str(file), None, str(error)))
            continue
        problems += found
        if not records:
            problems.append(Problem(str(file), None, "no usable images"))
    return problems


def _check_folder(folder: Path) -> list[Problem]:
    problems: list[Problem] = []
    usable = check_image_files(find_images(folder), problems)
    if not usable:
        problems.append(Problem(str(folder), None, "no usable images in this folder"))
    return problems


def check_dataset(path_or_yaml: str | Path, root: Path = Path(".")) -> list[Problem]:
    """Every problem of a data set, without training.

    Args:
        path_or_yaml: anything ``data.dataset`` accepts (see
            :func:`vfmkd.datasets.resolve_dataset`).
        root: project root.

    Returns:
        The problems (empty when the data set is clean).
    """
    try:
        spec = resolve_dataset(path_or_yaml, root)
    except DatasetError as error:
        return [Problem(str(path_or_yaml), None, str(error))]
    if spec.kind == "yolo":
        return _check_yolo(spec.source, spec.project_root)
    if spec.kind == "coco":
        return _check_coco(spec.source)
    return _check_folder(spec.source)


def format_problems(problems: Sequence[Problem]) -> str:
    """One line per problem (``severity: file:line: message``) and a count by severity."""
    lines = [str(problem) for problem in problems]
    counts = Counter(problem.severity for problem in problems)
    if counts:
        lines.append(", ".join(f"{count} {severity}(s)" for severity, count in sorted(counts.items())))
    return "\n".join(lines)
