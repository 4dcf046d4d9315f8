"""Batching of data set samples (``DataLoader(collate_fn=collate_samples)``)."""

from __future__ import annotations

from typing import Any

import torch


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch.

    Args:
        samples: B sample dicts from a data set (see :mod:`vfmkd.datasets`).

    Returns:
        ``images`` uint8 ``[B, 3, H, W]``; ``targets`` with ``batch_idx`` int64 ``[N]``,
        ``cls`` int64 ``[N]`` and ``boxes`` float32 ``[N, 4]`` (xyxy input pixels), N the
        objects of the whole batch; ``masks``: per image uint8 ``[n_i, H, W]`` (None when
        no sample has masks); ``frames``, ``tiles``, ``source_ids``: per image lists;
        ``ids``, ``paths``, ``orig_sizes``: per image.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    counts = torch.tensor([len(sample["cls"]) for sample in samples], dtype=torch.int64)
    targets = {
        "batch_idx": torch.repeat_interleave(torch.arange(len(samples), dtype=torch.int64), counts),
        "cls": torch.cat([sample["cls"].reshape(-1).to(torch.int64) for sample in samples]),
        "boxes": torch.cat([sample["boxes"].reshape(-1, 4).to(torch.float32) for sample in samples]),
    }
    with_masks = any(sample.get("masks") is not None for sample in samples)
    return {
        "images": torch.stack([sample["image"] for sample in samples]),
        "targets": targets,
        "masks": [sample.get("masks") for sample in samples] if with_masks else None,
        "frames": [sample["frames"] for sample in samples],
        "tiles": [sample["tiles"] for sample in samples],
        "source_ids": [sample.get("source_ids", [sample["id"]]) for sample in samples],
        "ids": [sample["id"] for sample in samples],
        "paths": [sample["path"] for sample in samples],
        "orig_sizes": [tuple(sample["orig_size"]) for sample in samples],
    }
