"""The ``vfmkd`` command (also ``python -m vfmkd``).

Sub-commands::

    vfmkd data synth OUT [--train N] [--val M] [--seed S]
    vfmkd data check DATA
    vfmkd weights list | download NAME [--dir weights] [--url URL]
    vfmkd features extract --teacher NAME (--weights PATH | --random-init) --data DATA --out DIR
    vfmkd features extract --config CFG --teacher KEY
    vfmkd features info DIR | verify DIR [--num N]
    vfmkd train --config CFG [--set key=value ...] [--resume]
    vfmkd eval --config CFG --checkpoint CKPT [--set key=value ...]
    vfmkd predict --checkpoint CKPT --source PATH [--out DIR] [--prompts FILE] [--conf C] ...
    vfmkd predict --engine onnxruntime --model FILE.onnx [--segmenter STEM] --source PATH [--out DIR] ...
    vfmkd export --checkpoint CKPT --format onnx [--img-size N] [--dynamic] [--opset N] [--out FILE] [--nms]
    vfmkd report RUN_DIR [--out FILE.html] [--images N] [--device D] [--conf C]
    vfmkd demo [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from vfmkd.errors import run_with_user_errors

# NOTE: each command imports what it runs inside its handler: `vfmkd --help` and the light
# commands then start without loading torch models, teachers and data code.

logger = logging.getLogger("vfmkd")

DEMO_CONFIG = "configs/experiments/yolov8n_sam2_shapes_demo.yaml"


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from vfmkd.datasets.synthetic import generate_synthetic_dataset

    data_yaml = generate_synthetic_dataset(
        Path(args.out), num_train=args.train, num_val=args.val, seed=args.seed
    )
    _say(f"wrote the built-in data set: {data_yaml}")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from vfmkd.datasets.check import check_dataset, format_problems

    problems = check_dataset(args.data)
    if problems:
        _say(format_problems(problems))
        _say(f"{len(problems)} problem(s) found in {args.data}")
        return 1
    _say(f"{args.data}: no problems found")
    return 0


def _load_config(args: argparse.Namespace, extra_overrides: Sequence[str] = ()):
    from vfmkd.config import load_config

    return load_config(args.config, [*extra_overrides, *(args.set or [])])


def _cmd_train(args: argparse.Namespace) -> int:
    return run_training(_load_config(args), resume=args.resume)


def run_training(config, *, resume: bool = False) -> int:
    """Train from a validated config and print where the run is.

    The report's pictures go to TensorBoard after each evaluation
    (``eval.tensorboard_images``).
    """
    from vfmkd.core.build import build_trainer
    from vfmkd.report.hooks import TensorBoardPictures

    count = config.eval.tensorboard_images
    result = build_trainer(config, resume=resume, hooks=[TensorBoardPictures(count)] if count else []).train()
    if result.get("is_main", True):
        _print_result(result)
    return 0


def _print_result(result: dict) -> None:
    metrics = result.get("metrics") or {}
    if "mAP" in metrics:
        _say(f"box mAP50-95 {metrics.get('mAP', 0.0):.4f}  mAP50 {metrics.get('mAP50', 0.0):.4f}")
    if "mask_mAP" in metrics:
        _say(f"mask mAP50-95 {metrics.get('mask_mAP', 0.0):.4f}  mAP50 {metrics.get('mask_mAP50', 0.0):.4f}")
    miou = sorted(key for key in metrics if key.startswith("miou/"))
    if miou:
        _say("prompt mIoU  " + "  ".join(f"{key[len('miou/'):]} {metrics[key]:.4f}" for key in miou))
    for name in sorted(key for key in metrics if key.startswith("fidelity/")):
        _say(f"{name} {metrics[name]:.4f}")
    _say(f"run directory: {result.get('run_dir')}")
    for key in ("last", "best"):
        if result.get(key):
            _say(f"{key} checkpoint: {result[key]}")


def seed_overrides(
    raw: dict, *, backbone: str | None, teacher: str | None, dataset: str | None
) -> dict:
    """Apply the seed's ``tools/train.py --backbone/--teacher/--dataset`` flags to a raw config.

    ``--backbone X`` keeps the config's backbone when it already is X, else takes
    ``configs/backbones/X.yaml``; ``--teacher T`` enables T (from the config or
    ``configs/teachers/T.yaml``) and disables the others; ``--dataset D`` sets
    ``data.dataset``.
    """
    from vfmkd.config import ConfigError
    from vfmkd.utils.paths import find_project_file

    raw = dict(raw or {})
    if backbone:
        model = dict(raw.get("model") or {})
        current = dict(model.get("backbone") or {})
        if current.get("type") != backbone:
            config_file = f"configs/backbones/{backbone}.yaml"
            current = {"config": config_file} if find_project_file(config_file) else {"type": backbone}
        model["backbone"] = current
        raw["model"] = model
    if teacher:
        teachers = {name: dict(entry or {}) for name, entry in (raw.get("teachers") or {}).items()}
        if teacher not in teachers:
            config_file = f"configs/teachers/{teacher}.yaml"
            if find_project_file(config_file) is None:
                raise ConfigError(
                    f"--teacher {teacher}: not in the config's 'teachers' section and no "
                    f"{config_file}; add it to one of them"
                )
            teachers[teacher] = {"config": config_file}
        for name, entry in teachers.items():
            entry["enabled"] = name == teacher
        raw["teachers"] = teachers
    if dataset:
        raw["data"] = {**(raw.get("data") or {}), "dataset": dataset}
    return raw


def seed_train_main(argv: Sequence[str] | None = None) -> int:
    """``python tools/train.py --config CFG --backbone B --teacher T --dataset D``."""
    parser = argparse.ArgumentParser(prog="tools/train.py", description="train a vfmkd experiment")
    parser.add_argument("--config", required=True, help="experiment YAML")
    parser.add_argument("--backbone", help="student backbone (yolov8, ...)")
    parser.add_argument("--teacher", help="teacher to distil from (sam2, sam, dino, ...)")
    parser.add_argument("--dataset", help="data set name or path (coco128, shapes, data.yaml)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.lr=1e-3")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def action() -> int:
        from vfmkd.config import apply_overrides, read_yaml, validate_config

        raw = seed_overrides(
            read_yaml(args.config), backbone=args.backbone, teacher=args.teacher, dataset=args.dataset
        )
        raw = apply_overrides(raw, args.set or [])
        return run_training(validate_config(raw, args.config), resume=args.resume)

    return run_with_user_errors(action)


def _checkpoint_distiller(config: Any, checkpoint: dict, model: Any) -> Any:
    """The checkpoint's own adapters for feature fidelity; None (with the reason) when it cannot be measured."""
    from vfmkd.config import ConfigError
    from vfmkd.core.checkpoint import load_distiller_from_checkpoint
    from vfmkd.features.format import FeatureStoreError

    try:
        return load_distiller_from_checkpoint(config, checkpoint, model)
    except (ConfigError, FeatureStoreError, FileNotFoundError) as error:
        # NOTE: e.g. the training store (the teacher's feature shapes) or the teacher's weights
        # are not on this machine; the mAP is still worth reporting.
        logger.warning("feature fidelity skipped: %s", error)
        return None


def _cmd_eval(args: argparse.Namespace) -> int:
    from vfmkd.core.build import build_evaluators
    from vfmkd.core.checkpoint import load_checkpoint, load_model_from_checkpoint
    from vfmkd.datasets import build_dataset
    from vfmkd.distillation.distiller import DistilledModel
    from vfmkd.evaluation import run_evaluation
    from vfmkd.utils.distributed import resolve_device

    config = _load_config(args)
    device = resolve_device(config.train.device)
    checkpoint = load_checkpoint(args.checkpoint)
    model = load_model_from_checkpoint(checkpoint, device)
    dataset = build_dataset(config.data, config.data.val_split, train=False)
    # NOTE: the distiller first, so that adapters that do not fit the config fail before the pass.
    distiller = None if args.no_fidelity else _checkpoint_distiller(config, checkpoint, model)
    evaluated = DistilledModel(model, distiller.to(device) if distiller is not None else None)
    evaluators = build_evaluators(model, dataset, distiller)
    if not getattr(dataset, "has_labels", True):
        _say(f"{config.data.dataset}: no labels, so no mAP; feature fidelity only")
    metrics = run_evaluation(
        evaluated,
        dataset,
        evaluators,
        batch_size=config.eval.batch_size or config.data.batch_size,
        num_workers=config.data.num_workers,
        device=device,
        amp=config.train.amp,
        amp_dtype=config.train.amp_dtype,
        predict_options={
            "conf_threshold": config.eval.conf_threshold,
            "iou_threshold": config.eval.iou_threshold,
            "max_det": config.eval.max_det,
        },
    )
    _say(json.dumps({k: v for k, v in metrics.items() if not k.endswith("per_class")}, indent=2))
    table = per_class_table(metrics)
    if table:
        _say(table)
    return 0


def per_class_table(metrics: dict) -> str:
    """Box AP (``per_class``) and mask AP (``mask_per_class``) by class, one table each;
    classes without ground truth in the split (NaN) are left out and counted."""
    lines = []
    for key, label in (("per_class", "AP"), ("mask_per_class", "mask AP")):
        every = metrics.get(key) or {}
        present = {name: ap for name, ap in every.items() if not math.isnan(ap)}
        width = max((len(name) for name in present), default=0)
        lines += [f"  {name:<{width}}  {label} {ap:.4f}" for name, ap in present.items()]
        if len(every) > len(present):
            lines.append(f"  ({len(every) - len(present)} classes without ground truth in this split not listed)")
    return "\n".join(lines)


def _cmd_predict(args: argparse.Namespace) -> int:
    from vfmkd.inference import PredictError, Predictor

    options = {"img_size": args.img_size, "conf": args.conf, "iou": args.iou, "max_det": args.max_det}
    options["batch_size"] = args.batch_size
    if args.engine == "onnxruntime":
        if args.model is None or args.checkpoint is not None or args.config is not None:
            raise PredictError(
                "--engine onnxruntime runs an exported model: give --model FILE.onnx (no --checkpoint, --config)"
            )
        # NOTE: --device cuda asks onnxruntime for its CUDA provider (the CPU one stays the fallback).
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if args.device.startswith("cuda") else None
        predictor = Predictor.from_onnx(args.model, segmenter=args.segmenter, providers=providers, **options)
    else:
        if args.checkpoint is None or args.model is not None or args.segmenter is not None:
            raise PredictError(
                "--engine torch runs a checkpoint: give --checkpoint CKPT "
                "(--model and --segmenter are for --engine onnxruntime)"
            )
        predictor = Predictor.from_checkpoint(args.checkpoint, config=args.config, device=args.device, **options)
    summary = predictor.predict_source(
        args.source, out_dir=args.out, prompts=args.prompts, progress=not args.no_progress
    )
    rows = len(summary.results)
    _say(f"{summary.processed} image(s) predicted ({rows} result(s)), {len(summary.skipped)} skipped as unreadable")
    for path, reason in summary.skipped[:10]:
        _say(f"  skipped {path}: {reason}")
    if len(summary.skipped) > 10:
        _say(f"  ... and {len(summary.skipped) - 10} more (see the warnings above)")
    _say(f"drawn images: {summary.out_dir}")
    _say(f"COCO results: {summary.results_file}")
    return 0


def _add_predict_command(commands: Any) -> None:
    predict = commands.add_parser("predict", help="run a checkpoint on images: drawn images + COCO results")
    predict.add_argument("--checkpoint", help="a training checkpoint (best.pt, last.pt); --engine torch")
    predict.add_argument(
        "--engine", choices=("torch", "onnxruntime"), default="torch", help="torch (a checkpoint, the default) or "
        "onnxruntime (an exported model, --model)"
    )
    predict.add_argument(
        "--model", help="vfmkd export's detector graph (STEM.onnx; without a detection head STEM_encoder.onnx); "
        "STEM_encoder.onnx and STEM_decoder.onnx beside it give masks; --engine onnxruntime"
    )
    predict.add_argument(
        "--segmenter", help="the segmenter's files when not beside --model: either file or their STEM; "
        "--engine onnxruntime"
    )
    predict.add_argument("--config", help="experiment YAML naming the classes and size (default: the checkpoint's)")
    predict.add_argument("--source", required=True, help="an image, a folder, a quoted glob or a .txt list of paths")
    predict.add_argument(
        "--out", default="runs/predict", help="output folder (default runs/predict; its files are overwritten)"
    )
    predict.add_argument("--prompts", help="JSON of boxes / points per image (original pixels): masks for those")
    predict.add_argument("--conf", type=float, default=0.25, help="score threshold (default 0.25)")
    predict.add_argument("--iou", type=float, default=0.7, help="NMS IoU threshold (default 0.7)")
    predict.add_argument("--max-det", type=int, default=300, help="most detections per image (default 300)")
    predict.add_argument("--img-size", type=int, default=None, help="input size (default: the training data.img_size)")
    predict.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default auto)")
    predict.add_argument("--batch-size", type=int, default=1, help="images per forward pass (default 1)")
    predict.add_argument("--no-progress", action="store_true", help="no progress bar")
    predict.set_defaults(handler=_cmd_predict)


def _cmd_demo(args: argparse.Namespace) -> int:
    from vfmkd.config import load_config

    overrides = [f"train.output_dir={args.out}"] if args.out else []
    config = load_config(args.config, overrides)
    _say(f"demo: {args.config}")
    for key, teacher in config.teachers.items():
        if teacher.enabled and teacher.offline and teacher.feature_path:
            prepare_teacher_store(key, config, args.config)
    run_training(config)
    from vfmkd.report import write_report

    _say(f"report: {write_report(config.run_dir, device=config.train.device)}")
    return 0


def prepare_teacher_store(key: str, config: Any, config_file: str) -> None:
    """Extract (or finish extracting) the store of ``teachers.<key>`` for the training split.

    Args:
        key: the teacher entry.
        config: the validated experiment.
        config_file: its YAML, for the equivalent command line printed for the user.
    """
    from vfmkd.features.cli import ExtractionOptions, extract_teacher_entry, format_store_info

    teacher = config.teachers[key]
    # NOTE: the rule of build_teacher_from_config, said loudly before minutes of extraction.
    if teacher.allow_random_init and not (teacher.model_path and Path(teacher.model_path).is_file()):
        _say(
            "\n" + "!" * 78 + f"\n!! teacher '{key}' has RANDOM weights: {teacher.model_path} is missing, so its "
            "features\n!! mean nothing; this run only shows the flow works. For real distillation:\n"
            f"!!   vfmkd weights download {teacher.name or key}\n" + "!" * 78 + "\n"
        )
    _say(f"teacher features: vfmkd features extract --config {config_file} --teacher {key} --no-progress")
    store = extract_teacher_entry(config, key, options=ExtractionOptions(progress=False))
    _say(format_store_info(store))


def _say(text: str) -> None:
    # NOTE: the CLI is the one place that writes to stdout; library code logs.
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vfmkd", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="built-in data set and data checks")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    synth = data_commands.add_parser("synth", help="write the built-in synthetic data set")
    synth.add_argument("out", help="output folder, e.g. datasets/shapes")
    synth.add_argument("--train", type=int, default=64, help="training images (default 64)")
    synth.add_argument("--val", type=int, default=16, help="validation images (default 16)")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(handler=_cmd_data_synth)
    check = data_commands.add_parser("check", help="list every problem in a data set")
    check.add_argument("data", help="data yaml, COCO json, dataset folder or name (shapes, coco128)")
    check.set_defaults(handler=_cmd_data_check)

    train = commands.add_parser("train", help="train a student from an experiment config")
    train.add_argument("--config", required=True, help="experiment YAML")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.lr=1e-3")
    train.add_argument("--resume", action="store_true", help="continue the run from its last.pt")
    train.set_defaults(handler=_cmd_train)

    evaluate = commands.add_parser("eval", help="COCO mAP and feature fidelity of a checkpoint")
    evaluate.add_argument("--config", required=True)
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument(
        "--no-fidelity", action="store_true", help="COCO mAP only (skip the teacher maps and the adapters)"
    )
    evaluate.add_argument("--set", action="append", metavar="KEY=VALUE")
    evaluate.set_defaults(handler=_cmd_eval)
    _add_predict_command(commands)

    from vfmkd.features.cli import add_features_commands
    from vfmkd.teachers.cli import add_weights_commands

    from vfmkd.export.cli import add_export_command
    from vfmkd.report.cli import add_report_command

    add_weights_commands(commands)
    add_features_commands(commands)
    add_export_command(commands)
    add_report_command(commands)

    demo = commands.add_parser("demo", help="the whole flow on the built-in data set")
    demo.add_argument("--config", default=DEMO_CONFIG)
    demo.add_argument("--out", default=None, help="output folder for runs (default: runs)")
    demo.set_defaults(handler=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vfmkd`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    handler: Callable[[argparse.Namespace], int] = args.handler
    return run_with_user_errors(lambda: handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
