"""What predict writes: the drawn image (mask overlay, boxes) and the COCO results entries."""

from __future__ import annotations

import numpy as np
import torch

from tests.predict.predict_models import rle_masks
from vfmkd.inference import Prediction
from vfmkd.inference.engine import mask_boxes
from vfmkd.inference.writers import coco_results, draw_prediction
from vfmkd.utils import visualization


def _prediction(labels: list[int]) -> Prediction:
    masks = np.zeros((2, 30, 50), dtype=bool)
    masks[0, 5:15, 10:20] = True
    masks[1, 20:25, 30:45] = True
    return Prediction(
        boxes=np.array([[10.0, 5.0, 20.0, 15.0], [30.0, 20.0, 45.0, 25.0]]),
        scores=np.array([0.9, 0.4], dtype=np.float32),
        labels=np.array(labels),
        names=["cat" if label == 0 else "dog" if label == 1 else "prompt" for label in labels],
        masks=masks,
        image_size=(30, 50),
        name="pets/a.jpg",
    )


def test_masks_are_overlaid_and_boxes_drawn_at_the_original_size() -> None:
    image = np.full((30, 50, 3), 100, dtype=np.uint8)
    drawn = np.asarray(draw_prediction(image, _prediction([0, 1])))
    assert drawn.shape == image.shape
    assert (drawn[8:12, 13:17] != 100).any(axis=-1).all()  # inside the first mask, off its outline
    assert (drawn[27:, :5] == 100).all()  # away from every mask, box and label


def test_coco_results_in_original_pixels_with_rle_masks() -> None:
    rows = coco_results(_prediction([0, 1]), image_id=7, category_ids=[3, 9])
    assert [row["category_id"] for row in rows] == [3, 9] and [row["category_name"] for row in rows] == ["cat", "dog"]
    assert rows[0]["bbox"] == [10.0, 5.0, 10.0, 10.0] and rows[0]["score"] == 0.9
    assert {row["image_id"] for row in rows} == {7} and {row["file_name"] for row in rows} == {"pets/a.jpg"}
    np.testing.assert_array_equal(rle_masks(rows), _prediction([0, 1]).masks)
    prompted = coco_results(_prediction([-1, -1]), image_id=0, category_ids=[3, 9])
    assert [(row["category_id"], row["prompt_index"]) for row in prompted] == [(None, 0), (None, 1)]


def test_mask_boxes_are_tight_pixel_edge_boxes() -> None:
    masks = torch.from_numpy(_prediction([0, 1]).masks)
    masks = torch.cat([masks, torch.zeros(1, 30, 50, dtype=torch.bool)])
    np.testing.assert_array_equal(mask_boxes(masks).numpy(), [[10, 5, 20, 15], [30, 20, 45, 25], [0, 0, 0, 0]])


def test_ground_truth_is_drawn_without_scores() -> None:
    image = np.full((80, 120, 3), 100, dtype=np.uint8)
    truth = Prediction(
        boxes=np.array([[10.0, 40.0, 60.0, 70.0]]),
        scores=np.ones(1, dtype=np.float32),
        labels=np.array([0]),
        names=["cat"],
        masks=None,
        image_size=(80, 120),
        name="truth",
    )
    with_scores = (np.asarray(draw_prediction(image, truth)) != 100).any(axis=-1)
    names_only = (np.asarray(draw_prediction(image, truth, show_scores=False)) != 100).any(axis=-1)
    assert names_only.sum() < with_scores.sum() and (names_only <= with_scores).all()  # "cat" but no "1.00"
    assert draw_prediction is visualization.draw_prediction  # the old import path still works
