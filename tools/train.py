"""Train a student (the seed's command).

    python tools/train.py --config configs/experiments/yolov8_sam2_coco.yaml \\
        --backbone yolov8 --teacher sam2 --dataset coco128

A thin wrapper over ``vfmkd train``; ``--set key=value`` and ``--resume`` work too.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vfmkd.cli import seed_train_main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(seed_train_main())
