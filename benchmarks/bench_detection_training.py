"""Detection training throughput: vfmkd's trainer beside Ultralytics' trainer, same run.

YOLOv8n, batch 16, 320 px, the built-in `shapes` data set, the same data loader worker
count and default augmentation (mosaic, flip, scale/translate, HSV) in both. Images/s is
measured over optimizer steps after a warm-up, from the end of one step to the end of
the next, so data waiting counts. Ultralytics runs in a subprocess (it is AGPL and only a
yardstick here, never imported by vfmkd).

    python benchmarks/bench_detection_training.py [--images 160] [--steps 8] [--warmup 2]

Prints a markdown table and writes benchmarks/results/detection_training.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure_vfmkd(data_yaml: Path, args: argparse.Namespace, amp: bool, out_dir: Path) -> float:
    from vfmkd.config import validate_config
    from vfmkd.core import EvalHook, build_trainer
    from vfmkd.core.trainer import Trainer

    config = validate_config(
        {
            "experiment_name": f"bench_{'amp' if amp else 'fp32'}",
            "model": {
                "backbone": {"type": "yolov8", "scale": "n"},
                "heads": {"detection": {"type": "yolo_head", "num_classes": 6}},
            },
            "data": {
                "dataset": str(data_yaml),
                "img_size": args.imgsz,
                "batch_size": args.batch,
                "num_workers": args.workers,
            },
            "train": {
                "max_steps": args.warmup + args.steps,
                "amp": amp,
                "output_dir": str(out_dir),
                "eval_interval": 1000,
                "save_interval": 1000,
                "log_interval": 1000,
            },
        }
    )

    class TimedTrainer(Trainer):
        stamps: list[float] = []

        def after_step(self) -> None:
            self.stamps.append(time.perf_counter())

    trainer = build_trainer(config, trainer_class=TimedTrainer)
    trainer.stamps = []
    trainer.hooks = [hook for hook in trainer.hooks if not isinstance(hook, EvalHook)]
    trainer.train()
    return _images_per_second(trainer.stamps, args)


def _images_per_second(stamps: list[float], args: argparse.Namespace) -> float:
    timed = stamps[args.warmup - 1 :] if args.warmup > 0 else stamps
    if len(timed) < 2:
        raise SystemExit("not enough steps measured; raise --images or --steps")
    return args.batch * (len(timed) - 1) / (timed[-1] - timed[0])


ULTRALYTICS_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    os.environ["YOLO_OFFLINE"] = "1"
    from ultralytics import YOLO
    data, imgsz, batch, workers, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    stamps = []
    model = YOLO("yolov8n.yaml")
    model.add_callback("on_train_batch_end", lambda trainer: stamps.append(time.perf_counter()))
    model.train(data=data, imgsz=imgsz, batch=batch, epochs=1, device="cpu", workers=workers,
                plots=False, val=False, amp=False, project=out, name="ultralytics", exist_ok=True,
                verbose=False, seed=0, warmup_epochs=0)
    print("STAMPS " + json.dumps(stamps))
    """
)


def measure_ultralytics(data_yaml: Path, args: argparse.Namespace, out_dir: Path) -> float | None:
    # Ultralytics resolves a relative `path:` against its own datasets folder.
    absolute_yaml = out_dir / "data_absolute.yaml"
    text = data_yaml.read_text().replace("path: .", f"path: {data_yaml.parent}")
    absolute_yaml.write_text(text)
    command = [
        sys.executable, "-c", ULTRALYTICS_SCRIPT, str(absolute_yaml), str(args.imgsz),
        str(args.batch), str(args.workers), str(out_dir),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=out_dir)
    lines = [line for line in result.stdout.splitlines() if line.startswith("STAMPS ")]
    if result.returncode != 0 or not lines:
        sys.stderr.write(f"ultralytics run failed (is it installed?):\n{result.stderr[-2000:]}\n")
        return None
    return _images_per_second(json.loads(lines[-1][len("STAMPS "):]), args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=160, help="training images (one Ultralytics epoch)")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-ultralytics", action="store_true")
    args = parser.parse_args()
    args.steps = min(args.steps, args.images // args.batch - args.warmup)

    import torch

    from vfmkd.datasets.synthetic import generate_synthetic_dataset

    with tempfile.TemporaryDirectory() as temp:
        temp_dir = Path(temp)
        data_yaml = generate_synthetic_dataset(temp_dir / "shapes", num_train=args.images, num_val=8, seed=0)
        results = {
            "vfmkd fp32": measure_vfmkd(data_yaml, args, amp=False, out_dir=temp_dir / "runs"),
            "vfmkd bf16 autocast": measure_vfmkd(data_yaml, args, amp=True, out_dir=temp_dir / "runs"),
        }
        if not args.skip_ultralytics:
            results["Ultralytics fp32"] = measure_ultralytics(data_yaml, args, temp_dir)

    reference = results.get("Ultralytics fp32")
    print(f"\nYOLOv8n detection training, batch {args.batch}, {args.imgsz} px, {args.workers} workers, "
          f"{args.steps} timed steps, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("| trainer | images/s | vs Ultralytics |")
    print("|---|---:|---:|")
    for name, value in results.items():
        ratio = f"{value / reference:.2f}x" if reference and value else "-"
        print(f"| {name} | {value:.2f} | {ratio} |" if value else f"| {name} | failed | - |")
    out = ROOT / "benchmarks" / "results" / "detection_training.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "images_per_second": results, "torch": torch.__version__,
                               "cpu_count": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
