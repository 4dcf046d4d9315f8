"""Data order and per-sample seeding of training: what makes a resumed run continue exactly.

Every sample's augmentation draws from generators seeded by ``(seed, epoch, index)``
(:class:`SeededDataset`), the sampler's order is a function of ``(seed, epoch)`` and it
can start mid-epoch (:class:`ResumableSampler`); :func:`build_train_loader` puts them
together.
"""

from __future__ import annotations

import contextlib
import math
import random
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

__all__ = ["ResumableSampler", "SeededDataset", "build_train_loader", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _item_seeds(seed: int, epoch: int, index: int) -> tuple[int, int, int]:
    """Independent python / numpy / torch seeds for one sample of one epoch."""
    words = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, epoch, index]).generate_state(5, dtype=np.uint32)
    python_seed = (int(words[0]) << 32) | int(words[1])
    numpy_seed = int(words[2])
    torch_seed = (int(words[3]) << 32) | int(words[4])
    return python_seed, numpy_seed, torch_seed


@contextlib.contextmanager
def _preserved_global_rng() -> Iterator[None]:
    """Restore python / numpy / torch CPU generator states on exit."""
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)


class SeededDataset(Dataset):
    """Seeds the global generators from ``(seed, epoch, index)`` before each sample.

    Augmentations draw from python's ``random``, ``numpy.random`` and torch's CPU
    generator; seeding them per sample makes every sample of every epoch reproducible,
    whichever worker loads it and whether or not the run was resumed. Keys are
    ``(epoch, index)`` pairs, as :class:`ResumableSampler` yields them, so the epoch
    reaches persistent workers too. In the main process (``num_workers=0``) the
    trainer's own generator states are restored afterwards.

    Args:
        dataset: the inner map-style data set. When it has ``set_epoch(epoch)`` (e.g. to
            close mosaic), that is called in each process when the epoch changes.
        seed: the run's seed.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self._epoch_seen: int | None = None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int] | int) -> Any:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        if epoch != self._epoch_seen and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        self._epoch_seen = epoch
        python_seed, numpy_seed, torch_seed = _item_seeds(self.seed, epoch, index)
        in_main_process = get_worker_info() is None
        with _preserved_global_rng() if in_main_process else contextlib.nullcontext():
            random.seed(python_seed)
            np.random.seed(numpy_seed)
            # NOTE: only the CPU generator; torch.manual_seed would also reseed CUDA.
            torch.default_generator.manual_seed(torch_seed)
            return self.dataset[index]


class ResumableSampler(DistributedSampler):
    """``DistributedSampler``'s order, tagged with the epoch, able to start mid-epoch.

    Yields ``(epoch, index)`` pairs for :class:`SeededDataset`. The order is a function of
    ``(seed, epoch)`` (and of rank and world size); :meth:`set_start` skips the samples
    already consumed, without loading them.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, shuffle: bool, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` samples of this rank's order (this epoch only)."""
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        indices = list(super().__iter__())[self.start :]
        return iter([(self.epoch, index) for index in indices])

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)


def build_train_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    collate_fn: Callable[[list[Any]], Any],
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> tuple[ResumableSampler, DataLoader, int]:
    """The shuffling, resumable training loader and its micro-batches per epoch (per rank).

    The last incomplete batch is dropped when a rank has at least one full batch.
    """
    sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    drop_last = sampler.num_samples >= batch_size
    loader = DataLoader(
        SeededDataset(dataset, seed),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        # NOTE: a private generator, so creating an iterator never draws from the global
        # torch generator whose state the checkpoint restores.
        generator=torch.Generator().manual_seed(seed),
    )
    samples = sampler.num_samples
    batches = samples // batch_size if drop_last else math.ceil(samples / batch_size)
    if batches == 0:
        raise ValueError(f"the training data set is empty ({len(dataset)} samples)")  # type: ignore[arg-type]
    return sampler, loader, batches
