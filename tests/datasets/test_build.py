"""Resolving ``data.dataset``, building splits, folder data sets and batching."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tests.conftest import SYNTHETIC_TRAIN_IMAGES, SYNTHETIC_VAL_IMAGES
from vfmkd.datasets import (
    CocoDataset,
    DatasetError,
    FolderDataset,
    TrainTransform,
    YoloDataset,
    build_dataset,
    collate_samples,
    generate_synthetic_dataset,
    resolve_dataset,
)
from vfmkd.geometry import Frame

SMALL = {"img_size": 64, "augment": {"mosaic": 1.0}}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VFMKD_CACHE_DIR", str(tmp_path / "cache"))


def test_shapes_is_generated_on_first_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    import vfmkd.datasets as datasets_module

    def small(out: Path) -> Path:
        calls.append(out)
        return generate_synthetic_dataset(out, num_train=2, num_val=1)

    monkeypatch.setattr(datasets_module, "generate_synthetic_dataset", small)
    spec = resolve_dataset("shapes", tmp_path)
    assert spec.kind == "yolo" and spec.source == tmp_path / "datasets" / "shapes" / "data.yaml"
    assert resolve_dataset("shapes", tmp_path).source == spec.source
    assert len(calls) == 1


def test_resolve_forms(synthetic_project: Path, tmp_path: Path) -> None:
    shapes = synthetic_project / "datasets" / "shapes"
    assert resolve_dataset(str(shapes / "data.yaml")).kind == "yolo"
    assert resolve_dataset(str(shapes)).source == shapes / "data.yaml"
    coco = resolve_dataset(str(shapes / "annotations" / "instances_train.json"))
    assert coco.kind == "coco"
    only_coco = tmp_path / "only_coco"
    shutil.copytree(shapes / "annotations", only_coco / "annotations")
    shutil.copytree(shapes / "images", only_coco / "images")
    spec = resolve_dataset(str(only_coco))
    assert spec.kind == "coco" and spec.source.name == "instances_train.json"
    folder = resolve_dataset(str(shapes / "images"))
    assert folder.kind == "folder"
    assert resolve_dataset("datasets/shapes", synthetic_project).source == shapes / "data.yaml"
    with pytest.raises(DatasetError, match="not found"):
        resolve_dataset("no_such_set", tmp_path)


def test_coco128_without_images_says_how_to_get_them(tmp_path: Path) -> None:
    if (Path(__file__).resolve().parents[2] / "datasets" / "coco128" / "images").is_dir():
        pytest.skip("coco128 is downloaded in this checkout")
    with pytest.raises(DatasetError, match="download_datasets.sh"):
        resolve_dataset("coco128", tmp_path)


def test_build_dataset_accepts_dicts_and_objects(
    synthetic_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(synthetic_project)
    train = build_dataset({"dataset": "shapes", **SMALL}, "train", train=True)
    assert isinstance(train, YoloDataset) and len(train) == SYNTHETIC_TRAIN_IMAGES
    sample = train[0]
    assert sample["image"].shape == (3, 64, 64) and sample["image"].dtype == torch.uint8
    assert all(isinstance(frame, Frame) for frame in sample["frames"]) and sample["masks"] is None
    config = SimpleNamespace(dataset="shapes", img_size=96, augment=None, load_masks=True, cache_images=True)
    val = build_dataset(config, "val", train=False)
    sample = val[1]
    assert sample["image"].shape == (3, 96, 96) and sample["masks"].shape[0] == len(sample["boxes"])
    assert len(sample["frames"]) == 1 and sample["id"] == val.ids[1]
    coco = build_dataset(
        {"dataset": "datasets/shapes/annotations/instances_train.json", "img_size": 64}, "val", False
    )
    assert isinstance(coco, CocoDataset) and len(coco) == SYNTHETIC_VAL_IMAGES


def test_folder_dataset_has_empty_targets(tmp_path: Path) -> None:
    for relative in ("a.jpg", "sub/b.png", "sub/deeper/c.JPG", ".hidden/d.png"):
        path = tmp_path / "pics" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(
            path, format="PNG" if relative.endswith("png") else "JPEG"
        )
    (tmp_path / "pics" / "notes.txt").write_text("not an image")
    dataset = build_dataset({"dataset": str(tmp_path / "pics"), "img_size": 32}, "train", train=True)
    assert isinstance(dataset, FolderDataset)
    assert dataset.ids == ["a", "sub/b", "sub/deeper/c"] and dataset.names == []
    sample = dataset[2]
    assert sample["boxes"].shape == (0, 4) and sample["cls"].shape == (0,)
    ground_truth = dataset.coco_ground_truth()
    assert len(ground_truth["images"]) == 3 and ground_truth["annotations"] == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no usable images"):
        FolderDataset(empty)


def test_collate_batches_targets_and_frames(synthetic_project: Path) -> None:
    dataset = YoloDataset(synthetic_project / "datasets" / "shapes" / "data.yaml", "train", load_masks=True)
    dataset.transform = TrainTransform(64, {"mosaic": 0.5})
    samples = [dataset[index] for index in range(4)]
    batch = collate_samples(samples)
    counts = [len(sample["cls"]) for sample in samples]
    assert batch["images"].shape == (4, 3, 64, 64) and batch["images"].dtype == torch.uint8
    assert batch["targets"]["batch_idx"].tolist() == sum(
        ([index] * count for index, count in enumerate(counts)), []
    )
    assert (
        batch["targets"]["boxes"].shape == (sum(counts), 4)
        and batch["targets"]["boxes"].dtype == torch.float32
    )
    assert batch["targets"]["cls"].dtype == torch.int64
    assert [len(masks) for masks in batch["targets"]["masks"]] == counts
    assert batch["targets"]["frame_index"].tolist() == sum((sample["frame_index"].tolist() for sample in samples), [])
    assert [len(frames) for frames in batch["frames"]] == [len(tiles) for tiles in batch["tiles"]]
    assert batch["ids"] == [sample["id"] for sample in samples] and len(batch["orig_sizes"]) == 4


def test_dataloader_with_workers_is_repeatable(synthetic_project: Path) -> None:
    dataset = YoloDataset(synthetic_project / "datasets" / "shapes" / "data.yaml", "train")
    dataset.transform = TrainTransform(64)

    def first_batch() -> dict:
        loader = DataLoader(
            dataset,
            batch_size=3,
            num_workers=2 if os.cpu_count() and os.cpu_count() > 1 else 0,
            collate_fn=collate_samples,
            generator=torch.Generator().manual_seed(3),
        )
        return next(iter(loader))

    first, second = first_batch(), first_batch()
    assert torch.equal(first["images"], second["images"]) and first["frames"] == second["frames"]
