"""Labelled + unlabelled training data (``data.unlabeled``, ``data.label_fraction``,
``data.unlabeled_ratio``): the mixed set, its ids, its batches and its config errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import SYNTHETIC_TRAIN_IMAGES, SYNTHETIC_VAL_IMAGES
from vfmkd.config import ConfigError, validate_config
from vfmkd.core.loader import BatchMix, MixedBatchSampler
from vfmkd.datasets.collate import collate_samples
from vfmkd.datasets.image_io import DatasetError
from vfmkd.datasets.mixed import MixedDataset, build_train_dataset

IMG_SIZE = 64


def _data(data_yaml: Path, **keys) -> dict:
    return {"dataset": str(data_yaml), "img_size": IMG_SIZE, "augment": {"mosaic": 0.0}, **keys}


def test_unlabeled_folder_joins_with_namespaced_ids_and_no_labels(synthetic_data_yaml):
    val_images = synthetic_data_yaml.parent / "images" / "val"
    mixed = build_train_dataset(_data(synthetic_data_yaml, unlabeled=[str(val_images)]), "train")
    assert isinstance(mixed, MixedDataset)
    assert (mixed.labeled_count, mixed.unlabeled_count) == (SYNTHETIC_TRAIN_IMAGES, SYNTHETIC_VAL_IMAGES)
    labeled_ids, unlabeled_ids = mixed.ids[: mixed.labeled_count], mixed.ids[mixed.labeled_count :]
    # The val images are named like the train ones (000000...): the namespace keeps them apart.
    assert {Path(i).name for i in labeled_ids} & {i.split(":", 1)[1] for i in unlabeled_ids}
    assert len(set(mixed.ids)) == len(mixed.ids)
    assert all(i.startswith("unlabeled0:") for i in unlabeled_ids)
    batch = collate_samples([mixed[0], mixed[len(mixed) - 1]])
    assert batch["targets"]["has_labels"].tolist() == [True, False]
    assert int((batch["targets"]["batch_idx"] == 1).sum()) == 0
    assert batch["source_ids"][1] == [unlabeled_ids[-1]]
    assert mixed.load_raw(len(mixed) - 1)["id"] == unlabeled_ids[-1]


def test_glob_and_data_yaml_entries(synthetic_data_yaml):
    pattern = str(synthetic_data_yaml.parent / "images" / "val" / "*.jpg")
    mixed = build_train_dataset(_data(synthetic_data_yaml, unlabeled=[pattern, str(synthetic_data_yaml)]), "train")
    assert mixed.unlabeled_count == SYNTHETIC_VAL_IMAGES + SYNTHETIC_TRAIN_IMAGES
    assert sum(i.startswith("unlabeled0:") for i in mixed.ids) == SYNTHETIC_VAL_IMAGES
    # A data yaml's labels are ignored: no sample of that part has a target.
    last = mixed[len(mixed) - 1]
    assert not last["has_labels"] and len(last["cls"]) == 0


@pytest.mark.parametrize("fraction, kept", [(0.5, 3), (0.34, 2), (0.01, 1), (1.0, SYNTHETIC_TRAIN_IMAGES)])
def test_label_fraction_keeps_that_many_labels_reproducibly(synthetic_data_yaml, fraction, kept):
    first = build_train_dataset(_data(synthetic_data_yaml, label_fraction=fraction), "train", seed=3)
    again = build_train_dataset(_data(synthetic_data_yaml, label_fraction=fraction), "train", seed=3)
    labeled = first.labeled_count if isinstance(first, MixedDataset) else len(first)
    assert labeled == kept
    assert first.ids == again.ids
    if kept < SYNTHETIC_TRAIN_IMAGES:
        assert first.unlabeled_count == SYNTHETIC_TRAIN_IMAGES - kept
        # Same images, same ids as the full labelled set: the store extracted from it serves them.
        assert sorted(first.ids) == sorted(build_train_dataset(_data(synthetic_data_yaml), "train").ids)
        assert not first[len(first) - 1]["has_labels"]
        others = {
            tuple(build_train_dataset(_data(synthetic_data_yaml, label_fraction=fraction), "train", seed=s).ids)
            for s in range(6)
        }
        assert len(others) > 1  # the seed chooses which images keep labels
        fixed = {
            tuple(build_train_dataset(_data(synthetic_data_yaml, label_fraction=fraction, label_seed=3), "train",
                                      seed=s).ids)
            for s in range(6)
        }
        assert len(fixed) == 1  # ... unless data.label_seed fixes them


def test_unlabeled_ids_that_collide_are_refused(synthetic_data_yaml):
    labeled = build_train_dataset(_data(synthetic_data_yaml), "train")
    with pytest.raises(DatasetError, match="two of the training sets"):
        MixedDataset(labeled, [labeled])


@pytest.mark.parametrize(
    "data, message",
    [
        ({"unlabeled": "no/such/folder"}, r"data.unlabeled\[0\] 'no/such/folder': no such file or folder"),
        ({"unlabeled": ["EMPTY"]}, r"data.unlabeled\[0\] .*holds no images"),
        ({"unlabeled": ["EMPTY/*.jpg"]}, r"data.unlabeled\[0\] .*matches no image"),
        ({"label_fraction": 0.0}, r"data.label_fraction: Input should be greater than 0"),
        ({"label_fraction": 1.5}, r"data.label_fraction: Input should be less than or equal to 1"),
        ({"unlabeled_ratio": 0.5}, r"data.unlabeled_ratio is set but there are no unlabelled images"),
        ({"unlabeled_ratio": 1.0, "label_fraction": 0.5}, r"data.unlabeled_ratio: Input should be less than 1"),
        ({"unlabeled_batch_size": 4}, r"data.unlabeled_batch_size is set but there are no unlabelled images"),
        ({"unlabeled_batch_size": 0, "label_fraction": 0.5}, r"data.unlabeled_batch_size: Input should be greater"),
        (
            {"unlabeled_batch_size": 4, "unlabeled_ratio": 0.5, "label_fraction": 0.5},
            r"data.unlabeled_ratio and data.unlabeled_batch_size are both set",
        ),
    ],
)
def test_bad_keys_are_config_errors_naming_the_key(tmp_path, data, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    entry = data.get("unlabeled")
    if entry is not None:
        replace = lambda text: text.replace("EMPTY", str(tmp_path / "empty"))  # noqa: E731
        data = {**data, "unlabeled": [replace(e) for e in entry] if isinstance(entry, list) else replace(entry)}
    with pytest.raises(ConfigError, match=message):
        validate_config({"data": data})


def _order(dataset, mix, batch_size, epoch=0, rank=0, world=1, start=0):
    sampler = MixedBatchSampler(dataset, mix=mix, batch_size=batch_size, num_replicas=world, rank=rank, seed=7)
    sampler.set_epoch(epoch)
    sampler.set_start(start)
    return [index for _, index in sampler]


def test_mixed_batches_hold_the_unlabeled_share():
    dataset = list(range(20))  # 0..14 labelled, 15..19 unlabelled
    mix = BatchMix(labeled=15, unlabeled_ratio=0.5)
    order = _order(dataset, mix, batch_size=4)
    assert len(order) == 20
    for batch in range(5):
        assert sum(index >= 15 for index in order[4 * batch : 4 * batch + 4]) == 2
    assert order == _order(dataset, mix, batch_size=4)
    assert order != _order(dataset, mix, batch_size=4, epoch=1)
    assert order[6:] == _order(dataset, mix, batch_size=4, start=6)  # resumes mid-epoch
    # A fractional share is exact over the epoch: 0.25 of 4-sample batches over 20 samples.
    quarter = _order(dataset, BatchMix(labeled=15, unlabeled_ratio=0.25), batch_size=3)
    assert sum(index >= 15 for index in quarter) == 5
    # Two ranks see the same kinds at the same positions, and split the epoch between them.
    ranks = [_order(dataset, mix, batch_size=4, rank=rank, world=2) for rank in (0, 1)]
    assert [i >= 15 for i in ranks[0]] == [i >= 15 for i in ranks[1]]
    assert sum(index >= 15 for index in ranks[0][:4]) == 2


def test_mixed_batches_hold_a_fixed_number_of_unlabeled_samples():
    dataset = list(range(20))  # 0..14 labelled, 15..19 unlabelled
    mix = BatchMix(labeled=15, unlabeled_per_batch=3)
    order = _order(dataset, mix, batch_size=5)  # 2 labelled + 3 unlabelled per batch
    assert [sum(index >= 15 for index in order[5 * b : 5 * b + 5]) for b in range(4)] == [3, 3, 3, 3]
    assert order[7:] == _order(dataset, mix, batch_size=5, start=7)
    with pytest.raises(ValueError, match="do not fit a mixed batch of 3"):
        _order(dataset, mix, batch_size=3)
    with pytest.raises(ValueError, match="exactly one of"):
        BatchMix(labeled=15, unlabeled_ratio=0.5, unlabeled_per_batch=3)
