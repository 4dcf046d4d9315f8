"""Exported students side by side: CPU latency of PyTorch eager against onnxruntime.

Each student family at its smallest size with its default PAFPN neck and the YOLOv8 head
(80 classes), plus YOLOv8n with the DETR head (RT-DETR-R18's decoder layout, ``preset:
r18``) and YOLOv8n's promptable mask head (SAM 2 decoder at the official sizes), all at
random init, exported by :func:`vfmkd.export.export_model` at ``--img-size`` (640) with
batch 1. For each detector: the median over ``--repeats`` runs (after ``--warmup``) of the
PyTorch eager forward of the undeployed student (backbone, neck, head, decoding: what the
graph computes, no NMS), then of the exported graph in onnxruntime (CPU provider, default
graph optimisations); parameters (the deployed graph's) and the ONNX file's size. For the
segmenter: the image encoder, and the prompt decoder per call with 1 box prompt (its
masks pasted back into a 480 x 640 original). Threads: ``--threads`` for both torch and
onnxruntime (intra-op; 1 by default). Times use ``time.perf_counter``.

    python benchmarks/bench_export.py [--img-size 640] [--threads 1] [--repeats 5] [--warmup 2] \\
        [--only yolov8n vit_tiny ...] [--out results.json]

Prints a markdown table and writes benchmarks/results/export.json (or ``--out``).
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

from bench_segmentation import machine, median_seconds  # noqa: E402  (the benchmarks' shared timing and machine info)

STUDENTS: dict[str, dict[str, Any]] = {
    "yolov8n": {"backbone": {"type": "yolov8", "scale": "n"}},
    "vit_tiny": {"backbone": {"type": "vit", "size": "tiny"}},
    "repvit_m0_9": {"backbone": {"type": "repvit", "variant": "m0_9"}},
    "timm_convnext_atto": {"backbone": {"type": "timm", "name": "convnext_atto"}},
    "mamba_nano": {"backbone": {"type": "mamba", "size": "nano"}},
    "yolov8n_rtdetr": {"backbone": {"type": "yolov8", "scale": "n"}, "head": {"type": "rtdetr_head", "preset": "r18"}},
    "yolov8n_sam2": {"backbone": {"type": "yolov8", "scale": "n"}, "head": {"type": "sam_mask_head", "decoder": "sam2"}},
}
NUM_CLASSES = 80


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _build(name: str) -> Any:
    import torch

    from vfmkd.models import build_model

    spec = STUDENTS[name]
    head = dict(spec.get("head", {"type": "yolo_head"}))
    if head["type"] != "sam_mask_head":
        head["num_classes"] = NUM_CLASSES
    key = "segmentation" if head["type"] == "sam_mask_head" else "detection"
    torch.manual_seed(0)
    return build_model({"backbone": dict(spec["backbone"]), "heads": {key: head}}).eval()


def measure(name: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Export one student and time it both ways."""
    import torch

    from vfmkd.export import export_model
    from vfmkd.export.graphs import DetectorGraph
    from vfmkd.export.segmenter import ImageEncoderGraph

    model = _build(name)
    size = args.img_size
    start = time.perf_counter()
    summary = export_model(model, folder / f"{name}.onnx", img_size=size, names=[f"c{i}" for i in range(NUM_CLASSES)])
    export_seconds = time.perf_counter() - start
    images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    segmenter = "segmentation" in model.heads
    eager = ImageEncoderGraph(model, "segmentation") if segmenter else DetectorGraph(model, "detection")
    first = summary.files[0]  # the detector graph, or the segmenter's image encoder
    session = _session(first.path, args.threads)
    feeds = {"images": images.numpy()}

    def run_eager() -> None:
        with torch.no_grad():
            eager(images)

    row = {
        "student": name,
        "graph": first.graph,
        "parameters_m": first.parameters / 1e6,
        "file_mb": first.size_bytes / 2**20,
        "export_s": export_seconds,
        "torch_ms": 1000 * median_seconds(run_eager, args.warmup, args.repeats),
        "onnxruntime_ms": 1000 * median_seconds(lambda: session.run(None, feeds), args.warmup, args.repeats),
        "check": first.check,
    }
    if segmenter:
        row["decoder"] = _decoder_row(model, summary.files[1], session.run(None, feeds), args)
    return row


def _decoder_row(model: Any, decoder_file: Any, maps: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    """The prompt decoder per call, one box prompt on a 480 x 640 image: PyTorch against onnxruntime."""
    import numpy as np
    import torch

    from vfmkd.export.segmenter import PromptDecoderGraph

    size = args.img_size
    decoder = PromptDecoderGraph(model.heads["segmentation"], size)
    inputs = (
        *[torch.from_numpy(value) for value in maps],
        torch.tensor([[[100.0, 120.0], [400.0, 360.0]]]),
        torch.tensor([[2.0, 3.0]]),
        torch.zeros(1, 1, size // 4, size // 4),
        torch.zeros(1),
        torch.tensor([480.0, 640.0]),
    )
    session = _session(decoder_file.path, args.threads)
    names = [entry.name for entry in session.get_inputs()]
    feeds = {name: value.numpy().astype(np.float32) for name, value in zip(names, inputs)}

    def run_eager() -> None:
        with torch.no_grad():
            decoder(*inputs)

    return {
        "parameters_m": decoder_file.parameters / 1e6,
        "file_mb": decoder_file.size_bytes / 2**20,
        "torch_ms": 1000 * median_seconds(run_eager, args.warmup, args.repeats),
        "onnxruntime_ms": 1000 * median_seconds(lambda: session.run(None, feeds), args.warmup, args.repeats),
    }


def report(result: dict[str, Any]) -> str:
    args, info = result["args"], result["machine"]
    lines = [
        f"## Export: PyTorch eager vs onnxruntime (`{result['command']}`)",
        "",
        f"batch 1, {args['img_size']} px, float32, {args['threads']} thread(s), {info['cpus']} CPUs, load average "
        f"{info['load_average_before'][0]:.1f} before, {info['load_average_after'][0]:.1f} after; median of "
        f"{args['repeats']} runs",
        "",
        "| student (+ PAFPN + head) | graph | params (M) | ONNX (MiB) | PyTorch (ms) | onnxruntime (ms) | speed-up |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        entries = [(row["student"], row["graph"].replace("_", " "), row)]
        if "decoder" in row:
            entries.append((row["student"], "prompt decoder, 1 box", row["decoder"]))
        for student, graph, values in entries:
            speed = values["torch_ms"] / values["onnxruntime_ms"]
            lines.append(
                f"| {student} | {graph} | {values['parameters_m']:.2f} | {values['file_mb']:.1f} | "
                f"{values['torch_ms']:.1f} | {values['onnxruntime_ms']:.1f} | {speed:.2f}x |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--img-size", type=int, default=640)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None, choices=sorted(STUDENTS))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "export.json")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.only or STUDENTS:
            rows.append(measure(name, Path(folder), args))
            print(json.dumps(rows[-1]), flush=True)
    result = {
        "command": "python benchmarks/bench_export.py " + " ".join(sys.argv[1:]),
        "args": {key: value for key, value in vars(args).items() if key != "out"},
        "machine": machine(load_before),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(report(result))


if __name__ == "__main__":
    main()
