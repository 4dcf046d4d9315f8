"""An exported detector in onnxruntime, as a predictor's engine; and what an exported file says about itself.

``vfmkd export`` (:mod:`vfmkd.export`) writes graphs whose ONNX ``metadata_props`` carry
everything a user of the file needs besides the weights (:class:`OnnxMetadata`): the
graph (``detector``, ``image_encoder``, ``prompt_decoder``), the head, the input size, the
letterbox (content centred, padding 114), the class names and COCO category ids, whether
NMS is in the graph, and the vfmkd version. :class:`OnnxEngine` runs a detector graph
behind a :class:`~vfmkd.inference.Predictor` (``vfmkd predict --engine onnxruntime
--model FILE.onnx``), no checkpoint needed, with the torch engine's post-processing:

- ``yolo_head`` without NMS in the graph: boxes and class probabilities of every anchor
  out, then the head's own selection and NMS
  (:func:`~vfmkd.models.heads.yolo_head.select_detections`);
- ``yolo_head`` with NMS in the graph (``vfmkd export --nms``): ``detections [N, 7]``
  (image, x1, y1, x2, y2, score, label), then the best ``max_det`` of each image;
- ``rtdetr_head``: the top ``K`` (query, class) pairs out, then the score threshold
  (:func:`~vfmkd.models.heads.rtdetr_head.select_top`).

With the segmenter's two graphs beside the detector, :mod:`vfmkd.inference.onnx_segmenter`
adds masks (one per detection, or one per prompt).

onnx and onnxruntime are optional (``pip install "vfmkd[export]"``); they are imported
when used (:func:`import_optional`).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from vfmkd.errors import UserError

__all__ = [
    "DETECTOR_GRAPH",
    "ENCODER_GRAPH",
    "DECODER_GRAPH",
    "LETTERBOX",
    "OnnxEngine",
    "OnnxMetadata",
    "OnnxModelError",
    "import_optional",
    "read_metadata",
]

DETECTOR_GRAPH = "detector"
ENCODER_GRAPH = "image_encoder"
DECODER_GRAPH = "prompt_decoder"
GRAPHS = (DETECTOR_GRAPH, ENCODER_GRAPH, DECODER_GRAPH)
#: The letterbox of every vfmkd input (:class:`~vfmkd.datasets.transforms.EvalTransform`).
LETTERBOX = {"center": True, "pad_value": 114, "scale_up": True}
INSTALL_HINT = 'pip install "vfmkd[export]"'


class OnnxModelError(UserError, ValueError):
    """An ONNX file that is not a vfmkd export of the kind asked for; the message says which and why."""


def import_optional(name: str) -> Any:
    """Import ``onnx``, ``onnxruntime`` or ``onnxscript``, or say how to install them.

    Raises:
        UserError: the package is not installed.
    """
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise UserError(
            f"{name} is not installed ({error}); {INSTALL_HINT} installs onnx, onnxruntime and onnxscript"
        ) from None


@dataclass
class OnnxMetadata:
    """What a vfmkd ONNX file says about itself (its ``metadata_props``).

    Attributes:
        graph: ``detector``, ``image_encoder`` or ``prompt_decoder``.
        head_type: the head it runs (``yolo_head``, ``rtdetr_head``, ``sam_mask_head``).
        input_size: side of the square network input.
        names: class name of each label (detectors).
        category_ids: COCO category id of each label (detectors).
        nms: whether NMS is in the graph (``yolo_head``).
        max_det: detections the graph keeps per image (the DETR top-K, the NMS's per class).
        letterbox: how images become inputs (:data:`LETTERBOX`).
        extra: other entries (``vfmkd_version``, ``backbone``, ``decoder``, ``inputs``, ``outputs``, ...).
    """

    graph: str
    head_type: str
    input_size: int
    names: list[str] = field(default_factory=list)
    category_ids: list[int] = field(default_factory=list)
    nms: bool = False
    max_det: int = 0
    letterbox: dict[str, Any] = field(default_factory=lambda: dict(LETTERBOX))
    extra: dict[str, str] = field(default_factory=dict)

    def to_props(self) -> dict[str, str]:
        """The entries as ONNX ``metadata_props`` (strings; lists and dicts as JSON)."""
        return {
            "graph": self.graph,
            "head_type": self.head_type,
            "input_size": str(self.input_size),
            "names": json.dumps(self.names),
            "category_ids": json.dumps(self.category_ids),
            "nms": json.dumps(self.nms),
            "max_det": str(self.max_det),
            "letterbox": json.dumps(self.letterbox),
            **self.extra,
        }

    @classmethod
    def from_props(cls, props: Mapping[str, str], source: str) -> OnnxMetadata:
        """Read :meth:`to_props`' entries back.

        Raises:
            OnnxModelError: an entry is missing or unreadable (not a vfmkd export).
        """
        missing = [key for key in ("graph", "head_type", "input_size") if key not in props]
        if missing:
            raise OnnxModelError(
                f"{source}: no vfmkd metadata ({', '.join(missing)} missing); export the model with `vfmkd export`"
            )
        try:
            known = {"graph", "head_type", "input_size", "names", "category_ids", "nms", "max_det", "letterbox"}
            metadata = cls(
                graph=props["graph"],
                head_type=props["head_type"],
                input_size=int(props["input_size"]),
                names=[str(name) for name in json.loads(props.get("names", "[]"))],
                category_ids=[int(value) for value in json.loads(props.get("category_ids", "[]"))],
                nms=bool(json.loads(props.get("nms", "false"))),
                max_det=int(props.get("max_det", "0")),
                letterbox=dict(json.loads(props.get("letterbox", json.dumps(LETTERBOX)))),
                extra={key: value for key, value in props.items() if key not in known},
            )
        except (ValueError, TypeError) as error:
            raise OnnxModelError(f"{source}: unreadable vfmkd metadata ({error})") from None
        if metadata.graph not in GRAPHS:
            raise OnnxModelError(f"{source}: unknown graph '{metadata.graph}' (known: {', '.join(GRAPHS)})")
        return metadata


def read_metadata(path: str | Path) -> OnnxMetadata:
    """The vfmkd metadata of an ONNX file (read with onnx, without the weights)."""
    onnx = import_optional("onnx")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # noqa: BLE001 - onnx raises several types for a bad file
        raise OnnxModelError(f"{path}: not a readable ONNX model ({str(error).splitlines()[0]})") from None
    return OnnxMetadata.from_props({entry.key: entry.value for entry in model.metadata_props}, str(path))


class OnnxEngine:
    """An exported vfmkd detector in onnxruntime (see the module doc).

    Args:
        path: the detector graph (``vfmkd export`` writes it as ``<out>.onnx``).
        providers: onnxruntime execution providers (default: the CPU).
    """

    promptable = False
    has_detector = True

    def __init__(self, path: str | Path, *, providers: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        self.metadata = read_metadata(self.path)
        if self.metadata.graph != DETECTOR_GRAPH:
            raise OnnxModelError(
                f"{self.path} is a {self.metadata.graph.replace('_', ' ')} graph; --engine onnxruntime runs the "
                "detector graph (the <out>.onnx of vfmkd export)"
            )
        if self.metadata.letterbox != LETTERBOX:
            raise OnnxModelError(f"{self.path}: letterbox {self.metadata.letterbox} is not vfmkd's {LETTERBOX}")
        ort = import_optional("onnxruntime")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(self.path), sess_options=options, providers=list(providers or ["CPUExecutionProvider"])
        )
        self.output_names = [output.name for output in self.session.get_outputs()]
        batch_dim = self.session.get_inputs()[0].shape[0]
        self.fixed_batch = batch_dim if isinstance(batch_dim, int) else None

    def forward(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The graph's outputs for the batch's uint8 ``images [B, 3, S, S]``.

        A graph with NMS takes its thresholds as inputs, so it runs in :meth:`postprocess`,
        which has them; here it gets the float images.
        """
        images = batch["images"].float().div(255).numpy()
        if self.metadata.nms:
            return {"images": images}
        return self._run({"images": images})

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One session run, or one per image for a graph exported without a dynamic batch."""
        if self.fixed_batch is None:
            return dict(zip(self.output_names, self.session.run(None, feeds)))
        images = feeds["images"]
        runs = [self.session.run(None, {**feeds, "images": images[i : i + 1]}) for i in range(len(images))]
        if self.metadata.nms:
            # NOTE: each run numbers its single image 0; put the batch index back.
            for index, outputs in enumerate(runs):
                outputs[0][:, 0] = index
        return {name: np.concatenate([outputs[i] for outputs in runs]) for i, name in enumerate(self.output_names)}

    def postprocess(
        self,
        outputs: Mapping[str, np.ndarray],
        batch: Mapping[str, Any],
        *,
        prompts: Sequence[Mapping[str, torch.Tensor]] | None = None,
        conf_threshold: float = 0.25,
        iou_threshold: float = 0.7,
        max_det: int = 300,
    ) -> list[dict[str, torch.Tensor]]:
        """Per-image detections in original pixels (``boxes``, ``scores``, ``labels``), as the torch engine's."""
        from vfmkd.models.heads.rtdetr_head import select_top
        from vfmkd.models.heads.yolo_head import select_detections

        if prompts is not None:
            raise ValueError("an exported detector answers no prompts; run the prompt decoder graph for masks")
        tensors = {name: torch.from_numpy(np.asarray(value)) for name, value in outputs.items()}
        if self.metadata.head_type == "rtdetr_head":
            decoded = (tensors["boxes"], tensors["scores"], tensors["labels"])
            return select_top(*decoded, batch, conf_threshold=conf_threshold, max_det=max_det)
        if not self.metadata.nms:
            options = {"conf_threshold": conf_threshold, "iou_threshold": iou_threshold, "max_det": max_det}
            return select_detections(tensors["boxes"], tensors["scores"], batch, **options)
        thresholds = {
            "conf_threshold": np.array([conf_threshold], np.float32),
            "iou_threshold": np.array([iou_threshold], np.float32),
        }
        detections = self._run({"images": outputs["images"], **thresholds})["detections"]
        return _split_detections(torch.from_numpy(detections), batch, max_det)


def _split_detections(
    detections: torch.Tensor, batch: Mapping[str, Any], max_det: int
) -> list[dict[str, torch.Tensor]]:
    """An NMS graph's ``[N, 7]`` rows (image, x1, y1, x2, y2, score, label) as per-image results, best first."""
    from vfmkd.models.heads.base import original_frames
    from vfmkd.models.heads.yolo_head import boxes_to_original

    batch_size = int(batch["images"].shape[0])
    frames = original_frames(batch, batch_size)
    results = []
    for image in range(batch_size):
        rows = detections[detections[:, 0] == image]
        rows = rows[torch.argsort(rows[:, 5], descending=True, stable=True)][:max_det]
        result = {"boxes": rows[:, 1:5].float(), "scores": rows[:, 5].float(), "labels": rows[:, 6].long()}
        if frames is not None:
            result["boxes"] = boxes_to_original(result["boxes"], frames[image])
        results.append(result)
    return results
