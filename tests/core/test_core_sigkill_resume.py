"""kill -9 of a training run at seeded random steps, then `--resume`: the final weights equal
an uninterrupted run's bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

STEPS = 12  # 6 images, batch 2: 3 steps per epoch, a checkpoint every epoch


def _config(tmp_path: Path, data_yaml: Path, name: str) -> Path:
    config = {
        "experiment_name": name,
        "model": {"backbone": {"type": "yolov8", "scale": "n"},
                  "heads": {"detection": {"type": "yolo_head", "num_classes": 6}}},
        "data": {"dataset": str(data_yaml), "img_size": 64, "batch_size": 2, "num_workers": 1},
        "train": {"max_steps": STEPS, "output_dir": str(tmp_path / "runs"), "device": "cpu", "amp": False,
                  "eval_interval": 100, "save_interval": 1, "log_interval": 1, "optimizer": "sgd", "lr": 0.01},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _command(config: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "vfmkd", "train", "--config", str(config), *(["--resume"] if resume else [])]


def _logged_steps(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return 0
    lines = [line for line in metrics.read_text().splitlines() if line.strip()]
    steps = [json.loads(line)["step"] for line in lines[:-1] if '"kind": "train"' in line]
    return max(steps, default=0)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    return {**checkpoint["model"], **{f"ema.{k}": v for k, v in checkpoint["ema"]["module"].items()}}


@pytest.mark.slow
def test_sigkill_at_random_steps_then_resume_equals_uninterrupted(tmp_path, synthetic_data_yaml):
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = subprocess.run(_command(_config(tmp_path, synthetic_data_yaml, "reference"), False),
                               capture_output=True, text=True, env=environment, timeout=300)
    assert reference.returncode == 0, reference.stderr[-2000:]
    config = _config(tmp_path, synthetic_data_yaml, "killed")
    run_dir = tmp_path / "runs" / "killed"
    rng = np.random.default_rng(0)
    kills = 0
    for _ in range(3):
        resume = (run_dir / "checkpoints" / "last.pt").exists()
        process = subprocess.Popen(_command(config, resume), env=environment, start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = min(_logged_steps(run_dir) + int(rng.integers(1, 4)), STEPS - 1)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None and _logged_steps(run_dir) < target:
            time.sleep(0.01)
        time.sleep(float(rng.uniform(0.0, 0.2)))
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            kills += 1
        process.wait(timeout=30)
    assert kills >= 2  # the run was really interrupted, mid-epoch or mid-checkpoint
    resume = (run_dir / "checkpoints" / "last.pt").exists()
    final = subprocess.run(_command(config, resume), capture_output=True, text=True, env=environment, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    expected, resumed = _weights(tmp_path / "runs" / "reference"), _weights(run_dir)
    assert expected.keys() == resumed.keys()
    for name, value in expected.items():
        assert torch.equal(value, resumed[name]), name
