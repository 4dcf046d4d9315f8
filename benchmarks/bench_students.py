"""Every student backbone side by side: parameters, GFLOPs and CPU training throughput.

For each student (backbone + its default neck + a YOLOv8 detection head, 80 classes) at
320 and 640 px: parameters, GFLOPs of one forward pass (PyTorch's own FLOP counter,
``torch.utils.flop_counter.FlopCounterMode``; multiply-adds count as 2 FLOPs), and
forward+backward images/s on the CPU (batch ``--batch``, float32, median of
``--repeats`` timed steps after one warm-up step).

    python benchmarks/bench_students.py [--sizes 320,640] [--batch 1] [--repeats 3] [--only yolov8_n,vit_tiny] [--skip-speed]

Prints a markdown table of every student measured so far and writes
benchmarks/results/students.json: the rows of this run replace the same students' figures
there (size by size), so a run with ``--only`` or ``--sizes`` completes the file rather
than overwriting it; ``commands`` lists the runs behind the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STUDENTS = {
    "yolov8_n": {"type": "yolov8", "scale": "n"},
    "yolov8_s": {"type": "yolov8", "scale": "s"},
    "yolov8_m": {"type": "yolov8", "scale": "m"},
    "yolov8_l": {"type": "yolov8", "scale": "l"},
    "yolov8_x": {"type": "yolov8", "scale": "x"},
    "vit_tiny": {"type": "vit", "size": "tiny"},
    "vit_small": {"type": "vit", "size": "small"},
    "vit_base": {"type": "vit", "size": "base"},
    "repvit_m0_9": {"type": "repvit", "variant": "m0_9"},
    "repvit_m1_1": {"type": "repvit", "variant": "m1_1"},
    "repvit_m2_3": {"type": "repvit", "variant": "m2_3"},
    "mamba_nano": {"type": "mamba", "size": "nano"},
    "mamba_tiny": {"type": "mamba", "size": "tiny"},
    "mamba_small": {"type": "mamba", "size": "small"},
    "timm_convnext_atto": {"type": "timm", "name": "convnext_atto"},
}


def build(backbone: dict, size: int) -> torch.nn.Module:
    from vfmkd.models import build_model

    backbone = dict(backbone)
    if backbone["type"] == "vit":
        backbone["img_size"] = size
    return build_model({"backbone": backbone, "heads": {"detection": {"type": "yolo_head", "num_classes": 80}}})


def gflops(model: torch.nn.Module, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.rand(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def train_images_per_second(model: torch.nn.Module, size: int, batch: int, repeats: int) -> float:
    model.train()
    images = torch.rand(batch, 3, size, size)
    times = []
    for step in range(repeats + 1):
        started = time.perf_counter()
        outputs = model(images)
        loss = sum(level.float().mean() for level in outputs["detection"])
        loss = loss + sum(level.float().mean() for level in outputs["features"].values())
        loss.backward()
        model.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - started)
    return batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="320,640")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated student names")
    parser.add_argument("--skip-speed", action="store_true", help="parameters and GFLOPs only")
    args = parser.parse_args()
    sizes = [int(value) for value in args.sizes.split(",")]
    unknown = sorted(set(filter(None, args.only.split(","))) - set(STUDENTS))
    if unknown:
        parser.error(f"--only: unknown student(s) {', '.join(unknown)}; choose from {', '.join(STUDENTS)}")
    names = [name for name in STUDENTS if not args.only or name in args.only.split(",")]
    out = ROOT / "benchmarks" / "results" / "students.json"
    command = " ".join(["python", "benchmarks/bench_students.py", *sys.argv[1:]])
    merged: dict = {"rows": []}
    for name in names:
        row = {"student": name, "config": STUDENTS[name]}
        for size in sizes:
            model = build(STUDENTS[name], size)
            row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
            row[f"gflops_{size}"] = gflops(model, size)
            if not args.skip_speed:  # a parameters-only run keeps the speeds already in the file
                row[f"train_img_s_{size}"] = train_images_per_second(model, size, args.batch, args.repeats)
                row["batch"] = args.batch
            del model
        print(json.dumps(row), flush=True)
        merged = merge_results(out, row, command)  # row by row: a run stopped midway keeps what it measured
    print_table(merged["rows"])


def merge_results(path: Path, row: dict, command: str) -> dict:
    """Fold one student's figures into the results file (atomically) and return its new content."""
    previous = json.loads(path.read_text()) if path.exists() else {}
    by_student = {old["student"]: old for old in previous.get("rows", [])}
    by_student[row["student"]] = {**by_student.get(row["student"], {}), **row}
    order = list(STUDENTS) + [name for name in by_student if name not in STUDENTS]
    commands = list(previous.get("commands", [previous["command"]] if "command" in previous else []))
    if not commands or commands[-1] != command:
        commands.append(command)
    merged = {
        "commands": commands,
        "rows": [by_student[name] for name in order if name in by_student],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    from vfmkd.utils.io import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(merged, indent=2))
    return merged


def print_table(rows: list[dict]) -> None:
    sizes = sorted({int(key.rsplit("_", 1)[1]) for row in rows for key in row if key.startswith("gflops_")})
    print("\n| student | params (M) | " + " | ".join(f"GFLOPs {size} | train img/s {size}" for size in sizes) + " |")
    print("|---|---:|" + "---:|---:|" * len(sizes))
    for row in rows:
        cells = []
        for size in sizes:
            flops, speed = row.get(f"gflops_{size}"), row.get(f"train_img_s_{size}")
            cells.append("-" if flops is None else f"{flops:.1f}")
            cells.append("-" if speed is None else f"{speed:.2f}")
        print(f"| {row['student']} | {row['params_m']:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
