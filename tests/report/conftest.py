"""A tiny distillation run, trained once for the report tests through ``vfmkd demo --config``.

YOLOv8n at 64 px learns detection on the shared synthetic data while it distils the
random-init ``covariant_probe`` test teacher (live passes) into p4: 4 steps, 2 epochs,
an evaluation after each, so the curves have two evaluation points. The demo's last
step writes the report; the tests read what it printed and wrote.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

# Importing the helper registers the `covariant_probe` teacher (the CLI runs in this process).
from tests.helpers.covariant_teacher import CovariantTeacher  # noqa: F401
from vfmkd.cli import main

EXPERIMENT = "tiny_report"


@dataclass
class TinyRun:
    run_dir: Path
    report: Path
    stdout: str


def tiny_config(data_yaml: Path) -> dict:
    return {
        "experiment_name": EXPERIMENT,
        "model": {"backbone": {"type": "yolov8", "scale": "n"},
                  "heads": {"detection": {"type": "yolo_head", "num_classes": 6}}},
        "teachers": {"probe": {"name": "covariant_probe", "offline": False, "allow_random_init": True,
                               "image_size": 128}},
        "distillation": {"losses": {"probe_p4": {"type": "mse", "teacher": "probe", "student": "p4"}}},
        "data": {"dataset": str(data_yaml), "img_size": 64, "batch_size": 3, "num_workers": 0,
                 "augment": {"mosaic": 0.0}},
        "train": {"max_steps": 4, "eval_interval": 1, "log_interval": 1, "device": "cpu", "amp": False,
                  "optimizer": "sgd", "lr": 0.01},
        "eval": {"tensorboard_images": 2},
    }


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, synthetic_data_yaml: Path) -> TinyRun:
    root = tmp_path_factory.mktemp("report_run")
    config_file = root / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config(synthetic_data_yaml)))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["demo", "--config", str(config_file), "--out", str(root / "runs")])
    assert code == 0, stdout.getvalue()
    printed = re.search(r"^report: (.+)$", stdout.getvalue(), re.MULTILINE)
    assert printed, f"the demo did not print the report's path:\n{stdout.getvalue()}"
    return TinyRun(root / "runs" / EXPERIMENT, Path(printed.group(1)), stdout.getvalue())
