"""The command line as users type it: `vfmkd ...`, `python -m vfmkd`, `python tools/train.py`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vfmkd.cli import main, seed_overrides, seed_train_main

ROOT = Path(__file__).resolve().parents[1]


def run(args, cwd, **env):
    environment = {**os.environ, "VFMKD_CACHE_DIR": str(Path(cwd) / ".cache"), **env}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=environment, timeout=600
    )


# Two `python -m vfmkd` processes: the import alone takes seconds.
@pytest.mark.slow
def test_python_m_vfmkd_data_synth_and_check(tmp_path):
    result = run(["-m", "vfmkd", "data", "synth", "shapes", "--train", "4", "--val", "2", "--seed", "3"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "shapes/data.yaml").is_file()
    assert len(list((tmp_path / "shapes/images/train").iterdir())) == 4
    check = run(["-m", "vfmkd", "data", "check", "shapes"], tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "no problems" in check.stdout


def test_data_check_lists_problems_with_file_and_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VFMKD_CACHE_DIR", str(tmp_path / ".cache"))
    assert main(["data", "synth", str(tmp_path / "d"), "--train", "3", "--val", "1"]) == 0
    label = sorted((tmp_path / "d/labels/train").iterdir())[0]
    label.write_text(label.read_text() + "0 0.5 0.5 nan 0.1\n99 0.5 0.5 0.1 0.1\n")
    capsys.readouterr()
    assert main(["data", "check", str(tmp_path / "d")]) == 1
    out = capsys.readouterr().out
    lines = label.read_text().splitlines()
    assert f"{label.name}:{len(lines) - 1}" in out
    assert f"{label.name}:{len(lines)}" in out


def test_config_error_is_one_clear_message(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  optimiser: sgd\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "train.optimiser" in err and "'optimizer'" in err and "Traceback" not in err


def test_seed_flags_pick_backbone_teacher_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    raw = {
        "model": {"backbone": {"type": "yolov8", "config": "configs/backbones/yolov8.yaml"}},
        "teachers": {"sam2": {"enabled": True}, "dino": {"enabled": True}},
    }
    out = seed_overrides(raw, backbone="yolov8", teacher="sam2", dataset="shapes")
    assert out["model"]["backbone"] == raw["model"]["backbone"]
    assert out["teachers"]["sam2"]["enabled"] and not out["teachers"]["dino"]["enabled"]
    assert out["data"]["dataset"] == "shapes"


@pytest.mark.slow
def test_seed_workflow_verbatim_then_eval_and_resume(tmp_path):
    """The seed README's steps 4 and 5, on the built-in data, with a random-init teacher.

    `prepare_teacher_features.py --teacher sam2 ... --output teacher_features/sam2/` then
    `train.py --config configs/experiments/yolov8_sam2_coco.yaml --backbone yolov8
    --teacher sam2 --dataset shapes`: hybrid SAM2 distillation plus detection.
    """
    small = ["--set", "teachers.sam2.allow_random_init=true", "--set", "teachers.sam2.image_size=128"]
    prepare = run(
        [str(ROOT / "tools/prepare_teacher_features.py"), "--teacher", "sam2", "--dataset", "shapes",
         "--output", "teacher_features/sam2/", "--random-init", "--image-size", "128", "--limit", "12",
         "--num-workers", "0", "--no-progress"],
        tmp_path,
    )
    assert prepare.returncode == 0, prepare.stdout[-3000:] + prepare.stderr[-3000:]
    assert "sam2.1_hiera_b+" in prepare.stdout
    overrides = [
        "--set", "data.img_size=64", "--set", "data.batch_size=4", "--set", "data.num_workers=0",
        "--set", "train.max_steps=2", "--set", f"train.output_dir={tmp_path / 'runs'}",
        "--set", "model.heads.detection.num_classes=6", "--set", "train.log_interval=1", *small,
    ]
    result = run(
        [str(ROOT / "tools/train.py"), "--config", str(ROOT / "configs/experiments/yolov8_sam2_coco.yaml"),
         "--backbone", "yolov8", "--teacher", "sam2", "--dataset", "shapes", *overrides],
        tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "runs/yolov8_sam2_coco_detection"
    assert "mAP50" in result.stdout and str(run_dir) in result.stdout
    assert "80% offline" in result.stderr  # the alignment table
    assert (run_dir / "checkpoints/last.pt").is_file()
    log = (run_dir / "metrics.jsonl").read_text()
    assert "distill/sam2/embed<-p4" in log and "det/box" in log and "mAP50" in log

    config = run_dir / "config.yaml"
    evaluation = run(["-m", "vfmkd", "eval", "--config", str(config), "--checkpoint",
                      str(run_dir / "checkpoints/last.pt")], tmp_path)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert '"mAP50"' in evaluation.stdout

    resumed = run(["-m", "vfmkd", "train", "--config", str(config), "--resume", "--set", "train.max_steps=3"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def test_seed_config_without_a_store_says_how_to_make_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VFMKD_CACHE_DIR", str(tmp_path / ".cache"))
    code = seed_train_main(["--config", str(ROOT / "configs/experiments/yolov8_sam2_coco.yaml"),
                            "--dataset", "shapes", "--set", "data.num_workers=0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "teachers.sam2.feature_path" in err and "prepare_teacher_features.py --teacher sam2" in err


def test_eval_table_leaves_out_classes_without_ground_truth():
    from vfmkd.cli import per_class_table

    metrics = {"per_class": {"person": 0.5, "toaster": float("nan"), "zebra": float("nan")},
               "mask_per_class": {"person": 0.25}}
    table = per_class_table(metrics)
    assert "person  AP 0.5000" in table and "person  mask AP 0.2500" in table
    assert "nan" not in table and "toaster" not in table
    assert "(2 classes without ground truth in this split not listed)" in table
