"""What happens around the optimizer steps: LR schedule, close-mosaic, logging, evaluation, checkpoints.

The :class:`~vfmkd.core.trainer.Trainer` runs the loop; everything else is a
:class:`Hook` called at fixed points (detectron2's ``HookBase`` style). Every rank calls
every hook at the same points, so hooks may run collectives; rank-0-only work checks
``trainer.is_main``. Order matters where one hook reads what another wrote: the
evaluation hook sets ``trainer.metrics`` / ``trainer.improved`` before the checkpoint
hook saves ``best.pt``.

Example: a hook that prints the loss every step::

    class PrintLoss(Hook):
        def after_step(self) -> None:
            print(self.trainer.step, self.trainer.step_values["total"])

    trainer = build_trainer(config, hooks=[PrintLoss()])
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch

from vfmkd.config import ExperimentConfig, save_config
from vfmkd.core.checkpoint import capture_rng_state, save_checkpoint
from vfmkd.core.optim import LRSchedule
from vfmkd.evaluation import Evaluator, fitness, run_evaluation
from vfmkd.utils import distributed

if TYPE_CHECKING:
    from vfmkd.core.trainer import Trainer

__all__ = [
    "CheckpointHook",
    "CloseMosaicHook",
    "EvalHook",
    "Hook",
    "LRScheduleHook",
    "LabelCountHook",
    "MetricsLogHook",
    "TeacherLifecycleHook",
]

logger = logging.getLogger(__name__)


class Hook:
    """Base class: every method is a no-op; ``self.trainer`` is set when registered."""

    trainer: Trainer

    def register(self, trainer: Trainer) -> None:
        """Called once when the trainer is built (before any resume)."""
        self.trainer = trainer

    def load_state(self, checkpoint: Mapping[str, Any]) -> None:
        """Called when the trainer resumes from ``checkpoint``."""

    def before_train(self) -> None:
        """Before the first step of :meth:`Trainer.train`."""

    def before_epoch(self) -> None:
        """Before the first step of each (possibly resumed) epoch."""

    def before_step(self) -> None:
        """Before each optimizer step's forward passes."""

    def after_step(self) -> None:
        """After each optimizer step (``trainer.step`` already counts it)."""

    def after_epoch(self) -> None:
        """When an epoch ended (``trainer.epoch`` already counts it); ``trainer.finished`` at the last."""

    def after_train(self) -> None:
        """When the run ended without an error (``trainer.interrupted`` when stopped early)."""

    def close(self, completed: bool) -> None:
        """Always, last; ``completed`` is False after an error."""


class LRScheduleHook(Hook):
    """Sets each parameter group's learning rate before every step (a function of the step).

    Args:
        schedule: the schedule, or a function ``(steps_per_epoch, total_steps) -> LRSchedule``
            called when the trainer is known (what the config builder passes).
    """

    def __init__(self, schedule: LRSchedule | Callable[[int, int], LRSchedule]) -> None:
        self._schedule = schedule
        self.schedule: LRSchedule | None = schedule if isinstance(schedule, LRSchedule) else None

    def register(self, trainer: Trainer) -> None:
        super().register(trainer)
        if self.schedule is None:
            self.schedule = self._schedule(trainer.steps_per_epoch, trainer.total_steps)  # type: ignore[operator]

    def load_state(self, checkpoint: Mapping[str, Any]) -> None:
        saved = checkpoint.get("scheduler")
        if saved and saved != self.schedule.state_dict():
            logger.warning(
                "the learning-rate schedule changed since the checkpoint (was %s, now %s); "
                "the resumed run will not match an uninterrupted one",
                saved,
                self.schedule.state_dict(),
            )

    def before_step(self) -> None:
        self.trainer.learning_rates = self.schedule.apply(self.trainer.optimizer, self.trainer.step)


class CloseMosaicHook(Hook):
    """Turns mosaic off for the last ``epochs`` epochs, as YOLOv8 does.

    Derived from the epoch alone, so a resumed run switches at the same epoch; through the
    data set's ``close_mosaic()``, then the loader is rebuilt because persistent workers
    hold their own copy of the transform.
    """

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def before_train(self) -> None:
        trainer = self.trainer
        total_epochs = math.ceil(trainer.total_steps / trainer.steps_per_epoch)
        if getattr(trainer.train_dataset, "mosaic_active", False) and self.epochs > total_epochs / 2:
            # NOTE: a step-limited run over a large (e.g. mixed labelled + unlabelled) set has few,
            # long epochs, where YOLOv8's 10 of 300 epochs become most of the run.
            logger.warning(
                "data.augment.close_mosaic is %d epochs of this run's %d (%d steps each): mosaic only in the "
                "first %d epoch(s); lower it for a run of few, long epochs",
                self.epochs, total_epochs, trainer.steps_per_epoch, max(total_epochs - self.epochs, 0),
            )

    def before_epoch(self) -> None:
        trainer = self.trainer
        if not getattr(trainer.train_dataset, "mosaic_active", False):
            return
        total_epochs = math.ceil(trainer.total_steps / trainer.steps_per_epoch)
        if trainer.epoch < total_epochs - self.epochs:
            return
        logger.info("epoch %d: closing mosaic for the last %d epoch(s)", trainer.epoch + 1, total_epochs - trainer.epoch)
        trainer.train_dataset.close_mosaic()
        trainer.rebuild_loader()


class TeacherLifecycleHook(Hook):
    """Commits teacher write-backs at each epoch's end and closes the teacher runtime at the end.

    Args:
        runtime: the distiller's :class:`~vfmkd.distillation.teacher_runtime.TeacherRuntime`.
    """

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime

    def after_epoch(self) -> None:
        self.runtime.end_epoch()

    def close(self, completed: bool) -> None:
        self.runtime.end_training(synchronize=completed)


class MetricsLogHook(Hook):
    """Every ``interval`` steps and at the last one: mean losses (averaged over ranks), LR,
    speed, data-wait share.

    Goes to ``metrics.jsonl`` / TensorBoard through the trainer's metric logger and, on
    rank 0, to the log. The interval restarts at each epoch.
    """

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self._reset()

    def _reset(self) -> None:
        self._start = time.perf_counter()
        self._data_time = 0.0
        self._images = 0
        self._steps = 0
        self._sums: dict[str, float] = {}

    def before_epoch(self) -> None:
        self._reset()

    def after_step(self) -> None:
        trainer = self.trainer
        self._sums = {k: self._sums.get(k, 0.0) + v for k, v in trainer.step_values.items()}
        self._steps += 1
        self._images += trainer.step_images
        self._data_time += trainer.step_data_time
        if trainer.step % self.interval == 0:
            self._log()

    def after_train(self) -> None:
        # The last step is always logged, also in runs shorter than the interval.
        if self._steps:
            self._log()

    def _log(self) -> None:
        trainer = self.trainer
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        means = {name: value / max(self._steps, 1) for name, value in self._sums.items()}
        loss_names = [name for name in means if name not in ("lr", "bias_lr", "grad_norm")]
        if trainer.world_size > 1 and loss_names:
            stacked = torch.tensor([means[name] for name in loss_names], device=trainer.collective_device)
            means.update(zip(loss_names, distributed.all_reduce_mean(stacked).tolist()))
        rates = trainer.learning_rates
        record = {
            **{f"loss/{name}": means[name] for name in loss_names},
            "lr": rates.get("lr"),
            "bias_lr": rates.get("bias_lr"),
            "grad_norm": means.get("grad_norm"),
            "images_per_second": self._images * trainer.world_size / elapsed,
            "data_time_share": self._data_time / elapsed,
            "skipped_steps": trainer.skipped_steps,
        }
        if trainer.scaler.is_enabled():
            record["grad_scale"] = float(trainer.scaler.get_scale())
        trainer.metric_logger.log(record, step=trainer.step, kind="train", epoch=trainer.epoch)
        if trainer.is_main:
            losses_text = "  ".join(f"{name} {means[name]:.4f}" for name in loss_names)
            logger.info(
                "step %d/%d  epoch %d  %s  lr %.3g  %.1f img/s  data %.0f%%",
                trainer.step,
                trainer.total_steps,
                trainer.epoch,
                losses_text,
                rates.get("lr", float("nan")),
                record["images_per_second"],
                100 * record["data_time_share"],
            )
        self._reset()


class LabelCountHook(Hook):
    """After each epoch: how many labelled and unlabelled samples it trained on (all ranks).

    Logged on rank 0 and written as a ``data`` record (``samples/labeled``,
    ``samples/unlabeled``) to ``metrics.jsonl``. A resumed epoch counts from the resume.
    """

    def __init__(self) -> None:
        self._images = self._labeled = self._epoch = 0

    def before_epoch(self) -> None:
        self._images = self._labeled = 0
        self._epoch = self.trainer.epoch

    def after_step(self) -> None:
        self._images += self.trainer.step_images
        self._labeled += self.trainer.step_labeled_images

    def after_epoch(self) -> None:
        trainer = self.trainer
        counts = torch.tensor([float(self._labeled), float(self._images)], device=trainer.collective_device)
        if trainer.world_size > 1:
            counts = distributed.all_reduce_mean(counts) * trainer.world_size
        labeled, images = (int(round(value)) for value in counts.tolist())
        record = {"samples/labeled": labeled, "samples/unlabeled": images - labeled}
        trainer.metric_logger.log(record, step=trainer.step, kind="data", epoch=self._epoch)
        if trainer.is_main:
            logger.info("epoch %d: %d labelled and %d unlabelled samples", self._epoch, labeled, images - labeled)


class EvalHook(Hook):
    """Evaluates the EMA weights (or the raw ones) every ``interval`` epochs and at the end.

    One pass over the validation set feeds every evaluator (rank 0 only; other ranks
    wait). Sets ``trainer.metrics`` with a ``fitness`` (COCO's ``0.1 mAP50 + 0.9 mAP``
    when there is a mAP, else the box-prompt mIoU of a mask head, else the mean fidelity
    cosine: without labels the best checkpoint is the one closest to its teachers), and
    ``trainer.improved``.

    Args:
        dataset: the validation data set, or None (no evaluation).
        evaluators: what to measure.
        interval: epochs between evaluations.
        batch_size: images per forward.
        options: ``predict`` options (``conf_threshold``, ``iou_threshold``, ``max_det``).
        collate_fn: batches validation samples (default ``collate_samples``).
    """

    def __init__(
        self,
        dataset: Any,
        evaluators: Sequence[Evaluator],
        *,
        interval: int = 1,
        batch_size: int,
        options: Mapping[str, Any] | None = None,
        collate_fn: Callable[[list[Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.evaluators = list(evaluators)
        self.interval = interval
        self.batch_size = batch_size
        self.options = dict(options or {})

    def after_epoch(self) -> None:
        if not self.trainer.finished and self.trainer.epoch % self.interval == 0:
            self.evaluate()

    def after_train(self) -> None:
        if not self.trainer.interrupted:
            self.evaluate()

    def evaluate(self) -> dict[str, Any] | None:
        """Run the evaluators now; the metrics on rank 0, None elsewhere or without data."""
        trainer = self.trainer
        if self.dataset is None or not self.evaluators:
            return None
        metrics = None
        if trainer.is_main:
            started = time.perf_counter()
            metrics = run_evaluation(
                trainer.evaluated_model,
                self.dataset,
                self.evaluators,
                batch_size=self.batch_size,
                num_workers=trainer.num_workers,
                device=trainer.device,
                amp=trainer.settings.amp,
                amp_dtype=trainer.settings.amp_dtype,
                collate_fn=self.collate_fn,
                predict_options=self.options,
            )
            metrics["fitness"] = _fitness(metrics)
            _log_metrics(metrics, trainer.step, time.perf_counter() - started)
            trainer.metric_logger.log(metrics, step=trainer.step, kind="eval", epoch=trainer.epoch)
        distributed.barrier()
        trainer.evaluated = True
        if metrics is not None:
            trainer.metrics = metrics
            if trainer.best_fitness is None or metrics["fitness"] > trainer.best_fitness:
                trainer.best_fitness = metrics["fitness"]
                trainer.improved = True
        return metrics


def _fitness(metrics: Mapping[str, Any]) -> float:
    if "mAP" in metrics:
        return fitness(dict(metrics))
    if "miou/box" in metrics and metrics["miou/box"] == metrics["miou/box"]:
        return float(metrics["miou/box"])
    cosines = [value for name, value in metrics.items() if name.endswith("/cosine")]
    return sum(cosines) / len(cosines) if cosines else 0.0


def _log_metrics(metrics: Mapping[str, Any], step: int, seconds: float) -> None:
    if "mAP" in metrics:
        logger.info(
            "eval at step %d: mAP50-95 %.4f  mAP50 %.4f  mAP75 %.4f (%.1fs)",
            step,
            metrics["mAP"],
            metrics["mAP50"],
            metrics["mAP75"],
            seconds,
        )
    if "mask_mAP" in metrics:
        logger.info(
            "eval at step %d: mask mAP50-95 %.4f  mAP50 %.4f  mAP75 %.4f",
            step,
            metrics["mask_mAP"],
            metrics["mask_mAP50"],
            metrics["mask_mAP75"],
        )
    for name in sorted(key for key in metrics if key.startswith("fidelity/")):
        logger.info("%s %.4f", name, metrics[name])


class CheckpointHook(Hook):
    """Writes ``last.pt`` every ``interval`` epochs and at the end, ``best.pt`` when the fitness improved.

    Checkpoints hold the student and the distiller apart, the optimizer, scaler, EMA,
    counters and every rank's generator states (see :mod:`vfmkd.core.checkpoint`);
    written atomically on rank 0.

    Args:
        directory: where ``last.pt`` and ``best.pt`` go.
        interval: epochs between ``last.pt`` writes.
        config: the experiment, kept in each checkpoint (to rebuild the model) and written
            to ``config.yaml`` beside ``directory`` when training starts.
        names: the data set's class names, kept in each checkpoint (predict and export
            name their detections with them).
        category_ids: the COCO category id of each class.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        interval: int = 1,
        config: ExperimentConfig | None = None,
        names: Sequence[str] | None = None,
        category_ids: Sequence[int] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.interval = interval
        self.config = config
        self.config_dict = config.to_dict() if config is not None else {}
        self.names = list(names) if names else None
        self.category_ids = list(category_ids) if names and category_ids else None

    @property
    def last_path(self) -> Path:
        return self.directory / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.directory / "best.pt"

    def before_train(self) -> None:
        if self.trainer.is_main and self.config is not None:
            self.directory.parent.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.directory.parent / "config.yaml")
        if self.trainer.step == 0 and self.last_path.is_file() and self.trainer.is_main:
            logger.warning("%s exists and will be overwritten; use resume to continue that run", self.last_path)

    def after_epoch(self) -> None:
        if self.trainer.finished:
            return
        save = self.trainer.epoch % self.interval == 0
        if save or self.trainer.evaluated:
            self.save(last=save, best=self.trainer.improved)

    def after_train(self) -> None:
        self.save(last=True, best=self.trainer.improved)

    def save(self, *, last: bool, best: bool) -> None:
        """Write the requested checkpoints (every rank calls this: rng states are gathered)."""
        trainer = self.trainer
        rng_states = distributed.all_gather_object(capture_rng_state())
        if trainer.is_main and (last or best):
            schedule = trainer.find_hook(LRScheduleHook)
            arguments = dict(
                model=trainer.model,
                optimizer=trainer.optimizer,
                scheduler_state=schedule.schedule.state_dict() if schedule is not None else None,
                ema=trainer.ema,
                scaler=trainer.scaler,
                step=trainer.step,
                epoch=trainer.epoch,
                config_dict=self.config_dict,
                rng_state=rng_states,
                best_fitness=trainer.best_fitness,
                metrics=trainer.metrics,
                batch_in_epoch=trainer.batch_in_epoch,
                world_size=trainer.world_size,
                names=self.names,
                category_ids=self.category_ids,
            )
            if last:
                save_checkpoint(self.last_path, **arguments)
            if best:
                save_checkpoint(self.best_path, **arguments)
                logger.info("new best fitness %.4f: wrote %s", trainer.best_fitness, self.best_path)
        distributed.barrier()
        trainer.evaluated = trainer.improved = False

