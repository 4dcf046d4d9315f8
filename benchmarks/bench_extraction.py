"""Extraction throughput beside the bare teacher forward on pre-decoded tensors.

The same teacher and images are run two ways in one process:

- ``forward``: ``teacher.extract`` on batches that were decoded, preprocessed and moved
  to the device beforehand (the ceiling);
- ``extract``: :func:`vfmkd.features.extract_features` end to end (loader workers decode
  and preprocess, background writer encodes and commits float16 shards, manifest), into
  a fresh store.

Both are timed after one warm-up forward; images/s of ``extract`` counts the whole call.
The default teacher is ``sam2.1_hiera_t`` at random init and 512 px; when it cannot be
built the benchmark falls back to ``dinov2_vits14``.

    python benchmarks/bench_extraction.py [--teacher sam2.1_hiera_t] [--image-size 512]
        [--images 16] [--batch-size 4] [--num-workers 2] [--device auto] [--weights PATH]

Prints a markdown table and writes benchmarks/results/extraction.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vfmkd.datasets import build_dataset  # noqa: E402
from vfmkd.features.extract import extract_features  # noqa: E402
from vfmkd.utils.distributed import resolve_device  # noqa: E402

FALLBACK_TEACHER = "dinov2_vits14"


def write_images(folder: Path, count: int) -> None:
    """COCO-like JPEGs (640x480 and 480x640) with smooth content."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        height, width = (480, 640) if index % 2 == 0 else (640, 480)
        coarse = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
        image.save(folder / f"{index:012d}.jpg", quality=90)


def build(args: argparse.Namespace, device: torch.device):
    from vfmkd.teachers import build_teacher

    options = {"random_init": args.weights is None, "weights": args.weights, "image_size": args.image_size,
               "device": str(device)}
    try:
        return build_teacher(args.teacher, **options), args.teacher
    except (KeyError, ImportError, FileNotFoundError) as error:
        sys.stderr.write(f"cannot build {args.teacher} ({error}); falling back to {FALLBACK_TEACHER}\n")
        options.update(random_init=True, weights=None)
        return build_teacher(FALLBACK_TEACHER, **options), FALLBACK_TEACHER


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="sam2.1_hiera_t")
    parser.add_argument("--weights", help="checkpoint (default: random init)")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float16")
    args = parser.parse_args()
    device = resolve_device(args.device)
    load_before = os.getloadavg()
    teacher, teacher_name = build(args, device)
    folder = Path(tempfile.mkdtemp(prefix="bench_extraction_"))
    try:
        write_images(folder / "images", args.images)
        dataset = build_dataset({"dataset": str(folder / "images"), "img_size": 64}, "train", train=False)
        prepared = [teacher.preprocess_image(dataset.load_raw(index)["image"])[0] for index in range(len(dataset))]
        batches = [
            torch.stack(prepared[start : start + args.batch_size]).to(device)
            for start in range(0, len(prepared), args.batch_size)
        ]
        teacher.extract(batches[0])  # warm-up (kernels, allocator)
        synchronize(device)
        start = time.perf_counter()
        for batch in batches:
            features = teacher.extract(batch)
            {name: value.float().cpu() for name, value in features.items()}  # what extraction also pays
        synchronize(device)
        forward_rate = len(prepared) / (time.perf_counter() - start)

        start = time.perf_counter()
        extract_features(teacher, dataset, folder / "store", dtype=args.dtype, batch_size=args.batch_size,
                         num_workers=args.num_workers, progress=False)
        extract_rate = len(prepared) / (time.perf_counter() - start)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    specs = {name: [spec.channels, spec.height, spec.width] for name, spec in teacher.feature_specs.items()}
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": str(device),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "torch_threads": torch.get_num_threads(), "load_average_before": list(load_before)},
        "teacher": teacher_name, "random_init": args.weights is None, "image_size": args.image_size,
        "features": specs, "images": args.images, "batch_size": args.batch_size,
        "num_workers": args.num_workers, "codec": args.dtype,
        "forward_images_per_second": forward_rate, "extract_images_per_second": extract_rate,
        "ratio": extract_rate / forward_rate,
    }
    out = ROOT / "benchmarks" / "results" / "extraction.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    gpu = f" ({result['machine']['gpu']})" if result["machine"]["gpu"] else ""
    sys.stdout.write(
        f"## Extraction: {teacher_name} {'random init' if args.weights is None else 'weights'}, "
        f"{args.image_size} px, {args.images} images of 640x480, batch {args.batch_size}, "
        f"{args.num_workers} workers, {device}{gpu}, {os.cpu_count()} CPUs, "
        f"load average {load_before[0]:.1f} at start\n\n"
        "| run | images/s |\n|---|---|\n"
        f"| bare forward on pre-decoded tensors | {forward_rate:.2f} |\n"
        f"| extract_features end to end ({args.dtype} store) | {extract_rate:.2f} |\n\n"
        f"ratio: {extract_rate / forward_rate:.2f}x (target >= 0.9x)\n\nwrote {out}\n"
    )


if __name__ == "__main__":
    main()
