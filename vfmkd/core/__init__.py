"""Training engine: the trainer, COCO evaluation, checkpoints, EMA, optimizers, DDP helpers."""

from vfmkd.core.evaluator import COCOEvaluator, evaluate_model
from vfmkd.core.trainer import TaskLoss, Trainer

__all__ = ["COCOEvaluator", "TaskLoss", "Trainer", "evaluate_model"]
