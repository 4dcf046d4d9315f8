"""Prompt-in-the-loop mask distillation (``mask_kd``): frames, the loop, offline decoder-only, learning."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from vfmkd.config import ConfigError, validate_config
from vfmkd.core.build import build_trainer
from vfmkd.datasets import build_dataset
from vfmkd.datasets.collate import batch_to_device
from vfmkd.distillation.mask_kd import DecoderRecord, MaskDistillation, map_prompt_boxes, map_prompt_points
from vfmkd.features.extract import extract_features
from vfmkd.geometry import Frame, hflip_matrix, longest_side_frame, resize_frame, warp_features_batch
from vfmkd.ops.boxes import box_iou
from vfmkd.ops.masks import centre_point, mask_iou
from vfmkd.teachers import build_teacher

IMG_SIZE = 128
TEACHER_SIZE = 128
TERM = "distill/sam2/masks<-segmentation"
AUGMENT = {"mosaic": 1.0, "fliplr": 0.5, "scale": 0.5, "translate": 0.2}


def _teacher_frame(kind: str, image_hw: tuple[int, int], size: int) -> Frame:
    """SAM's frame (longest side, padded) or SAM 2's (stretched to a square)."""
    return longest_side_frame(image_hw, size) if kind == "sam" else resize_frame(image_hw, (size, size))


def _augmented_samples(data_yaml: Path, count: int) -> tuple[Any, list[dict[str, Any]]]:
    dataset = build_dataset(
        {"dataset": str(data_yaml), "img_size": IMG_SIZE, "load_masks": True, "augment": AUGMENT}, "train", train=True
    )
    samples = []
    for seed in range(count):
        random.seed(seed)
        np.random.seed(seed)
        samples.append(dataset[seed % len(dataset)])
    return dataset, samples


# --------------------------------------------------------------------------- prompts through frames
@pytest.mark.parametrize("kind", ["sam", "sam2"])
def test_prompts_in_the_teacher_frame_select_the_same_object(synthetic_data_yaml: Path, kind: str) -> None:
    """A point prompt on an object of the augmented image (flip, scale, translate, mosaic), mapped
    into the teacher's input, lands on the same object of the source image; the same point
    mapped through a wrong frame (another tile's, or the frame without its flip) mostly does not."""
    dataset, samples = _augmented_samples(synthetic_data_yaml, 16)
    index_of = {sample_id: index for index, sample_id in enumerate(dataset.ids)}
    hits, wrong_hits, prompts = 0, 0, 0
    for sample in samples:
        raws = [dataset.load_raw(index_of[source]) for source in sample["source_ids"]]
        records = [
            DecoderRecord({}, _teacher_frame(kind, raw["image"].shape[:2], TEACHER_SIZE), frame)
            for raw, frame in zip(raws, sample["frames"])
        ]
        for instance, mask in enumerate(sample["masks"]):
            if int(mask.sum()) < 30:
                continue
            tile = int(sample["frame_index"][instance])
            point = centre_point(mask.bool())[None]
            label = int(sample["cls"][instance])
            right = map_prompt_points(point, records[tile])
            hits += _on_object(raws[tile], records[tile].teacher_frame, right, label)
            wrong_frame = _wrong_frame(sample["frames"], tile)
            wrong = map_prompt_points(point, DecoderRecord({}, records[tile].teacher_frame, wrong_frame))
            wrong_hits += _on_object(raws[tile], records[tile].teacher_frame, wrong, label)
            prompts += 1
    assert prompts >= 30
    assert hits == prompts
    assert wrong_hits <= 0.5 * prompts


def _wrong_frame(frames: list[Frame], tile: int) -> Frame:
    """Another tile's frame, or (one tile) the frame with an extra horizontal flip."""
    if len(frames) > 1:
        return frames[(tile + 1) % len(frames)]
    frame = frames[tile]
    return frame.then(hflip_matrix(frame.input_size[1])[:2], frame.input_size, valid=frame.valid)


def _on_object(raw: dict[str, Any], teacher_frame: Frame, teacher_point: torch.Tensor, label: int) -> bool:
    """Whether a teacher-input point shows an object of class ``label`` in the source image."""
    x, y = teacher_frame.invert_points(teacher_point.double().numpy())[0]
    height, width = raw["image"].shape[:2]
    if not (0 <= x < width and 0 <= y < height):
        return False
    return any(
        bool(raw["masks"][k][int(y), int(x)]) and int(raw["cls"][k]) == label for k in range(len(raw["masks"]))
    )


@pytest.mark.parametrize("kind", ["sam", "sam2"])
def test_teacher_masks_come_back_onto_the_student_objects(synthetic_data_yaml: Path, kind: str) -> None:
    """A box prompt mapped into the teacher frame holds the object's teacher-frame mask, and that
    mask at the decoder's stride-4 resolution, warped back as the loss warps the teacher's
    masks, covers the augmented image's mask of the object."""
    dataset, samples = _augmented_samples(synthetic_data_yaml, 6)
    index_of = {sample_id: index for index, sample_id in enumerate(dataset.ids)}
    size, checked = 512, 0
    for sample in samples:
        raws = [dataset.load_raw(index_of[source]) for source in sample["source_ids"]]
        for instance, mask in enumerate(sample["masks"]):
            tile = int(sample["frame_index"][instance])
            raw, frame = raws[tile], sample["frames"][tile]
            if int(mask.sum()) < 60:
                continue
            teacher_frame = _teacher_frame(kind, raw["image"].shape[:2], size)
            record = DecoderRecord({}, teacher_frame, frame)
            original = _source_mask(raw, teacher_frame, frame, mask)
            source_hw = raw["image"].shape[:2]
            in_teacher, _ = warp_features_batch(
                original[None, None].float(), [Frame.identity(*source_hw)], 1, [teacher_frame], (size // 4, size // 4), 4
            )
            if not _cut(mask, frame):
                # A whole object: its box in the teacher frame is the box of its teacher-frame mask.
                box = map_prompt_boxes(sample["boxes"][instance][None], record) / 4
                ys, xs = torch.nonzero(in_teacher[0, 0] > 0.5, as_tuple=True)
                cells = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()[None]
                assert box_iou(box, cells).item() >= 0.7
            back, valid = warp_features_batch(in_teacher, [teacher_frame], 4, [frame], (IMG_SIZE, IMG_SIZE), 1)
            assert mask_iou((back[:, 0] > 0.5) & valid[:, 0], mask.bool()[None]).item() >= 0.7
            checked += 1
    assert checked >= 10


def _cut(mask: torch.Tensor, frame: Frame) -> bool:
    """Whether the object touches the edge of its image content (cropped by the augmentation)."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    x0, y0, x1, y1 = frame.valid
    return bool(xs.min() <= x0 + 1 or ys.min() <= y0 + 1 or xs.max() + 1 >= x1 - 1 or ys.max() + 1 >= y1 - 1)


def _source_mask(raw: dict[str, Any], teacher_frame: Frame, frame: Frame, mask: torch.Tensor) -> torch.Tensor:
    """The source image's mask of the augmented image's object ``mask`` (the one it overlaps most)."""
    point = centre_point(mask.bool()).double().numpy()[None]
    x, y = frame.invert_points(point)[0]
    for candidate in raw["masks"]:
        if candidate[int(y), int(x)]:
            return torch.as_tensor(candidate)
    raise AssertionError("the object's centre is on no source mask")


# --------------------------------------------------------------------------- the loop
class _CountingDecoder:
    """A teacher decoder stand-in: the prompt's box (or a disc around its first point) as the mask."""

    family, feature_names = "sam", ("embed",)

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def decode(self, features, *, image_index=None, boxes=None, points=None, mask_input=None, multimask=False, clamp=True):
        self.calls.append({"boxes": boxes, "points": points, "mask_input": mask_input})
        count = len(boxes) if boxes is not None else len(points[0])
        size = features["embed"].shape[-1] * 4
        ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
        masks = torch.full((count, 1, size, size), -10.0)
        for index in range(count):
            if boxes is not None:
                x0, y0, x1, y1 = (boxes[index] + 0.5).tolist()
                inside = (xs >= x0 / 4) & (xs < x1 / 4) & (ys >= y0 / 4) & (ys < y1 / 4)
            else:
                cx, cy = ((points[0][index, 0] + 0.5) / 4).tolist()
                inside = (xs - cx) ** 2 + (ys - cy) ** 2 < 16
            masks[index, 0][inside] = 10.0
        return masks, torch.ones(count, 1)


def _tiny_student(decoder: str = "sam") -> Any:
    from vfmkd.models import build_model
    from vfmkd.models.heads.sam_mask_head import SAMMaskHead

    head = {"type": "sam_mask_head", "decoder": decoder, **SAMMaskHead.small_config()}
    return build_model({"backbone": {"type": "yolov8", "scale": "n"}, "heads": {"segmentation": head}})


def test_refinement_loop_adds_one_point_per_round_and_feeds_back_each_sides_mask() -> None:
    torch.manual_seed(0)
    student = _tiny_student()
    images = torch.rand(1, 3, 64, 64)
    outputs = student(images)["segmentation"]
    frame = Frame.identity(64, 64)
    record = DecoderRecord({"embed": torch.zeros(1, 256, 4, 4)}, frame, frame)
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 8:40, 10:50] = 1
    targets = {"boxes": torch.tensor([[10.0, 8.0, 50.0, 40.0]]), "batch_idx": torch.zeros(1, dtype=torch.int64),
               "masks": [masks], "has_labels": torch.ones(1, dtype=torch.bool), "frame_index": torch.zeros(1, dtype=torch.int64)}
    decoder = _CountingDecoder()
    loss = MaskDistillation(decode_iters=2, point_probability=0.0, min_error_pixels=1)
    value = loss(student.heads["segmentation"], outputs, decoder, [[record]], targets)
    assert value.item() > 0
    value.backward()
    assert student.heads["segmentation"].mask_decoder.output_hypernetworks_mlps[0].layers[0].weight.grad.abs().sum() > 0
    assert len(decoder.calls) == 3
    first, second, third = decoder.calls
    assert torch.allclose(first["boxes"], targets["boxes"] - 0.5) and first["points"] is None and first["mask_input"] is None
    assert second["points"][0].shape == (1, 1, 2) and third["points"][0].shape == (1, 2, 2)
    assert second["mask_input"].shape == (1, 1, 16, 16)
    # A positive click lies inside the teacher's mask (the box), a negative one outside it.
    for call in (second, third):
        (x, y), label = (call["points"][0][0, -1] + 0.5).tolist(), int(call["points"][1][0, -1])
        inside = 10 <= x < 50 and 8 <= y < 40
        assert label == -1 or label == int(inside)


def test_unlabelled_images_are_prompted_by_a_grid_inside_the_valid_region() -> None:
    torch.manual_seed(0)
    student = _tiny_student()
    outputs = student(torch.rand(1, 3, 64, 64))["segmentation"]
    # Letterboxed content: only the top half of the input is image.
    frame = Frame.identity(32, 64).then(np.eye(2, 3), (64, 64), valid=(0.0, 0.0, 64.0, 32.0))
    record = DecoderRecord({"embed": torch.zeros(1, 256, 4, 4)}, Frame.identity(32, 64), frame)
    decoder = _CountingDecoder()
    loss = MaskDistillation(decode_iters=0, grid_size=4, max_instances=16)
    loss(student.heads["segmentation"], outputs, decoder, [[record]], {"has_labels": torch.zeros(1, dtype=torch.bool)})
    points = decoder.calls[0]["points"][0][:, 0] + 0.5
    assert len(points) == 8 and bool((points[:, 1] < 32).all())
    assert MaskDistillation(unlabeled_prompts="none")(
        student.heads["segmentation"], outputs, decoder, [[record]], None
    ).item() == 0.0


def test_unlabelled_images_can_be_prompted_by_the_detectors_boxes() -> None:
    torch.manual_seed(0)
    student = _tiny_student()
    outputs = student(torch.rand(1, 3, 64, 64))["segmentation"]
    frame = Frame.identity(64, 64)
    record = DecoderRecord({"embed": torch.zeros(1, 256, 4, 4)}, frame, frame)
    detections = [{"boxes": torch.tensor([[30.0, 30.0, 60.0, 60.0], [4.0, 4.0, 20.0, 20.0], [1.0, 1.0, 1.5, 1.5]]),
                   "scores": torch.tensor([0.1, 0.9, 0.8])}]
    decoder = _CountingDecoder()
    loss = MaskDistillation(unlabeled_prompts="boxes", decode_iters=0, box_threshold=0.25)
    value = loss(student.heads["segmentation"], outputs, decoder, [[record]], {"has_labels": torch.zeros(1, dtype=torch.bool)}, detections)
    assert value.item() > 0
    # The 0.1 box is below the threshold, the sub-pixel one is no box to prompt with.
    assert (decoder.calls[0]["boxes"] + 0.5).tolist() == [[4.0, 4.0, 20.0, 20.0]]


# --------------------------------------------------------------------------- in training
@pytest.fixture(scope="module")
def sam2_store(tmp_path_factory: pytest.TempPathFactory, synthetic_data_yaml: Path) -> tuple[Path, Path]:
    """A random-init SAM 2.1 Hiera-T saved in the official format, and its float16 store of the data."""
    root = tmp_path_factory.mktemp("mask_kd")
    teacher = build_teacher("sam2.1_hiera_t", random_init=True, image_size=TEACHER_SIZE)
    checkpoint = root / "sam2.1_hiera_tiny.pt"
    torch.save({"model": teacher.model.state_dict()}, checkpoint)
    teacher = build_teacher("sam2.1_hiera_t", weights=str(checkpoint), image_size=TEACHER_SIZE)
    dataset = build_dataset({"dataset": str(synthetic_data_yaml), "img_size": IMG_SIZE}, "train", train=False)
    extract_features(teacher, dataset, root / "store", num_workers=0, progress=False, split="train")
    return root, checkpoint


def _config(root: Path, checkpoint: Path, data_yaml: Path, *, offline_ratio: float, steps: int, **extra: Any) -> Any:
    return validate_config(
        {
            "experiment_name": "mask_kd",
            "model": {"backbone": {"type": "yolov8", "scale": "n"},
                      "heads": {"segmentation": {"type": "sam_mask_head", "transformer_depth": 1, "mlp_dim": 64}}},
            "teachers": {"sam2": {"name": "sam2.1_hiera_t", "model_path": str(checkpoint), "image_size": TEACHER_SIZE,
                                  "feature_path": str(root / "store"), "offline_ratio": offline_ratio}},
            "distillation": {"losses": {"sam2_masks": {"type": "mask_kd", "teacher": "sam2", "params": {"decode_iters": 1}},
                                        **extra.pop("losses", {})}},
            "data": {"dataset": str(data_yaml), "img_size": IMG_SIZE, "batch_size": 4, "num_workers": 0,
                     "load_masks": True, **extra.pop("data", {})},
            "train": {"max_steps": steps, "output_dir": str(root / "runs"), "eval_interval": 1000, "save_interval": 1000,
                      "log_interval": 1, "amp": False, **extra.pop("train", {})},
        }
    )


def test_offline_mask_kd_loads_only_the_teachers_decoder(sam2_store: tuple[Path, Path], synthetic_data_yaml: Path) -> None:
    root, checkpoint = sam2_store
    trainer = build_trainer(_config(root, checkpoint, synthetic_data_yaml, offline_ratio=1.0, steps=2))
    trainer.train()
    runtime = trainer.model.distiller.teachers
    assert runtime._online == {}  # the image encoder was never built
    assert trainer.step_values[TERM] > 0
    decoder = runtime._decoders["sam2"]
    assert sum(p.numel() for p in decoder.parameters()) < 5_000_000


def test_mask_kd_config_errors_name_the_key(sam2_store: tuple[Path, Path], synthetic_data_yaml: Path) -> None:
    root, checkpoint = sam2_store
    config = _config(root, checkpoint, synthetic_data_yaml, offline_ratio=1.0, steps=1)
    config.distillation.losses["sam2_masks"].params = {"decode_iters": 1, "colour": "red"}
    with pytest.raises(ConfigError, match=r"distillation.losses.sam2_masks.params: .*colour"):
        build_trainer(config)
    config.distillation.losses["sam2_masks"].params = {}
    config.model.heads.pop("segmentation")
    config.model.heads["detection"] = {"type": "yolo_head", "num_classes": 6}
    with pytest.raises(ConfigError, match=r"sam2_masks.student: .*add a sam_mask_head"):
        build_trainer(config)


def _agreement(trainer: Any) -> float:
    """Mean student-vs-teacher mask IoU over the ground-truth box prompts of one batch of the data."""
    runtime = trainer.model.distiller.teachers
    loss = trainer.model.distiller.losses["sam2__masks__segmentation"]
    # NOTE: batch statistics (train mode): after a short run BatchNorm's running statistics
    # still hold much of their initial values, which the masks of a run this short do not show.
    student = trainer.model.student
    batch = batch_to_device(next(iter(trainer.train_loader)), trainer.device)
    targets = batch["targets"]
    with torch.no_grad():
        outputs = student(batch["images"])["segmentation"]
        records = runtime.decoder_records(batch, trainer.device, "sam2")
        groups = [
            (row, 0, {"boxes": targets["boxes"][targets["batch_idx"] == row]})
            for row in range(len(records))
            if bool((targets["batch_idx"] == row).any())
        ]
        ious = loss.agreement(student.heads["segmentation"], outputs, runtime.prompt_decoder("sam2", trainer.device), records, groups)
    return float(ious.mean())


@pytest.mark.slow
def test_mask_kd_brings_the_students_masks_to_the_teachers(sam2_store: tuple[Path, Path], synthetic_data_yaml: Path) -> None:
    """With the ground-truth mask loss weighted 0, mask_kd alone (offline, fixed seed) raises the
    student-teacher mask mIoU on the data's box prompts by at least 0.1 in 75 steps (~45 s here).

    A random-init SAM 2 decoder answers nearly every prompt with the same blob (the student
    agrees with it 0.7 from the start), so the teacher's decoder here is one with structure:
    the prompt's box, or a disc around its first click (:class:`_CountingDecoder`), run
    through the same frames, store records and refinement loop.
    """
    root, checkpoint = sam2_store
    no_augment = {"mosaic": 0.0, "fliplr": 0.0, "scale": 0.0, "translate": 0.0, "hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0}
    config = _config(
        root, checkpoint, synthetic_data_yaml, offline_ratio=1.0, steps=75,
        losses={"segmentation": {"weight": 0.0}},
        data={"augment": no_augment, "batch_size": 8},
        train={"lr": 2e-3, "ema": False, "warmup_steps": 5, "log_interval": 20},
    )
    trainer = build_trainer(config)
    trainer.model.distiller.teachers._decoders["sam2"] = _CountingDecoder()
    trainer.model.distiller.losses["sam2__masks__segmentation"].point_probability = 0.0
    before = _agreement(trainer)
    trainer.train()
    after = _agreement(trainer)
    print("agreement", before, after)
    assert after >= before + 0.1, (before, after)


def test_prompt_miou_also_measures_the_student_against_the_teacher(
    sam2_store: tuple[Path, Path], synthetic_data_yaml: Path
) -> None:
    """With a mask term whose teacher can run on the validation images, training evaluation
    reports ``miou_teacher/<prompt>``; the teacher's masks come back in the student's frame."""
    from vfmkd.distillation.mask_kd import TeacherSegmenter
    from vfmkd.evaluation import PromptMIoUEvaluator

    root, checkpoint = sam2_store
    config = _config(root, checkpoint, synthetic_data_yaml, offline_ratio=0.5, steps=1, train={"eval_interval": 1})
    trainer = build_trainer(config)
    result = trainer.train()
    for key in ("box", "box+2", "point", "point+1"):
        assert 0.0 <= result["metrics"][f"miou_teacher/{key}"] <= 1.0
    evaluators = [hook for hook in trainer.hooks if hasattr(hook, "evaluators")][0].evaluators
    assert any(isinstance(e, PromptMIoUEvaluator) and e.teacher_segment is not None for e in evaluators)

    # The teacher's box masks (a box-shaped stand-in decoder) land on the boxes in the student input.
    runtime = trainer.model.distiller.teachers
    runtime._decoders["sam2"] = _CountingDecoder()
    dataset = build_dataset({"dataset": str(synthetic_data_yaml), "img_size": IMG_SIZE, "load_masks": True}, "val", train=False)
    from vfmkd.datasets.collate import collate_samples

    batch = batch_to_device(collate_samples([dataset[0], dataset[1]]), trainer.device)
    targets = batch["targets"]
    prompts = [{"boxes": targets["boxes"][targets["batch_idx"] == row]} for row in range(2)]
    results = TeacherSegmenter(runtime, "sam2")(batch, prompts)
    ious = []
    for image_prompts, result in zip(prompts, results):
        for box, mask in zip(image_prompts["boxes"], result["masks"]):
            expected = torch.zeros(IMG_SIZE, IMG_SIZE, dtype=torch.bool)
            x0, y0, x1, y1 = box.round().long().tolist()
            expected[y0:y1, x0:x1] = True
            ious.append(mask_iou((mask > 0)[None], expected[None]).item())
    # NOTE: the teacher's masks have 4-pixel cells at its 128-pixel input: small boxes lose some IoU.
    assert len(ious) >= 4 and min(ious) >= 0.6 and sum(ious) / len(ious) >= 0.8, ious


def test_a_plain_image_folder_trains_the_mask_head_from_the_teachers_masks_alone(
    sam2_store: tuple[Path, Path], synthetic_data_yaml: Path, tmp_path: Path
) -> None:
    """Unlabelled images (a folder, no labels): no task loss, mask_kd prompted by a grid, the
    teacher live (these images are not in its store)."""
    import shutil

    root, checkpoint = sam2_store
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for image in sorted((synthetic_data_yaml.parent / "images" / "train").glob("*.jpg"))[:4]:
        shutil.copy(image, folder / image.name)
    config = _config(root, checkpoint, synthetic_data_yaml, offline_ratio=0.0, steps=2,
                     data={"dataset": str(folder), "val_split": "train"})
    config.teachers["sam2"].feature_path = None
    config.teachers["sam2"].offline = False
    trainer = build_trainer(config)
    trainer.train()
    assert trainer.step_values[TERM] > 0
    assert not any(name.startswith("seg/") for name in trainer.step_values)
    # The student's decoder gets its gradient from the teacher's masks.
    losses = trainer.model(batch_to_device(next(iter(trainer.train_loader)), trainer.device))
    assert set(losses) == {TERM}
    losses[TERM].backward()
    weight = trainer.model.student.heads["segmentation"].mask_decoder.output_hypernetworks_mlps[0].layers[0].weight
    assert weight.grad.abs().sum() > 0
