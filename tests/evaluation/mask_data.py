"""A hand-made instance-mask data set for the mask evaluators' tests.

Three images of sizes (32, 16), (16, 32) and (32, 32) (H, W), letterboxed to 64 x 64 at
scale 2 exactly, so a mask drawn in original pixels and upsampled 2x lands on the input
grid without rounding. Objects: axis-aligned rectangles (polygons), one RLE rectangle,
one triangle and one box-only object (no ``segmentation``). Every input image is filled
with its data set index, so a fake student can tell which image it sees.
"""

from __future__ import annotations

import numpy as np
import torch
from pycocotools import mask as mask_utils

from vfmkd.geometry import letterbox_frame

INPUT_SIZE = 64
SCALE = 2
NAMES = ["square", "circle", "star"]
CATEGORY_IDS = [1, 3, 7]

# Per image: (label, kind, geometry); rectangles are (x0, y0, x1, y1) in original pixels.
OBJECTS: list[list[tuple[int, str, tuple[float, ...]]]] = [
    [(0, "polygon", (2, 3, 12, 13)), (1, "polygon", (4, 18, 14, 30))],
    [(1, "polygon", (3, 2, 19, 12))],
    [(0, "rle", (5, 5, 25, 15)), (0, "triangle", (18, 18, 30, 30)), (1, "box_only", (1, 20, 10, 30))],
]
SIZES = [(32, 16), (16, 32), (32, 32)]


def rectangle_mask(height: int, width: int, box: tuple[float, ...]) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    x0, y0, x1, y1 = (int(value) for value in box)
    mask[y0:y1, x0:x1] = True
    return mask


def _segmentation(kind: str, box: tuple[float, ...], height: int, width: int):
    x0, y0, x1, y1 = box
    if kind == "polygon":
        return [[x0, y0, x1, y0, x1, y1, x0, y1]]
    if kind == "triangle":
        return [[x0, y0, x1, y0, x0, y1]]
    if kind == "rle":
        rle = mask_utils.encode(np.asfortranarray(rectangle_mask(height, width, box).astype(np.uint8)))
        return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
    return None


class MaskDataset(torch.utils.data.Dataset):
    """The data set above: ``names``, ``eval_category_ids``, ``coco_ground_truth()``, samples."""

    names = NAMES
    eval_category_ids = CATEGORY_IDS

    def __len__(self) -> int:
        return len(SIZES)

    def frame(self, index: int):
        return letterbox_frame(SIZES[index], INPUT_SIZE)

    def __getitem__(self, index: int) -> dict:
        return {"image": torch.full((3, INPUT_SIZE, INPUT_SIZE), index, dtype=torch.uint8), "frame": self.frame(index)}

    def coco_ground_truth(self) -> dict:
        images, annotations = [], []
        for index, ((height, width), objects) in enumerate(zip(SIZES, OBJECTS)):
            images.append({"id": index, "height": height, "width": width, "file_name": f"image_{index}.png"})
            for label, kind, box in objects:
                x0, y0, x1, y1 = box
                annotation = {
                    "id": len(annotations) + 1,
                    "image_id": index,
                    "category_id": CATEGORY_IDS[label],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": float((x1 - x0) * (y1 - y0)),
                    "iscrowd": 0,
                }
                segmentation = _segmentation(kind, box, height, width)
                if segmentation is not None:
                    annotation["segmentation"] = segmentation
                annotations.append(annotation)
        categories = [{"id": cid, "name": name} for cid, name in zip(CATEGORY_IDS, NAMES)]
        return {"images": images, "annotations": annotations, "categories": categories}


def ground_truth_masks(index: int) -> tuple[np.ndarray, list[int]]:
    """``[N, H, W]`` bool masks of the objects of image ``index`` that have one, and their labels."""
    height, width = SIZES[index]
    masks, labels = [], []
    for annotation in MaskDataset().coco_ground_truth()["annotations"]:
        if annotation["image_id"] != index or "segmentation" not in annotation:
            continue
        segmentation = annotation["segmentation"]
        rle = (
            mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
            if isinstance(segmentation, list)
            else segmentation
        )
        masks.append(mask_utils.decode(rle).astype(bool))
        labels.append(CATEGORY_IDS.index(annotation["category_id"]))
    return np.stack(masks), labels


def ground_truth_boxes(index: int) -> np.ndarray:
    """``[N, 4]`` xyxy annotation boxes of the objects of image ``index`` that have a mask."""
    boxes = [
        [x, y, x + w, y + h]
        for annotation in MaskDataset().coco_ground_truth()["annotations"]
        if annotation["image_id"] == index and "segmentation" in annotation
        for x, y, w, h in [annotation["bbox"]]
    ]
    return np.array(boxes, dtype=np.float64)


def shift_right(masks: np.ndarray, pixels: int) -> np.ndarray:
    """Masks moved ``pixels`` columns to the right (columns shifted in are empty)."""
    shifted = np.zeros_like(masks)
    shifted[..., pixels:] = masks[..., : masks.shape[-1] - pixels]
    return shifted


def to_input_logits(masks: np.ndarray, index: int, padding_value: float = 10.0) -> torch.Tensor:
    """``[N, 64, 64]`` logits (+-10) of original-pixel masks in image ``index``'s letterboxed input.

    The padding gets ``padding_value`` (positive: "object"), which an evaluator must ignore.
    """
    frame = MaskDataset().frame(index)
    logits = torch.full((len(masks), INPUT_SIZE, INPUT_SIZE), padding_value)
    upsampled = torch.from_numpy(masks).repeat_interleave(SCALE, 1).repeat_interleave(SCALE, 2).float() * 20 - 10
    left, top = int(frame.valid[0]), int(frame.valid[1])
    logits[:, top : top + upsampled.shape[1], left : left + upsampled.shape[2]] = upsampled
    return logits


def collate(samples: list[dict]) -> dict:
    return {"images": torch.stack([s["image"] for s in samples]), "frames": [[s["frame"]] for s in samples]}
