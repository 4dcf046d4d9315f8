"""Feature fidelity: how close the adapted student maps are to the teacher's, on held-out data.

For every distillation term, over the valid cells of the validation images: the mean
cosine similarity between the aligned student and teacher vectors, and the normalised
MSE ``sum((s - t)^2) / sum(t^2)``. Teacher maps come from ``val_feature_path`` when the
teacher has one; else from the training store for the validation images it holds (the
same image under the same id: COCO128 validates on its training images), live for the
rest; a teacher that is all offline and has no validation store is skipped (its weights
are never loaded just to evaluate).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from vfmkd.distillation.distiller import Distiller
from vfmkd.distillation.sources import DistillationDataset, OfflinePlan, TeacherFeatureCollate
from vfmkd.evaluation.base import Collate, Evaluator
from vfmkd.registry import EVALUATORS

logger = logging.getLogger(__name__)


@EVALUATORS.register("feature_fidelity")
class FidelityEvaluator(Evaluator):
    """``fidelity/<teacher>/<feature><-<map>/{cosine,nmse}`` for every term it can measure.

    The validation loader of :func:`~vfmkd.evaluation.base.run_evaluation` reads the
    teachers' validation stores (:meth:`prepare_data`), so box mAP and fidelity share one
    pass. The evaluated module's own distiller (the EMA copy's adapters when evaluating
    the EMA weights) aligns the student maps.

    Args:
        distiller: the distiller trained with the student (its terms and teacher runtime).
    """

    wants_predictions = False

    def __init__(self, distiller: Distiller) -> None:
        self.runtime = distiller.teachers
        self.plans: list[OfflinePlan] = []
        skipped: set[str] = set()
        for key, plan in self.runtime.teacher_plans.items():
            if plan.config.val_feature_path:
                # NOTE: with the mask terms' decoder inputs, which prompt_miou's teacher reads.
                features = tuple(sorted(self.runtime.features_of(key)))
                self.plans.append(OfflinePlan(key, plan.config.val_feature_path, features, 1.0))
            elif plan.offline_ratio >= 1.0:
                skipped.add(key)
        if skipped:
            logger.info(
                "feature fidelity skipped for %s: all offline and no val_feature_path (extract the validation "
                "split with `vfmkd features extract --split val` and set teachers.<name>.val_feature_path)",
                ", ".join(sorted(skipped)),
            )
        self.terms = [term for term in distiller.terms if term.teacher not in skipped]
        self.distiller = distiller
        self._sums: dict[str, list[float]] = {}
        self._store_plans: list[OfflinePlan] | None = None

    def prepare_data(self, dataset: Dataset, collate_fn: Collate) -> tuple[Dataset, Collate]:
        """Samples carry the validation stores' records of the teachers that have one."""
        if not self.terms and not self.plans:
            return dataset, collate_fn
        if self._store_plans is None:
            # NOTE: once: matching the ids to the extracted split lists that split's files.
            self._store_plans = self._training_store_plans(dataset)
        return DistillationDataset(dataset, [*self.plans, *self._store_plans]), TeacherFeatureCollate(collate_fn)

    def _training_store_plans(self, dataset: Dataset) -> list[OfflinePlan]:
        """Training stores of the live-capable teachers without a validation store, limited to
        the validation images they hold (same id and same file)."""
        plans = []
        served = {plan.teacher for plan in self.plans}
        for key, plan in self.runtime.teacher_plans.items():
            if key in served or plan.store is None or plan.offline_ratio >= 1.0 or len(plan.store) == 0:
                continue
            same = images_in_store(dataset, plan.store)
            if same:
                features = tuple(sorted(self.runtime.features_of(key)))
                plans.append(OfflinePlan(key, str(plan.store.path), features, 1.0, only_ids=frozenset(same)))
                logger.info("feature fidelity of %s: %d of %d validation images from its training store",
                            key, len(same), len(dataset))
        return plans

    def reset(self, model: torch.nn.Module) -> None:
        """Measure through ``model.distiller`` (the evaluated copy's adapters) when it has one."""
        self.distiller = getattr(model, "distiller", None) or self.distiller
        self._sums = {term.name: [0.0, 0.0, 0.0, 0.0] for term in self.terms}

    def process(self, batch: Mapping[str, Any], outputs: Mapping[str, Any], predictions: Any) -> None:
        """Accumulate cosine and squared errors of every term over the batch's valid cells."""
        if not self.terms:
            return
        images = batch["images"]
        targets = self.runtime.teacher_targets(dict(batch), images.device, teachers={term.teacher for term in self.terms})
        # NOTE: the student may have run under autocast; the adapters and the comparison run in float32.
        maps = {term.level: outputs["maps"][term.level].float() for term in self.terms}
        for term in self.terms:
            adapted, teacher, valid = self.distiller.aligned_pair(term, maps, targets)
            mask = valid[:, 0]
            cosine = F.cosine_similarity(adapted, teacher, dim=1, eps=1e-8)[mask]
            cells = mask.unsqueeze(1).expand_as(teacher)
            entry = self._sums[term.name]
            entry[0] += float(cosine.sum())
            entry[1] += float(cosine.numel())
            entry[2] += float((adapted - teacher).pow(2)[cells].sum())
            entry[3] += float(teacher.pow(2)[cells].sum())

    def evaluate(self) -> dict[str, float]:
        """Mean cosine and normalised MSE of each term with at least one valid cell."""
        results = {}
        for name, (cosine_sum, count, error, energy) in self._sums.items():
            if count:
                base = name.replace("distill/", "fidelity/", 1)
                results[f"{base}/cosine"] = cosine_sum / count
                results[f"{base}/nmse"] = error / max(energy, 1e-12)
        return results


def images_in_store(dataset: Dataset, store: Any) -> set[str]:
    """Ids of ``dataset``'s images that ``store`` holds: same id and same file in the split
    the store was extracted from (ids alone may name other images in another split)."""
    from vfmkd.datasets import build_dataset

    records = getattr(dataset, "records", None)
    source, split = store.manifest.get("data_resolved"), store.manifest.get("split")
    if not records or not source or not split:
        return set()
    try:
        extracted = build_dataset({"dataset": source, "img_size": 64}, split, train=False)
    except Exception as error:  # noqa: BLE001 - the data may have moved; fidelity then runs live
        logger.debug("training store's data %s (%s) unreadable: %s", source, split, error)
        return set()
    paths = {record.id: Path(record.path).resolve() for record in getattr(extracted, "records", [])}
    return {record.id for record in records if record.id in store and paths.get(record.id) == Path(record.path).resolve()}
