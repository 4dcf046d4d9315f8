"""Feature fidelity: how close the adapted student maps are to the teacher's, on held-out data.

For every distillation term, over the valid cells of the validation images: the mean
cosine similarity between the aligned student and teacher vectors, and the normalised
MSE ``sum((s - t)^2) / sum(t^2)``. Teacher maps come from ``val_feature_path`` when the
teacher has one, else from a live pass; a teacher that is all offline and has no
validation store is skipped (its weights are never loaded just to evaluate).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from vfmkd.distillation.sources import DistillationDataset, OfflinePlan, collate_with_teacher_features

logger = logging.getLogger(__name__)


def feature_fidelity(
    model: torch.nn.Module,
    distiller: Any,
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
) -> dict[str, float]:
    """``fidelity/<teacher>/<feature><-<level>/{cosine,nmse}`` for every term it can measure.

    Args:
        model: the student with its ``distill`` adapters (e.g. the EMA copy).
        distiller: the run's :class:`~vfmkd.distillation.distiller.Distiller`.
        dataset: the validation data set (letterboxed samples).
        batch_size: images per forward.
        num_workers: data loader workers.
        device: where the student runs.
    """
    plans, skipped = [], set()
    for key, plan in distiller.teacher_plans.items():
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
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                images = batch["images"].to(device).float() / 255
                batch = {**batch, "images": images}
                features = model(images)["features"]
                targets = distiller.teacher_targets(batch, device, teachers={term.teacher for term in terms})
                for term in terms:
                    student, teacher, valid = distiller.aligned_pair(model, term, features, targets)
                    mask = valid[:, 0]
                    cosine = F.cosine_similarity(student, teacher, dim=1, eps=1e-8)[mask]
                    cells = mask.unsqueeze(1).expand_as(teacher)
                    entry = sums[term.name]
                    entry[0] += float(cosine.sum())
                    entry[1] += float(cosine.numel())
                    entry[2] += float((student - teacher).pow(2)[cells].sum())
                    entry[3] += float(teacher.pow(2)[cells].sum())
    finally:
        model.train(was_training)
    results = {}
    for name, (cosine_sum, count, error, energy) in sums.items():
        if count:
            base = name.replace("distill/", "fidelity/", 1)
            results[f"{base}/cosine"] = cosine_sum / count
            results[f"{base}/nmse"] = error / max(energy, 1e-12)
    return results


def checkpoint_fidelity(
    config: Any,
    checkpoint_path: str | Path,
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
) -> dict[str, float]:
    """Feature fidelity of a trained checkpoint, through the adapters it trained with.

    Rebuilds the distillation plan of ``config`` on ``model`` (the checkpoint's student, as
    :func:`~vfmkd.core.checkpoint.load_model_from_checkpoint` gives it), loads the
    checkpoint's adapters and loss parameters into ``model.distill`` from the same weights
    (EMA when stored), and measures :func:`feature_fidelity`. Nothing is written back to
    any store. Returns ``{}`` (and says why) when the config has no distillation term, the
    checkpoint has no adapters, or what the plan needs (a training store for the teacher's
    feature shapes, the teacher's weights) is not at hand.

    Raises:
        CheckpointError: the checkpoint's adapters do not fit this config's distillation terms.
    """
    from vfmkd.config import ConfigError
    from vfmkd.core.checkpoint import DISTILL_PREFIX, CheckpointError, load_checkpoint
    from vfmkd.distillation.distiller import build_distiller
    from vfmkd.features.format import FeatureStoreError

    checkpoint = load_checkpoint(checkpoint_path)
    state = checkpoint["ema"]["module"] if checkpoint.get("ema") else checkpoint["model"]
    distill_state = {
        key[len(DISTILL_PREFIX) :]: value for key, value in state.items() if key.startswith(DISTILL_PREFIX)
    }
    if not distill_state:
        logger.info("feature fidelity: %s has no distillation adapters (a detection-only run)", checkpoint_path)
        return {}
    eval_config = config.model_copy(deep=True)
    for teacher in eval_config.teachers.values():
        teacher.write_back = False  # evaluation never adds to a store
    try:
        distiller = build_distiller(eval_config, model, has_labels=getattr(dataset, "has_labels", True))
        if distiller is None:
            return {}
        missing, unexpected = model.distill.load_state_dict(distill_state, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{checkpoint_path}: its distillation adapters do not fit the config's distillation terms "
                f"(missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}); evaluate with the "
                "config the run was trained with (its run directory's config.yaml)"
            )
        model.distill.to(device)
        return feature_fidelity(
            model, distiller, dataset, batch_size=batch_size, num_workers=num_workers, device=device
        )
    except (ConfigError, FeatureStoreError, FileNotFoundError) as error:
        # NOTE: e.g. the training store (the teacher's feature shapes) or the teacher's weights
        # are not on this machine; the mAP is still worth reporting.
        logger.warning("feature fidelity skipped: %s", error)
        return {}
