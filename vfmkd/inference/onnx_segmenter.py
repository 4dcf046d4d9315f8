"""The exported segmenter (image encoder + prompt decoder) in onnxruntime, behind a predictor.

``vfmkd export`` writes a promptable mask head as two graphs beside the detector
(:mod:`vfmkd.export.segmenter`): ``<stem>_encoder.onnx`` (run once per image) and
``<stem>_decoder.onnx`` (run per prompt set). :func:`find_segmenter` finds the pair of a
model file, :func:`build_onnx_engine` the engine of an export (``Predictor.from_onnx``);
:class:`OnnxSegmenterEngine` runs the pair, with the detector graph when there is
one, as :class:`~vfmkd.inference.engine.TorchEngine` runs a checkpoint:

- without prompts, the detector's boxes (original pixels, best first) prompt the decoder:
  one mask per detection, as the model's ``predict`` segments detections
  (:mod:`vfmkd.models.instance_masks`);
- with prompts, one mask per prompt: the boxes (two corners labelled 2 and 3), then the
  points, decoded apart as the torch engine does; ``scores`` the predicted IoU.

The decoder takes prompts in original pixels and gives mask logits in original pixels,
so the engine maps the predictor's input-pixel prompts back through each image's frame.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from vfmkd.inference.engine import prompt_rows
from vfmkd.inference.onnx_engine import (
    DECODER_GRAPH,
    DETECTOR_GRAPH,
    ENCODER_GRAPH,
    OnnxEngine,
    OnnxMetadata,
    OnnxModelError,
    import_optional,
    read_metadata,
)

__all__ = [
    "DECODER_SUFFIX",
    "ENCODER_SUFFIX",
    "OnnxSegmenter",
    "OnnxSegmenterEngine",
    "build_onnx_engine",
    "find_segmenter",
]

ENCODER_SUFFIX = "_encoder.onnx"
DECODER_SUFFIX = "_decoder.onnx"
#: Label of a box's top-left and bottom-right corner, and of a padding point (SAM's convention).
BOX_CORNER_LABELS = (2.0, 3.0)
PADDING_LABEL = -1.0


def segmenter_stem(path: str | Path) -> Path:
    """The stem the segmenter files of a model file or stem share: ``out/best`` for
    ``out/best.onnx``, ``out/best_encoder.onnx``, ``out/best_decoder.onnx`` or ``out/best``."""
    path = Path(path)
    for suffix in (ENCODER_SUFFIX, DECODER_SUFFIX, ".onnx"):
        if path.name.endswith(suffix):
            return path.with_name(path.name[: -len(suffix)])
    return path


def find_segmenter(path: str | Path, *, required: bool = False) -> tuple[Path, Path] | None:
    """The ``(encoder, decoder)`` files of a model file or stem (:func:`segmenter_stem`).

    Args:
        path: the detector graph, either segmenter file, or their stem.
        required: raise when the pair is not there (else None).

    Raises:
        OnnxModelError: ``required`` and a file of the pair is missing (both named).
    """
    stem = segmenter_stem(path)
    pair = (stem.with_name(stem.name + ENCODER_SUFFIX), stem.with_name(stem.name + DECODER_SUFFIX))
    missing = [str(file) for file in pair if not file.is_file()]
    if not missing:
        return pair
    if required:
        raise OnnxModelError(
            f"segmenter of {path}: {' and '.join(missing)} not found; `vfmkd export` writes <stem>{ENCODER_SUFFIX} "
            f"and <stem>{DECODER_SUFFIX} for a checkpoint with a sam_mask_head"
        )
    return None


class OnnxSegmenter:
    """The image encoder and prompt decoder graphs in onnxruntime.

    Args:
        encoder: ``<stem>_encoder.onnx``.
        decoder: ``<stem>_decoder.onnx``.
        providers: onnxruntime execution providers (default: the CPU).
    """

    def __init__(self, encoder: str | Path, decoder: str | Path, *, providers: Sequence[str] | None = None) -> None:
        self.encoder_metadata = _graph_metadata(encoder, ENCODER_GRAPH)
        self.decoder_metadata = _graph_metadata(decoder, DECODER_GRAPH)
        if self.encoder_metadata.input_size != self.decoder_metadata.input_size:
            raise OnnxModelError(
                f"{encoder} ({self.encoder_metadata.input_size} px) and {decoder} "
                f"({self.decoder_metadata.input_size} px) are not one export; export the checkpoint again"
            )
        self.input_size = self.encoder_metadata.input_size
        # NOTE: SAM's decoder wants a padding point after points without a box; SAM 2's graph appends it itself.
        self.pads_points = self.decoder_metadata.extra.get("decoder") == "sam"
        ort = import_optional("onnxruntime")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        providers = list(providers or ["CPUExecutionProvider"])
        self.encoder = ort.InferenceSession(str(encoder), sess_options=options, providers=providers)
        self.decoder = ort.InferenceSession(str(decoder), sess_options=options, providers=providers)
        self.map_names = [output.name for output in self.encoder.get_outputs()]

    def encode(self, images: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Per image its maps (``image_embeddings [1, 256, S / 16, S / 16]``, ...) of float ``images [B, 3, S, S]``."""
        # NOTE: one image a run: an encoder exported without --dynamic takes batch 1, and the decoder one image's maps.
        runs = [self.encoder.run(None, {"images": images[index : index + 1]}) for index in range(len(images))]
        return [dict(zip(self.map_names, outputs)) for outputs in runs]

    def decode(
        self, maps: Mapping[str, np.ndarray], coords: np.ndarray, labels: np.ndarray, image_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks of one image's prompts.

        Args:
            maps: the image's :meth:`encode` maps.
            coords: ``[N, K, 2]`` points in original pixels.
            labels: ``[N, K]`` 1 positive, 0 negative, 2 / 3 box corners, -1 padding.
            image_size: ``(H0, W0)`` of the original image.

        Returns:
            ``masks`` bool ``[N, H0, W0]`` and predicted IoUs ``[N]``.
        """
        count = len(coords)
        if count == 0 or np.size(coords) == 0:
            return torch.zeros((0, *image_size), dtype=torch.bool), torch.zeros(0)
        coords = np.asarray(coords, np.float32).reshape(count, -1, 2)
        labels = np.asarray(labels, np.float32).reshape(count, -1)
        low_res = self.input_size // 4
        feeds = {
            **maps,
            "point_coords": coords,
            "point_labels": labels,
            "mask_input": np.zeros((count, 1, low_res, low_res), np.float32),
            "has_mask_input": np.zeros(1, np.float32),
            "orig_im_size": np.asarray(image_size, np.float32),
        }
        masks, iou = self.decoder.run(["masks", "iou_predictions"], feeds)
        return torch.from_numpy(masks[:, 0] > 0), torch.from_numpy(iou[:, 0]).float()

    def decode_boxes(
        self, maps: Mapping[str, np.ndarray], boxes: np.ndarray, image_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks of box prompts ``[N, 4]`` xyxy original pixels (see :meth:`decode`)."""
        corners = np.asarray(boxes, np.float64).reshape(-1, 2, 2)
        labels = np.tile(np.asarray(BOX_CORNER_LABELS, np.float32), (len(corners), 1))
        return self.decode(maps, corners, labels, image_size)

    def decode_points(
        self, maps: Mapping[str, np.ndarray], points: np.ndarray, labels: np.ndarray, image_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks of point prompts ``[N, K, 2]`` original pixels with labels ``[N, K]`` (see :meth:`decode`)."""
        if np.size(points) == 0:
            return self.decode(maps, np.zeros((0, 1, 2)), np.zeros((0, 1)), image_size)
        points = np.asarray(points, np.float64).reshape(len(points), -1, 2)
        labels = np.asarray(labels, np.float32).reshape(len(points), -1)
        if self.pads_points:
            points = np.concatenate([points, np.zeros((len(points), 1, 2))], axis=1)
            labels = np.concatenate([labels, np.full((len(labels), 1), PADDING_LABEL, np.float32)], axis=1)
        return self.decode(maps, points, labels, image_size)


class OnnxSegmenterEngine:
    """The exported segmenter, with the exported detector when there is one (see the module doc).

    Args:
        segmenter: the encoder and decoder graphs.
        detector: the detector graph (None: every image needs prompts).
    """

    promptable = True

    def __init__(self, segmenter: OnnxSegmenter, detector: OnnxEngine | None = None) -> None:
        if detector is not None and detector.metadata.input_size != segmenter.input_size:
            raise OnnxModelError(
                f"{detector.path} ({detector.metadata.input_size} px) and its segmenter "
                f"({segmenter.input_size} px) are not one export; export the checkpoint again"
            )
        self.segmenter = segmenter
        self.detector = detector
        self.has_detector = detector is not None
        self.metadata = detector.metadata if detector is not None else segmenter.encoder_metadata

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The encoder's maps per image and the detector's outputs (None without a detector)."""
        images = batch["images"].float().div(255).numpy()
        detections = self.detector.forward(batch) if self.detector is not None else None
        return {"maps": self.segmenter.encode(images), "detector": detections}

    def postprocess(
        self,
        outputs: Mapping[str, Any],
        batch: Mapping[str, Any],
        *,
        prompts: Sequence[Mapping[str, torch.Tensor]] | None = None,
        conf_threshold: float = 0.25,
        iou_threshold: float = 0.7,
        max_det: int = 300,
    ) -> list[dict[str, torch.Tensor]]:
        """Per-image results in original pixels, as the torch engine's
        (:meth:`~vfmkd.inference.engine.TorchEngine.postprocess`)."""
        frames = [frames[0] for frames in batch["frames"]]
        if prompts is not None:
            return [
                self._answer(maps, image_prompts, frame)
                for maps, image_prompts, frame in zip(outputs["maps"], prompts, frames)
            ]
        if self.detector is None:
            raise ValueError("no detector graph beside the segmenter: every image needs prompts")
        from vfmkd.models.instance_masks import top_detections

        options = {"conf_threshold": conf_threshold, "iou_threshold": iou_threshold, "max_det": max_det}
        detections = self.detector.postprocess(outputs["detector"], batch, **options)
        results = []
        for maps, image_detections, frame in zip(outputs["maps"], detections, frames):
            result = top_detections(image_detections, max_det)
            boxes = result["boxes"].double().numpy()
            result["masks"], result["mask_scores"] = self.segmenter.decode_boxes(maps, boxes, frame.source_size)
            results.append(result)
        return results

    def _answer(self, maps: Mapping[str, np.ndarray], prompts: Mapping[str, torch.Tensor], frame: Any) -> dict:
        """One image's rows for its prompts (input pixels, mapped back to original pixels here)."""
        boxes = frame.invert_boxes(prompts["boxes"].double().numpy().reshape(-1, 4))
        points = prompts["points"].double().numpy()
        if points.size:
            points = frame.invert_points(points.reshape(-1, 2)).reshape(points.shape)
        size = frame.source_size
        by_boxes = self.segmenter.decode_boxes(maps, boxes, size)
        by_points = self.segmenter.decode_points(maps, points, prompts["point_labels"].numpy(), size)
        return prompt_rows(*(dict(zip(("masks", "mask_scores"), answer)) for answer in (by_boxes, by_points)))


def _graph_metadata(path: str | Path, graph: str) -> OnnxMetadata:
    """A segmenter file's metadata, checked to be the graph it is used as."""
    metadata = read_metadata(path)
    if metadata.graph != graph:
        raise OnnxModelError(f"{path} is a {metadata.graph.replace('_', ' ')} graph, not the {graph.replace('_', ' ')}")
    return metadata


def build_onnx_engine(
    path: str | Path,
    *,
    segmenter: str | Path | bool | None = None,
    providers: Sequence[str] | None = None,
) -> OnnxEngine | OnnxSegmenterEngine:
    """The engine of an exported model: the detector, with its segmenter when there is one.

    Args:
        path: the detector graph (``<stem>.onnx``), or, for a model without a detection
            head, either segmenter file (``<stem>_encoder.onnx`` / ``<stem>_decoder.onnx``).
        segmenter: None: the segmenter files beside a detector (same stem) when both are
            there; a path (either file or their stem): those, which must exist; False: none.
        providers: onnxruntime execution providers (default: the CPU).

    Raises:
        OnnxModelError: a file that is not the graph it is used as, files of different
            exports, or a segmenter asked for and not found.
    """
    if read_metadata(path).graph != DETECTOR_GRAPH:
        pair = find_segmenter(path if segmenter in (None, True, False) else segmenter, required=True)
        return OnnxSegmenterEngine(OnnxSegmenter(*pair, providers=providers))
    detector = OnnxEngine(path, providers=providers)
    if segmenter is False:
        return detector
    named = segmenter not in (None, True)
    pair = find_segmenter(segmenter if named else path, required=named or segmenter is True)
    if pair is None:
        return detector
    return OnnxSegmenterEngine(OnnxSegmenter(*pair, providers=providers), detector)
