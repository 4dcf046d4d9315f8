"""Compute a teacher's features into a feature store (the seed's command).

    python tools/prepare_teacher_features.py --teacher sam2 --dataset coco128 \\
        --output teacher_features/sam2/

A thin wrapper over ``vfmkd features extract``: the same options (``--dataset`` is
``--data``, ``--output`` is ``--out``), e.g. ``--weights PATH``, ``--random-init``,
``--dtype int8``, ``--features embed``, ``--image-size 512``, ``--limit 32``. Re-run the
same command after an interruption to finish the store.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vfmkd.features.cli import seed_prepare_main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(seed_prepare_main())
