"""Data order and per-sample seeding of training: what makes a resumed run continue exactly.

Every sample's augmentation draws from generators seeded by ``(seed, epoch, index)``
(:class:`SeededDataset`), the sampler's order is a function of ``(seed, epoch)`` and it
can start mid-epoch (:class:`ResumableSampler`); :func:`build_train_loader` puts them
together. With a :class:`BatchMix` (``data.unlabeled_ratio`` or ``data.unlabeled_batch_size``)
each batch holds a fixed share or number of unlabelled samples (:class:`MixedBatchSampler`).
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

from vfmkd.errors import DataLoadingError, UserError

__all__ = ["BatchMix", "MixedBatchSampler", "ResumableSampler", "SeededDataset", "build_train_loader", "seed_everything"]


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
            try:
                return self.dataset[index]
            except Exception as error:
                raise DataLoadingError(
                    f"training sample '{_sample_id(self.dataset, index)}' (index {index}, epoch {epoch}) could not be "
                    f"loaded: {type(error).__name__}: {error}"
                ) from error


def _sample_id(dataset: Any, index: int) -> str:
    """The id of sample ``index`` of ``dataset`` or of the data set it wraps; the index otherwise."""
    while dataset is not None:
        ids = getattr(dataset, "ids", None)
        if ids is not None and 0 <= index < len(ids):
            return str(ids[index])
        dataset = getattr(dataset, "dataset", None)
    return str(index)


def release_workers(loader: DataLoader | None) -> None:
    """Stop a loader's persistent workers now that the run is over.

    NOTE: left to the garbage collector, their shutdown waits a 5 s timeout per worker
    wherever the collector happens to run (in a later evaluation or run). A new
    ``iter(loader)`` starts fresh workers.
    """
    if loader is not None and getattr(loader, "_iterator", None) is not None:
        loader._iterator = None


def worker_failure(error: BaseException, iterator: Any = None) -> DataLoadingError | None:
    """A user-facing error for a data loader failure; None for other errors.

    A worker that died (its exit code, from ``iterator``'s worker processes) explains any
    error it caused: PyTorch's ``RuntimeError`` from its SIGCHLD handler or its queue
    timeout, or a ``ConnectionResetError`` when it died while sending a batch. A sample's
    failure in a worker comes back as PyTorch's re-raise, whose message holds the worker's
    traceback: its last line is our message.
    """
    if isinstance(error, UserError) and not isinstance(error, DataLoadingError):
        return None  # already a clear error of its own (a full disk, divergence, a config key)
    text = str(error)
    workers = getattr(iterator, "_workers", None) or []
    dead = _dead_workers(workers)
    if not dead and workers and isinstance(error, (ConnectionError, EOFError)):
        # NOTE: the broken pipe can arrive before the killed worker is reaped: give it a moment.
        deadline = time.monotonic() + 2.0
        while not dead and time.monotonic() < deadline:
            time.sleep(0.05)
            dead = _dead_workers(workers)
    if isinstance(error, DataLoadingError) and not dead:
        last = [line for line in text.splitlines() if line.strip()][-1] if text.strip() else text
        return DataLoadingError(last.split("DataLoadingError: ", 1)[-1])
    if dead or (isinstance(error, RuntimeError) and text.startswith("DataLoader worker")):
        how = [f"pid {worker.pid} " + (f"killed by {_signal_name(-worker.exitcode)}" if worker.exitcode < 0
                                        else f"exited with code {worker.exitcode}") for worker in dead]
        what = ", ".join(how) if how else text.strip().splitlines()[0].strip()
        return DataLoadingError(
            f"a data loader worker died ({what}). SIGKILL is often the out-of-memory killer: lower "
            "data.num_workers or data.batch_size, or turn off data.cache_images; resume with --resume."
        )
    return None


def _dead_workers(workers: list[Any]) -> list[Any]:
    # NOTE: SIGTERM is how the loader's own shutdown ends a worker that does not stop in time,
    # which the clean-up after any error may do; it explains nothing.
    return [worker for worker in workers if worker.exitcode not in (None, 0, -signal.SIGTERM)]


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


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


@dataclass(frozen=True)
class BatchMix:
    """How labelled and unlabelled samples share each batch.

    Attributes:
        labeled: indices ``0 .. labeled - 1`` of the data set are labelled, the rest
            unlabelled (:class:`~vfmkd.datasets.mixed.MixedDataset`'s order).
        unlabeled_ratio: share of unlabelled samples in each batch, in (0, 1).
        unlabeled_per_batch: or, exactly this many unlabelled samples in each batch
            (the rest labelled); one of the two is set.
    """

    labeled: int
    unlabeled_ratio: float | None = None
    unlabeled_per_batch: int | None = None

    def __post_init__(self) -> None:
        if (self.unlabeled_ratio is None) == (self.unlabeled_per_batch is None):
            raise ValueError("BatchMix needs exactly one of unlabeled_ratio and unlabeled_per_batch")


class MixedBatchSampler(ResumableSampler):
    """:class:`ResumableSampler` whose batches hold a fixed share of unlabelled samples.

    An epoch has as many samples as the data set. Batch ``b`` of a rank holds
    ``floor((b + 1) * B * r) - floor(b * B * r)`` unlabelled samples (``r`` the ratio, so
    the share is exact over the epoch), or ``unlabeled_per_batch`` of them, the rest labelled; each kind is drawn from its
    own shuffled order (reshuffled when used up), a function of ``(seed, epoch)``. Every
    rank sees the same kinds at the same batch positions.
    """

    def __init__(
        self, dataset: Dataset, *, mix: BatchMix, batch_size: int, num_replicas: int, rank: int, seed: int
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        total = len(dataset)  # type: ignore[arg-type]
        if not 0 < mix.labeled < total:
            raise ValueError(f"a mixed batch needs labelled and unlabelled samples; got {mix.labeled} of {total} labelled")
        if mix.unlabeled_per_batch is not None and not 0 < mix.unlabeled_per_batch < batch_size:
            raise ValueError(f"{mix.unlabeled_per_batch} unlabelled samples do not fit a mixed batch of {batch_size}")
        self.mix = mix
        self.batch_size = batch_size

    def _unlabeled_slot(self, position: int) -> bool:
        batch, slot = divmod(position, self.batch_size)
        if self.mix.unlabeled_per_batch is not None:
            return slot < self.mix.unlabeled_per_batch
        unlabeled = math.floor((batch + 1) * self.batch_size * self.mix.unlabeled_ratio) - math.floor(
            batch * self.batch_size * self.mix.unlabeled_ratio
        )
        return slot < unlabeled

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        total = len(self.dataset)  # type: ignore[arg-type]
        streams = {False: _Stream(0, self.mix.labeled, generator), True: _Stream(self.mix.labeled, total, generator)}
        kinds = [self._unlabeled_slot(position) for position in range(self.num_samples)]
        # NOTE: rank r takes global positions r, r + W, ...; local position j is the same kind on every rank.
        order = [streams[kind].next() for kind in kinds for _ in range(self.num_replicas)]
        indices = order[self.rank :: self.num_replicas][self.start :]
        return iter([(self.epoch, index) for index in indices])


class _Stream:
    """Indices ``start .. stop - 1`` in shuffled order, reshuffled each time they run out."""

    def __init__(self, start: int, stop: int, generator: torch.Generator) -> None:
        self.start, self.stop, self.generator = start, stop, generator
        self.pending: list[int] = []

    def next(self) -> int:
        if not self.pending:
            self.pending = (torch.randperm(self.stop - self.start, generator=self.generator) + self.start).tolist()[::-1]
        return self.pending.pop()


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
    mix: BatchMix | None = None,
) -> tuple[ResumableSampler, DataLoader, int]:
    """The shuffling, resumable training loader and its micro-batches per epoch (per rank).

    The last incomplete batch is dropped when a rank has at least one full batch. With
    ``mix``, each batch holds its share or number of unlabelled samples (:class:`MixedBatchSampler`).
    """
    if mix is None:
        sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    else:
        sampler = MixedBatchSampler(
            dataset, mix=mix, batch_size=batch_size, num_replicas=world_size, rank=rank, seed=seed
        )
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
