"""Batching of data set samples (``DataLoader(collate_fn=collate_samples)``) and moving batches to a device."""

from __future__ import annotations

from typing import Any

import torch


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch.

    Args:
        samples: B sample dicts from a data set (see :mod:`vfmkd.datasets`).

    Returns:
        ``images`` uint8 ``[B, 3, H, W]``; ``targets`` (every label of the batch, moved
        to the device with it) with ``batch_idx`` int64 ``[N]``, ``cls`` int64 ``[N]`` and
        ``boxes`` float32 ``[N, 4]`` (xyxy input pixels), N the objects of the whole
        batch, ``frame_index`` int64 ``[N]`` (which of its image's ``frames`` each object
        came from: the mosaic tile; when the samples give it), ``has_labels`` bool ``[B]``
        (False for a sample without annotations: heads leave it out of their losses) and
        ``masks``: per image uint8 ``[n_i, H, W]`` (None when no sample has masks); ``frames``, ``tiles``, ``source_ids``: per image lists;
        ``ids``, ``paths``, ``orig_sizes``: per image.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    counts = torch.tensor([len(sample["cls"]) for sample in samples], dtype=torch.int64)
    targets = {
        "batch_idx": torch.repeat_interleave(torch.arange(len(samples), dtype=torch.int64), counts),
        "cls": torch.cat([sample["cls"].reshape(-1).to(torch.int64) for sample in samples]),
        "boxes": torch.cat([sample["boxes"].reshape(-1, 4).to(torch.float32) for sample in samples]),
        "has_labels": torch.tensor([bool(sample.get("has_labels", True)) for sample in samples]),
    }
    if all("frame_index" in sample for sample in samples):
        targets["frame_index"] = torch.cat([sample["frame_index"].reshape(-1).to(torch.int64) for sample in samples])
    with_masks = any(sample.get("masks") is not None for sample in samples)
    targets["masks"] = [sample.get("masks") for sample in samples] if with_masks else None
    return {
        "images": torch.stack([sample["image"] for sample in samples]),
        "targets": targets,
        "frames": [sample["frames"] for sample in samples],
        "tiles": [sample["tiles"] for sample in samples],
        "source_ids": [sample.get("source_ids", [sample["id"]]) for sample in samples],
        "ids": [sample["id"] for sample in samples],
        "paths": [sample["path"] for sample in samples],
        "orig_sizes": [tuple(sample["orig_size"]) for sample in samples],
    }


def batch_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with float ``images`` in [0, 1] and every tensor of ``targets`` on ``device``.

    uint8 images are divided by 255; tensors inside lists of ``targets`` (per-image masks)
    move too. Other entries (frames, ids, offline teacher records) are left as they are.
    """
    images = batch["images"].to(device, non_blocking=True)
    images = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    targets = batch.get("targets")
    if isinstance(targets, dict):
        targets = {key: _to_device(value, device) for key, value in targets.items()}
    return {**batch, "images": images, "targets": targets}


def _to_device(value: Any, device: torch.device) -> Any:
    if torch.is_tensor(value):
        return value.to(device, non_blocking=True)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(item, device) for item in value)
    return value
