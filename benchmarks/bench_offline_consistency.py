"""How far the store's warped teacher maps are from the teacher's own maps of the augmented image.

An offline sample's teacher maps are computed once on the clean image and warped into the
student's augmented frame. That equals what the teacher computes on the augmented image
only where the teacher is equivariant to the augmentation; a CNN's channels are not (a
flipped image does not give flipped features). This script builds the training batches of
an experiment config with one augmentation at a time, computes each sample's teacher maps
both ways (store + warp, and live on the augmented image) and prints, per augmentation and
feature, the mean cosine of the two vectors at each valid cell and the squared difference
over the live maps' variance (0: identical; 1: as far as the mean is).

    python benchmarks/bench_offline_consistency.py CONFIG [--teacher KEY] [--batches 3] [--batch 8]

The config's teacher needs a filled store (``feature_path``). Runs on the CPU. A store
extracted with ``--fliplr`` serves flipped samples from its mirror images, as training does
(``benchmarks/results/offline_consistency_fliplr.md``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NO_AUGMENT = {"mosaic": 0.0, "scale": 0.0, "translate": 0.0, "fliplr": 0.0, "hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0}
VARIANTS = {
    "none": {},
    "fliplr 1.0": {"fliplr": 1.0},
    "translate 0.1": {"translate": 0.1},
    "scale 0.3": {"scale": 0.3},
    "mosaic 0.5": {"mosaic": 0.5},
    "hsv (0.015, 0.7, 0.4)": {"hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4},
}


def measure(config: Any, teacher: str, augment: dict[str, float], batches: int, batch_size: int) -> dict[str, Any]:
    """Mean cosine and normalised squared difference per feature, over ``batches`` batches."""
    from vfmkd.core import build_trainer
    from vfmkd.core.loader import build_train_loader
    from vfmkd.datasets.collate import batch_to_device
    from vfmkd.distillation.sources import OFFLINE_KEY

    config = config.model_copy(deep=True)
    config.data.augment = config.data.augment.model_copy(update={**NO_AUGMENT, **augment, "close_mosaic": 0})
    config.data.num_workers = 0
    config.teachers[teacher].offline_ratio = 1.0
    trainer = build_trainer(config)
    runtime = trainer.model.distiller.teachers
    _, loader, _ = build_train_loader(
        trainer.train_dataset, batch_size=batch_size, num_workers=0, collate_fn=trainer.collate_fn, seed=0
    )
    sums: dict[str, list[float]] = {}
    for index, batch in enumerate(loader):
        if index == batches:
            break
        batch = batch_to_device(batch, torch.device("cpu"))
        stored = runtime.teacher_targets(batch, torch.device("cpu"), {teacher})
        live = runtime.teacher_targets({**batch, OFFLINE_KEY: {}}, torch.device("cpu"), {teacher})
        for (_, feature, _), (offline_maps, offline_valid) in stored.items():
            live_maps, live_valid = live[(teacher, feature, _)]
            cells = (offline_valid & live_valid)[:, 0]
            a, b = offline_maps.permute(0, 2, 3, 1)[cells], live_maps.permute(0, 2, 3, 1)[cells]
            # Both standardised per channel with the live maps' statistics, so a channel's
            # offset or scale (logits around -12, say) does not hide how the two differ.
            mean, std = b.mean(dim=0), b.std(dim=0).clamp(min=1e-6)
            a, b = (a - mean) / std, (b - mean) / std
            cosine = torch.nn.functional.cosine_similarity(a, b, dim=1).mean()
            relative = (a - b).square().mean()
            sums.setdefault(feature, []).append((float(cosine), float(relative)))
    return {feature: tuple(sum(v[i] for v in values) / len(values) for i in range(2)) for feature, values in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--teacher", help="teacher key (default: the config's first)")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    from vfmkd.config import load_config

    config = load_config(args.config)
    teacher = args.teacher or next(iter(config.teachers))
    rows = []
    for name, augment in VARIANTS.items():
        for feature, (cosine, relative) in sorted(measure(config, teacher, augment, args.batches, args.batch).items()):
            rows.append(f"| {name} | {feature} | {cosine:.3f} | {relative:.3f} |")
    print("| augmentation | feature | cosine (store+warp vs live) | squared difference (standardised) |")
    print("|---|---|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
