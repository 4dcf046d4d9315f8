"""Soak test: a long hybrid-distillation run with write-back must not grow in memory or files.

YOLOv8n trains ``--steps`` optimizer steps (default 1,000) on the built-in ``shapes`` data
with a DINOv2 ViT-S/14 teacher (random weights: its cost and data flow are what matter)
at ``offline_ratio`` 0.8 and ``write_back: true`` into an empty store, so the first epoch
fills the store and later epochs read it; a checkpoint is written every epoch. Every
``--every`` steps it samples:

- anonymous resident memory (``RssAnon`` of ``/proc/<pid>/status``: memory-mapped store
  pages do not count) of the training process and, separately, of its loader workers;
- open file descriptors of the training process.

The figures after the first epoch are the baseline; the run passes when the last sample
is within ``--max-growth`` (5 %) of it for the training process's memory and has no more
file descriptors.

    python benchmarks/bench_soak.py [--steps 1000] [--every 50] [--images 64] [--dir /tmp/soak]

Prints a table and writes benchmarks/results/soak.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_anon_mb(pid: int) -> float:
    """``RssAnon`` of a process in MiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def children(pid: int) -> list[int]:
    """Child process ids (the loader workers), from ``/proc/<pid>/task/*/children``."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(value) for value in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def soak_config(args: argparse.Namespace, data_yaml: Path, work: Path) -> dict[str, Any]:
    return {
        "experiment_name": "soak",
        "model": {"backbone": {"type": "yolov8", "scale": "n"},
                  "heads": {"detection": {"type": "yolo_head", "num_classes": 6}}},
        "teachers": {"dino": {"name": "dinov2_vits14", "allow_random_init": True, "image_size": 112,
                              "feature_path": str(work / "store"), "write_back": True, "offline_ratio": 0.8}},
        "distillation": {"losses": {"dino_patch": {"type": "cos_l1", "teacher": "dino", "feature": "patch",
                                                   "student": "p4"}}},
        "data": {"dataset": str(data_yaml), "img_size": args.imgsz, "batch_size": args.batch,
                 "num_workers": args.workers},
        "train": {"max_steps": args.steps, "output_dir": str(work / "runs"), "eval_interval": 10**6,
                  "save_interval": 1, "log_interval": args.every, "device": "cpu", "amp": False},
    }


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from vfmkd.config import validate_config
    from vfmkd.core import build_trainer
    from vfmkd.core.trainer import Trainer
    from vfmkd.datasets.synthetic import generate_synthetic_dataset

    data_yaml = generate_synthetic_dataset(work / "shapes", num_train=args.images, num_val=4, seed=0)
    samples: list[dict[str, Any]] = []
    pid = os.getpid()

    class SampledTrainer(Trainer):
        def after_step(self) -> None:
            super().after_step()
            if self.step % args.every == 0 or self.step == 1:
                workers = children(pid)
                samples.append({
                    "step": self.step, "epoch": self.epoch, "seconds": time.perf_counter() - started,
                    "rss_anon_mb": rss_anon_mb(pid), "workers": len(workers),
                    "workers_rss_anon_mb": sum(rss_anon_mb(child) for child in workers),
                    "open_files": open_files(pid),
                })

    trainer = build_trainer(validate_config(soak_config(args, data_yaml, work)), trainer_class=SampledTrainer)
    started = time.perf_counter()
    trainer.train()
    steps_per_epoch = trainer.steps_per_epoch
    baseline = next(sample for sample in samples if sample["step"] >= steps_per_epoch)
    last = samples[-1]
    growth = (last["rss_anon_mb"] - baseline["rss_anon_mb"]) / baseline["rss_anon_mb"]
    return {
        "samples": samples, "steps_per_epoch": steps_per_epoch, "baseline_step": baseline["step"],
        "rss_growth": growth, "open_files_growth": last["open_files"] - baseline["open_files"],
        "passed": growth <= args.max_growth and last["open_files"] <= baseline["open_files"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--imgsz", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-growth", type=float, default=0.05)
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        work = args.dir or Path(temp)
        result = run(args, work)
    print(f"\nsoak: {args.steps} steps ({result['steps_per_epoch']} per epoch), hybrid distillation with write-back")
    print("| step | epoch | s | RssAnon MiB | workers' RssAnon MiB | open files |")
    print("|---:|---:|---:|---:|---:|---:|")
    for sample in result["samples"]:
        print(f"| {sample['step']} | {sample['epoch']} | {sample['seconds']:.0f} | {sample['rss_anon_mb']:.1f} | "
              f"{sample['workers_rss_anon_mb']:.1f} ({sample['workers']}) | {sample['open_files']} |")
    print(f"growth after the first epoch (from step {result['baseline_step']}): RssAnon {result['rss_growth']:+.1%}, "
          f"open files {result['open_files_growth']:+d}: {'PASS' if result['passed'] else 'FAIL'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **result}, indent=2))


if __name__ == "__main__":
    main()
