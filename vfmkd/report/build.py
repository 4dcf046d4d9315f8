"""``vfmkd report RUN_DIR``: a run's page, from its files and its checkpoint.

:func:`write_report` reads the run directory (:mod:`vfmkd.report.run_files`), draws the
curves (:mod:`vfmkd.report.curves`), loads the checkpoint's student and adapters to draw
the feature and prediction pictures on the first validation images
(:mod:`vfmkd.report.pictures`), and writes one self-contained HTML page
(:mod:`vfmkd.report.page`) with its PNGs in a folder beside it. What cannot be drawn
(no checkpoint, a teacher store missing on this machine) is said in the page's notes
instead of failing the report.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vfmkd.report.curves import eval_figure, loss_figure, optimisation_figure
from vfmkd.report.page import Picture, ReportContent, render_html
from vfmkd.report.pictures import (
    FEATURE_COLUMNS,
    PREDICTION_COLUMNS,
    FeaturePicture,
    PredictionPicture,
    feature_pictures,
    prediction_pictures,
)
from vfmkd.report.run_files import RunFiles, per_class_rows, random_teachers, read_run, summary_rows

__all__ = ["write_report"]

logger = logging.getLogger(__name__)

#: Height in pixels of each picture of a feature strip, and of a prediction strip.
FEATURE_HEIGHT = 192
PREDICTION_HEIGHT = 288


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


@dataclass
class _StudentPart:
    """What the checkpoint adds to the page."""

    alignment: str = ""
    features: list[FeaturePicture] = field(default_factory=list)
    predictions: list[PredictionPicture] = field(default_factory=list)
    checkpoint: Path | None = None


def write_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    images: int = 4,
    device: str = "auto",
    conf: float = 0.25,
) -> Path:
    """Write the report of a run.

    Args:
        run_dir: the run directory (``runs/<experiment_name>``).
        out: the HTML file (default ``run_dir/report.html``); its PNGs go to
            ``<out stem>_files/`` beside it.
        images: validation images to draw features and predictions on (0: none).
        device: where the student (and a live teacher) runs: ``auto``, ``cpu``, ``cuda:1``...
        conf: score floor of the drawn detections.

    Returns:
        The HTML file's path.

    Raises:
        RunDirError: ``run_dir`` is no run directory.
        WriteError: the report or a picture could not be written (names the file and the space).
    """
    from vfmkd.utils.io import atomic_write_bytes, atomic_write_text

    run = read_run(run_dir)
    out = Path(out) if out is not None else run.run_dir / "report.html"
    notes: list[str] = []
    student_part = _student_part(run, images, device, conf, notes) if images > 0 else _StudentPart()
    if images <= 0:
        notes.append("--images 0: no feature or prediction pictures")
    step, per_class = per_class_rows(run.records)
    summary = summary_rows(run)
    if student_part.checkpoint is not None:
        summary.append(("pictures from", str(student_part.checkpoint)))
    content = ReportContent(
        title=f"vfmkd report: {run.config.get('experiment_name', run.run_dir.name)}",
        summary=summary,
        random_teachers=random_teachers(run.config),
        notes=notes,
        alignment=student_part.alignment,
        config_text=run.config_text,
        curves=_curve_pictures(run),
        features=_feature_sections(student_part.features),
        feature_columns=FEATURE_COLUMNS,
        predictions=_prediction_pictures(student_part.predictions, conf),
        prediction_columns=PREDICTION_COLUMNS,
        per_class_step=step,
        per_class=per_class,
    )
    folder = out.with_name(out.stem + "_files")
    pictures = [*content.curves, *content.predictions, *(p for group in content.features.values() for p in group)]
    for picture in pictures:
        # NOTE: atomic, and a full disk or a read-only folder is a WriteError naming the file.
        atomic_write_bytes(folder / picture.file_name, picture.png)
    atomic_write_text(out, render_html(content))
    logger.info("report: %s (%d pictures in %s)", out, len(pictures), folder)
    return out


def _curve_pictures(run: RunFiles) -> list[Picture]:
    figures = [
        ("curves_losses.png", loss_figure(run.records), "training loss terms (mean over each logged interval; log scale)"),
        ("curves_eval.png", eval_figure(run.records), "evaluation metrics at each evaluation"),
        ("curves_optimisation.png", optimisation_figure(run.records), "learning rate, gradient norm, speed, data wait"),
    ]
    return [Picture(name, png, caption) for name, png, caption in figures if png is not None]


def _feature_sections(pictures: list[FeaturePicture]) -> dict[str, list[Picture]]:
    sections: dict[str, list[Picture]] = {}
    for picture in pictures:
        group = sections.setdefault(picture.pair, [])
        strip = picture.strip(FEATURE_HEIGHT)
        caption = f"{picture.image_id}: mean cosine {picture.mean_cosine:.3f} over the cells with a teacher value"
        name = f"features_{_file_name(picture.pair.replace('<-', '_from_'))}_{len(group)}.png"
        group.append(Picture(name, _png(strip), caption, width=strip.shape[1]))
    return sections


def _prediction_pictures(pictures: list[PredictionPicture], conf: float) -> list[Picture]:
    drawn = []
    for position, picture in enumerate(pictures):
        strip = picture.strip(PREDICTION_HEIGHT)
        caption = f"{picture.image_id}: {picture.detections} predicted (score >= {conf:g})"
        drawn.append(Picture(f"predictions_{position}.png", _png(strip), caption, width=strip.shape[1]))
    return drawn


def _student_part(run: RunFiles, images: int, device: str, conf: float, notes: list[str]) -> _StudentPart:
    """The alignment table and the pictures, from the run's checkpoint (notes say what is missing)."""
    from vfmkd.config import ConfigError, validate_config
    from vfmkd.core.checkpoint import load_checkpoint, load_model_from_checkpoint
    from vfmkd.datasets import build_dataset
    from vfmkd.distillation.distiller import DistilledModel
    from vfmkd.distillation.plan import alignment_table
    from vfmkd.errors import UserError
    from vfmkd.utils.distributed import resolve_device

    part = _StudentPart(checkpoint=run.checkpoint)
    if part.checkpoint is None:
        notes.append(f"no checkpoint in {run.run_dir / 'checkpoints'}: no feature or prediction pictures")
        return part
    try:
        config = validate_config(run.config, str(run.run_dir / "config.yaml"))
    except ConfigError as error:
        notes.append(f"config.yaml does not validate with this vfmkd ({error}): no pictures")
        return part
    target = resolve_device(device)
    checkpoint = load_checkpoint(part.checkpoint)
    student = load_model_from_checkpoint({**checkpoint, "path": str(part.checkpoint)}, target)
    distiller = _distiller(config, checkpoint, student, notes)
    if distiller is not None and distiller.terms:
        part.alignment = alignment_table(distiller.terms, distiller.teachers.teacher_plans, config.data.img_size)
    try:
        dataset = build_dataset(config.data, config.data.val_split, train=False)
    except (UserError, FileNotFoundError) as error:
        notes.append(f"no pictures: the validation split '{config.data.val_split}' cannot be read here ({error})")
        return part
    indices = list(range(min(images, len(dataset))))
    if distiller is not None:
        part.features = _features(DistilledModel(student, distiller.to(target)), dataset, indices, target, notes)
    options = {"conf": conf, "iou": config.eval.iou_threshold, "max_det": min(config.eval.max_det, 100)}
    part.predictions = prediction_pictures(
        student, dataset, indices, device=target, img_size=config.data.img_size, **options
    )
    if not part.predictions:
        notes.append("the student has no detection or promptable mask head: no prediction pictures")
    return part


def _distiller(config: Any, checkpoint: dict, student: Any, notes: list[str]) -> Any:
    """The checkpoint's adapters, or None with the reason in the notes."""
    from vfmkd.config import ConfigError
    from vfmkd.core.checkpoint import CheckpointError, load_distiller_from_checkpoint
    from vfmkd.features.format import FeatureStoreError

    try:
        distiller = load_distiller_from_checkpoint(config, checkpoint, student)
    except (ConfigError, FeatureStoreError, FileNotFoundError, CheckpointError) as error:
        # NOTE: e.g. the training store (the teacher's feature shapes) is not on this machine.
        notes.append(f"no feature pictures and no alignment table: the distillation plan could not be rebuilt ({error})")
        return None
    if distiller is None:
        notes.append("no distillation terms in this run: no feature pictures")
    return distiller


def _features(model: Any, dataset: Any, indices: list[int], device: Any, notes: list[str]) -> list[FeaturePicture]:
    from vfmkd.distillation.fidelity import FidelityEvaluator

    fidelity = FidelityEvaluator(model.distiller)
    measured = {term.name for term in fidelity.terms}
    skipped = [term.name for term in model.distiller.terms if term.name not in measured]
    if skipped:
        notes.append(
            f"not drawn: {', '.join(skipped)} (an all-offline teacher without val_feature_path; extract the "
            "validation split with `vfmkd features extract --split val` and set teachers.<name>.val_feature_path)"
        )
    return feature_pictures(model, dataset, indices, device=device, fidelity=fidelity)
