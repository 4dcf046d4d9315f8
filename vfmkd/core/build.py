"""The builder: the only code that turns an :class:`~vfmkd.config.ExperimentConfig` into objects.

:func:`build_trainer` sets up the process (seeds, determinism, ``torchrun`` group),
builds the student, the data sets, the distiller (a
:class:`~vfmkd.distillation.distiller.DistilledModel` trains both), the optimizer, the
evaluators the heads ask for plus feature fidelity, and the default hooks, and hands
them to :class:`~vfmkd.core.trainer.Trainer`. Each part has its own function, so a
library user can build some parts from a config and pass others in.

Random draws follow one order, so a fixed seed gives the same run: the global seeds are
set first, then the student's weights are drawn, then the distiller's adapters.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from vfmkd.config import ConfigError, ExperimentConfig
from vfmkd.core.hooks import (
    CheckpointHook,
    CloseMosaicHook,
    EvalHook,
    Hook,
    LabelCountHook,
    LRScheduleHook,
    MetricsLogHook,
    TeacherLifecycleHook,
)
from vfmkd.core.loader import BatchMix, seed_everything
from vfmkd.core.optim import LRSchedule, build_optimizer
from vfmkd.core.trainer import LossFunction, LossFunctionModel, ProcessContext, Trainer
from vfmkd.datasets import build_dataset
from vfmkd.datasets.collate import collate_samples
from vfmkd.datasets.mixed import MixedDataset, build_train_dataset
from vfmkd.distillation.distiller import DistilledModel, Distiller, build_distiller, task_loss_weights
from vfmkd.distillation.fidelity import FidelityEvaluator
from vfmkd.distillation.mask_prompts import TeacherSegmenter
from vfmkd.distillation.sources import DistillationDataset, TeacherFeatureCollate
from vfmkd.evaluation import Evaluator, PromptMIoUEvaluator
from vfmkd.models import build_model
from vfmkd.ops.prompt_decoder import prompt_family
from vfmkd.registry import EVALUATORS, HEADS

__all__ = [
    "build_evaluators",
    "build_trainer",
    "build_training_model",
    "default_hooks",
    "prepare_config",
    "setup_process",
]

logger = logging.getLogger(__name__)

Collate = Callable[[list[Any]], dict[str, Any]]


def setup_process(config: ExperimentConfig) -> ProcessContext:
    """Join the ``torchrun`` group, pick the device, set determinism flags and seed everything.

    Call it before building the model: the weights are drawn from the seeded generators.
    """
    settings = config.train
    process = ProcessContext.current(settings.device)
    if settings.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
    seed_everything(settings.seed)
    return process


def prepare_config(config: ExperimentConfig) -> ExperimentConfig:
    """The config as the run uses it (a copy when something changes).

    Instance masks are loaded when a head trains on them (``needs_masks``), and a head's
    ``init_from: teacher`` becomes the ``model_path`` of the enabled teacher of its
    decoder's family (SAM or SAM 2); without one (random teachers) the head starts from
    random weights, with a warning.
    """
    heads = config.model.heads
    prepared = config.model_copy(deep=True)
    masks_needed = [name for name, head in heads.items() if getattr(HEADS.get(head.get("type", "")), "needs_masks", False)]
    if masks_needed and not config.data.load_masks:
        logger.info("data.load_masks: on, for the %s head(s)", ", ".join(masks_needed))
        prepared.data.load_masks = True
    for name, head in prepared.model.heads.items():
        if head.get("init_from") == "teacher":
            head["init_from"] = _family_teacher_weights(config, name, head.get("decoder", "sam"))
    return prepared


def _family_teacher_weights(config: ExperimentConfig, head_name: str, family: str) -> str | None:
    where = f"model.heads.{head_name}.init_from"
    for key, teacher in config.teachers.items():
        if teacher.enabled and prompt_family(teacher.name or key) == family:
            if teacher.model_path and Path(teacher.model_path).is_file():
                return teacher.model_path
            logger.warning("%s: teacher '%s' has no weights file; the mask decoder starts from random weights", where, key)
            return None
    raise ConfigError(
        f"{where}: 'teacher' needs an enabled {family.upper()}-family teacher in 'teachers' "
        f"(have: {', '.join(config.teachers) or 'none'}); or give a checkpoint path"
    )


def build_training_model(
    config: ExperimentConfig, student: nn.Module, train_dataset: Dataset, collate_fn: Collate | None = None
) -> tuple[DistilledModel, Dataset, Collate]:
    """The config's training model: the student with its task-loss weights and distiller.

    With distillation terms the training data set reads the teacher stores in the loader
    workers and batches carry the offline records; without any, a mixed set
    (``data.unlabeled``) keeps its labelled part only.

    Returns:
        The model, the training data set and the collate function to train with.
    """
    collate: Collate = collate_fn or collate_samples
    has_labels = getattr(train_dataset, "has_labels", True)
    distiller = build_distiller(config, student)
    if distiller is None and isinstance(train_dataset, MixedDataset) and has_labels:
        # NOTE: unlabelled samples only feed distillation terms; without any they would
        # only dilute the batches (a label_fraction baseline trains on its labels alone).
        logger.warning(
            "no distillation term: the %d unlabelled images are left out; training on the %d labelled ones",
            train_dataset.unlabeled_count, train_dataset.labeled_count,
        )
        train_dataset = train_dataset.parts[0]
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
        collate = TeacherFeatureCollate(collate)
    return model, train_dataset, collate


def build_evaluators(student: nn.Module, dataset: Any, distiller: Distiller | None = None) -> list[Evaluator]:
    """What to measure on ``dataset``: the evaluators the student's heads ask for, and feature fidelity.

    Head evaluators (``vfmkd.registry.EVALUATORS``, built with the data set) need labels;
    a data set without them gets fidelity only.
    """
    evaluators: list[Evaluator] = []
    if getattr(dataset, "has_labels", True):
        names = student.evaluator_names() if hasattr(student, "evaluator_names") else []
        evaluators += [EVALUATORS.get(name)(dataset) for name in names]
    if distiller is not None:
        evaluators.append(FidelityEvaluator(distiller))
        _add_teacher_masks(evaluators, distiller)
    return evaluators


def _add_teacher_masks(evaluators: list[Evaluator], distiller: Distiller) -> None:
    """prompt_miou also measures the student against a mask term's teacher (``miou_teacher/...``).

    The teacher reads its validation store, else runs live; an all-offline teacher without
    a validation store is skipped, as for feature fidelity (never loaded just to evaluate).
    """
    for term in distiller.mask_terms:
        plan = distiller.teachers.teacher_plans[term.teacher]
        if not plan.config.val_feature_path and plan.offline_ratio >= 1.0:
            logger.info("miou_teacher skipped for %s: all offline and no val_feature_path", term.teacher)
            continue
        for evaluator in evaluators:
            if isinstance(evaluator, PromptMIoUEvaluator) and evaluator.teacher_segment is None:
                evaluator.head_name = term.head
                evaluator.teacher_segment = TeacherSegmenter(distiller.teachers, term.teacher)
        return


def default_hooks(
    config: ExperimentConfig,
    val_dataset: Any,
    evaluators: Sequence[Evaluator],
    *,
    collate_fn: Collate | None = None,
    teacher_runtime: Any = None,
) -> list[Hook]:
    """The hooks of a config's run, in calling order.

    LR schedule, close-mosaic, teacher write-back / lifecycle, interval logging,
    evaluation, then checkpoints (which read what the evaluation found).
    """
    settings = config.train
    hooks: list[Hook] = [
        LRScheduleHook(
            lambda steps_per_epoch, total_steps: LRSchedule.from_config(
                settings, steps_per_epoch=steps_per_epoch, total_steps=total_steps
            )
        ),
        CloseMosaicHook(config.data.augment.close_mosaic),
    ]
    if teacher_runtime is not None:
        hooks.append(TeacherLifecycleHook(teacher_runtime))
    options = {
        "conf_threshold": config.eval.conf_threshold,
        "iou_threshold": config.eval.iou_threshold,
        "max_det": config.eval.max_det,
    }
    hooks += [
        MetricsLogHook(settings.log_interval),
        EvalHook(
            val_dataset,
            evaluators,
            interval=settings.eval_interval,
            batch_size=config.eval.batch_size or config.data.batch_size,
            options=options,
            collate_fn=collate_fn,
        ),
        CheckpointHook(
            config.run_dir / "checkpoints",
            interval=settings.save_interval,
            config=config,
            names=getattr(val_dataset, "names", None),
            category_ids=getattr(val_dataset, "eval_category_ids", None),
        ),
    ]
    return hooks


def build_trainer(
    config: ExperimentConfig,
    *,
    resume: bool = False,
    model: nn.Module | None = None,
    train_dataset: Dataset | None = None,
    val_dataset: Dataset | None = None,
    loss_fn: LossFunction | None = None,
    collate_fn: Collate | None = None,
    hooks: Sequence[Hook] = (),
    trainer_class: type[Trainer] = Trainer,
) -> Trainer:
    """A trainer for ``config``; objects passed in replace what the config would build.

    Building sets process-wide state, as a training run should: the global seeds
    (``train.seed``), cuDNN benchmark / deterministic mode (``train.deterministic``) and,
    under ``torchrun``, the process group.

    Args:
        config: the experiment.
        resume: continue from ``run_dir/checkpoints/last.pt``.
        model: the student; default ``vfmkd.models.build_model(config.model)``.
        train_dataset: default ``build_train_dataset(config.data, data.train_split)`` (with
            ``data.unlabeled`` and ``data.label_fraction``, seeded by ``train.seed``).
        val_dataset: default ``build_dataset(config.data, data.val_split, train=False)``.
        loss_fn: ``loss_fn(student, outputs, batch) -> {name: scalar}`` trained as a
            :class:`~vfmkd.core.trainer.LossFunctionModel` instead of the config's task
            losses and distillation terms.
        collate_fn: batches samples; default ``vfmkd.datasets.collate.collate_samples``.
        hooks: extra hooks, called after the default ones.
        trainer_class: a :class:`Trainer` subclass to build.
    """
    config = prepare_config(config)
    process = setup_process(config)
    if model is None:
        model = build_model(config.to_dict()["model"])
    if train_dataset is None:
        train_dataset = build_train_dataset(config.data, config.data.train_split, seed=config.train.seed)
    check_class_count(model, train_dataset, config.data.dataset)
    mixed = train_dataset if isinstance(train_dataset, MixedDataset) else None
    if val_dataset is None:
        val_dataset = build_dataset(config.data, config.data.val_split, train=False)
    distiller = None
    if loss_fn is None:
        training_model, train_dataset, train_collate = build_training_model(config, model, train_dataset, collate_fn)
        distiller = training_model.distiller
        mixed = mixed if distiller is not None else None
    else:
        training_model, train_collate = LossFunctionModel(model, loss_fn), collate_fn or collate_samples
    training_model.to(process.device)
    optimizer = build_optimizer(training_model, config.train)
    evaluators = build_evaluators(model, val_dataset, distiller)
    runtime = distiller.teachers if distiller is not None else None
    all_hooks = default_hooks(config, val_dataset, evaluators, collate_fn=collate_fn, teacher_runtime=runtime)
    if mixed is not None:
        all_hooks.append(LabelCountHook())
    trainer = trainer_class(
        model=training_model,
        train_dataset=train_dataset,
        optimizer=optimizer,
        settings=config.train,
        # NOTE: unlabeled_batch_size adds to the batch only when unlabelled samples are mixed in.
        batch_size=config.data.train_batch_size if mixed is not None else config.data.batch_size,
        collate_fn=train_collate,
        num_workers=config.data.num_workers,
        hooks=[*all_hooks, *hooks],
        process=process,
        run_dir=config.run_dir,
        batch_mix=_batch_mix(config, mixed),
    )
    if resume:
        checkpoint = trainer.resume()
        _warn_config_changes(config, checkpoint.get("config") or {})
    return trainer


def check_class_count(model: nn.Module, dataset: Any, data_name: str) -> None:
    """Fail before any step when a head has fewer classes than the labelled data's names.

    Raises:
        ConfigError: naming the head's ``num_classes`` key and the count to set.
    """
    names = list(getattr(dataset, "names", None) or [])
    if not names or not getattr(dataset, "has_labels", True):
        return
    for head_name, head in (getattr(model, "heads", None) or {}).items():
        count = getattr(head, "num_classes", None)
        if count is not None and count < len(names):
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise ConfigError(
                f"model.heads.{head_name}.num_classes is {count}, but the data set '{data_name}' has "
                f"{len(names)} class names ({shown}); set model.heads.{head_name}.num_classes: {len(names)}"
            )


def _batch_mix(config: ExperimentConfig, mixed: MixedDataset | None) -> BatchMix | None:
    """``data.unlabeled_ratio`` or ``data.unlabeled_batch_size`` for a mixed training set
    (None: plain concatenation)."""
    data = config.data
    if mixed is None:
        return None
    if data.unlabeled_batch_size is not None:
        return BatchMix(labeled=mixed.labeled_count, unlabeled_per_batch=data.unlabeled_batch_size)
    if data.unlabeled_ratio is not None:
        return BatchMix(labeled=mixed.labeled_count, unlabeled_ratio=data.unlabeled_ratio)
    return None


def _warn_config_changes(config: ExperimentConfig, saved: Mapping[str, Any]) -> None:
    current = config.to_dict()
    changed = [
        f"{section}.{key}"
        for section in current
        if isinstance(current[section], dict) and isinstance(saved.get(section), dict)
        for key in sorted(set(current[section]) | set(saved[section]))
        if current[section].get(key) != saved[section].get(key)
    ]
    if changed:
        logger.warning("config changed since the checkpoint: %s", ", ".join(changed))
