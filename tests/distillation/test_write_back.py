"""write_back: a training run fills its teacher's store with what extraction would store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.helpers.covariant_teacher import CovariantTeacher  # noqa: F401  (registers covariant_probe)
from vfmkd.config import ConfigError, validate_config
from vfmkd.core.build import build_trainer
from vfmkd.core.trainer import Trainer
from vfmkd.datasets import build_dataset
from vfmkd.distillation.sources import OFFLINE_KEY
from vfmkd.features.extract import extract_features
from vfmkd.features.store import FeatureStore
from vfmkd.features.writer import StoreLock
from vfmkd.teachers import build_teacher

TEACHER_SIZE = 128


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a small shared CPU two threads contend and run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, synthetic_data_yaml):
    """Six training images (mosaic on by default) and the store ``vfmkd features extract`` makes of them."""
    root = tmp_path_factory.mktemp("write_back")
    data_yaml = synthetic_data_yaml
    dataset = build_dataset({"dataset": str(data_yaml), "img_size": 64}, "train", train=False)
    extract_features(_teacher(), dataset, root / "reference", batch_size=4, num_workers=0, progress=False,
                     split="train")
    return root, data_yaml, dataset


class _Trainer(Trainer):
    """No evaluation: these tests look at the store."""

    def evaluate(self):
        return None


def _teacher():
    return build_teacher("covariant_probe", random_init=True, image_size=TEACHER_SIZE)


def _config(root, data_yaml, store, run, *, epochs=1, num_workers=0):
    return validate_config(
        {
            "experiment_name": run,
            "model": {"backbone": {"type": "yolov8", "scale": "n"},
                      "heads": {"detection": {"type": "yolo_head", "num_classes": 6}}},
            "teachers": {"probe": {"name": "covariant_probe", "feature_path": str(store), "write_back": True,
                                   "allow_random_init": True, "image_size": TEACHER_SIZE}},
            "distillation": {"offline_ratio": 0.5,
                             "losses": {"probe_p4": {"type": "cos_l1", "teacher": "probe", "student": "p4"},
                                        "detection": {"weight": 1.0}}},
            "data": {"dataset": str(data_yaml), "img_size": 64, "batch_size": 6, "num_workers": num_workers,
                     "augment": {"close_mosaic": 0}},
            "train": {"epochs": epochs, "eval_interval": 100, "log_interval": 1, "amp": False, "ema": False,
                      "output_dir": str(root / "runs"), "device": "cpu"},
        }
    )


def _assert_same_as_extraction(store_path, reference_path, ids):
    store, reference = FeatureStore.open(store_path, verify=True), FeatureStore.open(reference_path)
    assert sorted(store.ids) == sorted(ids)
    # every id exactly once (a repeat would already make open() fail)
    records = [json.loads(path.read_text()) for path in sorted((store_path / "shards").glob("rank*.json"))]
    assert sorted(sample_id for record in records for sample_id in record["ids"]) == sorted(ids)
    assert store.fingerprint == reference.fingerprint
    assert store.manifest["codec"] == "float16" and store.manifest["split"] == "train"
    assert store.manifest["num_samples"] == len(ids)
    written, expected = store.read_many(ids), reference.read_many(ids)
    for name in reference.specs:
        np.testing.assert_allclose(written[name], expected[name], rtol=2e-3, atol=2e-3)
    for sample_id in ids:
        assert store.frame(sample_id).isclose(reference.frame(sample_id))
    for name in reference.specs:
        np.testing.assert_allclose(store.stats(name)[0], reference.stats(name)[0], rtol=1e-3, atol=1e-3)
    return records


@pytest.mark.slow
def test_first_epoch_fills_an_empty_store_and_the_next_reads_it(shapes):
    root, data_yaml, dataset = shapes
    store_path = root / "filled"
    # one persistent worker: it reopens the store when the second epoch starts
    trainer = build_trainer(_config(root, data_yaml, store_path, "fill", epochs=2, num_workers=1), trainer_class=_Trainer)
    assert FeatureStore.open(store_path).ids == []  # created empty, from the teacher
    offline_rows: list[int] = []
    targets = trainer.model.distiller.teachers.teacher_targets

    def counting(batch, device, teachers=None):
        record = batch[OFFLINE_KEY].get("probe")
        offline_rows.append(0 if record is None else len(record["samples"]))
        return targets(batch, device, teachers)

    trainer.model.distiller.teachers.teacher_targets = counting
    assert trainer.train()["step"] == 2
    # epoch 1: nothing stored, all online; epoch 2: the filled store serves about half
    assert offline_rows[0] == 0 and offline_rows[1] > 0
    records = _assert_same_as_extraction(store_path, root / "reference", dataset.ids)
    assert {record["name"].split("-")[0] for record in records} == {"rank0"}
    # the lock was released: an extraction can resume the store (nothing left to do)
    extract_features(_teacher(), dataset, store_path, num_workers=0, progress=False, split="train")


@pytest.mark.slow
def test_a_partial_store_is_completed_and_its_shards_kept(shapes, tmp_path):
    root, data_yaml, dataset = shapes
    store_path = tmp_path / "partial"
    extract_features(_teacher(), dataset, store_path, limit=3, batch_size=4, num_workers=0, progress=False,
                     split="train")
    extracted = (store_path / "shards" / "rank0-000000.json").read_text()
    config = _config(root, data_yaml, store_path, "complete")
    config.train.output_dir = str(tmp_path / "runs")
    build_trainer(config, trainer_class=_Trainer).train()
    records = _assert_same_as_extraction(store_path, root / "reference", dataset.ids)
    assert (store_path / "shards" / "rank0-000000.json").read_text() == extracted
    assert [record["name"] for record in records][0] == "rank0-000000" and len(records) >= 2


def test_a_store_another_writer_holds_is_refused(shapes, tmp_path):
    root, data_yaml, _ = shapes
    store_path = tmp_path / "locked"
    config = _config(root, data_yaml, store_path, "locked")
    with StoreLock(store_path):
        with pytest.raises(ConfigError, match=r"teachers\.probe\.write_back: another extraction is writing"):
            build_trainer(config)
    config.teachers["probe"].feature_path = None
    with pytest.raises(ConfigError, match=r"teachers\.probe\.write_back: .*needs 'feature_path'"):
        build_trainer(config)
