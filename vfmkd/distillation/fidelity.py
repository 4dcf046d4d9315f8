"""Feature fidelity: how close the adapted student maps are to the teacher's, on held-out data.

For every distillation term, over the valid cells of the validation images: the mean
cosine similarity between the aligned student and teacher vectors, and the normalised
MSE ``sum((s - t)^2) / sum(t^2)``. Teacher maps come from ``val_feature_path`` when the
teacher has one, else from a live pass; a teacher that is all offline and has no
validation store is skipped (its weights are never loaded just to evaluate).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from vfmkd.distillation.distiller import Distiller
from vfmkd.distillation.sources import DistillationDataset, OfflinePlan, collate_with_teacher_features

logger = logging.getLogger(__name__)


def feature_fidelity(
    student: torch.nn.Module,
    distiller: Distiller,
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
) -> dict[str, float]:
    """``fidelity/<teacher>/<feature><-<level>/{cosine,nmse}`` for every term it can measure.

    Args:
        student: the student (e.g. the EMA copy's).
        distiller: the distiller trained with it (the same copy's adapters).
        dataset: the validation data set (letterboxed samples).
        batch_size: images per forward.
        num_workers: data loader workers.
        device: where the student runs.
    """
    plans, skipped = [], set()
    runtime = distiller.teachers
    for key, plan in runtime.teacher_plans.items():
        if plan.config.val_feature_path:
            features = tuple(sorted({term.feature for term in distiller.terms if term.teacher == key}))
            plans.append(OfflinePlan(key, plan.config.val_feature_path, features, 1.0))
        elif plan.offline_ratio >= 1.0:
            skipped.add(key)
    if skipped:
        logger.info(
            "feature fidelity skipped for %s: all offline and no val_feature_path (extract the validation "
            "split with `vfmkd features extract --split val` and set teachers.<name>.val_feature_path)",
            ", ".join(sorted(skipped)),
        )
    terms = [term for term in distiller.terms if term.teacher not in skipped]
    if not terms:
        return {}
    loader = DataLoader(
        DistillationDataset(dataset, plans),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_with_teacher_features,
    )
    sums: dict[str, list[float]] = {term.name: [0.0, 0.0, 0.0, 0.0] for term in terms}
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                images = batch["images"].to(device).float() / 255
                batch = {**batch, "images": images}
                maps = student(images)["features"]
                targets = runtime.teacher_targets(batch, device, teachers={term.teacher for term in terms})
                for term in terms:
                    adapted, teacher, valid = distiller.aligned_pair(term, maps, targets)
                    mask = valid[:, 0]
                    cosine = F.cosine_similarity(adapted, teacher, dim=1, eps=1e-8)[mask]
                    cells = mask.unsqueeze(1).expand_as(teacher)
                    entry = sums[term.name]
                    entry[0] += float(cosine.sum())
                    entry[1] += float(cosine.numel())
                    entry[2] += float((adapted - teacher).pow(2)[cells].sum())
                    entry[3] += float(teacher.pow(2)[cells].sum())
    finally:
        student.train(was_training)
    results = {}
    for name, (cosine_sum, count, error, energy) in sums.items():
        if count:
            base = name.replace("distill/", "fidelity/", 1)
            results[f"{base}/cosine"] = cosine_sum / count
            results[f"{base}/nmse"] = error / max(energy, 1e-12)
    return results
