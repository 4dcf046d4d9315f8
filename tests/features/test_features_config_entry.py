"""A teacher entry of an experiment config fills its store one way: `extract_teacher_entry`,
behind `vfmkd features extract --config` and `vfmkd demo`."""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
import pytest
import yaml

import toy_feature_teacher
from vfmkd.cli import prepare_teacher_store
from vfmkd.config import ConfigError, validate_config
from vfmkd.features import cli as features_cli
from vfmkd.features.cli import ExtractionOptions, extract_teacher_entry, main
from vfmkd.features.store import FeatureStore
from vfmkd.registry import TEACHERS

OPTIONS = ExtractionOptions(num_workers=0, progress=False, device="cpu")


def _toy_factory(*, checkpoint: Any = None, features: Sequence[str] | None = None,
                 image_size: int | None = None) -> toy_feature_teacher.ToyPoolTeacher:
    return toy_feature_teacher.ToyPoolTeacher(image_size or 32, features)


@pytest.fixture(autouse=True)
def toy_teacher(monkeypatch: pytest.MonkeyPatch) -> None:
    # NOTE: the config path builds teachers from the registry, the --teacher NAME path
    # through features_cli.load_teacher; both get the toy teacher, removed after each test.
    monkeypatch.setitem(TEACHERS._entries, toy_feature_teacher.TOY_NAME, _toy_factory)
    original = features_cli.load_teacher

    def load_teacher(name: str, **kwargs: Any) -> Any:
        if name == toy_feature_teacher.TOY_NAME:
            return toy_feature_teacher.build_toy(name, **kwargs)
        return original(name, **kwargs)

    monkeypatch.setattr(features_cli, "load_teacher", load_teacher)


def _raw_config(image_folder, tmp_path, **teacher: Any) -> dict[str, Any]:
    entry = {"name": toy_feature_teacher.TOY_NAME, "allow_random_init": True, "image_size": 32,
             "feature_path": str(tmp_path / "entry_store"), **teacher}
    return {"teachers": {"toy": entry}, "data": {"dataset": str(image_folder), "num_workers": 0}}


def test_a_config_entry_fills_the_store_the_named_teacher_command_fills(image_folder, tmp_path):
    config = validate_config(_raw_config(image_folder, tmp_path, features=["embed"]))
    store = extract_teacher_entry(config, "toy", options=OPTIONS)
    assert store.path == tmp_path / "entry_store" and len(store) == 12
    assert store.manifest["build_args"] == {
        "teacher": "toy_pool", "weights": None, "random_init": True, "seed": 0, "features": ["embed"],
        "image_size": 32, "timm_model": None,
    }
    assert store.manifest["data_source"] == str(image_folder) and store.manifest["split"] == "train"
    named = tmp_path / "named_store"
    assert main(["features", "extract", "--teacher", "toy_pool", "--random-init", "--features", "embed",
                 "--image-size", "32", "--data", str(image_folder), "--out", str(named), "--num-workers", "0",
                 "--no-progress"]) == 0
    reference = FeatureStore.open(named)
    assert store.manifest["fingerprint"] == reference.manifest["fingerprint"]
    assert store.manifest["build_args"] == reference.manifest["build_args"]
    for sample_id in ("img000", "img007"):
        np.testing.assert_array_equal(store.read(sample_id)["embed"], reference.read(sample_id)["embed"])


def test_the_command_with_config_uses_the_entry_and_verifies(image_folder, tmp_path, capsys):
    config_file = tmp_path / "experiment.yaml"
    config_file.write_text(yaml.safe_dump(_raw_config(image_folder, tmp_path)))
    assert main(["features", "extract", "--config", str(config_file), "--teacher", "toy", "--limit", "5",
                 "--num-workers", "0", "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "entry_store/manifest.json").read_text())
    assert manifest["requested_samples"] == 5 and manifest["build_args"]["teacher"] == "toy_pool"
    capsys.readouterr()
    assert main(["features", "verify", str(tmp_path / "entry_store"), "--num", "2"]) == 0
    assert "verify: OK" in capsys.readouterr().out


def test_teacher_options_that_contradict_the_entry_are_refused(image_folder, tmp_path, capsys):
    config_file = tmp_path / "experiment.yaml"
    config_file.write_text(yaml.safe_dump(_raw_config(image_folder, tmp_path)))
    assert main(["features", "extract", "--config", str(config_file), "--teacher", "toy", "--random-init",
                 "--image-size", "64"]) == 2
    error = capsys.readouterr().err
    assert "--random-init, --image-size" in error and "teachers.toy" in error
    assert main(["features", "extract", "--config", str(config_file), "--teacher", "other"]) == 2
    assert "teachers.other: no such entry (entries: toy)" in capsys.readouterr().err
    assert main(["features", "extract", "--teacher", "toy_pool", "--random-init"]) == 2
    assert "--data and --out are needed" in capsys.readouterr().err


def test_each_split_has_its_store(image_folder, tmp_path):
    config = validate_config(_raw_config(image_folder, tmp_path, val_feature_path=str(tmp_path / "val_store")))
    store = extract_teacher_entry(config, "toy", split="val", options=OPTIONS)
    assert store.path == tmp_path / "val_store" and store.manifest["split"] == "val"
    with pytest.raises(ConfigError, match="no store for split 'test'.*--out DIR"):
        extract_teacher_entry(config, "toy", split="test", options=OPTIONS)


def test_the_demo_extracts_through_the_entry_and_prints_the_command(image_folder, tmp_path, capsys):
    config = validate_config(_raw_config(image_folder, tmp_path, model_path=str(tmp_path / "missing.pt")))
    prepare_teacher_store("toy", config, "demo.yaml")
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and str(tmp_path / "missing.pt") in out
    assert "vfmkd features extract --config demo.yaml --teacher toy --no-progress" in out
    assert "12 of 12 requested" in out
    assert len(FeatureStore.open(tmp_path / "entry_store")) == 12
