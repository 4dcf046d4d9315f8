"""Detection heads side by side: ``yolo_head`` against ``rtdetr_head`` on the same student.

YOLOv8n student at 256 px on the built-in ``shapes`` data (``--train`` / ``--val``
images), float32 (``train.amp: false``), batch 8, no EMA, seed 0. The DETR head is
RT-DETR-R18's decoder layout (``preset: r18``: 3 decoder layers, 8 heads, 4 sampling
points, AIFI on P5, 100 denoising queries) made narrower for the CPU: ``hidden_dim`` 128,
feed-forward 512 (decoder and AIFI), 100 queries (at most 7 objects per image here).
Both heads train with AdamW at lr 1e-3 (what Ultralytics picks for YOLOv8 on a small
6-class set; RT-DETR's own 1e-4 is meant for 72 COCO epochs), weight decay 5e-4, 10
warm-up steps then a constant rate (the run ends on a clock, not a step count), and each
head's usual gradient clipping (10 for YOLO, 0.1 for RT-DETR). Augmentation is the
default without mosaic (YOLOv8 closes mosaic for the last 10 epochs; a short run is all
inside that window). Three measurements, one process:

1. Training throughput: a :class:`~vfmkd.core.trainer.Trainer` per head, ``--steps``
   optimizer steps timed after ``--warmup`` untimed ones, each from the end of the
   previous step to the end of its own (data waiting counts); the median step.

2. mAP after the same wall time: each head trains until each of ``--seconds`` (counted
   from the start of training, data loader start-up included, evaluations left out, to
   the end of the step that crosses it), where COCO box mAP50-95 / mAP50 is measured on
   the validation split with the head's own evaluators (``run_evaluation`` with the
   config's evaluation options: ``conf_threshold`` 0.001, ``max_det`` 300, NMS IoU 0.7
   for YOLO); after the last, :meth:`Trainer.request_stop` ends the run.

3. CPU inference per image, on the trained models of 2., eval mode, batch 1, every
   validation image letterboxed to 256 px: the model forward and ``predict`` (NMS for
   YOLO, top-k for RT-DETR, boxes mapped back to original pixels), at the evaluation's
   ``conf_threshold`` 0.001 and at a deployment-like 0.25; the median over ``--repeats``
   passes (after ``--warmup``) of the mean per image.

Times use ``time.perf_counter``.

    python benchmarks/bench_detr_head.py [--seconds 60 [120 ...]] [--steps 6] [--warmup 2] [--repeats 5] \\
        [--train 64] [--val 16] [--batch 8] [--workers 2] [--threads N] [--out results.json]

Prints markdown tables and writes benchmarks/results/detr_head.json (or ``--out``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_segmentation import machine, median_seconds  # noqa: E402  (the benchmarks' shared timing and machine info)

IMG_SIZE = 256
NUM_CLASSES = 6
DEPLOY_CONF = 0.25
BASELINE = "yolo_head"
# Per head: the head config and its training overrides.
HEADS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "yolo_head": ({"type": "yolo_head", "num_classes": NUM_CLASSES}, {"grad_clip": 10.0}),
    "rtdetr_head": (
        {"type": "rtdetr_head", "num_classes": NUM_CLASSES, "preset": "r18", "hidden_dim": 128, "ffn_dim": 512,
         "aifi_ffn_dim": 512, "num_queries": 100, "num_denoising": 100},
        {"grad_clip": 0.1},
    ),
}


def head_config(name: str, data_yaml: Path, args: argparse.Namespace, max_steps: int) -> Any:
    """The validated experiment of one head."""
    from vfmkd.config import validate_config

    head, train_overrides = HEADS[name]
    config = {
        "experiment_name": f"bench_{name}",
        "model": {"backbone": {"type": "yolov8", "scale": "n"}, "heads": {"detection": head}},
        "data": {"dataset": str(data_yaml), "img_size": IMG_SIZE, "batch_size": args.batch,
                 "num_workers": args.workers, "augment": {"mosaic": 0.0, "close_mosaic": 0}},
        "train": {"max_steps": max_steps, "amp": False, "ema": False, "optimizer": "adamw", "lr": 1e-3,
                  "weight_decay": 5e-4, "warmup_steps": 10, "final_lr_ratio": 1.0, "seed": 0,
                  "output_dir": str(args.folder / "runs"), "eval_interval": 100000, "save_interval": 100000,
                  "log_interval": 100000, **train_overrides},
    }
    return validate_config(config, f"bench_detr_head {name}")


def build_head_trainer(config: Any, extra_hooks: list[Any]) -> tuple[Any, Any]:
    """A trainer that records each step's end, without evaluation or checkpoint hooks, and its evaluation hook."""
    from vfmkd.core import CheckpointHook, EvalHook, build_trainer
    from vfmkd.core.trainer import Trainer

    class TimedTrainer(Trainer):
        def after_step(self) -> None:
            # NOTE: step_data_time is this step's time waiting for batches.
            self.stamps.append((time.perf_counter(), self.step_data_time))

    trainer = build_trainer(config, trainer_class=TimedTrainer, hooks=extra_hooks)
    evaluation = trainer.find_hook(EvalHook)
    trainer.hooks = [hook for hook in trainer.hooks if not isinstance(hook, (EvalHook, CheckpointHook))]
    return trainer, evaluation


def release_loader(trainer: Any) -> None:
    """Stop the trainer's persistent loader workers now, outside every timed region."""
    # NOTE: left to the cyclic garbage collector, a finished trainer's loader shutdown
    # waits out the 5 s join timeout of each worker, whenever the collector happens to
    # run (in a later row's steps or evaluation); dropping the last reference stops the
    # workers at once.
    trainer.train_loader = None
    gc.collect()


# --------------------------------------------------------------------------- 1. throughput
def time_training(name: str, data_yaml: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Seconds of each timed optimizer step and the share spent waiting for data."""
    trainer, _ = build_head_trainer(head_config(name, data_yaml, args, args.warmup + args.steps), [])
    trainer.stamps = [(time.perf_counter(), 0.0)]
    trainer.train()
    release_loader(trainer)
    stamps = trainer.stamps[args.warmup :]
    steps = [end - start for (start, _), (end, _) in zip(stamps, stamps[1:])]
    if not steps:
        raise SystemExit("no step measured; raise --steps")
    median = statistics.median(steps)
    return {
        "parameters": sum(p.numel() for p in trainer.model.student.parameters()),
        "head_parameters": sum(p.numel() for p in trainer.model.student.heads["detection"].parameters()),
        "step_seconds": steps,
        "median_step_seconds": median,
        "images_per_second": args.batch / median,
        "data_wait_share": sum(wait for _, wait in stamps[1:]) / sum(steps),
    }


# --------------------------------------------------------------------------- 2. same wall time
def train_for_seconds(name: str, data_yaml: Path, args: argparse.Namespace) -> tuple[list[dict[str, Any]], Any, Any]:
    """Train one head, with COCO box metrics on the validation split after each of ``args.seconds``.

    Returns:
        One result per budget, the trained student and the evaluation hook (validation
        data, predict options).
    """
    from vfmkd.core import Hook
    from vfmkd.evaluation import run_evaluation

    class TimeBudgets(Hook):
        """Evaluates after the step that crosses each budget (seconds of training, evaluations
        left out) and requests a stop after the last one."""

        def __init__(self, budgets: list[float]) -> None:
            self.budgets = sorted(budgets)
            self.results: list[dict[str, Any]] = []
            self.start = self.evaluating = 0.0

        def before_train(self) -> None:
            self.start = time.perf_counter()

        def after_step(self) -> None:
            trainer = self.trainer
            elapsed = time.perf_counter() - self.start - self.evaluating
            if elapsed < self.budgets[len(self.results)]:
                return
            started = time.perf_counter()
            metrics = run_evaluation(
                trainer.evaluated_model, evaluation.dataset, evaluation.evaluators,
                batch_size=evaluation.batch_size, num_workers=args.workers, device=trainer.device,
                predict_options=evaluation.options,
            )
            seconds = time.perf_counter() - started
            self.evaluating += seconds
            self.results.append({
                "budget_seconds": self.budgets[len(self.results)],
                "train_seconds": elapsed,
                "steps": trainer.step,
                "epochs": trainer.step * args.batch / len(trainer.train_dataset),
                "eval_seconds": seconds,
                "metrics": {key: float(value) for key, value in metrics.items() if key.startswith("mAP")},
            })
            if len(self.results) == len(self.budgets):
                trainer.request_stop()

    budgets = TimeBudgets(args.seconds)
    # NOTE: a step count no run reaches; the clock ends it (so the LR schedule is flat after warm-up).
    trainer, evaluation = build_head_trainer(head_config(name, data_yaml, args, 1_000_000), [budgets])
    trainer.stamps = []
    trainer.train()
    release_loader(trainer)
    return budgets.results, trainer.model.student, evaluation


# --------------------------------------------------------------------------- 3. inference
def time_inference(student: Any, evaluation: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Per image, batch 1: forward, ``predict`` at the evaluation's options and at ``DEPLOY_CONF``."""
    import torch

    from vfmkd.datasets.collate import batch_to_device, collate_samples

    dataset, device = evaluation.dataset, next(student.parameters()).device
    # NOTE: decoded, letterboxed and scaled to [0, 1] beforehand; only the model and predict are timed.
    batches = [batch_to_device(collate_samples([dataset[index]]), device) for index in range(len(dataset))]
    student.eval()
    options = dict(evaluation.options)
    deploy = {**options, "conf_threshold": DEPLOY_CONF}
    with torch.inference_mode():
        outputs = [student(batch["images"]) for batch in batches]

        def forward() -> None:
            for batch in batches:
                student(batch["images"])

        def predict(settings: dict[str, Any]) -> Callable[[], None]:
            def run() -> None:
                for batch, output in zip(batches, outputs):
                    student.predict(output, batch, **settings)

            return run

        forward_seconds = median_seconds(forward, args.warmup, args.repeats) / len(batches)
        predict_seconds = median_seconds(predict(options), args.warmup, args.repeats) / len(batches)
        deploy_seconds = median_seconds(predict(deploy), args.warmup, args.repeats) / len(batches)
        detections = statistics.mean(len(student.predict(o, b, **deploy)[0]["boxes"]) for b, o in zip(batches, outputs))
    return {
        "images": len(batches),
        "forward_seconds": forward_seconds,
        "predict_seconds": predict_seconds,
        "predict_seconds_deploy_conf": deploy_seconds,
        "detections_per_image_deploy_conf": detections,
        "predict_options": options,
    }


# --------------------------------------------------------------------------- report
def report(result: dict[str, Any]) -> str:
    """The markdown tables of a result."""
    args, info = result["args"], result["machine"]
    training, budget, inference = result["training"], result["same_wall_time"], result["inference"]
    baseline = training[BASELINE]["median_step_seconds"]
    lines = [
        f"## Detection heads: YOLO vs DETR (`{result['command']}`)",
        "",
        f"YOLOv8n, {IMG_SIZE} px, float32, batch {args['batch']}, {args['workers']} workers, `shapes` "
        f"{args['train']} train / {args['val']} val images; {info['cpus']} CPUs, {info['torch_threads']} torch "
        f"thread{'s' if info['torch_threads'] > 1 else ''}, load average {info['load_average_before'][0]:.1f} "
        f"before, {info['load_average_after'][0]:.1f} after",
        "",
        f"| training, median of {args['steps']} steps | params (M), head | ms/step | images/s | vs {BASELINE} | "
        "waiting for data |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in training.items():
        seconds = row["median_step_seconds"]
        lines.append(f"| {name} | {row['parameters'] / 1e6:.2f}, {row['head_parameters'] / 1e6:.2f} | "
                     f"{seconds * 1e3:.0f} | {row['images_per_second']:.1f} | {seconds / baseline:.2f}x | "
                     f"{row['data_wait_share']:.1%} |")
    lines += [
        "",
        f"| same wall time, {args['val']} val images | training s | steps | epochs | mAP50-95 | mAP50 | "
        "evaluation s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rows in budget.items():
        for row in rows:
            lines.append(f"| {name} | {row['train_seconds']:.0f} | {row['steps']} | {row['epochs']:.1f} | "
                         f"{row['metrics']['mAP']:.3f} | {row['metrics']['mAP50']:.3f} | {row['eval_seconds']:.1f} |")
    lines += [
        "",
        "| inference, batch 1, per image | forward ms | `predict` ms (conf 0.001) | total ms | "
        f"`predict` ms (conf {DEPLOY_CONF}) | detections at {DEPLOY_CONF} |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in inference.items():
        forward, predict = row["forward_seconds"] * 1e3, row["predict_seconds"] * 1e3
        deploy, detections = row["predict_seconds_deploy_conf"] * 1e3, row["detections_per_image_deploy_conf"]
        lines.append(f"| {name} | {forward:.1f} | {predict:.2f} | {forward + predict:.1f} | {deploy:.2f} | "
                     f"{detections:.1f} |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, nargs="+", default=[60.0],
                        help="training wall times per head after which the mAP is measured (the run stops at the last)")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps of the throughput rows")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps / inference passes")
    parser.add_argument("--repeats", type=int, default=5, help="timed inference passes over the val images (median)")
    parser.add_argument("--train", type=int, default=64, help="training images")
    parser.add_argument("--val", type=int, default=16, help="validation images")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="data loader workers")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "detr_head.json"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import torch

    from vfmkd.datasets.synthetic import generate_synthetic_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/bench_detr_head.py " + " ".join(sys.argv[1:])
    load_before = os.getloadavg()
    args.folder = Path(tempfile.mkdtemp(prefix="bench_detr_head_"))
    try:
        data_yaml = generate_synthetic_dataset(args.folder / "shapes", num_train=args.train, num_val=args.val, seed=0)
        training = {name: time_training(name, data_yaml, args) for name in HEADS}
        budget, inference = {}, {}
        for name in HEADS:
            budget[name], student, evaluation = train_for_seconds(name, data_yaml, args)
            inference[name] = time_inference(student, evaluation, args)
    finally:
        shutil.rmtree(args.folder, ignore_errors=True)
    result = {
        "command": command.strip(),
        "args": {key: value for key, value in vars(args).items() if key != "folder"},
        "heads": {name: {"head": head, "train": overrides} for name, (head, overrides) in HEADS.items()},
        "training": training,
        "same_wall_time": budget,
        "inference": inference,
        "machine": machine(load_before),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    sys.stdout.write(report(result) + f"\n\nwrote {out}\n")


if __name__ == "__main__":
    main()
