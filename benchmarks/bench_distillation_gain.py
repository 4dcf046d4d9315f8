"""What distillation gains: YOLOv8n with few labels, with and without a trained teacher.

On the built-in ``shapes`` data (generated with a fixed seed at ``--train-images`` /
``--val-images``):

1. **Teacher.** Ultralytics trains YOLOv8-``--teacher-scale`` on every label, once
   (``--teacher-epochs``); its final EMA weights are kept twice: the Ultralytics
   checkpoint (``distill_model=`` needs one) and the plain state dict vfmkd loads as a
   ``name: vfmkd`` teacher. Both sides use identical weights.
2. **Store.** ``vfmkd features extract`` writes the teacher's p3 / p4 / p5 for every
   training image (timed on its own: *extraction*), and for its mirror image, which
   offline samples the augmentation flipped read (``--fliplr``; ``--no-fliplr``: without).
3. **Students.** YOLOv8n for ``--steps`` optimizer steps at each label share
   (``--fractions``: ``data.label_fraction``, the kept images drawn with the run's seed, or
   with ``--label-seed`` for every run: ``data.label_seed``),
   per seed (``--seeds``):

   - ``no distillation``: the labelled images only;
   - ``<loss> offline 0.8``: the teacher's p3 / p4 / p5 into the student's p3 / p4 / p5
     with ``<loss>`` (``--losses``: ``mse``, ``cwd``; weight ``--weight`` per level, 2; the
     teacher maps standardised per channel with the store's statistics, ``normalize:
     true``, unless ``--no-normalize``), 80 % of the samples from the store and 20 %
     live; with partial labels, ``--unlabeled-batch`` images without labels are added to
     each batch of ``--batch`` labelled ones (``data.unlabeled_batch_size``; distillation
     terms only), so every row sees the same labelled images per step;
   - ``<first loss> offline 1.0``: the same, all from the store (the time the store saves);
   - ``Ultralytics`` and ``Ultralytics distill_model``: Ultralytics' own trainer on the
     same labelled images for the same number of steps, without and with its
     YOLO-to-YOLO distillation from the same teacher (live, labelled images only), the
     yardstick.

Every final model (EMA weights) is evaluated by the same code: vfmkd's COCO evaluation on
the validation split (letterbox at ``--imgsz``, conf 0.001, NMS IoU 0.7, 300 detections;
Ultralytics' weights converted by :mod:`vfmkd.models.ultralytics_compat`). The table gives
mAP50-95 mean +- standard deviation over the seeds and the training time per run (from
the start of training, loader start-up included, to the last step; no evaluation).

Each run is its own process with ``--threads`` torch threads; ``--jobs`` runs that many
at once (on a shared CPU, ``--threads 1 --jobs <cores>`` keeps the timings comparable).
Finished runs are kept in ``--dir`` (``runs/<settings>/<cell>/result.json``) and not redone, so an
interrupted benchmark resumes.

    python benchmarks/bench_distillation_gain.py [--dir /tmp/gain] [--steps 300] [--seeds 0 1 2] \\
        [--fractions 0.1 1.0] [--losses mse cwd] [--jobs 2] [--threads 1]

Prints a markdown table and writes ``--out`` (default benchmarks/results/distillation_gain.json).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEACHER_KEY = "teacher"
LEVELS = ("p3", "p4", "p5")
# The head's class-logit maps per level; losses on logits (bce) pair them with the student's own.
CLASS_MAPS = tuple(f"detection.cls_{level}" for level in LEVELS)
LOGIT_LOSSES = ("bce",)
NUM_CLASSES = 6
# The YOLOv8n shapes recipe (configs/experiments/yolov8n_shapes_detection.yaml), for both trainers.
LR = 0.002
WEIGHT_DECAY = 0.0005

ULTRALYTICS_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    os.environ["YOLO_OFFLINE"] = "1"
    import torch
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    from ultralytics import YOLO
    stamps = {}
    model = YOLO(spec["model"])
    model.add_callback("on_train_start", lambda trainer: stamps.setdefault("start", time.perf_counter()))
    model.add_callback("on_train_batch_end", lambda trainer: stamps.update(end=time.perf_counter(),
                                                                            steps=stamps.get("steps", 0) + 1))
    extra = {"distill_model": spec["distill_model"]} if spec.get("distill_model") else {}
    model.train(data=spec["data"], imgsz=spec["imgsz"], batch=spec["batch"], epochs=spec["epochs"], device="cpu",
                workers=spec["workers"], plots=False, val=False, amp=False, project=spec["out"], name="run",
                exist_ok=True, verbose=False, seed=spec["seed"], deterministic=False, optimizer="AdamW",
                lr0=spec["lr"], weight_decay=spec["weight_decay"], **extra)
    checkpoint = torch.load(os.path.join(spec["out"], "run", "weights", "last.pt"), weights_only=False)
    network = (checkpoint.get("ema") or checkpoint["model"]).float()
    network = getattr(network, "student_model", network)
    torch.save(network.state_dict(), spec["state_dict"])
    if spec.get("checkpoint"):
        os.replace(os.path.join(spec["out"], "run", "weights", "last.pt"), spec["checkpoint"])
    print("RESULT " + json.dumps({"seconds": stamps["end"] - stamps["start"], "steps": stamps["steps"]}))
    """
)


# ----------------------------------------------------------------------------- cells
def cell_name(kind: str, fraction: float, seed: int) -> str:
    return f"{kind}_f{fraction:g}_s{seed}"


def plan_cells(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every run of the table: kind, label share, seed."""
    # NOTE: in the order of what the table needs most, so an interrupted run has the key cells.
    yardstick = [] if args.skip_ultralytics else ["ultralytics", "ultralytics_distill"]
    kinds = ["plain", f"{args.losses[0]}@0.8", *yardstick, *(f"{loss}@0.8" for loss in args.losses[1:]),
             f"{args.losses[0]}@1.0"]
    return [
        {"kind": kind, "fraction": fraction, "seed": seed, "name": cell_name(kind, fraction, seed)}
        for fraction in args.fractions
        for kind in kinds
        for seed in args.seeds
        if not args.only or kind in args.only
    ]


def student_config(args: argparse.Namespace, cell: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The vfmkd experiment of one cell."""
    config: dict[str, Any] = {
        "experiment_name": cell["name"],
        "model": {
            "backbone": {"type": "yolov8", "scale": "n"},
            "heads": {"detection": {"type": "yolo_head", "num_classes": NUM_CLASSES}},
        },
        "data": {
            "dataset": str(args.data_yaml),
            "img_size": args.imgsz,
            "batch_size": args.batch,
            "num_workers": args.workers,
            "label_fraction": cell["fraction"],
            "label_seed": args.label_seed,
            # NOTE: close_mosaic counts epochs, and an epoch of a mixed set is many more steps than one
            # of its labelled part: the default 10 would close mosaic early in the distillation runs only.
            "augment": {"mosaic": 0.5, "scale": 0.3, "close_mosaic": args.close_mosaic},
        },
        "train": {
            "max_steps": args.steps,
            "optimizer": "adamw",
            "lr": LR,
            "weight_decay": WEIGHT_DECAY,
            "warmup_steps": args.warmup_steps,
            "ema_tau": 200,
            "seed": cell["seed"],
            "device": "cpu",
            "amp": False,
            "output_dir": str(run_dir),
            "eval_interval": 10**9,
            "save_interval": 10**9,
            "log_interval": 50,
        },
    }
    if cell["kind"] != "plain":
        loss, ratio = cell["kind"].split("@")
        logits = loss in LOGIT_LOSSES
        config["teachers"] = {TEACHER_KEY: teacher_entry(args, float(ratio), normalize=args.normalize and not logits)}
        if logits:
            # The teacher's class scores into the student's own class logits, level by level.
            losses = {
                f"{TEACHER_KEY}_{name}": {"type": loss, "teacher": TEACHER_KEY, "feature": name, "student": name,
                                          "adapter": "none", "weight": args.logit_weight}
                for name in CLASS_MAPS
            }
        else:
            losses = {
                f"{TEACHER_KEY}_{level}": {
                    "type": loss, "teacher": TEACHER_KEY, "feature": level, "student": level, "weight": args.weight,
                }
                for level in LEVELS
            }
        config["distillation"] = {"losses": losses}
        if cell["fraction"] < 1.0:
            # NOTE: the unlabelled images come on top of the labelled batch, so every run sees the
            # same labelled images per step (half the batch unlabelled at the same batch size
            # halved the detection signal: mAP50-95 0.325 vs 0.408-0.461 without distillation).
            config["data"]["unlabeled_batch_size"] = args.unlabeled_batch
    return config


def teacher_entry(args: argparse.Namespace, offline_ratio: float, *, normalize: bool) -> dict[str, Any]:
    return {
        "name": "vfmkd",
        "model_path": str(args.teacher_state_dict),
        "features": [*LEVELS, *CLASS_MAPS],
        "feature_path": str(args.store),
        "image_size": args.imgsz,
        "offline_ratio": offline_ratio,
        # Per-channel standardised with the store's statistics: the raw neck maps are small
        # (channel stds ~0.01-1), so an unnormalised MSE would be too weak to matter. Logits stay raw.
        "normalize": normalize,
    }


# ----------------------------------------------------------------------------- runs
def run_vfmkd_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """Worker process: train one vfmkd cell, evaluate its EMA weights, return its figures."""
    import torch

    torch.set_num_threads(spec["threads"])
    from vfmkd.config import validate_config
    from vfmkd.core import EvalHook, build_trainer
    from vfmkd.core.trainer import Trainer

    class TimedTrainer(Trainer):
        start = end = 0.0

        def _run(self) -> None:
            TimedTrainer.start = time.perf_counter()
            super()._run()

        def after_step(self) -> None:
            TimedTrainer.end = time.perf_counter()
            super().after_step()

    config = validate_config(spec["config"])
    trainer = build_trainer(config, trainer_class=TimedTrainer)
    trainer.hooks = [hook for hook in trainer.hooks if not isinstance(hook, EvalHook)]
    trainer.train()
    seconds = TimedTrainer.end - TimedTrainer.start
    metrics = evaluate_checkpoint(trainer.last_path, spec) if spec.get("evaluate", True) else {}
    return {"seconds": seconds, "steps": trainer.step, **metrics}


def run_ultralytics_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """Worker process: Ultralytics trains one cell in a subprocess; vfmkd evaluates its weights."""
    state_dict = Path(spec["out"]) / "final_state_dict.pt"
    payload = {**spec["ultralytics"], "state_dict": str(state_dict), "threads": spec["threads"], "out": spec["out"]}
    result = subprocess.run(
        [sys.executable, "-c", ULTRALYTICS_SCRIPT, json.dumps(payload)],
        capture_output=True, text=True, cwd=spec["out"],
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"Ultralytics run {spec['name']} failed:\n{result.stderr[-3000:]}")
    timing = json.loads(lines[-1][len("RESULT "):])
    return {**timing, **evaluate_state_dict(state_dict, spec)}


def evaluate_checkpoint(path: Path, spec: dict[str, Any]) -> dict[str, float]:
    from vfmkd.core.checkpoint import load_model_from_checkpoint

    return evaluate_model(load_model_from_checkpoint(path), spec)


def evaluate_state_dict(path: Path, spec: dict[str, Any]) -> dict[str, float]:
    """An Ultralytics YOLOv8 state dict, converted and evaluated as a vfmkd model."""
    import torch

    from vfmkd.models import build_model
    from vfmkd.models.ultralytics_compat import convert_ultralytics_state_dict
    from vfmkd.models.unified_model import DETECTION_HEAD
    from vfmkd.teachers.vfmkd_teacher import ultralytics_model_config
    from vfmkd.utils.state_dict import load_state_dict_strict

    state = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(ultralytics_model_config(state))
    load_state_dict_strict(model, convert_ultralytics_state_dict(state, head_name=DETECTION_HEAD), source=str(path))
    return evaluate_model(model, spec)


def evaluate_model(model: Any, spec: dict[str, Any]) -> dict[str, float]:
    """Box mAP50-95 and mAP50 on the validation split with vfmkd's COCO evaluation."""
    from vfmkd.config import validate_config
    from vfmkd.core.build import build_evaluators
    from vfmkd.datasets import build_dataset
    from vfmkd.evaluation import run_evaluation

    data = validate_config(spec["eval_config"]).data
    dataset = build_dataset(data, data.val_split, train=False)
    metrics = run_evaluation(
        model.eval(), dataset, build_evaluators(model, dataset), batch_size=16, num_workers=0, device="cpu",
        predict_options={"conf_threshold": 0.001, "iou_threshold": 0.7, "max_det": 300},
    )
    return {"map50_95": float(metrics["mAP"]), "map50": float(metrics["mAP50"])}


def run_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one cell in a fresh process (its own threads and memory); reuse a finished one."""
    out = Path(spec["out"])
    result_file = out / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    out.mkdir(parents=True, exist_ok=True)
    spec_file = out / "spec.json"
    spec_file.write_text(json.dumps(spec, indent=2))
    started = time.perf_counter()
    process = subprocess.run(
        [sys.executable, __file__, "--worker", str(spec_file)], capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(spec["threads"])},
    )
    if process.returncode != 0 or not result_file.exists():
        (out / "worker.log").write_text(process.stdout + process.stderr)
        raise RuntimeError(f"run {spec['name']} failed; see {out / 'worker.log'}:\n{process.stderr[-3000:]}")
    result = json.loads(result_file.read_text())
    score = f"mAP50-95 {result['map50_95']:.4f}, " if "map50_95" in result else ""
    print(f"  {spec['name']}: {score}{result['seconds']:.1f} s training "
          f"({time.perf_counter() - started:.0f} s in all)", flush=True)
    return result


def worker_main(spec_file: Path) -> None:
    spec = json.loads(spec_file.read_text())
    result = run_ultralytics_cell(spec) if spec["kind"].startswith("ultralytics") else run_vfmkd_cell(spec)
    temporary = spec_file.with_name("result.json.tmp")
    temporary.write_text(json.dumps({**result, "kind": spec["kind"], "fraction": spec["fraction"], "seed": spec["seed"]}))
    os.replace(temporary, spec_file.with_name("result.json"))


# ----------------------------------------------------------------------------- set-up
def prepare_data(args: argparse.Namespace) -> Path:
    from vfmkd.datasets.synthetic import generate_synthetic_dataset

    folder = args.dir / f"shapes_{args.train_images}_{args.val_images}"
    if not (folder / "data.yaml").exists():
        generate_synthetic_dataset(folder, num_train=args.train_images, num_val=args.val_images, seed=0)
    # Ultralytics resolves a relative `path:` against its own datasets folder.
    absolute = folder / "data_absolute.yaml"
    absolute.write_text((folder / "data.yaml").read_text().replace("path: .", f"path: {folder}"))
    return folder / "data.yaml"


def labelled_list(args: argparse.Namespace, fraction: float, seed: int) -> Path:
    """Ultralytics' data yaml for the images vfmkd keeps the labels of at ``fraction`` / ``seed``."""
    from vfmkd.config import validate_config
    from vfmkd.datasets.mixed import MixedDataset, build_train_dataset

    folder = args.data_yaml.parent
    data = validate_config(student_config(args, {"name": "x", "kind": "plain", "fraction": fraction, "seed": seed},
                                          args.dir)).data
    # NOTE: vfmkd's own choice (label_fraction with the seed, or label_seed), not a copy of it.
    training = build_train_dataset(data, "train", train=False, seed=seed)
    labelled = training.parts[0] if isinstance(training, MixedDataset) else training
    seed = seed if args.label_seed is None else args.label_seed
    listing = folder / f"train_f{fraction:g}_s{seed}.txt"
    listing.write_text("".join(f"{record.path}\n" for record in labelled.records))
    names = yaml.safe_load(args.data_yaml.read_text())["names"]
    spec = {"path": str(folder), "train": str(listing), "val": "images/val", "names": names}
    data_yaml = folder / f"ultralytics_f{fraction:g}_s{seed}.yaml"
    data_yaml.write_text(yaml.safe_dump(spec))
    return data_yaml


def train_teacher(args: argparse.Namespace) -> dict[str, Any]:
    """The Ultralytics teacher (trained once, kept in ``--dir``), and its mAP under vfmkd's evaluation."""
    out = args.dir / f"teacher_yolov8{args.teacher_scale}_e{args.teacher_epochs}"
    spec = {
        "name": out.name, "kind": "ultralytics", "fraction": 1.0, "seed": 0, "out": str(out),
        "threads": args.teacher_threads, "eval_config": eval_config(args),
        "ultralytics": {
            "model": f"yolov8{args.teacher_scale}.yaml", "data": str(args.data_yaml.parent / "data_absolute.yaml"),
            "imgsz": args.imgsz, "batch": args.batch, "epochs": args.teacher_epochs, "workers": args.workers,
            "seed": 0, "lr": LR, "weight_decay": WEIGHT_DECAY, "checkpoint": str(out / "teacher_ultralytics.pt"),
        },
    }
    print(f"teacher: YOLOv8{args.teacher_scale}, {args.teacher_epochs} epochs with Ultralytics ...", flush=True)
    result = run_cell(spec)
    args.teacher_checkpoint = out / "teacher_ultralytics.pt"
    args.teacher_state_dict = out / "final_state_dict.pt"
    return result


def extract_store(args: argparse.Namespace) -> float:
    """The teacher's p3 / p4 / p5 for every training image; seconds (0 when the store exists)."""
    config_file = args.dir / "extract.yaml"
    config = student_config(args, {"name": "extract", "kind": "mse@1.0", "fraction": 1.0, "seed": 0}, args.dir)
    config_file.write_text(yaml.safe_dump(config))
    timing = args.store.parent / f"{args.store.name}.seconds"
    if timing.exists():
        return float(timing.read_text())
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "vfmkd", "features", "extract", "--config", str(config_file), "--teacher", TEACHER_KEY,
         "--device", "cpu", "--num-workers", str(args.workers), "--no-progress", *(["--fliplr"] if args.fliplr else [])],
        check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.teacher_threads)},
    )
    seconds = time.perf_counter() - started
    timing.write_text(f"{seconds}")
    return seconds


def eval_config(args: argparse.Namespace) -> dict[str, Any]:
    return student_config(args, {"name": "eval", "kind": "plain", "fraction": 1.0, "seed": 0}, args.dir)


def cell_spec(args: argparse.Namespace, cell: dict[str, Any]) -> dict[str, Any]:
    # NOTE: the settings in the folder name, so a finished run is reused only for the same settings.
    settings = f"{args.imgsz}px_{args.steps}steps_b{args.batch}_warm{args.warmup_steps}"
    if args.label_seed is not None and cell["fraction"] < 1.0:
        settings += f"_labels{args.label_seed}"
    if not cell["kind"].startswith("ultralytics"):
        settings += f"_cm{args.close_mosaic}"
    if getattr(args, "timing", False):
        settings += "_timing"
    if cell["kind"].split("@")[0] in LOGIT_LOSSES:
        settings += f"_logits_w{args.logit_weight:g}_u{args.unlabeled_batch}"
    elif cell["kind"] not in ("plain", "ultralytics", "ultralytics_distill"):
        settings += f"_w{args.weight:g}_{'norm' if args.normalize else 'raw'}_u{args.unlabeled_batch}"
    if args.fliplr and cell["kind"] not in ("plain", "ultralytics", "ultralytics_distill"):
        settings += "_fliplr"
    out = args.dir / "runs" / settings / cell["name"]
    spec = {**cell, "out": str(out), "threads": args.threads, "eval_config": eval_config(args),
            "evaluate": not getattr(args, "timing", False)}
    if cell["kind"].startswith("ultralytics"):
        labelled = math.ceil(round(cell["fraction"] * args.train_images) / args.batch)
        spec["ultralytics"] = {
            "model": "yolov8n.yaml", "data": str(labelled_list(args, cell["fraction"], cell["seed"])),
            "imgsz": args.imgsz, "batch": args.batch, "epochs": max(1, round(args.steps / labelled)),
            "workers": args.workers, "seed": cell["seed"], "lr": LR, "weight_decay": WEIGHT_DECAY,
        }
        if cell["kind"] == "ultralytics_distill":
            spec["ultralytics"]["distill_model"] = str(args.teacher_checkpoint)
    else:
        spec["config"] = student_config(args, cell, out)
    return spec


def time_offline(args: argparse.Namespace) -> dict[str, Any]:
    """What the store costs: ``plain`` and ``<first loss>@1.0`` (all offline) at 100% labels
    for ``--time-steps`` steps, one run at a time on an otherwise idle machine, alternated
    ``--time-repeats`` times; training seconds per run (no evaluation) and their ratio."""
    timing = argparse.Namespace(**{**vars(args), "steps": args.time_steps, "timing": True})
    kinds = ("plain", f"{args.losses[0]}@1.0")
    seconds: dict[str, list[float]] = {kind: [] for kind in kinds}
    for repeat in range(args.time_repeats):
        for kind in kinds:
            cell = {"kind": kind, "fraction": 1.0, "seed": 0, "name": f"{cell_name(kind, 1.0, 0)}_r{repeat}"}
            seconds[kind].append(run_cell(cell_spec(timing, cell))["seconds"])
    plain, offline = (statistics.fmean(seconds[kind]) for kind in kinds)
    return {"steps": args.time_steps, "repeats": args.time_repeats, "threads": args.threads,
            "seconds": seconds, "plain_mean": plain, "offline_mean": offline, "ratio": offline / plain}


# ----------------------------------------------------------------------------- report
def label(kind: str) -> str:
    if kind == "plain":
        return "vfmkd, no distillation"
    if kind == "ultralytics":
        return "Ultralytics, no distillation"
    if kind == "ultralytics_distill":
        return "Ultralytics `distill_model=` (live, labelled only)"
    loss, ratio = kind.split("@")
    maps = "class logits p3/p4/p5" if loss in LOGIT_LOSSES else "p3/p4/p5"
    return f"vfmkd, {loss} {maps}, offline {ratio}"


def summarise(results: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for fraction in args.fractions:
        plain = {}
        for kind in dict.fromkeys(result["kind"] for result in results):
            cell = [r for r in results if r["kind"] == kind and r["fraction"] == fraction]
            if not cell:
                continue
            values = [r["map50_95"] for r in cell]
            row = {
                "fraction": fraction, "kind": kind, "runs": len(cell),
                "map50_95_mean": statistics.fmean(values),
                "map50_95_std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "map50_mean": statistics.fmean(r["map50"] for r in cell),
                "seconds_mean": statistics.fmean(r["seconds"] for r in cell),
                "values": values,
            }
            if kind in ("plain", "ultralytics"):
                plain[kind] = row
            reference = plain.get("ultralytics" if kind.startswith("ultralytics") else "plain")
            if reference is not None:
                row["gain"] = row["map50_95_mean"] - reference["map50_95_mean"]
                row["time_ratio"] = row["seconds_mean"] / reference["seconds_mean"]
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| labels | run | seeds | mAP50-95 (mean +- std) | gain | mAP50 | training s / run | time vs plain |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        gain = f"{row['gain']:+.4f}" if "gain" in row and row["kind"] not in ("plain", "ultralytics") else "-"
        ratio = f"{row['time_ratio']:.2f}x" if "time_ratio" in row else "-"
        lines.append(
            f"| {row['fraction']:.0%} | {label(row['kind'])} | {row['runs']} "
            f"| {row['map50_95_mean']:.4f} +- {row['map50_95_std']:.4f} "
            f"| {gain} | {row['map50_mean']:.4f} | {row['seconds_mean']:.0f} | {ratio} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, default=Path("runs/bench_distillation_gain"))
    parser.add_argument("--train-images", type=int, default=400)
    parser.add_argument("--val-images", type=int, default=100)
    parser.add_argument("--imgsz", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--close-mosaic", type=int, default=0,
                        help="vfmkd runs: epochs without mosaic at the end (data.augment.close_mosaic)")
    parser.add_argument("--teacher-scale", default="s", choices=["s", "m"])
    parser.add_argument("--teacher-epochs", type=int, default=40)
    parser.add_argument("--teacher-threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--label-seed", type=int,
                        help="draw the labelled images with this seed in every run (default: each run's seed)")
    parser.add_argument("--losses", nargs="+", default=["mse", "cwd", "bce"])
    parser.add_argument("--unlabeled-batch", type=int, default=8,
                        help="unlabelled images added to each batch of the distillation runs with partial labels")
    parser.add_argument("--weight", type=float, default=2.0, help="weight of each level's distillation term")
    parser.add_argument("--logit-weight", type=float, default=0.5,
                        help="weight of each level's term of the losses on class logits (bce)")
    parser.add_argument("--no-normalize", dest="normalize", action="store_false",
                        help="distil the raw teacher maps (default: standardised per channel)")
    parser.add_argument("--no-fliplr", dest="fliplr", action="store_false",
                        help="a store without mirror images (default: features extract --fliplr, whose mirror "
                             "images flipped offline samples read)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--skip-ultralytics", action="store_true")
    parser.add_argument("--only", nargs="+", help="run only these kinds (plain, mse@0.8, mse@1.0, ultralytics, ...)")
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: the table of the finished runs in --dir for these settings")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "distillation_gain.json")
    parser.add_argument("--time-steps", type=int,
                        help="instead of the table: time plain against all-offline <first loss> at 100%% labels "
                             "for this many steps, one run at a time (writes --time-out)")
    parser.add_argument("--time-repeats", type=int, default=2)
    parser.add_argument("--time-out", type=Path, default=ROOT / "benchmarks" / "results" / "distillation_time.json")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.worker is not None:
        worker_main(args.worker)
        return
    args.dir = args.dir.resolve()
    args.dir.mkdir(parents=True, exist_ok=True)
    args.data_yaml = prepare_data(args)
    teacher = train_teacher(args)
    print(f"teacher mAP50-95 {teacher['map50_95']:.4f} (mAP50 {teacher['map50']:.4f}), {teacher['seconds']:.0f} s")
    args.store = args.dir / f"store_{args.teacher_state_dict.parent.name}_{args.imgsz}_neck_and_logits"
    if args.fliplr:
        args.store = args.store.with_name(args.store.name + "_fliplr")
    extraction = extract_store(args)
    print(f"extraction: {extraction:.1f} s for {args.train_images} images", flush=True)
    if args.time_steps:
        timing = time_offline(args)
        print(f"{args.time_steps} steps, one run at a time: plain {timing['plain_mean']:.1f} s, "
              f"{args.losses[0]} all offline {timing['offline_mean']:.1f} s: {timing['ratio']:.3f}x")
        args.time_out.parent.mkdir(parents=True, exist_ok=True)
        args.time_out.write_text(json.dumps({**timing, "processor": platform.processor() or platform.machine(),
                                             "imgsz": args.imgsz, "batch": args.batch}, indent=2))
        return
    cells = plan_cells(args)
    specs = [cell_spec(args, cell) for cell in cells]
    if args.table_only:
        finished = [Path(spec["out"]) / "result.json" for spec in specs]
        results = [json.loads(path.read_text()) for path in finished if path.exists()]
    else:
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(run_cell, specs))
    rows = summarise(results, args)
    header = (
        f"YOLOv8n on shapes ({args.train_images} train / {args.val_images} val images, {args.imgsz} px), "
        f"{args.steps} steps of batch {args.batch}, seeds {args.seeds}; teacher YOLOv8{args.teacher_scale} "
        f"(Ultralytics, {args.teacher_epochs} epochs, all labels): mAP50-95 {teacher['map50_95']:.4f}; "
        f"extraction of its p3/p4/p5 store: {extraction:.1f} s; {args.threads} thread(s) per run, "
        f"{args.jobs} run(s) at once, {platform.processor() or platform.machine()}"
    )
    print("\n" + header + "\n" + table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "teacher": teacher, "extraction_seconds": extraction, "rows": rows, "runs": results}
    args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
