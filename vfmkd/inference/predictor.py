"""The predictor: images in, detections and masks in original pixels out.

Each image goes through three steps, kept apart so another engine (an exported model in
onnxruntime) can replace the middle one:

1. preprocess: the evaluation letterbox (:class:`~vfmkd.datasets.transforms.EvalTransform`:
   aspect kept, content centred, grey padding), the very input ``vfmkd eval`` scores, with
   each image's :class:`~vfmkd.geometry.Frame`; prompts are mapped into the input by it;
2. the engine (:mod:`vfmkd.inference.engine`): the network's outputs, then its
   post-processing into original pixels through the frames (NMS, mask decoding);
3. results: a :class:`Prediction` per image, drawn and written as COCO results by
   :meth:`Predictor.predict_source` (:mod:`vfmkd.inference.writers`).

Example::

    from vfmkd import Predictor

    predictor = Predictor.from_checkpoint("runs/exp/checkpoints/best.pt", conf=0.25)
    for prediction in predictor(["street.jpg", "park.jpg"]):
        print(prediction.name, prediction.boxes, prediction.names)
    predictor.predict_source("photos/", out_dir="runs/predict")   # drawn images + predictions.json
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from vfmkd.datasets.collate import collate_samples
from vfmkd.datasets.image_io import CorruptImageError, load_image_rgb
from vfmkd.datasets.transforms import EvalTransform, config_value
from vfmkd.geometry import Frame
from vfmkd.inference.engine import PROMPT_LABEL, Engine, TorchEngine
from vfmkd.inference.sources import (
    ImageEntry,
    ImagePrompts,
    PredictError,
    list_images,
    match_prompts,
    parse_prompts,
    read_prompts,
    to_image_prompts,
)
from vfmkd.inference.writers import coco_results, draw_prediction, save_drawing

__all__ = ["Prediction", "Predictor", "PredictSummary", "letterbox", "predict"]

logger = logging.getLogger(__name__)

RESULTS_FILE = "predictions.json"
#: The name of a row that answers a prompt.
PROMPT_NAME = "prompt"
ImageInput = str | Path | np.ndarray | Image.Image


@dataclass
class Prediction:
    """One image's predictions, in its original pixels.

    Attributes:
        boxes: ``[N, 4]`` float64 xyxy (continuous: pixel centres at ``i + 0.5``).
        scores: ``[N]`` float32: class confidence; for a prompt's mask, its predicted IoU.
        labels: ``[N]`` int64 class labels; -1 for a prompt's mask (no class).
        names: N class names (``prompt`` for a prompt's mask).
        masks: ``[N, H, W]`` bool, one per row, when the model segments; else None.
        image_size: ``(H, W)`` of the original image.
        name: the image's name (its path relative to the source, or ``image<i>``).
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    names: list[str]
    masks: np.ndarray | None
    image_size: tuple[int, int]
    name: str


@dataclass
class PredictSummary:
    """What :meth:`Predictor.predict_source` did.

    Attributes:
        processed: images predicted.
        skipped: ``(path, reason)`` of each image skipped (unreadable).
        results: the COCO results entries of every image (see :mod:`vfmkd.inference.writers`).
        out_dir: where drawn images and ``predictions.json`` went (None: nothing written).
        results_file: ``out_dir / predictions.json``, or None.
    """

    processed: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    out_dir: Path | None = None
    results_file: Path | None = None


@dataclass
class _Item:
    """An image on its way through the predictor."""

    image_id: int
    name: str
    image: np.ndarray
    prompts: ImagePrompts | None


class _ImagesInMemory:
    """Decoded images as a data source of the evaluation transform (``load_raw`` without targets)."""

    def __init__(self, images: Sequence[np.ndarray], names: Sequence[str]) -> None:
        self.images = images
        self.names = names

    def __len__(self) -> int:
        return len(self.images)

    def load_raw(self, index: int) -> dict[str, Any]:
        return {
            "image": self.images[index],
            "boxes": np.zeros((0, 4), dtype=np.float32),
            "cls": np.zeros((0,), dtype=np.int64),
            "masks": None,
            "id": self.names[index],
            "path": self.names[index],
        }


def letterbox(images: Sequence[np.ndarray], img_size: int, *, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Images as a predictor feeds them to its engine (an exported encoder graph wants the same).

    Args:
        images: ``[H, W, 3]`` uint8 RGB arrays.
        img_size: side of the square input.
        names: an id per image (default ``image<i>``).

    Returns:
        The collated batch: ``images`` uint8 ``[B, 3, S, S]`` (aspect kept, content centred,
        grey 114 padding; divide by 255 for a graph's float input) and ``frames`` (per
        image a list with its :class:`~vfmkd.geometry.Frame`).
    """
    names = list(names) if names is not None else [f"image{index}" for index in range(len(images))]
    source = _ImagesInMemory(list(images), names)
    rng = np.random.default_rng(0)  # unused: the letterbox is deterministic
    transform = EvalTransform(int(img_size))
    return collate_samples([transform(source, index, rng) for index in range(len(source))])


class Predictor:
    """Runs a model on images: boxes, class names, scores and masks in original pixels.

    Args:
        engine: the model (:class:`~vfmkd.inference.engine.TorchEngine` for a checkpoint).
        img_size: side of the square letterboxed input (a multiple of 32).
        names: class name of each label.
        category_ids: COCO category id of each label (default ``label + 1``).
        conf: detections' score floor.
        iou: NMS IoU threshold (YOLO head).
        max_det: most detections per image (each segmented, with a mask head).
        batch_size: images per forward pass.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        img_size: int,
        names: Sequence[str],
        category_ids: Sequence[int] | None = None,
        conf: float = 0.25,
        iou: float = 0.7,
        max_det: int = 300,
        batch_size: int = 1,
    ) -> None:
        _check_options(img_size=img_size, conf=conf, iou=iou, max_det=max_det, batch_size=batch_size)
        self.engine = engine
        self.img_size = int(img_size)
        self.names = list(names)
        self.category_ids = list(category_ids) if category_ids is not None else list(range(1, len(self.names) + 1))
        self.options = {"conf_threshold": float(conf), "iou_threshold": float(iou), "max_det": int(max_det)}
        self.batch_size = int(batch_size)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        config: str | Path | Any | None = None,
        device: str | torch.device = "auto",
        img_size: int | None = None,
        **options: Any,
    ) -> Predictor:
        """A predictor of a training checkpoint's student (its EMA weights when it has them).

        Args:
            path: a checkpoint written by ``vfmkd train`` (``best.pt``, ``last.pt``).
            config: an experiment YAML (or a loaded config) whose ``data`` section names
                the classes and the input size; default: the config stored in the checkpoint.
            device: ``auto`` (a GPU when one is visible), ``cpu``, ``cuda:1``, ...
            img_size: input size (default: the training ``data.img_size``).
            **options: ``conf``, ``iou``, ``max_det``, ``batch_size`` (see :class:`Predictor`).
        """
        from vfmkd.config import load_config
        from vfmkd.core.checkpoint import load_checkpoint, load_model_from_checkpoint
        from vfmkd.inference.classes import checkpoint_classes
        from vfmkd.utils.distributed import resolve_device

        try:
            target = resolve_device(device)
        except RuntimeError as error:
            raise PredictError(f"--device {device}: {error}") from None
        checkpoint = load_checkpoint(path)
        if isinstance(config, (str, Path)):
            config = load_config(config)
        given = config_value(config, "data") if config is not None else None
        data = given if given is not None else (checkpoint.get("config") or {}).get("data")
        model = load_model_from_checkpoint({**checkpoint, "path": str(path)}, target)
        size = int(img_size or config_value(data, "img_size", None) or 640)
        num_classes = _num_classes(model)
        names, category_ids = checkpoint_classes(checkpoint, num_classes, given) if num_classes else ([], [])
        return cls(TorchEngine(model, target), img_size=size, names=names, category_ids=category_ids, **options)

    @classmethod
    def from_onnx(
        cls,
        path: str | Path,
        *,
        segmenter: str | Path | bool | None = None,
        img_size: int | None = None,
        providers: Sequence[str] | None = None,
        **options: Any,
    ) -> Predictor:
        """A predictor of a model exported by ``vfmkd export``, in onnxruntime.

        Class names, COCO category ids and the input size come from the files' metadata;
        no checkpoint is needed. With the segmenter's two graphs (a checkpoint with a
        ``sam_mask_head``), masks come as from the checkpoint: one per detection, or one
        per prompt (:mod:`vfmkd.inference.onnx_segmenter`).

        Args:
            path: the detector graph (``<stem>.onnx``); for a model without a detection
                head, either segmenter file (then every image needs prompts).
            segmenter: None: ``<stem>_encoder.onnx`` and ``<stem>_decoder.onnx`` beside
                ``path`` when both are there; a path (either file or their stem): those;
                False: boxes only.
            img_size: must be the exported size when given (the graph's input is fixed).
            providers: onnxruntime execution providers (default: the CPU).
            **options: ``conf``, ``iou``, ``max_det``, ``batch_size`` (see :class:`Predictor`).
        """
        from vfmkd.inference.onnx_segmenter import build_onnx_engine

        engine = build_onnx_engine(path, segmenter=segmenter, providers=providers)
        metadata = engine.metadata
        if img_size is not None and int(img_size) != metadata.input_size:
            raise PredictError(
                f"--img-size {img_size}: {path} was exported for {metadata.input_size} px; drop --img-size or re-export"
            )
        if metadata.max_det and int(options.get("max_det", 300)) > metadata.max_det:
            logger.warning("%s keeps at most %d detections per image (vfmkd export --max-det)", path, metadata.max_det)
        names = metadata.names
        category_ids = metadata.category_ids or None
        return cls(engine, img_size=metadata.input_size, names=names, category_ids=category_ids, **options)

    # ----------------------------------------------------------------- in memory
    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        prompts: Mapping[str, Any] | ImagePrompts | Sequence[Mapping[str, Any] | ImagePrompts | None] | None = None,
    ) -> list[Prediction]:
        """Predict images.

        Args:
            images: one image or several: file paths, ``[H, W, 3]`` uint8 RGB arrays or
                PIL images.
            prompts: None (the detector's boxes; with a mask head, one mask per
                detection), or one prompt set per image (``{"boxes": [[x1, y1, x2, y2],
                ...], "points": [[[x, y], label], ...]}`` in original pixels, see
                :mod:`vfmkd.inference.sources`; None for an image: its detections): then
                one mask per prompt.

        Returns:
            One :class:`Prediction` per image, in order.

        Raises:
            CorruptImageError: a path that cannot be read.
        """
        inputs = [images] if isinstance(images, (str, Path, np.ndarray, Image.Image)) else list(images)
        if isinstance(prompts, (Mapping, ImagePrompts)):
            prompts = [prompts]
        per_image = list(prompts) if prompts is not None else [None] * len(inputs)
        if len(per_image) != len(inputs):
            raise ValueError(f"{len(per_image)} prompt sets for {len(inputs)} images; give one per image (None: none)")
        items = [
            _Item(index, _input_name(image, index), _as_rgb(image), _optional_prompts(image_prompts, index))
            for index, (image, image_prompts) in enumerate(zip(inputs, per_image))
        ]
        self._check_answerable([item.prompts is not None for item in items])
        return [prediction for _, prediction in self._predict_items(items)]

    def _check_answerable(self, prompted: Sequence[bool]) -> None:
        """Whether the model can answer images with prompts (a mask head) and without (a detector)."""
        if any(prompted) and not self.engine.promptable:
            raise PredictError(
                "prompts given, but the model has no promptable segmentation head (sam_mask_head); drop the prompts"
            )
        if not all(prompted) and not self.engine.has_detector:
            raise PredictError(
                "the model has no detection head, so an image needs prompts to segment; give --prompts FILE "
                "(prompts= in Python) with boxes or points for every image"
            )

    def _predict_items(self, items: Iterable[_Item]) -> Iterator[tuple[_Item, Prediction]]:
        """Predictions of items in order, in batches of prompted or of unprompted images."""
        pending: list[_Item] = []
        for item in items:
            if pending and (item.prompts is None) != (pending[0].prompts is None):
                yield from self._predict_batch(pending)
                pending = []
            pending.append(item)
            if len(pending) == self.batch_size:
                yield from self._predict_batch(pending)
                pending = []
        if pending:
            yield from self._predict_batch(pending)

    def _predict_batch(self, items: Sequence[_Item]) -> list[tuple[_Item, Prediction]]:
        """Preprocess, run the engine, and turn its results into predictions."""
        batch = letterbox([item.image for item in items], self.img_size, names=[item.name for item in items])
        prompts = None
        if items[0].prompts is not None:
            prompts = [_input_prompts(item.prompts, frames[0]) for item, frames in zip(items, batch["frames"])]
        outputs = self.engine.forward(batch)
        results = self.engine.postprocess(outputs, batch, prompts=prompts, **self.options)
        return [(item, self._prediction(result, item)) for item, result in zip(items, results)]

    def _prediction(self, result: Mapping[str, Any], item: _Item) -> Prediction:
        labels = _numpy(result.get("labels"), np.int64, (-1,))
        masks = result.get("masks")
        return Prediction(
            boxes=_numpy(result.get("boxes"), np.float64, (-1, 4)),
            scores=_numpy(result.get("scores"), np.float32, (-1,)),
            labels=labels,
            names=[PROMPT_NAME if label == PROMPT_LABEL else self.names[int(label)] for label in labels],
            masks=None if masks is None else masks.detach().cpu().numpy().astype(bool),
            image_size=(int(item.image.shape[0]), int(item.image.shape[1])),
            name=item.name,
        )

    # -------------------------------------------------------------------- source
    def predict_source(
        self,
        source: str | Path,
        *,
        out_dir: str | Path | None = None,
        prompts: str | Path | Mapping[str, Any] | None = None,
        progress: bool = True,
    ) -> PredictSummary:
        """Predict every image of a source; draw each and write COCO results into ``out_dir``.

        Args:
            source: an image, a folder, a glob or a ``.txt`` list (see
                :mod:`vfmkd.inference.sources`).
            out_dir: where each image with its predictions drawn (same relative path as
                in the source) and ``predictions.json`` go; None writes nothing.
            prompts: a prompts file (or its content as a dict), keyed by image; images it
                does not name are predicted from their detections.
            progress: show a progress bar.

        Returns:
            The summary; an unreadable image is named in a warning and skipped.

        Raises:
            PredictError: a bad source or prompts file, or no image could be read.
        """
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        entries = _outside(list_images(source), out_dir)
        matched: dict[str, ImagePrompts] = {}
        if prompts is not None:
            parsed = parse_prompts(prompts) if isinstance(prompts, Mapping) else read_prompts(prompts)
            matched = match_prompts(entries, parsed)
        self._check_answerable([entry.name in matched for entry in entries])
        summary = PredictSummary(processed=0, out_dir=None if out_dir is None else Path(out_dir))
        if summary.out_dir is not None:
            summary.out_dir.mkdir(parents=True, exist_ok=True)
        # NOTE: warnings through tqdm's writer while a bar is drawn, so the bar is not torn apart.
        with logging_redirect_tqdm() if progress else contextlib.nullcontext():
            listed = tqdm(entries, desc="predict", unit="image", disable=not progress)
            readable = _read_entries(listed, matched, summary)
            for item, prediction in self._predict_items(readable):
                summary.processed += 1
                summary.results.extend(coco_results(prediction, item.image_id, self.category_ids))
                if summary.out_dir is not None:
                    save_drawing(draw_prediction(item.image, prediction), summary.out_dir, item.name)
        if summary.processed == 0:
            path, reason = summary.skipped[0]
            raise PredictError(
                f"none of the {len(entries)} image(s) of {source} could be read (first: {path}: {reason})"
            )
        if summary.out_dir is not None:
            from vfmkd.utils.io import atomic_write_text

            summary.results_file = atomic_write_text(summary.out_dir / RESULTS_FILE, json.dumps(summary.results))
        return summary


def _outside(entries: list[ImageEntry], out_dir: str | Path | None) -> list[ImageEntry]:
    """The entries not inside the output folder (a source folder holding it would be fed its own drawings)."""
    if out_dir is None:
        return entries
    folder = Path(out_dir).resolve()
    kept = [entry for entry in entries if folder not in entry.path.resolve().parents]
    if len(kept) < len(entries):
        logger.warning("left out %d image(s) inside the output folder %s", len(entries) - len(kept), out_dir)
    if not kept:
        raise PredictError(f"every image of the source is inside the output folder {out_dir}; give another --out")
    return kept


def _read_entries(
    entries: Iterable[ImageEntry], prompts: Mapping[str, ImagePrompts], summary: PredictSummary
) -> Iterator[_Item]:
    """The readable images of a source as items; each unreadable one is warned about and recorded as skipped."""
    for image_id, entry in enumerate(entries):
        try:
            image = load_image_rgb(entry.path)
        except CorruptImageError as error:
            logger.warning("skipped %s: %s", entry.path, error.reason)
            summary.skipped.append((str(entry.path), error.reason))
            continue
        yield _Item(image_id, entry.name, image, prompts.get(entry.name))


def predict(
    checkpoint: str | Path,
    source: str | Path,
    *,
    out_dir: str | Path | None = None,
    prompts: str | Path | Mapping[str, Any] | None = None,
    progress: bool = True,
    **options: Any,
) -> PredictSummary:
    """``vfmkd predict`` from Python: :meth:`Predictor.from_checkpoint`, then :meth:`Predictor.predict_source`.

    Args:
        checkpoint: the training checkpoint.
        source: an image, a folder, a glob or a ``.txt`` list.
        out_dir: where drawn images and ``predictions.json`` go (None: nothing written).
        prompts: a prompts file or its content.
        progress: show a progress bar.
        **options: :meth:`Predictor.from_checkpoint`'s (``config``, ``device``,
            ``img_size``, ``conf``, ``iou``, ``max_det``, ``batch_size``).
    """
    predictor = Predictor.from_checkpoint(checkpoint, **options)
    return predictor.predict_source(source, out_dir=out_dir, prompts=prompts, progress=progress)


# --------------------------------------------------------------------------- helpers
def _check_options(*, img_size: int, conf: float, iou: float, max_det: int, batch_size: int) -> None:
    """Predictor options a user can get wrong, each named in the error."""
    problems = []
    if int(img_size) < 32 or int(img_size) % 32:
        problems.append(f"--img-size {img_size}: must be a multiple of 32 (the largest stride), e.g. 640")
    if not 0.0 <= conf <= 1.0:
        problems.append(f"--conf {conf}: must be in [0, 1]")
    if not 0.0 < iou <= 1.0:
        problems.append(f"--iou {iou}: must be in (0, 1]")
    if max_det < 1:
        problems.append(f"--max-det {max_det}: must be at least 1")
    if batch_size < 1:
        problems.append(f"--batch-size {batch_size}: must be at least 1")
    if problems:
        raise PredictError("; ".join(problems))


def _num_classes(model: torch.nn.Module) -> int:
    """Classes of the model's detection head (0 without one)."""
    for head in getattr(model, "heads", {}).values():
        if getattr(head, "predicts_boxes", False):
            return int(head.num_classes)
    return 0


def _input_name(image: ImageInput, index: int) -> str:
    return Path(image).name if isinstance(image, (str, Path)) else f"image{index}"


def _as_rgb(image: ImageInput) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB of a path, an array or a PIL image."""
    if isinstance(image, (str, Path)):
        return load_image_rgb(image)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"an image array must be [H, W, 3] uint8 RGB, got {array.dtype} {list(array.shape)}")
    return np.ascontiguousarray(array)


def _optional_prompts(prompts: Mapping[str, Any] | ImagePrompts | None, index: int) -> ImagePrompts | None:
    return None if prompts is None else to_image_prompts(prompts, f"prompts[{index}]")


def _input_prompts(prompts: ImagePrompts, frame: Frame) -> dict[str, torch.Tensor]:
    """An image's prompts mapped from original pixels into its network input."""
    count, most = prompts.points.shape[:2]
    points = frame.apply_points(prompts.points.reshape(-1, 2)).reshape(count, most, 2) if count else prompts.points
    return {
        "boxes": torch.as_tensor(frame.apply_boxes(prompts.boxes), dtype=torch.float32).reshape(-1, 4),
        "points": torch.as_tensor(points, dtype=torch.float32),
        "point_labels": torch.as_tensor(prompts.point_labels, dtype=torch.int64),
    }


def _numpy(values: torch.Tensor | None, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A result tensor as a numpy array (empty when the head gave none)."""
    if values is None:
        return np.zeros((0,) + shape[1:], dtype=dtype)
    return values.detach().cpu().numpy().astype(dtype).reshape(shape)
