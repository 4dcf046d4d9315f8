"""Write-back: a training run adds the teacher features its store lacks.

With ``teachers.<name>.write_back: true`` the first epoch fills the teacher's feature store
(``feature_path``; created when it does not exist), so later epochs, and later runs, read
it offline instead of running the teacher:

- in the data loader workers, :class:`~vfmkd.distillation.sources.DistillationDataset`
  notices a sample whose primary image is missing from the store, loads that image clean
  (``dataset.load_raw``) and runs the teacher's CPU preprocessing on it, as ``vfmkd
  features extract`` does;
- in the main process, :class:`StoreWriteBack` runs the teacher on those inputs (float32,
  autocast off) and hands the maps to this rank's
  :class:`~vfmkd.features.writer.ShardWriter`, whose small shards a background thread
  commits atomically, so the store is valid at every moment;
- after every epoch the partial shard is committed and the manifest rewritten; the
  workers reopen the store when the next epoch starts, so a sample written during an
  epoch is served offline from the next epoch on (within the epoch it stays online).

What is stored is what extraction stores: the teacher's features of the clean original
image in the teacher's own frame; augmentation never reaches the store. Only a sample's
primary image is written (a mosaic's other tiles are written when they are a primary
image themselves), so one epoch covers every image the sampler visited. Under DDP every
rank writes its own shards (``rank<r>-<k>``, numbered after the shards already there) and
the ranks exchange the ids they are about to write at every step, so an image that two
ranks meet in one epoch (the sampler pads the last batch with repeats) is written once.
Rank 0 holds the store's lock for the whole run: an extraction, or a second run writing
back into the same store, is refused instead of colliding with this one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from vfmkd.utils.distributed import barrier, get_rank, get_world_size
from vfmkd.features.extract import BackgroundWriter, default_shard_size
from vfmkd.features.format import (
    FeatureStoreError,
    StoreCorruptError,
    StoreHeader,
    StoreNotFoundError,
    describe_differences,
    read_shard_records,
)
from vfmkd.features.store import FeatureStore
from vfmkd.features.writer import ShardWriter, StoreLock, finalize_store, prepare_store_for_writing

__all__ = ["WRITE_BACK_SHARD_SIZE", "StoreWriteBack"]

logger = logging.getLogger(__name__)

# NOTE: small shards: a run that is killed loses at most this many samples per rank, and
# the writer's buffer stays small; a store filled by write-back has more, smaller files
# than an extracted one.
WRITE_BACK_SHARD_SIZE = 64


class StoreWriteBack:
    """This rank's writer of features computed during training into one teacher's store.

    Build it with :meth:`open` (every rank, at the same point); then, per training step,
    :meth:`claim` the ids every rank offers and :meth:`add` this rank's share; call
    :meth:`commit` at the end of each epoch and :meth:`close` at the end of the run.

    Args:
        key: the teacher's key in the config (for messages).
        root: the store directory, prepared for writing.
        header: what the store holds (from its manifest).
        rank: this writer's rank.
        shard_size: samples per shard.
        start_index: the first shard number of this rank (after its committed shards).
        lock: the store's lock, held by rank 0 until :meth:`close`.
    """

    def __init__(
        self,
        key: str,
        root: Path,
        header: StoreHeader,
        *,
        rank: int,
        shard_size: int,
        start_index: int,
        lock: StoreLock | None = None,
    ) -> None:
        self.key = key
        self.root = root
        self.header = header
        self.rank = rank
        self._writer = ShardWriter(root, header, rank=rank, shard_size=shard_size, start_index=start_index)
        self._background: BackgroundWriter | None = None
        self._claimed: set[str] = set()
        self._claimed_at_commit = 0
        self._lock = lock

    @classmethod
    def open(cls, key: str, root: str | Path, teacher: Any, new_store: StoreHeader) -> "StoreWriteBack":
        """Prepare the store for writing (creating it when absent) and return this rank's writer.

        Rank 0 takes the store's lock, creates the store with ``new_store`` when it has no
        manifest (else keeps the manifest's header) and removes files an interrupted writer
        left; then every rank opens it. Every rank must call this at the same point.

        Args:
            key: the teacher's key in the config.
            root: the store directory.
            teacher: the live teacher; it must be the one the store was made with,
                computing every stored feature.
            new_store: the header of a store created here (float16, the teacher's
                features, the training split).

        Raises:
            FeatureStoreError: the store is locked by another writer, holds other
                features, or the teacher differs from the store's.
        """
        root = Path(root)
        rank = get_rank()
        lock = None
        if rank == 0:
            lock = StoreLock(root).__enter__()
            try:
                try:
                    header = StoreHeader.from_manifest(FeatureStore.open(root).manifest)
                except StoreNotFoundError:
                    header = new_store
                    logger.info("teacher %s: creating the feature store %s (write-back)", key, root)
                prepare_store_for_writing(root, header)
            except BaseException:
                lock.__exit__(None, None, None)
                raise
        barrier()
        try:
            header = StoreHeader.from_manifest(FeatureStore.open(root).manifest)
            differences = describe_differences(header.fingerprint_fields, teacher.fingerprint_fields())
            if differences:
                raise FeatureStoreError(
                    f"the live teacher is not the one that made the store at {root}, so it cannot add "
                    "features to it:\n  " + "\n  ".join(differences)
                )
            records, problems = read_shard_records(root, header.specs, header.codec, header.fingerprint)
            if problems:
                raise StoreCorruptError("; ".join(problem.message for problem in problems))
        except BaseException:
            if lock is not None:
                lock.__exit__(None, None, None)
            raise
        start_index = 1 + max((record.index for record in records if record.rank == rank), default=-1)
        shard_size = min(WRITE_BACK_SHARD_SIZE, default_shard_size(header))
        stored = sum(len(record.ids) for record in records)
        logger.info(
            "teacher %s: write-back into %s (%d samples stored); rank %d writes shards from rank%d-%06d",
            key, root, stored, rank, rank, start_index,
        )
        return cls(key, root, header, rank=rank, shard_size=shard_size, start_index=start_index, lock=lock)

    @property
    def written(self) -> int:
        """Samples this rank committed so far."""
        return self._writer.committed_samples

    @property
    def changed(self) -> bool:
        """Whether some rank claimed an id since the last :meth:`commit` (the same answer on every rank)."""
        return len(self._claimed) != self._claimed_at_commit

    def claim(self, offered: Sequence[Sequence[str]]) -> list[int]:
        """Decide who writes which of the ids the ranks offer at one step.

        Every rank calls this with the same ``offered`` and reaches the same decision: an
        id goes to the lowest rank that offers it, and never again in this run.

        Args:
            offered: per rank, in rank order, the ids of its batch missing from the store.

        Returns:
            Positions, in this rank's list, of the ids this rank computes and writes.
        """
        mine = []
        for rank, ids in enumerate(offered):
            for position, sample_id in enumerate(ids):
                if sample_id in self._claimed:
                    continue
                self._claimed.add(sample_id)
                if rank == self.rank:
                    mine.append(position)
        return mine

    def add(
        self,
        teacher: Any,
        ids: Sequence[str],
        pixels: torch.Tensor,
        frames: Sequence[dict[str, Any]],
    ) -> None:
        """Compute and queue the features of clean teacher inputs.

        Args:
            teacher: the live teacher (on its device).
            ids: N sample ids.
            pixels: ``[N, 3, S, S]`` float32 teacher inputs (``teacher.preprocess_image``).
            frames: the N teacher frames as :meth:`~vfmkd.geometry.Frame.to_dict`.
        """
        device = next((parameter.device for parameter in teacher.parameters()), torch.device("cpu"))
        # NOTE: float32 as extraction computes it, even inside the training step's autocast.
        with torch.autocast(device.type, enabled=False):
            features = teacher.extract(pixels.to(device, non_blocking=True).float())
        arrays: dict[str, np.ndarray] = {
            name: features[name].to("cpu", torch.float32).contiguous().numpy() for name in self.header.specs
        }
        if self._background is None:
            self._background = BackgroundWriter(self._writer)
        self._background.put(list(ids), list(frames), arrays)

    def commit(self) -> None:
        """Commit every queued sample (the last shard may be short)."""
        self._claimed_at_commit = len(self._claimed)
        if self._background is not None:
            background, self._background = self._background, None
            background.close(commit=True)
        else:
            self._writer.flush()

    def finalize(self) -> None:
        """Rewrite the manifest from every committed shard (rank 0, after all ranks committed)."""
        manifest = finalize_store(self.root, self.header)
        logger.info("teacher %s: the store %s holds %d samples", self.key, self.root, manifest["num_samples"])

    def release(self) -> None:
        """Give the store's lock back (rank 0)."""
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None
