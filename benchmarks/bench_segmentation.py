"""Segmentation cost: mask-head training with mask_kd, teacher masks cached or live, mask-head inference.

YOLOv8n student at 256 px on the built-in ``shapes`` data; teacher SAM2.1 Hiera-T at 256 px
with random weights (its cost, not its masks, is measured), saved as an official
checkpoint (``{"model": state_dict}``) so ``mask_kd`` takes the decoder-only path, and its
float16 store of ``embed``, ``hires_s8`` and ``hires_s4`` extracted once before anything is
timed. Three measurements, side by side in one process:

1. Training step time, a :class:`~vfmkd.core.trainer.Trainer` per row, float32
   (``train.amp: false``), batch 8, default augmentation; each row times ``--steps``
   optimizer steps after ``--warmup`` untimed ones, from the end of one step to the end of
   the next (data waiting counts):

   - ``detection``: ``yolo_head`` only;
   - ``detection + mask_kd``: plus ``sam_mask_head`` (``decoder: sam2``, official sizes),
     ``mask_kd`` from the store (default params: two refinement rounds) and ``mse`` of the
     teacher's ``embed`` into ``segmentation.embed`` (no adapter), ``offline_ratio: 1.0``;
   - ``detection + mask_kd, decode_iters 0``: the same without refinement rounds.

2. Teacher masks for 4 box prompts per image: from the store (read the three maps, then
   :meth:`PromptDecoder.decode` of a decoder loaded alone from the checkpoint) against the
   live teacher (``preprocess_image`` + ``extract`` + ``predict_masks`` on the decoded
   image; image decoding is not counted).

3. Mask-head inference, eval mode: the student forward (image encoder, once per image,
   batch 1) and ``head.segment`` for 1, 4 and 16 box prompts (per prompt).

Times are medians of ``--repeats`` runs after ``--warmup`` untimed ones
(``time.perf_counter``).

    python benchmarks/bench_segmentation.py [--steps 6] [--warmup 2] [--repeats 5] [--batch 8] \\
        [--workers 2] [--threads N] [--dir /tmp/x] [--out results.json]

Prints a markdown table and writes benchmarks/results/segmentation.json (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMG_SIZE = 256
TEACHER = "sam2.1_hiera_t"
NUM_CLASSES = 6
PROMPTS_PER_IMAGE = 4
PROMPT_COUNTS = (1, 4, 16)
MASK_IMAGES = 8
ROWS = {
    "detection": None,
    "detection + mask_kd": {},
    "detection + mask_kd, decode_iters 0": {"decode_iters": 0},
}


def median_seconds(function: Callable[[], Any], warmup: int, repeats: int) -> float:
    """Median wall time of ``function`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --------------------------------------------------------------------------- set-up
def prepare(folder: Path, images: int) -> dict[str, Any]:
    """The data, the teacher checkpoint (official format) and its float16 store of the train split."""
    import torch

    from vfmkd.datasets import build_dataset
    from vfmkd.datasets.synthetic import generate_synthetic_dataset
    from vfmkd.features.extract import extract_features
    from vfmkd.teachers import build_teacher

    data_yaml = generate_synthetic_dataset(folder / "shapes", num_train=images, num_val=8, seed=0)
    teacher = build_teacher(TEACHER, random_init=True, image_size=IMG_SIZE)
    checkpoint = folder / "sam2.1_hiera_tiny.pt"
    torch.save({"model": teacher.model.state_dict()}, checkpoint)
    teacher = build_teacher(TEACHER, weights=str(checkpoint), image_size=IMG_SIZE)
    dataset = build_dataset({"dataset": str(data_yaml), "img_size": IMG_SIZE}, "train", train=False)
    start = time.perf_counter()
    store = extract_features(teacher, dataset, folder / "store", num_workers=0, progress=False, split="train")
    seconds = time.perf_counter() - start
    specs = ", ".join(f"{spec.name} {spec.channels}x{spec.height}x{spec.width}" for spec in store.specs.values())
    return {
        "data_yaml": data_yaml, "checkpoint": checkpoint, "store": store, "teacher": teacher, "dataset": dataset,
        "extraction": {"samples": len(store), "seconds": seconds, "features": specs, "codec": store.codec.name},
    }


# --------------------------------------------------------------------------- 1. training
def row_config(
    name: str, mask_kd_params: dict[str, Any] | None, setup: dict[str, Any], args: argparse.Namespace
) -> Any:
    """A row's validated config: detection only (``mask_kd_params`` None) or detection + mask head + mask_kd."""
    from vfmkd.config import validate_config

    heads: dict[str, Any] = {"detection": {"type": "yolo_head", "num_classes": NUM_CLASSES}}
    config: dict[str, Any] = {
        "experiment_name": "bench_" + name.replace(" ", "_").replace(",", "").replace("+", "plus"),
        "model": {"backbone": {"type": "yolov8", "scale": "n"}, "heads": heads},
        "data": {"dataset": str(setup["data_yaml"]), "img_size": IMG_SIZE, "batch_size": args.batch,
                 "num_workers": args.workers, "load_masks": mask_kd_params is not None,
                 "augment": {"close_mosaic": 0}},
        "train": {"max_steps": args.warmup + args.steps, "amp": False, "ema": False, "warmup_epochs": 0,
                  "output_dir": str(args.folder / "runs"), "eval_interval": 1000, "save_interval": 1000,
                  "log_interval": 1000},
    }
    if mask_kd_params is not None:
        heads["segmentation"] = {"type": "sam_mask_head", "decoder": "sam2"}
        config["teachers"] = {"sam2": {"name": TEACHER, "model_path": str(setup["checkpoint"]), "image_size": IMG_SIZE,
                                       "feature_path": str(setup["store"].path), "offline_ratio": 1.0}}
        config["distillation"] = {"offline_ratio": 1.0, "losses": {
            "sam2_masks": {"type": "mask_kd", "teacher": "sam2", "params": mask_kd_params},
            "embed": {"type": "mse", "teacher": "sam2", "feature": "embed", "student": "segmentation.embed",
                      "adapter": "none"},
        }}
    return validate_config(config, f"bench_segmentation row {name}")


def time_training(config: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Seconds of each timed optimizer step (end of the previous step to the end of this one) and its data waiting."""
    from vfmkd.core import EvalHook, build_trainer
    from vfmkd.core.trainer import Trainer

    class TimedTrainer(Trainer):
        def after_step(self) -> None:
            # NOTE: step_data_time is this step's time waiting for batches.
            self.stamps.append((time.perf_counter(), self.step_data_time))

    trainer = build_trainer(config, trainer_class=TimedTrainer)
    trainer.stamps = [(time.perf_counter(), 0.0)]
    trainer.hooks = [hook for hook in trainer.hooks if not isinstance(hook, EvalHook)]
    trainer.train()
    stamps = trainer.stamps[args.warmup :]
    steps = [end - start for (start, _), (end, _) in zip(stamps, stamps[1:])]
    if not steps:
        raise SystemExit("no step measured; raise --steps")
    median = statistics.median(steps)
    return {
        "step_seconds": steps,
        "median_step_seconds": median,
        "images_per_second": args.batch / median,
        "data_wait_share": sum(wait for _, wait in stamps[1:]) / sum(steps),
    }


# --------------------------------------------------------------------------- 2. teacher masks
def box_prompts(count: int, size: int) -> Any:
    """``count`` boxes ``[count, 4]`` xyxy spread over a ``size`` px input (their content does not change timing)."""
    import torch

    corners = (torch.linspace(0.05, 0.55, count)[:, None] * size).expand(count, 2)
    return torch.cat([corners, corners + 0.4 * size], dim=1)


def time_teacher_masks(setup: dict[str, Any], args: argparse.Namespace) -> dict[str, float]:
    """Per image, seconds to 4 box prompts' teacher masks from the store and from the live teacher."""
    import numpy as np
    import torch

    from vfmkd.ops.prompt_decoder import PromptDecoder

    store, teacher = setup["store"], setup["teacher"]
    decoder = PromptDecoder.from_checkpoint("sam2", setup["checkpoint"], image_size=IMG_SIZE)
    ids = store.ids[:MASK_IMAGES]
    raws = [setup["dataset"].load_raw(setup["dataset"].ids.index(sample_id))["image"] for sample_id in ids]
    boxes = box_prompts(PROMPTS_PER_IMAGE, IMG_SIZE)

    def cached() -> None:
        for sample_id in ids:
            maps = store.read(sample_id, decoder.feature_names, dtype=np.float16)
            decoder.decode({name: torch.from_numpy(value)[None].float() for name, value in maps.items()}, boxes=boxes)

    def live() -> None:
        for image in raws:
            pixels, _ = teacher.preprocess_image(image)
            teacher.predict_masks(teacher.extract(pixels[None]), boxes=boxes[None])

    with torch.inference_mode():
        cached_seconds = median_seconds(cached, args.warmup, args.repeats) / len(ids)
        live_seconds = median_seconds(live, args.warmup, args.repeats) / len(ids)
    return {"cached_seconds_per_image": cached_seconds, "live_seconds_per_image": live_seconds,
            "live_vs_cached": live_seconds / cached_seconds, "images": len(ids)}


# --------------------------------------------------------------------------- 3. mask-head inference
def time_mask_head(args: argparse.Namespace) -> dict[str, Any]:
    """Student forward once per image, then ``head.segment`` per prompt for several prompt counts."""
    import torch

    from vfmkd.models import build_model

    torch.manual_seed(0)
    model = build_model({"backbone": {"type": "yolov8", "scale": "n"},
                         "heads": {"segmentation": {"type": "sam_mask_head", "decoder": "sam2"}}}).eval()
    head = model.heads["segmentation"]
    image = torch.rand(1, 3, IMG_SIZE, IMG_SIZE)
    with torch.inference_mode():
        encoder = median_seconds(lambda: model(image), args.warmup, args.repeats)
        outputs = model(image)["segmentation"]
        per_prompt = {
            count: median_seconds(
                lambda count=count: head.segment(outputs, [{"boxes": box_prompts(count, IMG_SIZE)}]),
                args.warmup, args.repeats,
            ) / count
            for count in PROMPT_COUNTS
        }
    parameters = {"student": sum(p.numel() for p in model.parameters()),
                  "prompt_encoder_and_decoder": sum(p.numel() for p in [*head.prompt_encoder.parameters(),
                                                                        *head.mask_decoder.parameters()])}
    return {"encoder_seconds_per_image": encoder, "segment_seconds_per_prompt": per_prompt, "parameters": parameters}


# --------------------------------------------------------------------------- report
def machine(load_before: tuple[float, float, float]) -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_average_before": list(load_before), "load_average_after": list(os.getloadavg())}


def report(result: dict[str, Any]) -> str:
    """The markdown tables of a result."""
    args, info = result["args"], result["machine"]
    training, masks, head = result["training"], result["teacher_masks"], result["mask_head"]
    baseline = training["detection"]["median_step_seconds"]
    lines = [
        f"## Segmentation cost (`{result['command']}`)",
        "",
        f"YOLOv8n, {IMG_SIZE} px, float32; teacher {TEACHER} (random init) at {IMG_SIZE} px, store "
        f"{result['extraction']['codec']} ({result['extraction']['features']}); {info['cpus']} CPUs, "
        f"{info['torch_threads']} torch thread{'s' if info['torch_threads'] > 1 else ''}, "
        f"load average {info['load_average_before'][0]:.1f} before, {info['load_average_after'][0]:.1f} after",
        "",
        f"| training, batch {args['batch']}, {args['workers']} workers, median of {args['steps']} steps | ms/step | "
        "images/s | vs detection | waiting for data |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in training.items():
        seconds = row["median_step_seconds"]
        lines.append(f"| {name} | {seconds * 1e3:.0f} | {row['images_per_second']:.1f} | {seconds / baseline:.2f}x | "
                     f"{row['data_wait_share']:.1%} |")
    lines += [
        "",
        f"| teacher masks, {PROMPTS_PER_IMAGE} box prompts per image | ms/image |",
        "|---|---:|",
        f"| cached features (store read + decoder only) | {masks['cached_seconds_per_image'] * 1e3:.1f} |",
        f"| live teacher (preprocess + image encoder + decoder) | {masks['live_seconds_per_image'] * 1e3:.1f} |",
        f"| live / cached | {masks['live_vs_cached']:.1f}x |",
        "",
        "| mask-head inference, eval mode, batch 1 | ms |",
        "|---|---:|",
        f"| student forward (image encoder), per image | {head['encoder_seconds_per_image'] * 1e3:.1f} |",
    ]
    for count, seconds in head["segment_seconds_per_prompt"].items():
        lines.append(f"| `segment`, {count} box prompt{'s' if count > 1 else ''}, per prompt | {seconds * 1e3:.2f} |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per training row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps / calls")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each inference measurement (median)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="data loader workers")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--dir", help="work folder, kept; default a temporary one")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "segmentation.json"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/bench_segmentation.py " + " ".join(sys.argv[1:])
    load_before = os.getloadavg()
    args.folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_segmentation_"))
    try:
        setup = prepare(args.folder, images=(args.warmup + args.steps + 1) * args.batch)
        training = {name: time_training(row_config(name, params, setup, args), args) for name, params in ROWS.items()}
        result = {
            "command": command.strip(),
            "args": {key: value for key, value in vars(args).items() if key != "folder"},
            "extraction": setup["extraction"],
            "training": training,
            "teacher_masks": time_teacher_masks(setup, args),
            "mask_head": time_mask_head(args),
        }
    finally:
        if not args.dir:
            shutil.rmtree(args.folder, ignore_errors=True)
    result["machine"] = machine(load_before)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    sys.stdout.write(report(result) + f"\n\nwrote {out}\n")


if __name__ == "__main__":
    main()
