"""Promptable mask mIoU, EdgeSAM's protocol: the evaluator of promptable mask heads (``prompt_miou``).

For every ground-truth instance that has a mask, the student's mask head is prompted with

- ``box``: the instance's ground-truth box;
- ``point``: one positive point at the mask's centre (the pixel farthest from its
  boundary, :func:`~vfmkd.ops.masks.centre_point`);

and each prompt is refined twice (``+1``, ``+2``): a click drawn uniformly from where the
previous mask and the ground truth disagree (positive in a miss, negative in an
over-segmentation, none when that region is under ``min_pixels``;
:func:`~vfmkd.ops.masks.refinement_points`) is added to the prompt, and the previous
low-res logits are passed back as ``mask_input``. Masks are mapped back to the original
image (:func:`~vfmkd.ops.masks.masks_to_original`) and compared there with the
ground-truth masks; the mIoU is the mean over all instances of the data set.

Clicks are drawn from a generator seeded by ``(seed, image id, prompt kind)``, so the
numbers do not depend on the batch size or the order of images.

With ``teacher_segment`` (a callable ``(batch, prompts) -> results`` in the head's format,
e.g. the teacher's prompt encoder and mask decoder), the teacher is given the same
prompts (with its own previous ``low_res`` as ``mask_input``) and the student-vs-teacher
mask IoU is reported too.

Example::

    evaluator = PromptMIoUEvaluator(dataset)
    metrics = run_evaluation(model, dataset, [evaluator], batch_size=8, num_workers=0, device="cpu")
    # {"miou/box": ..., "miou/box+1": ..., "miou/box+2": ...,
    #  "miou/point": ..., "miou/point+1": ..., "miou/point+2": ...}
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from vfmkd.datasets.masks import segment_to_mask
from vfmkd.evaluation.base import Evaluator
from vfmkd.evaluation.segm import mask_ground_truth
from vfmkd.ops.masks import centre_point, mask_iou, masks_to_original, refinement_points
from vfmkd.registry import EVALUATORS
from vfmkd.utils.distributed import unwrap_model

__all__ = ["PROMPT_KINDS", "PromptMIoUEvaluator", "TeacherSegment"]

logger = logging.getLogger(__name__)

#: The first prompt of each protocol, in the order they are run.
PROMPT_KINDS = ("box", "point")

#: ``(batch, prompts) -> results``: per image a dict with ``masks [N, H_in, W_in]`` logits and ``low_res``.
TeacherSegment = Callable[[Mapping[str, Any], list[dict[str, torch.Tensor]]], Sequence[Mapping[str, torch.Tensor]]]


@dataclass
class _Instances:
    """The ground-truth instances of one image that have a non-empty mask.

    Attributes:
        frame: the image's frame (original -> network input).
        masks: ``[N, H0, W0]`` bool masks in original pixels.
        boxes: ``[N, 4]`` float32 xyxy boxes in input pixels.
        centres: ``[N, 2]`` float32 centre points in input pixels.
    """

    frame: Any
    masks: torch.Tensor
    boxes: torch.Tensor
    centres: torch.Tensor


@EVALUATORS.register("prompt_miou")
class PromptMIoUEvaluator(Evaluator):
    """Mask mIoU of box and centre-point prompts with 0, 1 and 2 refinement clicks.

    The evaluated model's head with a ``segment(head_outputs, prompts)`` method is
    prompted. An image without instances gets one stand-in prompt (its whole content as a
    box, or its centre as a point) whose mask is dropped: SAM's decoders fail on ``N = 0``.

    Args:
        dataset: has ``coco_ground_truth()`` (COCO dict in original image pixels, image
            id = data set index, annotations with ``segmentation`` polygons or RLE;
            those without one are left out with a warning).
        head: name of the segmenting head in ``student.heads``; needed only when several
            heads have ``segment``.
        teacher_segment: the teacher's ``(batch, prompts) -> results`` (masks at the
            student's input resolution); adds ``miou_teacher/<prompt>``: student vs teacher.
        refinement_steps: clicks added one at a time after the first prompt (EdgeSAM: 2).
        min_pixels: an error region smaller than this gives no click (a padding point).
        seed: seeds the clicks (with each image id and prompt kind).
    """

    wants_predictions = False

    def __init__(
        self,
        dataset: Any,
        *,
        head: str | None = None,
        teacher_segment: TeacherSegment | None = None,
        refinement_steps: int = 2,
        min_pixels: int = 10,
        seed: int = 0,
    ) -> None:
        ground_truth = mask_ground_truth(dataset.coco_ground_truth(), "prompt_miou")
        self.image_sizes: dict[int, tuple[int, int]] = {
            int(image["id"]): (int(image["height"]), int(image["width"])) for image in ground_truth["images"]
        }
        self.annotations: dict[int, list[dict[str, Any]]] = {}
        for annotation in ground_truth["annotations"]:
            if not annotation.get("iscrowd", 0):
                self.annotations.setdefault(int(annotation["image_id"]), []).append(annotation)
        if not self.annotations:
            logger.warning("prompt_miou: no ground-truth instance has a mask; every mIoU will be NaN")
        self.head_name = head
        self.teacher_segment = teacher_segment
        self.refinement_steps = int(refinement_steps)
        self.min_pixels = int(min_pixels)
        self.seed = int(seed)
        steps = range(self.refinement_steps + 1)
        self.keys = [kind if step == 0 else f"{kind}+{step}" for kind in PROMPT_KINDS for step in steps]
        self._segment: Callable[..., Sequence[Mapping[str, torch.Tensor]]] | None = None
        self._empty_masks_warned = False
        self._sums: dict[str, float] = {}
        self._count = 0

    def reset(self, model: Any = None) -> None:
        """Find the segmenting head of ``model`` (a student, or a module holding one as ``.student``)."""
        student = unwrap_model(getattr(model, "student", model))
        heads = dict(getattr(student, "heads", None) or {})
        segmenting = [name for name, module in heads.items() if callable(getattr(module, "segment", None))]
        if self.head_name is None and len(segmenting) == 1:
            self.head_name = segmenting[0]
        if self.head_name not in segmenting:
            wanted = f"head '{self.head_name}'" if self.head_name else "one head"
            raise ValueError(
                f"prompt_miou needs {wanted} with a segment(head_outputs, prompts) method; the model's heads "
                f"are {sorted(heads)}, of which {segmenting or 'none'} segment. Add a promptable mask head, "
                "name it with PromptMIoUEvaluator(head=...), or drop prompt_miou from the evaluators"
            )
        self._segment = heads[self.head_name].segment
        self._sums = {}
        self._count = 0

    def process(
        self,
        batch: Mapping[str, Any],
        outputs: Mapping[str, Any],
        predictions: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        """Prompt the head for every instance of the batch's images and add their IoUs."""
        if self._segment is None:
            raise RuntimeError("PromptMIoUEvaluator.process() before reset(model)")
        device = batch["images"].device
        image_ids = [int(index) for index in batch["indices"]]
        images = [
            self._instances(image_id, frames[0], device) for image_id, frames in zip(image_ids, batch["frames"])
        ]
        if not any(len(image.masks) for image in images):
            return
        head_outputs = outputs[self.head_name]
        for kind_index, kind in enumerate(PROMPT_KINDS):
            generators = [_click_generator(self.seed, image_id, kind_index) for image_id in image_ids]
            self._run_prompts(kind, batch, head_outputs, images, generators)
        self._count += sum(len(image.masks) for image in images)

    def _run_prompts(
        self,
        kind: str,
        batch: Mapping[str, Any],
        head_outputs: Any,
        images: list[_Instances],
        generators: list[torch.Generator],
    ) -> None:
        """One prompt kind: the first prompt, then each refinement step, IoUs added per step."""
        prompts = [_first_prompt(kind, image) for image in images]
        teacher_low_res: list[torch.Tensor | None] = [None] * len(images)
        for step in range(self.refinement_steps + 1):
            key = kind if step == 0 else f"{kind}+{step}"
            results = _checked(self._segment(head_outputs, prompts), images, "the head's segment()")
            masks = _instance_masks(results, images)
            self._add(f"miou/{key}", masks, [image.masks for image in images])
            if self.teacher_segment is not None:
                teacher_prompts = [
                    _with_mask_input(prompt, low_res) for prompt, low_res in zip(prompts, teacher_low_res)
                ]
                teacher_results = _checked(self.teacher_segment(batch, teacher_prompts), images, "teacher_segment()")
                self._add(f"miou_teacher/{key}", masks, _instance_masks(teacher_results, images))
                teacher_low_res = [
                    result["low_res"] if len(image.masks) else None for result, image in zip(teacher_results, images)
                ]
            if step < self.refinement_steps:
                prompts = [
                    self._refined(prompt, result["low_res"], mask, image, generator) if len(image.masks) else prompt
                    for prompt, result, mask, image, generator in zip(prompts, results, masks, images, generators)
                ]

    def _refined(
        self,
        prompt: dict[str, torch.Tensor],
        low_res: torch.Tensor,
        masks: torch.Tensor,
        image: _Instances,
        generator: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        """``prompt`` plus one click per instance from the error region of ``masks``, and ``low_res``."""
        points, labels = refinement_points(masks, image.masks.to(masks.device), generator, self.min_pixels)
        device = image.boxes.device
        input_points = torch.from_numpy(image.frame.apply_points(points.cpu().numpy())).float().to(device)
        labels = labels.to(device)
        # NOTE: no click (error region under min_pixels) becomes SAM's padding point: (0, 0), label -1.
        input_points[labels < 0] = 0.0
        previous_points = prompt.get("points", input_points.new_zeros(len(input_points), 0, 2))
        previous_labels = prompt.get("point_labels", labels.new_zeros(len(labels), 0))
        return {
            **prompt,
            "points": torch.cat([previous_points, input_points[:, None]], dim=1),
            "point_labels": torch.cat([previous_labels, labels[:, None]], dim=1),
            "mask_input": low_res,
        }

    def _instances(self, image_id: int, frame: Any, device: torch.device) -> _Instances:
        """The instances of image ``image_id`` with a mask: masks, and box and centre prompts in input pixels."""
        if image_id not in self.image_sizes:
            raise KeyError(
                f"image id {image_id} is not in the data set's COCO ground truth "
                f"({len(self.image_sizes)} images); pass dataset indices as image ids"
            )
        height, width = self.image_sizes[image_id]
        if tuple(frame.source_size) != (height, width):
            raise ValueError(
                f"image id {image_id}: the batch's frame is of a {tuple(frame.source_size)} image, the ground "
                f"truth of a ({height}, {width}) one; evaluate with the letterbox transform (no mosaic)"
            )
        masks, boxes = [], []
        for annotation in self.annotations.get(image_id, []):
            x0, y0, box_width, box_height = (float(value) for value in annotation["bbox"])
            box = np.array([x0, y0, x0 + box_width, y0 + box_height])
            mask = segment_to_mask(annotation["segmentation"], box, height, width)
            if mask.shape != (height, width):
                raise ValueError(
                    f"annotation id {annotation.get('id')} (image id {image_id}): its segmentation decodes to a "
                    f"{mask.shape} mask, the image is ({height}, {width}); fix the RLE 'size'"
                )
            if not mask.any():
                self._warn_empty(annotation)
                continue
            masks.append(torch.from_numpy(mask.astype(bool)))
            boxes.append(box)
        if not masks:
            empty = torch.zeros(0, height, width, dtype=torch.bool, device=device)
            return _Instances(frame, empty, torch.zeros(0, 4, device=device), torch.zeros(0, 2, device=device))
        mask_stack = torch.stack(masks)
        centres = np.stack([centre_point(mask).numpy() for mask in mask_stack])
        return _Instances(
            frame,
            mask_stack.to(device),
            torch.from_numpy(frame.apply_boxes(np.stack(boxes))).float().to(device),
            torch.from_numpy(frame.apply_points(centres)).float().to(device),
        )

    def _warn_empty(self, annotation: Mapping[str, Any]) -> None:
        if not self._empty_masks_warned:
            self._empty_masks_warned = True
            logger.warning(
                "prompt_miou: annotation id %s (image id %s) has an empty mask and is left out (so is any other)",
                annotation.get("id"),
                annotation.get("image_id"),
            )

    def _add(self, key: str, first: list[torch.Tensor], second: list[torch.Tensor]) -> None:
        total = sum(float(mask_iou(a, b.to(a.device)).sum()) for a, b in zip(first, second) if len(a))
        self._sums[key] = self._sums.get(key, 0.0) + total

    def evaluate(self) -> dict[str, Any]:
        """``miou/<prompt>`` (and ``miou_teacher/<prompt>`` with a teacher): mean IoU over all instances.

        ``<prompt>`` is ``box``, ``box+1``, ``box+2``, ``point``, ``point+1``, ``point+2``;
        NaN when no instance was seen.
        """
        groups = ["miou"] + (["miou_teacher"] if self.teacher_segment is not None else [])
        return {
            f"{group}/{key}": (self._sums.get(f"{group}/{key}", 0.0) / self._count if self._count else math.nan)
            for group in groups
            for key in self.keys
        }


def _click_generator(seed: int, image_id: int, kind_index: int) -> torch.Generator:
    """The generator of one image's clicks for one prompt kind, whatever batch the image is in."""
    state = np.random.SeedSequence([seed, image_id, kind_index]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def _first_prompt(kind: str, image: _Instances) -> dict[str, torch.Tensor]:
    """The first prompt of every instance of an image: its box, or its centre point.

    An image without instances gets one stand-in prompt: the valid region as a box, or
    its centre as a point.
    """
    boxes, centres = image.boxes, image.centres
    if not len(boxes):
        boxes = torch.tensor([image.frame.valid], dtype=torch.float32, device=boxes.device)
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    if kind == "box":
        return {"boxes": boxes}
    labels = torch.ones(len(centres), 1, dtype=torch.int64, device=centres.device)
    return {"points": centres[:, None], "point_labels": labels}


def _instance_masks(results: Sequence[Mapping[str, torch.Tensor]], images: list[_Instances]) -> list[torch.Tensor]:
    """Per image ``[N, H0, W0]`` bool masks of its instances in original pixels (stand-ins dropped)."""
    return [
        masks_to_original(result["masks"][: len(image.masks)], image.frame) for result, image in zip(results, images)
    ]


def _with_mask_input(prompt: dict[str, torch.Tensor], low_res: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``prompt`` with ``mask_input`` replaced by ``low_res`` (removed when None)."""
    updated = {key: value for key, value in prompt.items() if key != "mask_input"}
    if low_res is not None:
        updated["mask_input"] = low_res
    return updated


def _checked(
    results: Sequence[Mapping[str, torch.Tensor]], images: list[_Instances], source: str
) -> Sequence[Mapping[str, torch.Tensor]]:
    """``results`` after checking there is one per image and one mask per prompt."""
    if len(results) != len(images):
        raise ValueError(f"{source} returned {len(results)} results for a batch of {len(images)} images")
    for index, (result, image) in enumerate(zip(results, images)):
        prompted = max(len(image.masks), 1)
        if result["masks"].dim() != 3 or len(result["masks"]) != prompted:
            raise ValueError(
                f"{source}: image {index} of the batch got {prompted} prompts, but its masks have shape "
                f"{tuple(result['masks'].shape)}; expected [N, H_in, W_in] logits, one per prompt"
            )
    return results
