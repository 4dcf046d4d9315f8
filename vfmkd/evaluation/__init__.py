"""Evaluation: evaluators (``vfmkd.registry.EVALUATORS``) and the one pass that feeds them."""

from vfmkd.evaluation.base import Evaluator, IndexedCollate, IndexedDataset, run_evaluation
from vfmkd.evaluation.coco import COCOBoxEvaluator, fitness
from vfmkd.evaluation.miou import PromptMIoUEvaluator
from vfmkd.evaluation.segm import COCOMaskEvaluator

__all__ = [
    "COCOBoxEvaluator",
    "COCOMaskEvaluator",
    "Evaluator",
    "IndexedCollate",
    "IndexedDataset",
    "PromptMIoUEvaluator",
    "fitness",
    "run_evaluation",
]
