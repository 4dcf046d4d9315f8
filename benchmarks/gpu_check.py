"""GPU smoke check: the CUDA paths CI never runs, in a few minutes on any CUDA machine.

Checks, each a row of one table (``ok`` / ``FAILED`` with the error / ``skipped`` with why):

1. ``train fp16``: the demo's training (YOLOv8n, detection + SAM 2 mask head, hybrid SAM2.1
   distillation with an online share, the demo config) for ``--steps`` steps on the GPU
   with fp16 autocast and the grad scaler; finite losses, the scale, the step time.
2. ``online teacher``: the SAM2.1 Hiera-T teacher forward on the GPU equals its CPU forward
   (cosine of ``embed``).
3. ``extraction``: ``vfmkd features extract`` on the GPU into a store; the stored maps equal
   the CPU extraction's within the float16 codec.
4. ``selective scan``: vfmkd's selective scan on CUDA (mamba_ssm's kernel when installed,
   else the chunked PyTorch path) against the CPU result, forward and gradients.
5. ``ddp nccl``: two or more GPUs: ``torchrun`` training of the demo for a few steps with
   NCCL, weights equal on every rank afterwards (skipped with one GPU).

Teachers have random weights unless ``weights/`` holds them (the check is about code
paths, not accuracy). Without CUDA it prints why and exits 1.

    python benchmarks/gpu_check.py [--steps 20] [--dir /tmp/gpu_check]

Prints the table and writes benchmarks/results/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMO_CONFIG = ROOT / "configs" / "experiments" / "yolov8n_sam2_shapes_demo.yaml"


def demo_config(work: Path, data_yaml: Path, steps: int, device: str) -> dict[str, Any]:
    from vfmkd.config import read_yaml

    config = read_yaml(DEMO_CONFIG)
    config["experiment_name"] = "gpu_check"
    config["data"].update(dataset=str(data_yaml), num_workers=2)
    teacher = config["teachers"]["sam2"]
    teacher.update(feature_path=str(work / "store"), allow_random_init=True, write_back=True)
    config["train"].update(max_steps=steps, amp=True, amp_dtype="fp16", device=device, eval_interval=10**6,
                           save_interval=10**6, log_interval=max(steps // 4, 1), output_dir=str(work / "runs"))
    return config


def check_training(work: Path, data_yaml: Path, args: argparse.Namespace) -> str:
    import torch

    from vfmkd.config import validate_config
    from vfmkd.core import EvalHook, build_trainer

    trainer = build_trainer(validate_config(demo_config(work, data_yaml, args.steps, "cuda")))
    trainer.hooks = [hook for hook in trainer.hooks if not isinstance(hook, EvalHook)]
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = trainer.train()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    values = trainer.step_values
    if not all(map(lambda value: value == value and abs(value) != float("inf"), values.values())):
        raise AssertionError(f"non-finite values at the last step: {values}")
    return (f"{result['step']} steps, {seconds / max(result['step'], 1) * 1000:.0f} ms/step, loss "
            f"{values.get('total', float('nan')):.3f}, grad scale {trainer.scaler.get_scale():.0f}, "
            f"skipped {result['skipped_steps']}")


def check_online_teacher(work: Path, data_yaml: Path, args: argparse.Namespace) -> str:
    import torch
    import torch.nn.functional as F

    from vfmkd.teachers import build_teacher

    teacher = build_teacher("sam2.1_hiera_t", random_init=True, image_size=256)
    pixels = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        cpu = teacher.forward_features(pixels)["embed"]
        gpu = teacher.to("cuda").forward_features(pixels.cuda())["embed"].cpu()
    cosine = float(F.cosine_similarity(cpu.flatten(1), gpu.flatten(1)).min())
    if cosine < 0.999:
        raise AssertionError(f"GPU embed differs from CPU: min cosine {cosine:.5f}")
    return f"embed {tuple(gpu.shape)}, min cosine GPU vs CPU {cosine:.6f}"


def check_extraction(work: Path, data_yaml: Path, args: argparse.Namespace) -> str:
    import numpy as np

    from vfmkd.features.store import FeatureStore

    stores = {}
    for device in ("cpu", "cuda"):
        out = work / f"store_{device}"
        subprocess.run(
            [sys.executable, "-m", "vfmkd", "features", "extract", "--teacher", "sam2.1_hiera_t", "--random-init",
             "--image-size", "256", "--data", str(data_yaml), "--out", str(out), "--device", device,
             "--limit", "8", "--no-progress"],
            check=True, capture_output=True, text=True,
        )
        stores[device] = FeatureStore.open(out, verify=True)
    worst = 0.0
    for sample in stores["cpu"].ids:
        for name in stores["cpu"].specs:
            cpu = np.asarray(stores["cpu"].read(sample, [name])[name], dtype=np.float32)
            gpu = np.asarray(stores["cuda"].read(sample, [name])[name], dtype=np.float32)
            worst = max(worst, float(np.abs(cpu - gpu).max() / (np.abs(cpu).max() + 1e-6)))
    if worst > 1e-2:
        raise AssertionError(f"GPU store differs from CPU store: max relative error {worst:.4f}")
    return f"{len(stores['cuda'])} samples, max relative difference to the CPU store {worst:.2e}"


def check_selective_scan(work: Path, data_yaml: Path, args: argparse.Namespace) -> str:
    import torch

    from vfmkd.ops.selective_scan import _load_cuda_kernel, selective_scan

    generator = torch.Generator().manual_seed(0)
    batch, channels, state, length = 2, 64, 16, 256
    inputs = {
        "u": torch.randn(batch, channels, length, generator=generator),
        "delta": torch.randn(batch, channels, length, generator=generator) * 0.5,
        "A": -torch.rand(channels, state, generator=generator) - 0.5,
        "B": torch.randn(batch, state, length, generator=generator),
        "C": torch.randn(batch, state, length, generator=generator),
        "D": torch.randn(channels, generator=generator),
        "delta_bias": torch.randn(channels, generator=generator) * 0.1,
    }
    results = {}
    for device in ("cpu", "cuda"):
        tensors = {key: value.to(device).requires_grad_(True) for key, value in inputs.items()}
        output = selective_scan(**tensors, delta_softplus=True)
        output.square().sum().backward()
        results[device] = (output.detach().cpu(), {key: value.grad.cpu() for key, value in tensors.items()})
    error = float((results["cpu"][0] - results["cuda"][0]).abs().max())
    grad_error = max(float((results["cpu"][1][key] - results["cuda"][1][key]).abs().max()) for key in inputs)
    if error > 1e-3 or grad_error > 1e-2:
        raise AssertionError(f"CUDA scan differs from CPU: output {error:.2e}, gradients {grad_error:.2e}")
    path = "mamba_ssm kernel" if _load_cuda_kernel() is not None else "chunked PyTorch"
    return f"{path}: max |output diff| {error:.2e}, max |grad diff| {grad_error:.2e}"


def check_ddp(work: Path, data_yaml: Path, args: argparse.Namespace) -> str:
    import torch
    import yaml

    gpus = torch.cuda.device_count()
    if gpus < 2:
        return "skipped: one GPU"
    config = demo_config(work / "ddp", data_yaml, 4, "auto")
    config_file = work / "ddp.yaml"
    config_file.write_text(yaml.safe_dump(config))
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}", "-m", "vfmkd", "train",
         "--config", str(config_file)],
        check=True, capture_output=True, text=True, cwd=work,
    )
    return f"{gpus} ranks, NCCL, 4 steps"


CHECKS: dict[str, Callable[[Path, Path, argparse.Namespace], str]] = {
    "train fp16": check_training,
    "online teacher": check_online_teacher,
    "extraction": check_extraction,
    "selective scan": check_selective_scan,
    "ddp nccl": check_ddp,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check.json")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a machine with one (CI has none).")
        return 1
    from vfmkd.datasets.synthetic import generate_synthetic_dataset

    rows = []
    with tempfile.TemporaryDirectory() as temp:
        work = args.dir or Path(temp)
        data_yaml = generate_synthetic_dataset(work / "shapes", num_train=32, num_val=4, seed=0)
        for name, check in CHECKS.items():
            start = time.perf_counter()
            try:
                detail, status = check(work, data_yaml, args), "ok"
                status = "skipped" if detail.startswith("skipped") else status
            except Exception as error:  # noqa: BLE001 - every failure is a row of the report
                tail = getattr(error, "stderr", "") or traceback.format_exc()
                detail, status = f"{type(error).__name__}: {error} | {str(tail).strip().splitlines()[-1]}", "FAILED"
            rows.append({"check": name, "status": status, "detail": detail, "seconds": time.perf_counter() - start})
    device = torch.cuda.get_device_name(0)
    print(f"\ngpu_check on {torch.cuda.device_count()} x {device}, torch {torch.__version__}, {platform.node()}")
    print("| check | status | s | detail |\n|---|---|---:|---|")
    for row in rows:
        print(f"| {row['check']} | {row['status']} | {row['seconds']:.0f} | {row['detail']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": device, "gpus": torch.cuda.device_count(), "torch": torch.__version__,
                                    "rows": rows}, indent=2))
    return 0 if all(row["status"] != "FAILED" for row in rows) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
