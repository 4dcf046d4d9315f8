"""Offline extraction: run a teacher over a data set once and fill a feature store.

The pipeline keeps the accelerator busy:

- DataLoader workers load each original image (``dataset.load_raw``) and run the
  teacher's CPU preprocessing (decode, resize, normalise) and frame;
- the main thread runs the batched teacher forward under ``torch.inference_mode()`` in
  float32 and moves the maps to the CPU;
- a background writer thread, fed through a bounded queue, encodes the maps, computes
  per-channel sums and commits shards while the next batch is computed.

Resume: samples already committed are skipped, so re-running the same command after an
interruption (SIGKILL included) completes the store, each sample exactly once, with the
same values as an uninterrupted run. Under ``torchrun`` each rank takes every
``world_size``-th missing sample and writes its own shards; rank 0 prepares the store
first and writes the final manifest after all ranks are done.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import queue
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vfmkd.utils.distributed import barrier, get_rank, get_world_size, resolve_device
from vfmkd.features.codecs import get_codec
from vfmkd.features.format import StoreCorruptError, StoreHeader, mirrored_id, read_shard_records
from vfmkd.features.store import FeatureStore
from vfmkd.features.writer import ShardWriter, StoreLock, finalize_store, prepare_store_for_writing
from vfmkd.geometry import Frame, hflip_matrix
from vfmkd.teachers.base import BaseTeacher

__all__ = [
    "BackgroundWriter",
    "cpu_preprocessor",
    "default_shard_size",
    "extract_features",
    "teacher_input",
    "verify_against_teacher",
]

logger = logging.getLogger(__name__)

# Bytes of encoded features a shard aims at: big enough for few files, small enough
# that an interruption loses little work and the writer's buffer stays small.
SHARD_TARGET_BYTES = 256 << 20
MAX_SHARD_SIZE = 1024
WRITER_QUEUE_BATCHES = 2

Preprocessor = Callable[[np.ndarray], tuple[torch.Tensor, Frame]]


def default_shard_size(header: StoreHeader) -> int:
    """Samples per shard so that a shard holds about :data:`SHARD_TARGET_BYTES`."""
    codec = get_codec(header.codec)
    per_sample = sum(codec.bytes_per_sample(spec.channels, spec.height, spec.width) for spec in header.specs.values())
    return int(max(1, min(MAX_SHARD_SIZE, SHARD_TARGET_BYTES // max(per_sample, 1))))


# --------------------------------------------------------------------------- data side
def cpu_preprocessor(teacher: BaseTeacher, probe: np.ndarray | None = None) -> Preprocessor:
    """A copy of ``teacher.preprocess_image`` that carries no parameters or GPU tensors.

    DataLoader workers get this instead of the teacher, so a spawned worker is not sent
    the model's weights and a forked one never touches the GPU. When the light copy does
    not reproduce the teacher's output on ``probe`` (its preprocessing needs a
    submodule), the teacher's own method is used.

    Args:
        teacher: the teacher.
        probe: an RGB uint8 ``[H, W, 3]`` image to check the copy on.
    """
    light = copy.copy(teacher)
    light.__dict__["_parameters"] = {}
    light.__dict__["_modules"] = {}
    light.__dict__["_buffers"] = {name: value.detach().cpu() for name, value in teacher._buffers.items()}
    if probe is None:
        return light.preprocess_image
    try:
        pixels, frame = light.preprocess_image(probe)
        same = torch.equal(pixels, teacher.preprocess_image(probe)[0])
    except (AttributeError, KeyError, TypeError, RuntimeError) as error:
        logger.debug("teacher preprocessing needs the full module (%s); workers get the teacher", error)
        return teacher.preprocess_image
    return light.preprocess_image if same else teacher.preprocess_image


def teacher_input(image: np.ndarray, preprocess: Preprocessor, mirrored: bool = False) -> tuple[torch.Tensor, Frame]:
    """The teacher's input for an original image, or for its left-right mirror image.

    A mirrored input's frame starts from the unmirrored original (the flip composed in
    front of the preprocessing), so its maps warp into any student frame like the others.
    Stores extracted with ``fliplr`` keep them under :func:`~vfmkd.features.format.mirrored_id`;
    an offline training sample whose augmentation flipped it reads that record instead of
    the unmirrored one, since a teacher's channels are rarely mirror-symmetric.
    """
    if not mirrored:
        return preprocess(image)
    height, width = image.shape[:2]
    pixels, frame = preprocess(np.ascontiguousarray(image[:, ::-1]))
    flip = Frame.identity(height, width).then(hflip_matrix(width), (height, width))
    return pixels, flip.compose(frame)


class _ExtractionSamples(Dataset):
    """Samples to compute: ``(id, pixels [3, S, S], frame dict)``, or None when unreadable.

    A job is ``(index, mirrored)``: a mirrored job stores the mirror image under
    :func:`~vfmkd.features.format.mirrored_id`.
    """

    def __init__(self, dataset: Any, jobs: Sequence[tuple[int, bool]], preprocess: Preprocessor) -> None:
        self.dataset = dataset
        self.jobs = list(jobs)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, position: int) -> tuple[str, torch.Tensor, dict[str, Any]] | None:
        index, mirrored = self.jobs[position]
        expected_id = self.dataset.ids[index]
        raw = self.dataset.load_raw(index)
        if raw["id"] != expected_id:
            # load_raw substituted a readable image for an unreadable one: skip it.
            return None
        pixels, frame = teacher_input(raw["image"], self.preprocess, mirrored)
        return (mirrored_id(expected_id) if mirrored else expected_id), pixels, frame.to_dict()


def _collate(
    samples: list[tuple[str, torch.Tensor, dict[str, Any]] | None]
) -> tuple[list[str], torch.Tensor | None, list[dict[str, Any]], int]:
    kept = [sample for sample in samples if sample is not None]
    pixels = torch.stack([sample[1] for sample in kept]) if kept else None
    return [sample[0] for sample in kept], pixels, [sample[2] for sample in kept], len(samples) - len(kept)


# --------------------------------------------------------------------------- writer side
class BackgroundWriter:
    """Runs a :class:`ShardWriter` in a thread fed by a bounded queue.

    Used by extraction and by training's write-back: the caller's thread computes the
    next batch while this one encodes and commits shards.
    """

    _STOP = object()

    def __init__(self, writer: ShardWriter, max_batches: int = WRITER_QUEUE_BATCHES) -> None:
        self.writer = writer
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_batches)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="feature-store-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._STOP:
                return
            if self._error is not None:
                continue  # drain after a failure so the producer never blocks
            try:
                self.writer.add(*item)
            except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
                self._error = error

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, ids: list[str], frames: list[dict[str, Any]], features: dict[str, np.ndarray]) -> None:
        """Queue one batch (blocks while the queue is full); raises the writer's error."""
        self._raise_if_failed()
        self._queue.put((ids, frames, features))

    def close(self, commit: bool = True) -> None:
        """Finish the queued batches and, with ``commit``, the last partial shard."""
        self._queue.put(self._STOP)
        self._thread.join()
        self._raise_if_failed()
        if commit:
            self.writer.flush()


# --------------------------------------------------------------------------- entry point
def extract_features(
    teacher: BaseTeacher,
    dataset: Any,
    out_dir: str | Path,
    *,
    dtype: str = "float16",
    batch_size: int = 8,
    num_workers: int = 2,
    limit: int | None = None,
    shard_size: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    data_source: str | None = None,
    data_resolved: str | None = None,
    split: str | None = None,
    build_args: dict[str, Any] | None = None,
    verify_existing: bool = False,
    fliplr: bool = False,
) -> FeatureStore:
    """Compute a teacher's features for a data set into a store (resumable).

    Args:
        teacher: the teacher; its requested ``feature_specs`` are stored.
        dataset: a data set with ``ids`` and ``load_raw(index)`` (``image`` RGB uint8
            ``[H, W, 3]`` in original pixels, ``id``).
        out_dir: the store directory (created, or resumed when it exists).
        dtype: codec: ``float16``, ``bfloat16``, ``float32`` or ``int8``.
        batch_size: images per teacher forward.
        num_workers: DataLoader worker processes for loading and preprocessing.
        limit: only the first ``limit`` samples of the data set.
        shard_size: samples per shard (default: about 256 MB of features).
        device: where the teacher runs (``auto``: this rank's GPU if any; default: where
            the teacher already is).
        progress: show a progress bar (rank 0).
        data_source: the data set as the user named it (for the manifest).
        data_resolved: the resolved data set path (for ``features verify``).
        split: the split name (for the manifest).
        build_args: how to rebuild the teacher (for ``features verify``).
        verify_existing: hash every committed shard before resuming.
        fliplr: also store each image's mirror image (see :func:`teacher_input`), which
            flipped training samples read; twice the time and size; a resume on a store without.

    Returns:
        The store, opened for reading.

    Raises:
        StoreMismatchError: ``out_dir`` holds features of another teacher, codec,
            feature list or split.
    """
    root = Path(out_dir)
    rank, world_size = get_rank(), get_world_size()
    teacher, run_device = _frozen_on_device(teacher, device)
    sample_ids = list(dataset.ids)
    count = len(sample_ids) if limit is None else min(int(limit), len(sample_ids))
    header = StoreHeader(
        teacher=teacher.name,
        fingerprint_fields=teacher.fingerprint_fields(),
        codec=dtype,
        specs=dict(teacher.feature_specs),
        split=split,
        data_source=data_source,
        data_resolved=data_resolved,
        build_args=dict(build_args or {}),
        requested_samples=count * (2 if fliplr else 1),
    )
    # One extraction per store: rank 0 holds the lock for the whole job.
    with StoreLock(root) if rank == 0 else contextlib.nullcontext():
        if rank == 0:
            prepare_store_for_writing(root, header, verify_existing=verify_existing)
        barrier()
        _compute_missing_samples(
            teacher, dataset, root, header, sample_ids, count,
            rank=rank, world_size=world_size, device=run_device, shard_size=shard_size,
            batch_size=batch_size, num_workers=num_workers, progress=progress and rank == 0, fliplr=fliplr,
        )
        barrier()
        if rank == 0:
            _finalize_extraction(root, header, header.requested_samples or count)
        barrier()
    return FeatureStore.open(root)


def _frozen_on_device(
    teacher: BaseTeacher, device: str | torch.device | None
) -> tuple[BaseTeacher, torch.device]:
    """The frozen teacher, moved to ``device`` when one is given, and the device it runs on."""
    if device is not None:
        teacher = teacher.to(resolve_device(device))
    teacher.freeze()
    return teacher, next((parameter.device for parameter in teacher.parameters()), torch.device("cpu"))


def _compute_missing_samples(
    teacher: BaseTeacher,
    dataset: Any,
    root: Path,
    header: StoreHeader,
    sample_ids: Sequence[str],
    count: int,
    *,
    rank: int,
    world_size: int,
    device: torch.device,
    shard_size: int | None,
    batch_size: int,
    num_workers: int,
    progress: bool,
    fliplr: bool = False,
) -> None:
    """Compute this rank's share of the samples the store lacks and commit them as shards.

    Args:
        sample_ids: the ids of ``dataset``; the extraction covers the first ``count``.
        rank: this rank; it takes every ``world_size``-th missing sample and numbers its
            shards on from its last committed one.
        fliplr: also the mirror images (see :func:`extract_features`).
    """
    records, problems = read_shard_records(root, header.specs, header.codec, header.fingerprint)
    if problems:
        raise StoreCorruptError("; ".join(problem.message for problem in problems))
    committed = {sample_id for record in records for sample_id in record.ids}
    variants = (False, True) if fliplr else (False,)
    pending = [
        (index, mirrored)
        for index in range(count)
        for mirrored in variants
        if (mirrored_id(sample_ids[index]) if mirrored else sample_ids[index]) not in committed
    ]
    mine = pending[rank::world_size]
    logger.info(
        "%s: %d of %d samples stored, %d to compute (%d on this rank), teacher %s on %s, codec %s",
        root, count * len(variants) - len(pending), count * len(variants), len(pending), len(mine), teacher.name,
        device, header.codec,
    )
    if not mine:
        return
    writer = ShardWriter(
        root,
        header,
        rank=rank,
        shard_size=shard_size or default_shard_size(header),
        start_index=1 + max((record.index for record in records if record.rank == rank), default=-1),
    )
    probe = dataset.load_raw(mine[0][0])["image"]
    samples = _ExtractionSamples(dataset, mine, cpu_preprocessor(teacher, probe))
    _run(teacher, samples, writer, device, batch_size, num_workers, progress)


def _finalize_extraction(root: Path, header: StoreHeader, count: int) -> None:
    """Write the final manifest (rank 0, after every rank) and warn when samples are missing."""
    manifest = finalize_store(root, header)
    if manifest["num_samples"] < count:
        logger.warning(
            "%s holds %d of %d samples (unreadable images were skipped)",
            root, manifest["num_samples"], count,
        )


def _run(
    teacher: BaseTeacher,
    samples: _ExtractionSamples,
    writer: ShardWriter,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    progress: bool,
) -> None:
    from tqdm import tqdm

    loader = DataLoader(
        samples,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    background = BackgroundWriter(writer)
    skipped = 0
    bar = tqdm(total=len(samples), unit="img", desc="extract", disable=not progress, dynamic_ncols=True)
    try:
        for ids, pixels, frames, unreadable in loader:
            skipped += unreadable
            if pixels is not None:
                with torch.inference_mode():
                    features = teacher.extract(pixels.to(device, non_blocking=True))
                    arrays = {
                        name: value.to("cpu", torch.float32).contiguous().numpy() for name, value in features.items()
                    }
                background.put(ids, frames, arrays)
            bar.update(len(ids) + unreadable)
    except BaseException:
        # Keep what was fully computed: the queued batches become shards.
        try:
            background.close(commit=True)
        except BaseException as error:  # noqa: BLE001 - the first error is the one to report
            logger.debug("writer failed while stopping: %s", error)
        raise
    finally:
        bar.close()
    background.close(commit=True)
    if skipped:
        logger.warning("skipped %d unreadable image(s); run `vfmkd data check` to list them", skipped)
    logger.info(
        "rank %d wrote %d samples in %d shard(s) under %s",
        writer.rank, writer.committed_samples, writer.committed_shards, writer.shards,
    )


# --------------------------------------------------------------------------- verification
def verify_against_teacher(
    store: FeatureStore,
    teacher: BaseTeacher,
    dataset: Any,
    *,
    num: int = 8,
    seed: int = 0,
    batch_size: int = 4,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Recompute random stored samples with the teacher and compare.

    Args:
        store: the store.
        teacher: the teacher rebuilt from the store's manifest.
        dataset: the data set the store was extracted from (``ids``, ``load_raw``).
        num: samples to recompute (chosen at random among the stored ones in ``dataset``).
        seed: seed of the choice.
        batch_size: images per forward.
        device: where the teacher runs (default: where it is).

    Returns:
        ``samples`` (how many were compared), ``frames_equal`` (how many stored frames
        equal the recomputed ones), and per feature ``max_abs_error``, ``min_cosine`` and
        ``mean_cosine`` (cosine of each sample's flattened map, stored vs recomputed).
    """
    if device is not None:
        teacher = teacher.to(resolve_device(device))
    teacher.freeze()
    run_device = next((parameter.device for parameter in teacher.parameters()), torch.device("cpu"))
    position = {sample_id: index for index, sample_id in enumerate(dataset.ids)}
    # Mirrored records (fliplr) are recomputed from their image's mirror image.
    source = {sample_id: (sample_id, False) for sample_id in position}
    source.update({mirrored_id(sample_id): (sample_id, True) for sample_id in position})
    candidates = [sample_id for sample_id in store.ids if sample_id in source]
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(candidates), size=min(num, len(candidates)), replace=False).tolist())
    names = list(store.specs)
    errors = {name: 0.0 for name in names}
    cosines: dict[str, list[float]] = {name: [] for name in names}
    frames_equal = 0
    for start in range(0, len(chosen), batch_size):
        batch_ids = [candidates[index] for index in chosen[start : start + batch_size]]
        prepared = [
            teacher_input(dataset.load_raw(position[source[sample_id][0]])["image"], teacher.preprocess_image,
                          source[sample_id][1])
            for sample_id in batch_ids
        ]
        frames_equal += sum(frame.isclose(store.frame(sample_id)) for (_, frame), sample_id in zip(prepared, batch_ids))
        with torch.inference_mode():
            computed = teacher.extract(torch.stack([pixels for pixels, _ in prepared]).to(run_device))
        stored = store.read_many(batch_ids, names)
        for name in names:
            fresh = computed[name].to("cpu", torch.float32).numpy().reshape(len(batch_ids), -1).astype(np.float64)
            kept = stored[name].reshape(len(batch_ids), -1).astype(np.float64)
            errors[name] = max(errors[name], float(np.abs(fresh - kept).max()) if fresh.size else 0.0)
            norms = np.linalg.norm(fresh, axis=1) * np.linalg.norm(kept, axis=1)
            dots = (fresh * kept).sum(axis=1)
            cosines[name].extend(np.where(norms > 0, dots / np.maximum(norms, 1e-300), 1.0).tolist())
    return {
        "samples": len(chosen),
        "frames_equal": int(frames_equal),
        "features": {
            name: {
                "max_abs_error": errors[name],
                "min_cosine": min(cosines[name]) if cosines[name] else float("nan"),
                "mean_cosine": float(np.mean(cosines[name])) if cosines[name] else float("nan"),
            }
            for name in names
        },
    }
