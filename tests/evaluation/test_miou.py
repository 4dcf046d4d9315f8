"""Promptable mIoU (``prompt_miou``) with a fake mask head whose masks have a known IoU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tests.evaluation.mask_data import (
    MaskDataset,
    collate,
    ground_truth_boxes,
    ground_truth_masks,
    shift_right,
    to_input_logits,
)
from vfmkd.evaluation import PromptMIoUEvaluator, run_evaluation
from vfmkd.registry import EVALUATORS

KEYS = ["box", "box+1", "box+2", "point", "point+1", "point+2"]
LOW_RES = 16


class FakeMaskHead(nn.Module):
    """Answers each prompt with its ground-truth mask moved ``shift`` columns right, then
    corrected around each click (a 3 x 3 patch set for a positive click, cleared for a
    negative one), as input logits whose padding says "object".

    It finds the prompted instance from the prompt itself (the box, or the first point),
    so a prompt in the wrong place fails, and records every call.
    """

    def __init__(self, shift: int) -> None:
        super().__init__()
        self.shift = shift
        self.calls: list[list[dict]] = []

    def segment(self, head_outputs: dict, prompts: list[dict]) -> list[dict]:
        results, record = [], []
        for index, prompt in zip(head_outputs["indices"].tolist(), prompts):
            masks = self._answer(index, prompt)
            low_res = torch.rand(len(masks), 1, LOW_RES, LOW_RES)
            record.append({"index": index, "prompt": prompt, "masks": masks, "low_res": low_res})
            results.append({"masks": to_input_logits(masks, index), "low_res": low_res, "iou": torch.ones(len(masks))})
        self.calls.append(record)
        return results

    def _answer(self, index: int, prompt: dict) -> np.ndarray:
        frame = MaskDataset().frame(index)
        truth, _ = ground_truth_masks(index)
        points = prompt.get("points", torch.zeros(0, 0, 2))
        labels = prompt.get("point_labels", torch.zeros(0, 0))
        count = len(prompt["boxes"]) if "boxes" in prompt else len(points)
        answers = np.zeros((count, *truth.shape[1:]), dtype=bool)
        for row in range(count):
            instance = self._find(index, truth, frame, prompt, row)
            answer = shift_right(truth[instance], self.shift)
            clicks = range(0 if "boxes" in prompt else 1, points.shape[1])
            for click in clicks:
                if labels[row, click] < 0:
                    continue
                x, y = frame.invert_points(points[row, click][None].numpy())[0]
                answer[max(int(y) - 1, 0) : int(y) + 2, max(int(x) - 1, 0) : int(x) + 2] = bool(labels[row, click])
            answers[row] = answer
        return answers

    @staticmethod
    def _find(index: int, truth: np.ndarray, frame, prompt: dict, row: int) -> int:
        if "boxes" in prompt:
            box = frame.invert_boxes(prompt["boxes"][row][None].numpy())[0]
            matches = [i for i, known in enumerate(ground_truth_boxes(index)) if np.allclose(box, known)]
        else:
            x, y = frame.invert_points(prompt["points"][row, :1].numpy())[0]
            matches = [i for i, mask in enumerate(truth) if mask[int(y), int(x)]]
        assert len(matches) == 1, f"prompt {row} of image {frame} selects {len(matches)} instances"
        return matches[0]


class FakeStudent(nn.Module):
    """Reads the image index from the pixels (``MaskDataset`` fills image i with i); no predict()."""

    def __init__(self, *heads: tuple[str, nn.Module]) -> None:
        super().__init__()
        self.heads = nn.ModuleDict(dict(heads))

    def forward(self, images: torch.Tensor) -> dict:
        indices = (images[:, 0, 0, 0] * 255).round().long()
        return {name: {"indices": indices} for name in self.heads}


def evaluate(head: FakeMaskHead, dataset=None, batch_size: int = 3, **options) -> dict:
    dataset = dataset or MaskDataset()
    evaluator = PromptMIoUEvaluator(dataset, **options)
    student = FakeStudent(("detection", nn.Identity()), ("segmentation", head))
    return run_evaluation(
        student, dataset, [evaluator], batch_size=batch_size, num_workers=0, device="cpu", collate_fn=collate
    )


def shifted_ious(shift: int, images=range(3)) -> list[float]:
    """IoU of every instance's ground-truth mask with itself moved ``shift`` columns."""
    ious = []
    for index in images:
        truth, _ = ground_truth_masks(index)
        moved = shift_right(truth, shift)
        ious += list((truth & moved).sum((1, 2)) / (truth | moved).sum((1, 2)))
    return ious


def test_known_shift_gives_exactly_its_miou():
    ious = shifted_ious(2)
    # rectangles 10, 10, 16 and 20 pixels wide: IoU (w - 2) / (w + 2); then the triangle
    assert ious[:4] == pytest.approx([8 / 12, 8 / 12, 14 / 18, 18 / 22], abs=1e-12)
    metrics = evaluate(FakeMaskHead(shift=2))
    assert set(metrics) == {f"miou/{key}" for key in KEYS}
    assert metrics["miou/box"] == pytest.approx(np.mean(ious), abs=1e-6)
    assert metrics["miou/point"] == pytest.approx(np.mean(ious), abs=1e-6)


def test_perfect_masks_need_no_click():
    head = FakeMaskHead(shift=0)
    metrics = evaluate(head)
    assert metrics == {f"miou/{key}": 1.0 for key in KEYS}
    refined = [entry["prompt"] for call in head.calls for entry in call if "mask_input" in entry["prompt"]]
    assert len(refined) == 12  # 3 images x 2 prompt kinds x 2 refinement steps
    assert all((prompt["point_labels"][:, -1] == -1).all() for prompt in refined)  # padding points


def test_clicks_fall_in_the_previous_error_and_low_res_comes_back():
    head = FakeMaskHead(shift=3)
    metrics = evaluate(head, batch_size=3)
    assert len(head.calls) == 6  # one batch: box, box+1, box+2, point, point+1, point+2
    for step, (previous, current) in enumerate(zip(head.calls, head.calls[1:]), start=1):
        if step == 3:  # the point prompts start afresh
            assert "mask_input" not in current[0]["prompt"]
            continue
        for before, after in zip(previous, current):
            assert torch.equal(after["prompt"]["mask_input"], before["low_res"])
            frame = MaskDataset().frame(after["index"])
            truth, _ = ground_truth_masks(after["index"])
            clicks = zip(after["prompt"]["points"][:, -1], after["prompt"]["point_labels"][:, -1])
            for row, (point, label) in enumerate(clicks):
                x, y = frame.invert_points(point[None].numpy())[0]
                column, line = int(x), int(y)
                assert label in (0, 1) and (x, y) == (column + 0.5, line + 0.5)  # shift 3: every error is large
                missed = truth[row, line, column] and not before["masks"][row, line, column]
                extra = before["masks"][row, line, column] and not truth[row, line, column]
                assert missed if label == 1 else extra
    assert metrics["miou/box+1"] != metrics["miou/box"] and metrics["miou/point+2"] != metrics["miou/point+1"]
    assert evaluate(FakeMaskHead(shift=3)) == metrics  # the clicks are seeded
    assert evaluate(FakeMaskHead(shift=3), seed=1) != metrics


def test_batch_size_does_not_change_the_numbers():
    assert evaluate(FakeMaskHead(shift=3), batch_size=1) == evaluate(FakeMaskHead(shift=3), batch_size=3)


def test_teacher_masks_give_student_teacher_miou():
    teacher = FakeMaskHead(shift=0)
    teacher_calls = []

    def teacher_segment(batch, prompts):
        teacher_calls.append(prompts)
        return teacher.segment({"indices": torch.tensor(batch["indices"])}, prompts)

    student = FakeMaskHead(shift=2)
    metrics = evaluate(student, teacher_segment=teacher_segment)
    assert set(metrics) == {f"{group}/{key}" for group in ("miou", "miou_teacher") for key in KEYS}
    # The teacher answers the ground truth: student vs teacher is student vs ground truth.
    assert metrics["miou_teacher/box"] == pytest.approx(metrics["miou/box"], abs=1e-6)
    assert metrics["miou_teacher/point"] == pytest.approx(np.mean(shifted_ious(2)), abs=1e-6)
    # The student's clicks, with the teacher's own low-res logits as mask_input.
    assert "mask_input" not in teacher_calls[0][0]
    for step in (1, 2):
        for image in range(3):
            given, student_prompt = teacher_calls[step][image], student.calls[step][image]["prompt"]
            assert torch.equal(given["points"], student_prompt["points"])
            assert torch.equal(given["mask_input"], teacher.calls[step - 1][image]["low_res"])


def test_images_without_instances_get_a_stand_in_prompt_whose_mask_is_dropped():
    class _NoMasksInImage1(MaskDataset):
        def coco_ground_truth(self) -> dict:
            ground_truth = super().coco_ground_truth()
            ground_truth["annotations"] = [a for a in ground_truth["annotations"] if a["image_id"] != 1]
            return ground_truth

    class _StandIn(FakeMaskHead):
        """Answers image 1's stand-in prompt (which selects no instance) with an empty mask."""

        def _answer(self, index: int, prompt: dict) -> np.ndarray:
            if index == 1:
                return np.zeros((1, 16, 32), dtype=bool)
            return super()._answer(index, prompt)

    head = _StandIn(shift=2)
    metrics = evaluate(head, dataset=_NoMasksInImage1())
    assert metrics["miou/box"] == pytest.approx(np.mean(shifted_ious(2, images=[0, 2])), abs=1e-6)
    assert metrics["miou/point+2"] != metrics["miou/point"]  # the other images are refined
    stand_ins = [call[1]["prompt"] for call in head.calls]
    assert [prompt.get("boxes", torch.zeros(1, 4)).tolist() for prompt in stand_ins[:3]] == [[[0.0, 16.0, 64.0, 48.0]]] * 3
    assert [prompt["points"].tolist() for prompt in stand_ins[3:]] == [[[[32.0, 32.0]]]] * 3
    assert not any("mask_input" in prompt for prompt in stand_ins)


def test_registered_and_needs_a_segmenting_head():
    dataset = MaskDataset()
    evaluator = EVALUATORS.get("prompt_miou")(dataset)
    assert isinstance(evaluator, PromptMIoUEvaluator) and not evaluator.wants_predictions
    with pytest.raises(ValueError, match=r"segment\(head_outputs, prompts\).*'detection'"):
        evaluator.reset(FakeStudent(("detection", nn.Identity())))
    two = FakeStudent(("first", FakeMaskHead(0)), ("second", FakeMaskHead(2)))
    with pytest.raises(ValueError, match=r"\['first', 'second'\] segment"):
        evaluator.reset(two)
    metrics = run_evaluation(
        two,
        dataset,
        [PromptMIoUEvaluator(dataset, head="second")],
        batch_size=3,
        num_workers=0,
        device="cpu",
        collate_fn=collate,
    )
    assert metrics["miou/box"] == pytest.approx(np.mean(shifted_ious(2)), abs=1e-6)


def test_an_rle_of_the_wrong_size_is_named():
    class _WrongRle(MaskDataset):
        def coco_ground_truth(self) -> dict:
            ground_truth = super().coco_ground_truth()
            ground_truth["annotations"][3]["segmentation"] = {"size": [8, 8], "counts": "08"}  # image 2 is 32 x 32
            return ground_truth

    with pytest.raises(ValueError, match=r"annotation id 4 \(image id 2\).*\(8, 8\) mask, the image is \(32, 32\)"):
        evaluate(FakeMaskHead(shift=0), dataset=_WrongRle())
