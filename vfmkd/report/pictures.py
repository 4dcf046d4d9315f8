"""What the student learned, in pictures, on a few validation images.

Two kinds, for ``vfmkd report`` and for TensorBoard at each evaluation:

- :class:`FeaturePicture`, per image and distillation pair: the student's input, the
  teacher map and the student's adapted map in the teacher's PCA colours
  (:class:`~vfmkd.report.pca.FeatureProjection`), and the per-cell cosine;
- :class:`PredictionPicture`, per image: the ground truth beside the student's boxes
  (and masks, with a segmentation head), drawn by :mod:`vfmkd.inference.writers`.

The maps come as feature fidelity measures them
(:class:`~vfmkd.distillation.fidelity.FidelityEvaluator`): teacher maps from the
validation store, else a live teacher pass, aligned on the student's grid by the
distiller; pairs of an all-offline teacher without a validation store are left out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from vfmkd.datasets.collate import batch_to_device, collate_samples
from vfmkd.report.pca import FeatureProjection, colour_cosine, cosine_map, enlarge

__all__ = [
    "FeaturePicture",
    "PredictionPicture",
    "feature_pictures",
    "log_pictures",
    "prediction_pictures",
]

logger = logging.getLogger(__name__)

#: White space between the pictures of a strip, in pixels.
GAP = 4
#: Column titles of a feature strip, left to right.
FEATURE_COLUMNS = ("student input", "teacher (PCA)", "student, adapted (teacher's PCA)", "cosine (-1 red, 1 green)")
#: Column titles of a prediction strip.
PREDICTION_COLUMNS = ("ground truth", "student's prediction")


def _strip(pictures: Sequence[np.ndarray], height: int) -> np.ndarray:
    """Pictures side by side at one height, white gaps between: ``[height, W, 3]`` uint8."""
    scaled = [enlarge(picture, height) for picture in pictures]
    gap = np.full((height, GAP, 3), 255, dtype=np.uint8)
    parts: list[np.ndarray] = []
    for picture in scaled:
        parts += [picture, gap]
    return np.concatenate(parts[:-1], axis=1)


@dataclass
class FeaturePicture:
    """One image and one distillation pair.

    Attributes:
        image_id: the validation sample's id.
        pair: the pair's name, ``<teacher>/<feature><-<map>``.
        image: ``[S, S, 3]`` uint8, the student's (letterboxed) input.
        teacher: ``[Hg, Wg, 3]`` uint8, the teacher map on the student's grid, PCA colours.
        student: ``[Hg, Wg, 3]`` uint8, the adapted student map in the same colours.
        cosine: ``[Hg, Wg, 3]`` uint8, the per-cell cosine coloured.
        mean_cosine: mean cosine over the valid cells (NaN without one).
    """

    image_id: str
    pair: str
    image: np.ndarray
    teacher: np.ndarray
    student: np.ndarray
    cosine: np.ndarray
    mean_cosine: float

    def strip(self, height: int = 192) -> np.ndarray:
        """The four pictures side by side (:data:`FEATURE_COLUMNS`): ``[height, W, 3]`` uint8."""
        return _strip([self.image, self.teacher, self.student, self.cosine], height)


@dataclass
class PredictionPicture:
    """One image: the ground truth and the student's prediction, drawn at the original size.

    Attributes:
        image_id: the validation sample's id.
        truth: ``[H, W, 3]`` uint8.
        predicted: ``[H, W, 3]`` uint8.
        detections: rows the student predicted.
    """

    image_id: str
    truth: np.ndarray
    predicted: np.ndarray
    detections: int

    def strip(self, height: int = 256) -> np.ndarray:
        """Ground truth and prediction side by side: ``[height, W, 3]`` uint8."""
        return _strip([self.truth, self.predicted], height)


def _input_picture(image: torch.Tensor) -> np.ndarray:
    """A float ``[3, S, S]`` input in [0, 1] -> ``[S, S, 3]`` uint8."""
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def feature_pictures(
    model: nn.Module,
    dataset: Any,
    indices: Sequence[int],
    *,
    device: torch.device | str,
    fidelity: Any = None,
    collate_fn: Callable[[list[Any]], dict[str, Any]] | None = None,
) -> list[FeaturePicture]:
    """Teacher vs student maps of every measurable distillation pair on images ``indices``.

    Args:
        model: a :class:`~vfmkd.distillation.distiller.DistilledModel` (its ``student`` and
            ``distiller``); its training mode is restored afterwards.
        dataset: the validation data set (letterboxed samples).
        indices: which samples.
        device: where the student and the teachers run.
        fidelity: the run's :class:`~vfmkd.distillation.fidelity.FidelityEvaluator` (which
            pairs it measures); default: one made for ``model.distiller``.
        collate_fn: batches samples (default ``collate_samples``).

    Returns:
        Per image, one picture per pair (image-major); empty without a distiller.
    """
    from vfmkd.distillation.fidelity import FidelityEvaluator

    distiller = getattr(model, "distiller", None)
    if distiller is None or not distiller.terms or not indices:
        return []
    fidelity = fidelity if fidelity is not None else FidelityEvaluator(distiller)
    terms = list(fidelity.terms)
    if not terms:
        return []
    device = torch.device(device)
    wrapped, collate = fidelity.prepare_data(dataset, collate_fn or collate_samples)
    batch = batch_to_device(collate([wrapped[index] for index in indices]), device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = model.student(batch["images"])
            targets = distiller.teachers.teacher_targets(batch, device, teachers={term.teacher for term in terms})
            maps = {term.level: outputs["maps"][term.level].float() for term in terms}
            aligned = [(term, *distiller.aligned_pair(term, maps, targets)) for term in terms]
    finally:
        model.train(was_training)
    pictures = []
    for row, image_id in enumerate(batch["ids"]):
        image = _input_picture(batch["images"][row])
        for term, student, teacher, valid in aligned:
            pictures.append(_feature_picture(str(image_id), term.name, image, student[row], teacher[row], valid[row, 0]))
    return pictures


def _feature_picture(
    image_id: str, name: str, image: np.ndarray, student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor
) -> FeaturePicture:
    """The picture of one pair on one image: maps ``[C, Hg, Wg]``, ``valid`` ``[Hg, Wg]``."""
    projection = FeatureProjection.fit(teacher, valid)
    cosine = cosine_map(student, teacher)
    mask = valid.cpu().numpy().astype(bool)
    return FeaturePicture(
        image_id=image_id,
        pair=name.split("/", 1)[1] if name.startswith("distill/") else name,
        image=image,
        teacher=projection.to_rgb(teacher, valid),
        student=projection.to_rgb(student, valid),
        cosine=colour_cosine(cosine, valid),
        mean_cosine=float(cosine[mask].mean()) if mask.any() else float("nan"),
    )


def prediction_pictures(
    student: nn.Module,
    dataset: Any,
    indices: Sequence[int],
    *,
    device: torch.device | str,
    img_size: int | None = None,
    conf: float = 0.25,
    iou: float = 0.7,
    max_det: int = 100,
) -> list[PredictionPicture]:
    """The ground truth and the student's predictions on images ``indices``, drawn.

    The student runs through :class:`~vfmkd.inference.Predictor` (the evaluation
    letterbox). A model without a detection head but with a promptable mask head is
    prompted with the ground-truth boxes; a model without heads gives no pictures.

    Args:
        student: the model (its training mode is restored afterwards).
        dataset: the validation data set (``load_raw(index)``: the original image and labels).
        indices: which samples.
        device: where the student runs.
        img_size: the letterbox side (default: the data set's sample size).
        conf: score floor of drawn detections.
        iou: NMS IoU threshold.
        max_det: most detections per image.
    """
    from vfmkd.inference import Predictor
    from vfmkd.inference.engine import TorchEngine

    if not indices or not hasattr(dataset, "load_raw"):
        return []
    was_training = student.training
    try:
        engine = TorchEngine(student, device)
        if not (engine.has_detector or engine.promptable):
            return []
        raws = [dataset.load_raw(index) for index in indices]
        size = int(img_size or dataset[indices[0]]["image"].shape[-1])
        names = _class_names(student, dataset)
        predictor = Predictor(engine, img_size=size, names=names, conf=conf, iou=iou, max_det=max_det)
        prompts = None if engine.has_detector else [_box_prompts(raw) for raw in raws]
        predictions = predictor([raw["image"] for raw in raws], prompts=prompts)
    finally:
        student.train(was_training)
    return [_prediction_picture(raw, prediction, names) for raw, prediction in zip(raws, predictions)]


def _box_prompts(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {"boxes": np.asarray(raw["boxes"], dtype=np.float64).reshape(-1, 4).tolist()}


def _class_names(student: nn.Module, dataset: Any) -> list[str]:
    """The data set's class names, numbered names beyond them up to the detector's class count."""
    names = [str(name) for name in (getattr(dataset, "names", None) or [])]
    for head in getattr(student, "heads", {}).values():
        if getattr(head, "predicts_boxes", False):
            names += [str(label) for label in range(len(names), int(head.num_classes))]
    return names


def _prediction_picture(raw: Mapping[str, Any], prediction: Any, names: Sequence[str]) -> PredictionPicture:
    from vfmkd.inference import Prediction
    from vfmkd.utils.visualization import draw_prediction

    image = raw["image"]
    labels = np.asarray(raw["cls"], dtype=np.int64).reshape(-1)
    masks = raw.get("masks")
    truth = Prediction(
        boxes=np.asarray(raw["boxes"], dtype=np.float64).reshape(-1, 4),
        scores=np.ones(len(labels), dtype=np.float32),
        labels=labels,
        names=[names[label] if 0 <= label < len(names) else str(label) for label in labels],
        masks=None if masks is None else np.asarray(masks).astype(bool),
        image_size=(int(image.shape[0]), int(image.shape[1])),
        name=str(raw.get("id", "")),
    )
    return PredictionPicture(
        image_id=str(raw.get("id", "")),
        truth=np.asarray(draw_prediction(image, truth, show_scores=False)),
        predicted=np.asarray(draw_prediction(image, prediction)),
        detections=len(prediction.boxes),
    )


def log_pictures(
    log_image: Callable[[str, np.ndarray], None],
    model: nn.Module,
    dataset: Any,
    *,
    count: int,
    device: torch.device | str,
    fidelity: Any = None,
    collate_fn: Callable[[list[Any]], dict[str, Any]] | None = None,
) -> int:
    """The pictures of the first ``count`` validation images, as ``log_image(tag, [H, W, 3] uint8)`` calls.

    Tags: ``features/<teacher>/<feature><-<map>/<k>`` and ``predictions/<k>`` (k the
    image's position). What TensorBoard shows at each evaluation (see
    :class:`~vfmkd.core.hooks.EvalHook`).

    Returns:
        How many pictures were logged.
    """
    indices = list(range(min(count, len(dataset))))
    logged = 0
    positions: dict[str, int] = {}
    for picture in feature_pictures(model, dataset, indices, device=device, fidelity=fidelity, collate_fn=collate_fn):
        position = positions.setdefault(picture.image_id, len(positions))
        log_image(f"features/{picture.pair}/{position}", picture.strip(128))
        logged += 1
    student = getattr(model, "student", model)
    for position, picture in enumerate(prediction_pictures(student, dataset, indices, device=device)):
        log_image(f"predictions/{position}", picture.strip(192))
        logged += 1
    return logged
