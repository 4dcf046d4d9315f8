"""Evaluation: evaluators (``vfmkd.registry.EVALUATORS``) and the one pass that feeds them."""

from vfmkd.evaluation.base import Evaluator, IndexedCollate, IndexedDataset, run_evaluation
from vfmkd.evaluation.coco import COCOBoxEvaluator, fitness
from vfmkd.evaluation.segm import COCOMaskEvaluator

__all__ = [
    "COCOBoxEvaluator",
    "COCOMaskEvaluator",
    "Evaluator",
    "IndexedCollate",
    "IndexedDataset",
    "fitness",
    "run_evaluation",
]
