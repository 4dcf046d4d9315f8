"""Writes a checkpoint in vfmkd's format 1 (adapters under `distill.` in the student's state).

How format1_last.pt.gz was made: `git worktree add /tmp/oldvfmkd 6338368`, run this
script, then `gzip -9 -c /tmp/oldck/runs/format1/checkpoints/last.pt > format1_last.pt.gz`.

Run with the code of commit 6338368 (format 1): the old Trainer builds the student, the
distiller's adapters, optimizer and EMA, and its own _save writes last.pt. The weights
are set to a low-entropy pattern first so that the gzipped file is small.
"""
import sys
from pathlib import Path
import torch
sys.path.insert(0, "/tmp/oldvfmkd")
from tests.helpers.covariant_teacher import CovariantTeacher  # noqa: F401
from vfmkd.config import validate_config
from vfmkd.core.ema import ModelEMA
from vfmkd.core.trainer import Trainer
from vfmkd.datasets.synthetic import generate_synthetic_dataset

root = Path("/tmp/oldck")
data = generate_synthetic_dataset(root / "data", num_train=4, num_val=2, seed=0, min_size=64, max_size=96, overwrite=True)
config = validate_config({
    "experiment_name": "format1",
    "model": {"backbone": {"type": "timm", "name": "mobilenetv3_small_050"},
              "heads": {"detection": {"type": "yolo_head", "num_classes": 6}}},
    "teachers": {"probe": {"name": "covariant_probe", "allow_random_init": True, "image_size": 64, "offline": False}},
    "distillation": {"losses": {"probe_p4": {"type": "mgd", "teacher": "probe", "student": "p4"}}},
    "data": {"dataset": str(data), "img_size": 64, "batch_size": 2, "num_workers": 0},
    "train": {"max_steps": 1, "output_dir": str(root / "runs"), "eval_interval": 100, "device": "cpu"},
})
trainer = Trainer(config)
with torch.no_grad():
    for index, parameter in enumerate(trainer.model.parameters()):
        pattern = (torch.arange(parameter.numel()) % 7 - 3).float() * 0.01 + index * 1e-3
        parameter.copy_(pattern.view_as(parameter))
trainer.ema = ModelEMA(trainer.model, 0.9, 10.0, updates=3)
trainer.step, trainer.epoch = 5, 1
trainer._save(last=True, best=False)
print(trainer.last_path)
