"""Evaluators and the one pass over a validation set that feeds them all.

An :class:`Evaluator` sees every batch once: the batch on the device, the student's raw
outputs and its predictions (in original image pixels). :func:`run_evaluation` makes
that pass for a list of evaluators, so box mAP, feature fidelity and (later) mask
metrics share one loader and one forward per image; training evaluation and
``vfmkd eval`` both call it.

Example::

    from vfmkd.evaluation import COCOBoxEvaluator, run_evaluation

    metrics = run_evaluation(model, val_dataset, [COCOBoxEvaluator(val_dataset)],
                             batch_size=16, num_workers=2, device="cpu")
    print(metrics["mAP"])
"""

from __future__ import annotations

import abc
import os
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vfmkd.datasets.collate import batch_to_device, collate_samples
from vfmkd.utils.amp import resolve_amp
from vfmkd.utils.distributed import unwrap_model

__all__ = ["Collate", "Evaluator", "IndexedCollate", "IndexedDataset", "run_evaluation"]

Collate = Callable[[list[Any]], dict[str, Any]]


class Evaluator(abc.ABC):
    """Accumulates what it measures over one pass, then reports metrics.

    Subclasses implement :meth:`process` and :meth:`evaluate`; :meth:`prepare_data` lets
    one add what it needs to each sample (e.g. cached teacher features) without a second
    loader.
    """

    #: False when the evaluator needs no predictions (they are then not computed for it).
    wants_predictions: bool = True

    def prepare_data(self, dataset: Dataset, collate_fn: Collate) -> tuple[Dataset, Collate]:
        """The data set and collate function the pass uses (default: unchanged)."""
        return dataset, collate_fn

    def reset(self, model: nn.Module) -> None:
        """Start a pass of ``model`` (the evaluated module: a student or a student with its distiller)."""

    @abc.abstractmethod
    def process(self, batch: Mapping[str, Any], outputs: Mapping[str, Any], predictions: Sequence[dict[str, Any]] | None) -> None:
        """Add one batch: ``batch`` on the device (with ``indices``), the student's outputs, per-image predictions."""

    @abc.abstractmethod
    def evaluate(self) -> dict[str, Any]:
        """The metrics of everything processed since :meth:`reset`."""


class IndexedDataset(Dataset):
    """Wraps a data set so each item also carries its index: ``(index, sample)``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


class IndexedCollate:
    """Collate ``(index, sample)`` pairs: the inner collate's batch plus ``indices``."""

    def __init__(self, collate_fn: Collate) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: list[tuple[int, Any]]) -> dict[str, Any]:
        batch = self.collate_fn([sample for _, sample in items])
        batch["indices"] = [int(index) for index, _ in items]
        return batch


def run_evaluation(
    model: nn.Module,
    dataset: Dataset,
    evaluators: Sequence[Evaluator],
    *,
    batch_size: int,
    num_workers: int,
    device: str | torch.device,
    amp: bool = False,
    amp_dtype: str = "auto",
    collate_fn: Collate | None = None,
    predict_options: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """One pass of ``model`` over ``dataset``, feeding every evaluator; their metrics merged.

    Args:
        model: the evaluated module: a student (``student(images) -> outputs``,
            ``student.predict(outputs, batch, **options)``) or a module holding one as
            ``.student`` (a ``DistilledModel``, whose distiller the evaluators may use).
        dataset: the validation data set (letterboxed samples).
        evaluators: what to measure; a metric name given by two evaluators is an error.
        batch_size: images per forward pass.
        num_workers: data loading processes (capped to the CPU count).
        device: where to run.
        amp: autocast the student's forward pass (see :func:`~vfmkd.utils.amp.resolve_amp`).
        amp_dtype: ``auto``, ``bf16`` or ``fp16``.
        collate_fn: batches samples (default ``vfmkd.datasets.collate.collate_samples``).
        predict_options: passed to ``predict`` (``conf_threshold``, ``iou_threshold``, ``max_det``).
        progress: show a progress bar.
    """
    from tqdm import tqdm

    device = torch.device(device)
    student = unwrap_model(getattr(unwrap_model(model), "student", model))
    collate: Collate = collate_fn or collate_samples
    for evaluator in evaluators:
        dataset, collate = evaluator.prepare_data(dataset, collate)
        evaluator.reset(unwrap_model(model))
    loader = DataLoader(
        IndexedDataset(dataset),
        batch_size=batch_size,
        shuffle=False,
        num_workers=min(num_workers, os.cpu_count() or 1),
        collate_fn=IndexedCollate(collate),
        pin_memory=device.type == "cuda",
        # NOTE: a private generator keeps evaluation from drawing on the global torch
        # generator, whose state a resumed training run restores.
        generator=torch.Generator().manual_seed(0),
    )
    autocast_enabled, autocast_dtype = resolve_amp(device, amp, amp_dtype)
    wants_predictions = any(evaluator.wants_predictions for evaluator in evaluators)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(loader, desc="eval", disable=not progress, leave=False):
                batch = batch_to_device(batch, device)
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_enabled):
                    outputs = student(batch["images"])
                predictions = student.predict(outputs, batch, **dict(predict_options or {})) if wants_predictions else None
                for evaluator in evaluators:
                    evaluator.process(batch, outputs, predictions)
    finally:
        model.train(was_training)
    metrics: dict[str, Any] = {}
    for evaluator in evaluators:
        results = evaluator.evaluate()
        clashes = sorted(set(results) & set(metrics))
        if clashes:
            raise ValueError(f"{type(evaluator).__name__} reports metrics another evaluator gave: {clashes}")
        metrics.update(results)
    return metrics
