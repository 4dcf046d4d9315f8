"""Training engine: the trainer, COCO evaluation, checkpoints, EMA, optimizers, DDP helpers."""

from vfmkd.core.evaluator import COCOEvaluator, evaluate_model
from vfmkd.core.trainer import LossFunctionModel, Trainer

__all__ = ["COCOEvaluator", "LossFunctionModel", "Trainer", "evaluate_model"]
