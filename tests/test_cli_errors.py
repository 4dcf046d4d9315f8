"""The command line's error paths: each bad invocation prints one error naming the key or file
and the fix, exits 2, and no traceback reaches the user."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vfmkd.cli import main


def _config(tmp_path: Path, data_yaml: Path) -> Path:
    config = {
        "experiment_name": "errors",
        "model": {"backbone": {"type": "yolov8", "scale": "n"},
                  "heads": {"detection": {"type": "yolo_head", "num_classes": 6}}},
        "data": {"dataset": str(data_yaml), "img_size": 64, "batch_size": 2, "num_workers": 0},
        "train": {"max_steps": 1, "output_dir": str(tmp_path / "runs"), "device": "cpu", "amp": False},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


CASES = {
    "fewer classes than the data": (
        lambda cfg, tmp: ["train", "--config", cfg, "--set", "model.heads.detection.num_classes=3"],
        ["model.heads.detection.num_classes is 3", "6 class names", "num_classes: 6"],
    ),
    "unknown backbone": (
        lambda cfg, tmp: ["train", "--config", cfg, "--set", "model.backbone.type=yolov9"],
        ["unknown backbone 'yolov9'", "Known:"],
    ),
    "unknown key": (
        lambda cfg, tmp: ["train", "--config", cfg, "--set", "train.epoch=3"],
        ["train.epoch"],
    ),
    "missing config": (
        lambda cfg, tmp: ["train", "--config", str(tmp / "nope.yaml")],
        ["nope.yaml"],
    ),
    "not a checkpoint": (
        lambda cfg, tmp: ["eval", "--config", cfg, "--checkpoint", str(tmp / "notes.pt")],
        ["notes.pt: not a PyTorch checkpoint", "runs/<run>/checkpoints/last.pt"],
    ),
    "missing checkpoint": (
        lambda cfg, tmp: ["eval", "--config", cfg, "--checkpoint", str(tmp / "absent.pt")],
        ["absent.pt"],
    ),
    "unknown teacher": (
        lambda cfg, tmp: ["features", "extract", "--teacher", "sam3_giant", "--random-init", "--data", str(tmp),
                          "--out", str(tmp / "store")],
        ["sam3_giant"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_error_paths_print_one_line_and_exit_2(case, tmp_path, synthetic_data_yaml, capsys):
    (tmp_path / "notes.pt").write_text("these are my notes, not weights\n")
    arguments, expected = CASES[case]
    code = main(arguments(str(_config(tmp_path, synthetic_data_yaml)), tmp_path))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    # One error, starting the output (a config with several problems lists them below it).
    assert err.startswith("error: ") and err.count("error: ") == 1, err
    for text in expected:
        assert text in err, (text, err)
