"""Where a training sample's teacher features come from: the store (offline) or the teacher (online).

Per teacher and per sample, a draw decides offline or online (``offline_ratio``; the draw
is made in the data loader worker from the sample's own seed, so it is reproducible and
resumable). Offline samples read their cached maps in the worker
(:class:`DistillationDataset`), one record per source image (a mosaic has up to four),
together with the frame each record was computed in; on the device the maps are warped
into the student's frame (:func:`offline_features`). Online samples run the teacher on
the augmented image itself (:func:`online_features`). A sample missing from the store is
computed online; with ``write_back`` its primary image is also prepared for the store
(see :mod:`vfmkd.distillation.write_back`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from vfmkd.datasets.collate import collate_samples
from vfmkd.features.format import mirrored_id
from vfmkd.features.store import FeatureStore
from vfmkd.geometry import Frame, FrameWarp, merge_tiles, warp_features_batch

OFFLINE_KEY = "teacher_offline"
WRITE_BACK_KEY = "teacher_write_back"


@dataclass(frozen=True)
class OfflinePlan:
    """What the worker reads for one teacher.

    Attributes:
        teacher: the teacher's key in the config.
        store_path: the feature store's folder.
        features: feature names to read.
        offline_ratio: probability that a sample is served from the store.
        write_back: the teacher's CPU preprocessing (``image [H, W, 3] uint8 -> (pixels
            [3, S, S], frame)``) when samples missing from the store are written back;
            None otherwise.
        only_ids: read only these sample ids from the store (the others go live); None:
            every id the store holds.
    """

    teacher: str
    store_path: str
    features: tuple[str, ...]
    offline_ratio: float
    write_back: Callable[[np.ndarray], tuple[torch.Tensor, Frame]] | None = None
    only_ids: frozenset[str] | None = None


class DistillationDataset(Dataset):
    """Wraps a training data set: adds each offline teacher's cached maps to every sample.

    ``sample["teacher_offline"][teacher]`` is None (online: draw, or a source image missing
    from the store) or a dict with ``features`` (name -> float16 ``[T, C, H, W]``, one row
    per source image of the sample) and ``frames`` (T teacher frames). The draw uses
    python's ``random``, which the trainer seeds per sample and epoch.

    For a plan with ``write_back``, ``sample["teacher_write_back"][teacher]`` holds, when the
    sample's primary image is missing from the store, that image loaded clean and
    preprocessed for the teacher: ``id``, ``pixels`` (float32 ``[3, S, S]``) and ``frame``
    (a :meth:`~vfmkd.geometry.Frame.to_dict`). Such a plan's store is reopened whenever the
    epoch changes (:meth:`set_epoch`, which the trainer's sampler wrapper calls in every
    worker), so samples written during an epoch are read offline from the next one on.

    Args:
        dataset: the training data set (samples with ``source_ids`` and ``frames``; with
            write-back also ``ids`` and ``load_raw(index)``).
        plans: one per teacher with a store.
    """

    def __init__(self, dataset: Dataset, plans: Sequence[OfflinePlan]) -> None:
        self.dataset = dataset
        self.plans = list(plans)
        self._stores: dict[str, Any] = {}
        self._writes_back = any(plan.write_back is not None for plan in self.plans)
        if self._writes_back and not (hasattr(dataset, "ids") and hasattr(dataset, "load_raw")):
            raise TypeError(
                f"write_back needs a data set with `ids` and `load_raw(index)`; {type(dataset).__name__} has not"
            )

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    @property
    def has_labels(self) -> bool:
        """Whether the wrapped data set has labels."""
        return bool(getattr(self.dataset, "has_labels", True))

    @property
    def names(self) -> Any:
        """The wrapped data set's class names."""
        return self.dataset.names

    @property
    def mosaic_active(self) -> bool:
        """Whether the wrapped data set may make mosaics."""
        return bool(getattr(self.dataset, "mosaic_active", False))

    def close_mosaic(self) -> None:
        """Stop the wrapped data set's mosaics (offline rows follow each tile's frame either way)."""
        self.dataset.close_mosaic()

    def set_epoch(self, epoch: int) -> None:
        """A new epoch: reopen write-back stores (they may hold new shards) and tell the data set."""
        for plan in self.plans:
            if plan.write_back is not None:
                self._stores.pop(plan.teacher, None)
        inner = getattr(self.dataset, "set_epoch", None)
        if callable(inner):
            inner(epoch)

    def _store(self, plan: OfflinePlan) -> Any:
        # Opened lazily in each worker process: memory maps do not cross a fork well.
        store = self._stores.get(plan.teacher)
        if store is None:
            store = self._stores[plan.teacher] = FeatureStore.open(plan.store_path)
        return store

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.dataset[index]
        source_ids = sample.get("source_ids") or [sample["id"]]
        offline: dict[str, Any] = {}
        for plan in self.plans:
            # NOTE: drawn for every mixed plan, in order, whatever the outcome, so each
            # teacher's draw does not depend on the others' store contents; a plan that is
            # all offline draws nothing (evaluation must not move the training generators).
            use_store = plan.offline_ratio >= 1.0 or (plan.offline_ratio > 0.0 and random.random() < plan.offline_ratio)
            store = self._store(plan)
            allowed = plan.only_ids
            if not use_store or any(
                source_id not in store or (allowed is not None and source_id not in allowed) for source_id in source_ids
            ):
                offline[plan.teacher] = None
                continue
            # A flipped source image reads its mirror image's record when the store has
            # one (``features extract --fliplr``): a teacher's channels are rarely
            # mirror-symmetric, so the flip cannot be left to the warp.
            record_ids = [
                _record_id(store, source_id, frame) for source_id, frame in zip(source_ids, sample["frames"])
            ]
            # NOTE: maps travel as the store's float16 (copied straight from the memory
            # map, no decode); global vectors stay float32.
            spatial = [name for name in plan.features if store.specs[name].stride]
            vectors = [name for name in plan.features if not store.specs[name].stride]
            maps = store.read_many(record_ids, spatial, dtype=np.float16) if spatial else {}
            if vectors:
                maps.update(store.read_many(record_ids, vectors))
            offline[plan.teacher] = {
                "features": {name: torch.from_numpy(maps[name]) for name in plan.features},
                "frames": [store.frame(record_id) for record_id in record_ids],
            }
        sample[OFFLINE_KEY] = offline
        if self._writes_back:
            sample[WRITE_BACK_KEY] = self._write_back_inputs(index)
        return sample

    def _write_back_inputs(self, index: int) -> dict[str, dict[str, Any]]:
        """Per write-back teacher whose store lacks the primary image: its clean teacher input."""
        sample_id = self.dataset.ids[index]  # type: ignore[attr-defined]
        inputs: dict[str, dict[str, Any]] = {}
        raw = None
        for plan in self.plans:
            if plan.write_back is None or sample_id in self._store(plan):
                continue
            if raw is None:
                raw = self.dataset.load_raw(index)  # type: ignore[attr-defined]
            if raw["id"] != sample_id:
                break  # unreadable: load_raw substituted another image
            pixels, frame = plan.write_back(raw["image"])
            inputs[plan.teacher] = {"id": sample_id, "pixels": pixels, "frame": frame.to_dict()}
        return inputs


def _record_id(store: FeatureStore, source_id: str, frame: Frame) -> str:
    """The store record to read for a source image shown in ``frame``: its mirror image's
    when the frame is mirrored and the store holds one, else its own."""
    if frame.mirrored:
        mirrored = mirrored_id(source_id)
        if mirrored in store:
            return mirrored
    return source_id


class TeacherFeatureCollate:
    """A collate function (default :func:`~vfmkd.datasets.collate.collate_samples`) plus the offline teacher records.

    See :func:`collate_with_teacher_features`; picklable, so loader workers can use it.
    """

    def __init__(self, collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]] = collate_samples) -> None:
        self.collate_fn = collate_fn

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_with_teacher_features(samples, self.collate_fn)


def collate_with_teacher_features(
    samples: list[dict[str, Any]], collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]] = collate_samples
) -> dict[str, Any]:
    """``collate_fn`` (default :func:`~vfmkd.datasets.collate.collate_samples`) plus the offline teacher records.

    Adds ``teacher_offline``: teacher -> dict with ``samples`` (int64 ``[B_off]``, the batch
    rows served offline), ``tile_sample`` (int64 ``[T]``, row of each record), ``features``
    (name -> ``[T, C, H, W]``), ``teacher_frames`` and ``student_frames`` (T frames each).
    Samples of a write-back data set add ``teacher_write_back``: teacher -> dict with
    ``ids`` (N), ``pixels`` (float32 ``[N, 3, S, S]``) and ``frames`` (N frame dicts), the
    batch's primary images missing from that teacher's store (empty dict when none is).
    """

    batch = collate_fn(samples)
    if any(WRITE_BACK_KEY in sample for sample in samples):
        pending: dict[str, dict[str, Any]] = {}
        for sample in samples:
            for teacher, item in sample.get(WRITE_BACK_KEY, {}).items():
                entry = pending.setdefault(teacher, {"ids": [], "pixels": [], "frames": []})
                entry["ids"].append(item["id"])
                entry["pixels"].append(item["pixels"])
                entry["frames"].append(item["frame"])
        for entry in pending.values():
            entry["pixels"] = torch.stack(entry["pixels"])
        batch[WRITE_BACK_KEY] = pending
    teachers = sorted({name for sample in samples for name in sample.get(OFFLINE_KEY, {})})
    gathered: dict[str, Any] = {}
    for teacher in teachers:
        rows, tile_rows, teacher_frames, student_frames = [], [], [], []
        features: dict[str, list[torch.Tensor]] = {}
        for row, sample in enumerate(samples):
            record = sample[OFFLINE_KEY].get(teacher)
            if record is None:
                continue
            rows.append(row)
            count = len(record["frames"])
            tile_rows += [row] * count
            teacher_frames += record["frames"]
            student_frames += list(sample["frames"][:count])
            for name, maps in record["features"].items():
                features.setdefault(name, []).append(maps)
        gathered[teacher] = {
            "samples": torch.tensor(rows, dtype=torch.int64),
            "tile_sample": torch.tensor(tile_rows, dtype=torch.int64),
            "features": {name: torch.cat(maps) for name, maps in features.items()},
            "teacher_frames": teacher_frames,
            "student_frames": student_frames,
        }
    batch[OFFLINE_KEY] = gathered
    return batch


def offline_features(
    record: dict[str, Any],
    requests: Sequence[tuple[str, int, tuple[int, int], float]],
    batch_size: int,
    device: torch.device,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Warp one teacher's cached maps into the student's frame, on the student's grids.

    Each record (a source image of a sample) is warped through its own frames (teacher
    frame -> original image -> student frame) and records of one sample (mosaic tiles) are
    merged; global vectors (stride 0) are averaged over the sample's records. The frame
    chains are composed once for all requests.

    Args:
        record: the teacher's entry of the batch's ``teacher_offline``.
        requests: ``(feature, teacher stride, grid (Hg, Wg), grid stride)`` per map.
        batch_size: B, the batch's row count.
        device: where the maps go.

    Returns:
        rows: int64 ``[B_off]`` batch rows served offline.
        per request: ``[B_off, C, Hg, Wg]`` float32 maps (``[B_off, C, 1, 1]`` for global
        vectors) and ``[B_off, 1, Hg, Wg]`` bool valid.
    """
    rows = record["samples"].to(device)
    tile_sample = record["tile_sample"].to(device)
    # Tiles index into the offline rows, not the whole batch.
    position = torch.full((batch_size,), -1, dtype=torch.int64, device=device)
    position[rows] = torch.arange(len(rows), device=device)
    tile_index = position[tile_sample]
    # One record per offline sample (no mosaic): records are already in row order.
    one_per_sample = len(record["tile_sample"]) == len(record["samples"])
    warp = None
    out = []
    for feature, teacher_stride, grid, grid_stride in requests:
        maps = record["features"][feature].to(device, non_blocking=True).float()
        if teacher_stride == 0:
            merged = maps.new_zeros((len(rows), *maps.shape[1:]))
            merged.index_add_(0, tile_index, maps)
            counts = torch.bincount(tile_index, minlength=len(rows)).clamp(min=1)
            valid = torch.ones((len(rows), 1, 1, 1), dtype=torch.bool, device=device)
            out.append((merged / counts.view(-1, 1, 1, 1).to(merged.dtype), valid))
            continue
        if warp is None:
            warp = FrameWarp(record["teacher_frames"], record["student_frames"], device)
        warped, valid = warp.warp(maps, teacher_stride, grid, grid_stride)
        out.append((warped, valid) if one_per_sample else merge_tiles(warped, valid, tile_index, len(rows)))
    return rows, out


def student_input_region(frames: Sequence[Frame]) -> tuple[float, float, float, float]:
    """The box around every source image's valid region in a student input (mosaic: the
    union of the tiles; letterbox: the image without padding)."""
    regions = np.array([frame.valid for frame in frames], dtype=np.float64)
    return (
        float(regions[:, 0].min()),
        float(regions[:, 1].min()),
        float(regions[:, 2].max()),
        float(regions[:, 3].max()),
    )


def online_features(
    teacher: Any,
    images: torch.Tensor,
    frames: Sequence[Sequence[Frame]],
    feature_requests: Sequence[tuple[str, tuple[int, int], float]],
    computed: tuple[dict[str, torch.Tensor], Sequence[Frame]] | None = None,
) -> dict[tuple[str, tuple[int, int], float], tuple[torch.Tensor, torch.Tensor]]:
    """Run ``teacher`` on augmented student inputs and put its maps on student grids.

    Args:
        teacher: a :class:`~vfmkd.teachers.base.BaseTeacher` on the images' device.
        images: ``[B, 3, H, W]`` float student inputs in ``[0, 1]``.
        frames: per image, its frames (for the valid region).
        feature_requests: ``(feature, grid (Hg, Wg), grid stride)`` triples.
        computed: the teacher's features and frames on ``images`` when already computed.

    Returns:
        request -> (``[B, C, Hg, Wg]`` float32 maps, ``[B, 1, Hg, Wg]`` bool valid).
    """
    height, width = images.shape[-2:]
    if computed is None:
        pixels, teacher_frames = teacher.preprocess_tensor(images)
        features = teacher.extract(pixels)
    else:
        features, teacher_frames = computed
    # Online maps live in "student input -> teacher input" frames; the student side is
    # the identity on the student input, valid where image content is.
    student_frames = [
        Frame.identity(height, width).then(np.eye(2, 3), (height, width), valid=student_input_region(sample_frames))
        for sample_frames in frames
    ]
    out = {}
    for request in feature_requests:
        name, grid, grid_stride = request
        # NOTE: clone() turns the teacher's inference-mode tensors into ordinary ones
        # that a loss may save for backward.
        maps = features[name].float().clone()
        stride = teacher.feature_specs[name].stride
        if stride == 0:
            out[request] = (maps, torch.ones((len(maps), 1, 1, 1), dtype=torch.bool, device=maps.device))
            continue
        out[request] = warp_features_batch(maps, teacher_frames, stride, student_frames, grid, grid_stride)
    return out
