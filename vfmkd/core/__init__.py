"""Training engine: the builder, the trainer and its hooks, checkpoints, EMA, optimizers."""

from vfmkd.core.build import build_evaluators, build_trainer, build_training_model, default_hooks, setup_process
from vfmkd.core.hooks import (
    CheckpointHook,
    CloseMosaicHook,
    EvalHook,
    Hook,
    LRScheduleHook,
    MetricsLogHook,
    TeacherLifecycleHook,
)
from vfmkd.core.trainer import LossFunctionModel, ProcessContext, Trainer

__all__ = [
    "CheckpointHook",
    "CloseMosaicHook",
    "EvalHook",
    "Hook",
    "LRScheduleHook",
    "LossFunctionModel",
    "MetricsLogHook",
    "ProcessContext",
    "TeacherLifecycleHook",
    "Trainer",
    "build_evaluators",
    "build_trainer",
    "build_training_model",
    "default_hooks",
    "setup_process",
]
