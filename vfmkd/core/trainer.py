"""The training loop: plain PyTorch with AMP, DDP, EMA, exact resume and COCO evaluation.

The trainer only sums and logs the loss dict that the trained module returns for a batch
(``model(batch) -> {name: loss}``, a
:class:`~vfmkd.distillation.distiller.DistilledModel`: the student's task losses and the
distillation terms); which losses exist is that module's business.

Example::

    from vfmkd.config import load_config
    from vfmkd.core import Trainer

    config = load_config("configs/experiments/yolov8n_shapes_demo.yaml", ["train.epochs=3"])
    result = Trainer(config).train()          # or Trainer(config, resume=True)
    print(result["metrics"]["mAP"], result["last"])

Under ``torchrun --nproc_per_node=N`` the same code trains with DistributedDataParallel;
rank 0 logs, evaluates and writes checkpoints.

Reproducibility: every sample's augmentation draws from generators seeded by
``(seed, epoch, index)``, the sampler's order is a function of ``(seed, epoch)``, and the
learning rate is a function of the optimizer step, so a run resumed from ``last.pt``
continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

from vfmkd.config import ConfigError
from vfmkd.utils import distributed
from vfmkd.core.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    load_training_state,
    restore_rng_state,
    save_checkpoint,
)
from vfmkd.core.ema import ModelEMA
from vfmkd.core.evaluator import evaluate_model, fitness, resolve_amp
from vfmkd.core.optim import LRSchedule, build_optimizer

__all__ = [
    "LossFunction",
    "ResumableSampler",
    "SeededDataset",
    "LossFunctionModel",
    "Trainer",
    "TrainingDivergedError",
    "seed_everything",
]

logger = logging.getLogger(__name__)

LossFunction = Callable[[nn.Module, Any, dict[str, Any]], dict[str, torch.Tensor]]

MAX_CONSECUTIVE_NONFINITE = 10
# NOTE: SIGTERM is what schedulers (SLURM, Kubernetes) send before preempting a job;
# SIGUSR1 is SLURM's configurable early warning. Both end the run at the next step with a
# last.pt to resume from.
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


class TrainingDivergedError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


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


class LossFunctionModel(nn.Module):
    """A student and a loss function trained as one: ``forward(batch) -> {name: loss}``.

    Args:
        student: the model; ``student(images)`` gives its outputs.
        loss_fn: ``loss_fn(student, outputs, batch) -> {name: scalar}``; an ``nn.Module``
            becomes a child (moved with the student, its parameters optimised with it;
            checkpoints keep the student only).
    """

    def __init__(self, student: nn.Module, loss_fn: LossFunction) -> None:
        super().__init__()
        self.student = student
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The loss dict of a batch on the device."""
        return self.loss_fn(self.student, self.student(batch["images"]), batch)


def collate_samples_default() -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    from vfmkd.datasets.collate import collate_samples

    return collate_samples


def _built_from_config(
    config: Any, model: nn.Module | None, train_dataset: Dataset | None, val_dataset: Dataset | None
) -> tuple[nn.Module, Dataset, Dataset]:
    """The student and the data sets, each built from the config unless given."""
    if model is None:
        from vfmkd.models import build_model

        model = build_model(config.to_dict()["model"])
    if train_dataset is None or val_dataset is None:
        from vfmkd.datasets import build_dataset

        if train_dataset is None:
            train_dataset = build_dataset(config.data, config.data.train_split, train=True)
        if val_dataset is None:
            val_dataset = build_dataset(config.data, config.data.val_split, train=False)
    return model, train_dataset, val_dataset


def _distilled_model(
    config: Any, student: nn.Module, train_dataset: Dataset, collate_fn: Callable[[list[Any]], dict[str, Any]] | None
) -> tuple[nn.Module, Dataset, Callable[[list[Any]], dict[str, Any]] | None]:
    """The config's training model: the student with its task-loss weights and distiller.

    With distillation terms the training data set reads the teacher stores in the loader
    workers, and (unless a collate function was given) batches carry the offline records.
    """
    from vfmkd.distillation.distiller import DistilledModel, build_distiller, task_loss_weights
    from vfmkd.distillation.sources import DistillationDataset, collate_with_teacher_features

    has_labels = getattr(train_dataset, "has_labels", True)
    distiller = build_distiller(config, student)
    if not has_labels:
        if distiller is None:
            raise ConfigError(
                f"data.dataset '{config.data.dataset}' has no labels and the config has no distillation "
                "term: there is nothing to learn; add a teacher and a distillation.losses entry, or "
                "give labelled data"
            )
        logger.info("the training data has no labels: distillation terms only, no task losses")
    model = DistilledModel(student, distiller, task_weights=task_loss_weights(config), task_losses=has_labels)
    if distiller is not None:
        train_dataset = DistillationDataset(train_dataset, distiller.teachers.offline_plans())
        collate_fn = collate_fn or collate_with_teacher_features
    return model, train_dataset, collate_fn


class Trainer:
    """Trains a model from an :class:`~vfmkd.config.ExperimentConfig`.

    Objects not passed are built from the config. Building a trainer sets process-wide
    state, as a training run should: the global seeds (``train.seed``), cuDNN benchmark /
    deterministic mode (``train.deterministic``) and, under ``torchrun``, the process group.

    Args:
        config: the experiment.
        model: the student; default ``vfmkd.models.build_model(config.model)``.
        train_dataset: default ``build_dataset(config.data, data.train_split, train=True)``.
        val_dataset: default ``build_dataset(config.data, data.val_split, train=False)``.
        loss_fn: ``loss_fn(student, outputs, batch) -> {name: scalar}``, where ``batch``
            holds float ``images [B, 3, H, W]`` in [0, 1] and ``targets`` on the device,
            trained as a :class:`LossFunctionModel`; default: the config's task-loss
            weights and distillation terms, a
            :class:`~vfmkd.distillation.distiller.DistilledModel`.
        collate_fn: batches samples; default ``vfmkd.datasets.collate.collate_samples``.
        resume: continue from ``run_dir/checkpoints/last.pt``.
    """

    def __init__(
        self,
        config: Any,
        *,
        model: nn.Module | None = None,
        train_dataset: Dataset | None = None,
        val_dataset: Dataset | None = None,
        loss_fn: LossFunction | None = None,
        collate_fn: Callable[[list[Any]], dict[str, Any]] | None = None,
        resume: bool = False,
    ) -> None:
        self.config = config
        train_cfg = config.train
        self._owns_process_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        self.dist_info = distributed.init_distributed()
        self.rank = self.dist_info.rank
        self.world_size = self.dist_info.world_size
        self.is_main = self.rank == 0
        self.device = distributed.resolve_device(train_cfg.device, self.dist_info.local_rank)
        self._configure_determinism(train_cfg.deterministic)
        seed_everything(train_cfg.seed)

        self.run_dir = Path(config.run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.last_path = self.checkpoint_dir / "last.pt"
        self.best_path = self.checkpoint_dir / "best.pt"

        model, train_dataset, val_dataset = _built_from_config(config, model, train_dataset, val_dataset)
        self.val_dataset = val_dataset
        if loss_fn is None:
            training_model, train_dataset, collate_fn = _distilled_model(config, model, train_dataset, collate_fn)
        else:
            training_model = LossFunctionModel(model, loss_fn)
        self.collate_fn = collate_fn or collate_samples_default()
        self.train_dataset = train_dataset
        # The trained module: ``model(batch) -> {name: loss}``; ``model.student`` is what is evaluated.
        self.model: nn.Module = training_model.to(self.device)

        self.optimizer = build_optimizer(self.model, train_cfg)
        self.autocast_enabled, self.autocast_dtype = resolve_amp(self.device, train_cfg.amp, train_cfg.amp_dtype)
        use_scaler = self.autocast_enabled and self.autocast_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.ema = ModelEMA(self.model, train_cfg.ema_decay, train_cfg.ema_tau) if train_cfg.ema else None

        self.batch_size = config.data.batch_size
        self.num_workers = min(config.data.num_workers, os.cpu_count() or 1)
        self.sampler, self.train_loader, self.batches_per_epoch = self._build_train_loader(train_dataset)
        self.accumulate = train_cfg.accumulate
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / self.accumulate)
        self.total_steps = train_cfg.max_steps or train_cfg.epochs * self.steps_per_epoch
        self.schedule = LRSchedule.from_config(
            train_cfg, steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps
        )

        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best_fitness: float | None = None
        self.metrics: dict[str, Any] = {}
        self.skipped_steps = 0
        self._consecutive_nonfinite = 0
        self._stop_requested = False
        self._rng_to_restore: dict[str, Any] | None = None
        if resume:
            self._load_resume_state()

        self.train_model: nn.Module = self.model
        if self.world_size > 1:
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=False,
            )
        if self._rng_to_restore is not None:
            restore_rng_state(self._rng_to_restore)
        elif self.world_size > 1:
            # NOTE: same initial weights on every rank (seeded above), but each rank gets its
            # own stream afterwards, e.g. for dropout.
            torch.manual_seed(train_cfg.seed + self.rank)
        self.metric_logger: Any = None

    # ----------------------------------------------------------------- set-up helpers
    def _close_mosaic_if_due(self) -> None:
        """Turn mosaic off for the last ``data.augment.close_mosaic`` epochs, as YOLOv8 does.

        Derived from the epoch alone, so a resumed run switches at the same epoch. The
        loader is rebuilt because persistent workers hold their own copy of the transform.
        """
        if not getattr(self.train_dataset, "mosaic_active", False):
            return
        total_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        if self.epoch < total_epochs - self.config.data.augment.close_mosaic:
            return
        logger.info("epoch %d: closing mosaic for the last %d epoch(s)", self.epoch + 1, total_epochs - self.epoch)
        self.train_dataset.close_mosaic()
        self.sampler, self.train_loader, _ = self._build_train_loader(self.train_dataset)

    def _build_train_loader(self, dataset: Dataset) -> tuple[ResumableSampler, DataLoader, int]:
        """The shuffling, resumable training loader and its micro-batches per epoch (per rank)."""
        seed = self.config.train.seed
        sampler = ResumableSampler(dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=seed)
        drop_last = sampler.num_samples >= self.batch_size
        loader = DataLoader(
            SeededDataset(dataset, seed),
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=self.device.type == "cuda",
            drop_last=drop_last,
            persistent_workers=self.num_workers > 0,
            # NOTE: a private generator, so creating an iterator never draws from the global
            # torch generator whose state the checkpoint restores.
            generator=torch.Generator().manual_seed(seed),
        )
        samples = sampler.num_samples
        batches = samples // self.batch_size if drop_last else math.ceil(samples / self.batch_size)
        if batches == 0:
            raise ValueError(f"the training data set is empty ({len(dataset)} samples)")  # type: ignore[arg-type]
        return sampler, loader, batches

    @staticmethod
    def _configure_determinism(deterministic: bool) -> None:
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        else:
            torch.backends.cudnn.benchmark = True

    def _load_resume_state(self) -> None:
        if not self.last_path.is_file():
            raise FileNotFoundError(
                f"resume: no checkpoint at {self.last_path}; train without --resume to start this run, "
                f"or set experiment_name / train.output_dir to the run you want to continue"
            )
        checkpoint = load_checkpoint(self.last_path, map_location=self.device)
        self._warn_config_changes(checkpoint.get("config") or {})
        try:
            ema_restored = load_training_state(self.model, self.ema, checkpoint)
        except CheckpointError as error:
            raise CheckpointError(f"{self.last_path}: {error}") from None
        if checkpoint.get("optimizer") is not None:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        if self.ema is not None and not ema_restored:
            logger.warning("%s has no EMA weights; the EMA restarts from the current weights", self.last_path)
            self.ema = ModelEMA(self.model, self.config.train.ema_decay, self.config.train.ema_tau)
        if checkpoint.get("scheduler") and checkpoint["scheduler"] != self.schedule.state_dict():
            logger.warning(
                "the learning-rate schedule changed since the checkpoint (was %s, now %s); "
                "the resumed run will not match an uninterrupted one",
                checkpoint["scheduler"],
                self.schedule.state_dict(),
            )
        self.step = int(checkpoint["step"])
        self.epoch = int(checkpoint["epoch"])
        self.batch_in_epoch = int(checkpoint.get("batch_in_epoch", 0))
        saved_world_size = int(checkpoint.get("world_size", 1))
        if saved_world_size != self.world_size and self.batch_in_epoch:
            consumed = self.batch_in_epoch * saved_world_size
            self.batch_in_epoch = (consumed // self.world_size) // self.accumulate * self.accumulate
            logger.warning(
                "resuming with %d processes instead of %d: the rest of epoch %d sees a different data order",
                self.world_size,
                saved_world_size,
                self.epoch,
            )
        self.best_fitness = checkpoint.get("best_fitness")
        self.metrics = dict(checkpoint.get("metrics") or {})
        rng_states = checkpoint.get("rng_state") or []
        if rng_states:
            self._rng_to_restore = rng_states[self.rank] if len(rng_states) == self.world_size else rng_states[0]
        logger.info(
            "resumed from %s at step %d (epoch %d, batch %d)", self.last_path, self.step, self.epoch, self.batch_in_epoch
        )

    def _warn_config_changes(self, saved: Mapping[str, Any]) -> None:
        current = self.config.to_dict()
        changed = [
            f"{section}.{key}"
            for section in current
            if isinstance(current[section], dict) and isinstance(saved.get(section), dict)
            for key in sorted(set(current[section]) | set(saved[section]))
            if current[section].get(key) != saved[section].get(key)
        ]
        if changed:
            logger.warning("config changed since the checkpoint: %s", ", ".join(changed))

    # --------------------------------------------------------------------- control
    def request_stop(self) -> None:
        """End the run after the current optimizer step, writing ``last.pt`` to resume from."""
        self._stop_requested = True

    def after_step(self) -> None:
        """Called after every optimizer step on every rank; subclasses add behaviour here."""

    def _handle_stop_signal(self, signal_number: int, frame: Any) -> None:
        logger.warning("received %s: stopping after this step and writing last.pt", signal.Signals(signal_number).name)
        self._stop_requested = True

    @contextlib.contextmanager
    def _stop_signal_handlers(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {}
        for name in STOP_SIGNALS:
            if hasattr(signal, name):
                number = getattr(signal, name)
                previous[number] = signal.signal(number, self._handle_stop_signal)
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def _should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_requested else 0.0], device=self._collective_device())
        return bool(distributed.all_reduce_max(flag).item())

    def _collective_device(self) -> torch.device:
        return self.device if self.dist_info.backend == "nccl" else torch.device("cpu")

    # ------------------------------------------------------------------- the loop
    def train(self) -> dict[str, Any]:
        """Run to ``train.epochs`` epochs or ``train.max_steps`` optimizer steps.

        ``max_steps``, when set, decides the length alone (epochs continue as needed).
        The run evaluates every ``eval_interval`` epochs and at the end, writes ``last.pt``
        every ``save_interval`` epochs and at the end (also when stopped by SIGTERM /
        SIGUSR1 or :meth:`request_stop`), and ``best.pt`` whenever the fitness improves.

        Returns:
            ``run_dir``, ``last`` and ``best`` (checkpoint paths or None), ``metrics``
            (latest evaluation), ``best_fitness``, ``step``, ``epoch``, ``interrupted``,
            ``skipped_steps`` and ``is_main``.
        """
        from vfmkd.config import save_config
        from vfmkd.utils.logging import MetricLogger, log_to_file

        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.run_dir / "config.yaml")
        self.metric_logger = MetricLogger(self.run_dir, enabled=self.is_main)
        interrupted = False
        completed = False
        log_file = log_to_file(self.run_dir / "train.log") if self.is_main else contextlib.nullcontext()
        try:
            with log_file, self._stop_signal_handlers():
                if self.step == 0 and self.last_path.is_file() and self.is_main:
                    logger.warning("%s exists and will be overwritten; use resume to continue that run", self.last_path)
                self._log_start()
                while self.step < self.total_steps:
                    epoch_done = self._train_epoch()
                    if epoch_done:
                        self.epoch += 1
                        self.batch_in_epoch = 0
                        if self._teachers is not None:
                            self._teachers.end_epoch()
                    if self.step >= self.total_steps:
                        break
                    if epoch_done:
                        # NOTE: before the stop check, so a run stopped at an epoch boundary
                        # has done what the uninterrupted run does there.
                        self._end_of_period(
                            evaluate=self.epoch % self.config.train.eval_interval == 0,
                            save=self.epoch % self.config.train.save_interval == 0,
                        )
                    if self._should_stop():
                        interrupted = True
                        break
                self._end_of_period(evaluate=not interrupted, save=True)
            completed = True
        finally:
            try:
                if self._teachers is not None:
                    self._teachers.end_training(synchronize=completed)
            finally:
                self.metric_logger.close()
                if self._owns_process_group:
                    distributed.cleanup()
        return {
            "run_dir": str(self.run_dir),
            "last": str(self.last_path) if self.last_path.is_file() else None,
            "best": str(self.best_path) if self.best_path.is_file() else None,
            "metrics": self.metrics,
            "best_fitness": self.best_fitness,
            "step": self.step,
            "epoch": self.epoch,
            "interrupted": interrupted,
            "skipped_steps": self.skipped_steps,
            "is_main": self.is_main,
        }

    def _log_start(self) -> None:
        parameters = sum(p.numel() for p in self.model.parameters())
        logger.info(
            "training %s: %.2fM parameters on %s (x%d), %s, %d steps (%d per epoch, %d micro-batches "
            "of %d, accumulate %d), run dir %s",
            self.config.experiment_name,
            parameters / 1e6,
            self.device,
            self.world_size,
            f"autocast {str(self.autocast_dtype).replace('torch.', '')}" if self.autocast_enabled else "fp32",
            self.total_steps,
            self.steps_per_epoch,
            self.batches_per_epoch,
            self.batch_size,
            self.accumulate,
            self.run_dir,
        )

    def _train_epoch(self) -> bool:
        """Train until the epoch ends, the run ends or a stop is requested; True if the epoch ended."""
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._close_mosaic_if_due()
        self.sampler.set_epoch(self.epoch)
        self.sampler.set_start(self.batch_in_epoch * self.batch_size)
        self.train_model.train()
        progress = tqdm(
            total=self.batches_per_epoch,
            initial=self.batch_in_epoch,
            desc=f"epoch {self.epoch + 1}",
            disable=True if not self.is_main else None,
            leave=False,
            dynamic_ncols=True,
        )
        self._reset_interval()
        # NOTE: log lines go through tqdm.write while the bar is shown, so they do not break it.
        consoles = [
            candidate
            for candidate in (logging.getLogger(), logging.getLogger("vfmkd"))
            if any(type(handler) is logging.StreamHandler for handler in candidate.handlers)
        ]
        redirect = logging_redirect_tqdm(loggers=consoles) if consoles and not progress.disable else contextlib.nullcontext()
        try:
            with redirect:
                return self._run_epoch_steps(progress)
        finally:
            progress.close()

    def _run_epoch_steps(self, progress: Any) -> bool:
        iterator = iter(self.train_loader)
        while self.batch_in_epoch < self.batches_per_epoch:
            group_size = min(self.accumulate, self.batches_per_epoch - self.batch_in_epoch)
            values = self._optimizer_step(iterator, group_size, progress)
            self.after_step()
            if self.step % self.config.train.log_interval == 0:
                self._log_interval(values)
            if self.batch_in_epoch >= self.batches_per_epoch:
                return True
            if self.step >= self.total_steps or self._should_stop():
                return False
        return True

    def _prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Move images (uint8 -> float in [0, 1]) and targets to the device."""
        images = batch["images"].to(self.device, non_blocking=True)
        images = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        targets = batch.get("targets")
        if isinstance(targets, dict):
            targets = {
                key: value.to(self.device, non_blocking=True) if torch.is_tensor(value) else value
                for key, value in targets.items()
            }
        return {**batch, "images": images, "targets": targets}

    def _optimizer_step(self, iterator: Iterator[dict[str, Any]], group_size: int, progress: Any) -> dict[str, float]:
        """Forward/backward ``group_size`` micro-batches, then one optimizer step.

        Returns:
            Loss terms averaged over the group's micro-batches, plus ``total``.
        """
        distributed_run = isinstance(self.train_model, nn.parallel.DistributedDataParallel)
        group_finite = True
        sums: dict[str, float] = {}
        for micro_batch in range(group_size):
            waited = time.perf_counter()
            batch = next(iterator)
            self._interval_data_time += time.perf_counter() - waited
            batch = self._prepare_batch(batch)
            last_micro_batch = micro_batch == group_size - 1
            sync = self.train_model.no_sync() if distributed_run and not last_micro_batch else contextlib.nullcontext()
            with sync:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_enabled):
                    losses = self.train_model(batch)
                total = sum(value.float() for value in losses.values())
                # NOTE: one device sync per micro-batch, for the finiteness check and the logs.
                reported = torch.stack([total.detach(), *(value.detach().float() for value in losses.values())]).tolist()
                finite = math.isfinite(reported[0])
                if distributed_run:
                    # every rank must take the same branch, or the gradient all-reduce hangs
                    flag = torch.tensor([float(finite)], device=self._collective_device())
                    finite = bool(distributed.all_reduce_min(flag).item())
                if finite:
                    self.scaler.scale(total / group_size).backward()
                else:
                    group_finite = False
            for name, value in zip(["total", *losses], reported):
                sums[name] = sums.get(name, 0.0) + value
            self.batch_in_epoch += 1
            self._interval_images += batch["images"].shape[0]
            progress.update(1)
        values = {name: total_value / group_size for name, total_value in sums.items()}

        learning_rates = self.schedule.apply(self.optimizer, self.step)
        stepped = False
        grad_norm = float("nan")
        if group_finite:
            self.scaler.unscale_(self.optimizer)
            max_norm = self.config.train.grad_clip or float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
            if self.scaler.is_enabled() or math.isfinite(grad_norm):
                self.scaler.step(self.optimizer)
                self.scaler.update()
                stepped = True
        self.optimizer.zero_grad(set_to_none=True)
        if stepped:
            self._consecutive_nonfinite = 0
            if self.ema is not None:
                self.ema.update(self.model)
        else:
            self._skip_step("loss" if not group_finite else "gradient")
        self.step += 1
        values.update(lr=learning_rates["lr"], bias_lr=learning_rates["bias_lr"], grad_norm=grad_norm)
        self._interval_sums = {k: self._interval_sums.get(k, 0.0) + v for k, v in values.items()}
        self._interval_steps += 1
        if not progress.disable:
            elapsed = max(time.perf_counter() - self._interval_start, 1e-9)
            shown = {name: f"{value:.3g}" for name, value in values.items() if name not in ("bias_lr", "grad_norm")}
            shown["img/s"] = f"{self._interval_images * self.world_size / elapsed:.1f}"
            progress.set_postfix(shown)
        return values

    def _skip_step(self, what: str) -> None:
        self.skipped_steps += 1
        self._consecutive_nonfinite += 1
        logger.warning(
            "step %d (epoch %d): non-finite %s, optimizer step skipped (%d in a row, %d in total)",
            self.step,
            self.epoch,
            what,
            self._consecutive_nonfinite,
            self.skipped_steps,
        )
        if self._consecutive_nonfinite >= MAX_CONSECUTIVE_NONFINITE:
            raise TrainingDivergedError(
                f"{self._consecutive_nonfinite} optimizer steps in a row had a non-finite {what} "
                f"(up to step {self.step}, epoch {self.epoch}). Lower train.lr, set train.grad_clip, "
                f"try train.amp=false, or check the data; {self.last_path} holds the last saved state."
            )

    # ------------------------------------------------------------------- logging
    def _reset_interval(self) -> None:
        self._interval_start = time.perf_counter()
        self._interval_data_time = 0.0
        self._interval_images = 0
        self._interval_steps = 0
        self._interval_sums: dict[str, float] = {}

    def _log_interval(self, last_values: dict[str, float]) -> None:
        elapsed = max(time.perf_counter() - self._interval_start, 1e-9)
        steps = max(self._interval_steps, 1)
        means = {name: value / steps for name, value in self._interval_sums.items()}
        loss_names = [name for name in means if name not in ("lr", "bias_lr", "grad_norm")]
        if self.world_size > 1 and loss_names:
            stacked = torch.tensor([means[name] for name in loss_names], device=self._collective_device())
            for name, value in zip(loss_names, distributed.all_reduce_mean(stacked).tolist()):
                means[name] = value
        record = {
            **{f"loss/{name}": means[name] for name in loss_names},
            "lr": last_values["lr"],
            "bias_lr": last_values["bias_lr"],
            "grad_norm": means.get("grad_norm"),
            "images_per_second": self._interval_images * self.world_size / elapsed,
            "data_time_share": self._interval_data_time / elapsed,
            "skipped_steps": self.skipped_steps,
        }
        if self.scaler.is_enabled():
            record["grad_scale"] = float(self.scaler.get_scale())
        self.metric_logger.log(record, step=self.step, kind="train", epoch=self.epoch)
        if self.is_main:
            losses_text = "  ".join(f"{name} {means[name]:.4f}" for name in loss_names)
            logger.info(
                "step %d/%d  epoch %d  %s  lr %.3g  %.1f img/s  data %.0f%%",
                self.step,
                self.total_steps,
                self.epoch,
                losses_text,
                last_values["lr"],
                record["images_per_second"],
                100 * record["data_time_share"],
            )
        self._reset_interval()

    # ------------------------------------------------------------ eval and saving
    def evaluate(self) -> dict[str, Any] | None:
        """COCO mAP of the EMA weights (or the raw ones) on the validation set; rank 0 only.

        Returns:
            The metrics on rank 0, None on other ranks or without a validation set.
        """
        if self.val_dataset is None:
            return None
        metrics = None
        if self.is_main:
            eval_cfg = self.config.eval
            started = time.perf_counter()
            metrics = {}
            if getattr(self.val_dataset, "has_labels", True):
                metrics = evaluate_model(
                    self._evaluated().student,
                    self.val_dataset,
                    batch_size=eval_cfg.batch_size or self.batch_size,
                    num_workers=self.num_workers,
                    device=self.device,
                    amp=self.config.train.amp,
                    amp_dtype=self.config.train.amp_dtype,
                    eval_cfg=eval_cfg,
                    collate_fn=self.collate_fn,
                )
                metrics["fitness"] = fitness(metrics)
                logger.info(
                    "eval at step %d: mAP50-95 %.4f  mAP50 %.4f  mAP75 %.4f (%.1fs)",
                    self.step,
                    metrics["mAP"],
                    metrics["mAP50"],
                    metrics["mAP75"],
                    time.perf_counter() - started,
                )
            metrics.update(self._feature_fidelity())
            if "fitness" not in metrics:
                # NOTE: without labels the best checkpoint is the one closest to its teachers.
                cosines = [value for name, value in metrics.items() if name.endswith("/cosine")]
                metrics["fitness"] = sum(cosines) / len(cosines) if cosines else 0.0
            if self.metric_logger is not None:
                self.metric_logger.log(metrics, step=self.step, kind="eval", epoch=self.epoch)
        distributed.barrier()
        return metrics

    def _feature_fidelity(self) -> dict[str, float]:
        """Cosine and normalised MSE of each distillation pair on the validation set."""
        from vfmkd.distillation.fidelity import feature_fidelity

        evaluated = self._evaluated()
        distiller = getattr(evaluated, "distiller", None)
        if distiller is None:
            return {}
        metrics = feature_fidelity(
            evaluated.student,
            distiller,
            self.val_dataset,
            batch_size=self.config.eval.batch_size or self.batch_size,
            num_workers=self.num_workers,
            device=self.device,
        )
        for name, value in metrics.items():
            logger.info("%s %.4f", name, value)
        return metrics

    @property
    def _teachers(self) -> Any:
        """The distiller's teacher runtime (write-back commits at epoch ends), None without one."""
        distiller = getattr(self.model, "distiller", None)
        return distiller.teachers if distiller is not None else None

    def _evaluated(self) -> nn.Module:
        """The training model whose weights are evaluated: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def _end_of_period(self, *, evaluate: bool, save: bool) -> None:
        """Evaluate and/or write checkpoints (every rank calls this at the same points)."""
        improved = False
        if evaluate:
            metrics = self.evaluate()
            if metrics is not None:
                self.metrics = metrics
                if self.best_fitness is None or metrics["fitness"] > self.best_fitness:
                    self.best_fitness = metrics["fitness"]
                    improved = True
        if save or evaluate:
            self._save(last=save, best=improved)

    def _save(self, *, last: bool, best: bool) -> None:
        rng_states = distributed.all_gather_object(capture_rng_state())
        if self.is_main and (last or best):
            arguments = dict(
                model=self.model,
                optimizer=self.optimizer,
                scheduler_state=self.schedule.state_dict(),
                ema=self.ema,
                scaler=self.scaler,
                step=self.step,
                epoch=self.epoch,
                config_dict=self.config.to_dict(),
                rng_state=rng_states,
                best_fitness=self.best_fitness,
                metrics=self.metrics,
                batch_in_epoch=self.batch_in_epoch,
                world_size=self.world_size,
            )
            if last:
                save_checkpoint(self.last_path, **arguments)
            if best:
                save_checkpoint(self.best_path, **arguments)
                logger.info("new best fitness %.4f: wrote %s", self.best_fitness, self.best_path)
        distributed.barrier()
