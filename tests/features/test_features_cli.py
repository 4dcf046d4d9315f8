"""The commands: `vfmkd features extract | info | verify` and the seed's prepare script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import toy_feature_teacher
from vfmkd.features import cli as features_cli
from vfmkd.features.cli import main, seed_prepare_main, teacher_settings
from vfmkd.features.store import FeatureStore

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def toy_teacher(monkeypatch):
    original = features_cli.load_teacher

    def load_teacher(name, **kwargs):
        if name == toy_feature_teacher.TOY_NAME:
            return toy_feature_teacher.build_toy(name, **kwargs)
        return original(name, **kwargs)

    monkeypatch.setattr(features_cli, "load_teacher", load_teacher)


def _extract_args(images, out, *extra):
    return ["features", "extract", "--teacher", "toy_pool", "--random-init", "--data", str(images),
            "--out", str(out), "--num-workers", "0", "--no-progress", *extra]


def test_extract_info_verify(image_folder, tmp_path, capsys):
    out = tmp_path / "store"
    assert main(_extract_args(image_folder, out, "--dtype", "int8", "--limit", "7", "--image-size", "32")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["build_args"] == {
        "teacher": "toy_pool", "weights": None, "random_init": True, "seed": 0, "features": None, "image_size": 32,
        "timm_model": None,
    }
    assert manifest["data_source"] == str(image_folder) and manifest["split"] == "train"
    capsys.readouterr()
    assert main(["features", "info", str(out)]) == 0
    info = capsys.readouterr().out
    for text in ("toy_pool", manifest["fingerprint"], "YES", "int8", "7 of 7 requested", "embed", "4x2x2",
                 "hires_s8", "3x4x4"):
        assert text in info, text
    assert main(["features", "verify", str(out), "--num", "5"]) == 0
    report = capsys.readouterr().out
    assert "checksums: every file" in report and "recomputed 5 sample(s); frames equal: 5/5" in report
    assert "verify: OK" in report


def test_extract_fliplr_then_info_and_verify(image_folder, tmp_path, capsys):
    out = tmp_path / "store"
    assert main(_extract_args(image_folder, out, "--limit", "3", "--fliplr")) == 0
    store = FeatureStore.open(out)
    own = [sample_id for sample_id in store.ids if not sample_id.endswith("#fliplr")]
    assert len(own) == 3 and sorted(store.ids) == sorted(own + [f"{sample_id}#fliplr" for sample_id in own])
    capsys.readouterr()
    assert main(["features", "info", str(out)]) == 0
    assert "6 of 6 requested (3 of them mirror images, --fliplr)" in capsys.readouterr().out
    assert main(["features", "verify", str(out), "--num", "6"]) == 0
    assert "frames equal: 6/6" in capsys.readouterr().out


def test_verify_reports_damage_and_wrong_weights(image_folder, tmp_path, capsys):
    out = tmp_path / "store"
    assert main(_extract_args(image_folder, out, "--seed", "3")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["build_args"]["seed"] = 4  # rebuilt teacher gets other weights
    from vfmkd.features.format import manifest_checksum

    manifest["content_sha256"] = manifest_checksum(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["features", "verify", str(out)]) == 2
    assert "weights_sha256: store" in capsys.readouterr().err
    shard = sorted((out / "shards").glob("*.embed.npy"))[0]
    data = bytearray(shard.read_bytes())
    data[-2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert main(["features", "verify", str(out)]) == 1
    assert "checksums: FAILED" in capsys.readouterr().out


def test_mismatched_store_is_refused_with_the_fields(image_folder, tmp_path, capsys):
    out = tmp_path / "store"
    assert main(_extract_args(image_folder, out, "--limit", "2")) == 0
    capsys.readouterr()
    assert main(_extract_args(image_folder, out, "--image-size", "64", "--dtype", "bfloat16")) == 2
    error = capsys.readouterr().err
    assert "preprocessing.image_size: store 32, asked 64" in error
    assert "codec: store float16, asked bfloat16" in error and "another --out folder" in error


def test_unknown_store_and_missing_data_are_user_errors(tmp_path, capsys):
    assert main(["features", "info", str(tmp_path / "none")]) == 2
    assert "no feature store" in capsys.readouterr().err
    assert main(_extract_args(tmp_path / "no_images", tmp_path / "out")) == 2


def test_missing_weights_say_where_and_how(image_folder, tmp_path, capsys):
    pytest.importorskip("vfmkd.teachers")
    code = main(["features", "extract", "--teacher", "sam2.1_hiera_t", "--weights", str(tmp_path / "none.pt"),
                 "--data", str(image_folder), "--out", str(tmp_path / "out"), "--num-workers", "0"])
    assert code == 2
    error = capsys.readouterr().err
    assert str(tmp_path / "none.pt") in error and "--random-init" in error


def test_commands_plug_into_the_vfmkd_parser(tmp_path, capsys):
    import argparse

    from vfmkd.features.cli import add_features_commands

    parser = argparse.ArgumentParser(prog="vfmkd")
    add_features_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["features", "info", str(tmp_path)])
    (tmp_path / "manifest.json").write_text("{}")
    assert args.handler(args) == 2  # store errors are handled inside the handler
    assert "not a vfmkd feature store manifest" in capsys.readouterr().err


@pytest.mark.slow
def test_seed_prepare_script_names(image_folder, tmp_path):
    out = tmp_path / "teacher_features" / "toy"
    assert seed_prepare_main(["--teacher", "toy_pool", "--random-init", "--dataset", str(image_folder),
                              "--output", str(out), "--num-workers", "0", "--no-progress"]) == 0
    assert len(FeatureStore.open(out)) == 12
    result = subprocess.run([sys.executable, str(ROOT / "tools/prepare_teacher_features.py"), "--help"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0 and "--dataset" in result.stdout and "--output" in result.stdout


def test_shipped_teacher_config_gives_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = teacher_settings("sam2", weights=None, random_init=False, features=None, image_size=None)
    assert settings.name == "sam2.1_hiera_b+" and settings.features == ["embed"]
    assert settings.weights is None  # not downloaded: the factory's default lookup explains
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights/sam2.1_hiera_base_plus.pt").write_bytes(b"")
    found = teacher_settings("sam2", weights=None, random_init=False, features=None, image_size=None)
    assert found.weights == str(tmp_path / "weights/sam2.1_hiera_base_plus.pt")
    random = teacher_settings("sam2", weights=None, random_init=True, features=["embed", "hires_s8"], image_size=512)
    assert random.weights is None and random.features == ["embed", "hires_s8"] and random.image_size == 512
    plain = teacher_settings("dinov2_vits14", weights="w.pth", random_init=False, features=None, image_size=None)
    assert plain.name == "dinov2_vits14" and plain.weights == str(tmp_path / "w.pth")


@pytest.mark.slow
def test_a_real_teacher_when_the_factory_exists(image_folder, tmp_path, capsys):
    teachers = pytest.importorskip("vfmkd.teachers")
    if not hasattr(teachers, "build_teacher"):
        pytest.skip("vfmkd.teachers.build_teacher is not there yet")
    out = tmp_path / "dino"
    assert main(["features", "extract", "--teacher", "dinov2_vits14", "--random-init", "--image-size", "56",
                 "--data", str(image_folder), "--out", str(out), "--limit", "3", "--num-workers", "0",
                 "--no-progress"]) == 0
    store = FeatureStore.open(out, verify=True)
    assert len(store) == 3 and store.manifest["random_init"] is True
    assert main(["features", "verify", str(out), "--num", "2"]) == 0


def test_timm_teacher_by_name_with_its_model_then_verify(image_folder, tmp_path, capsys):
    pytest.importorskip("timm")
    out = tmp_path / "timm"
    assert main(["features", "extract", "--teacher", "timm", "--timm-model", "convnext_atto", "--random-init",
                 "--image-size", "64", "--data", str(image_folder), "--out", str(out), "--limit", "2",
                 "--num-workers", "0", "--no-progress"]) == 0
    store = FeatureStore.open(out)
    assert store.manifest["build_args"]["timm_model"] == "convnext_atto" and len(store) == 2
    capsys.readouterr()
    # verify rebuilds the same architecture from the manifest
    assert main(["features", "verify", str(out), "--num", "2"]) == 0
    assert "verify: OK" in capsys.readouterr().out


def test_unlabeled_images_by_hand_get_the_ids_training_reads(synthetic_data_yaml, image_folder, tmp_path):
    from vfmkd.datasets.mixed import build_train_dataset

    out = tmp_path / "store"
    assert main(_extract_args(synthetic_data_yaml, out, "--unlabeled", str(image_folder))) == 0
    training = build_train_dataset(
        {"dataset": str(synthetic_data_yaml), "img_size": 64, "unlabeled": [str(image_folder)]}, "train", train=False
    )
    assert set(FeatureStore.open(out).ids) == set(training.ids)
    assert any(sample.startswith("unlabeled0:") for sample in training.ids)
