"""Download the teacher checkpoints of the seed's workflow into weights/ (the seed's command).

    python tools/download_models.py                       # sam2.1_hiera_b+ and dinov2_vitb14
    python tools/download_models.py --models sam_vit_h,dinov2_vitl14
    python tools/download_models.py --all                 # every checkpoint with a public URL

Files already present are skipped; interrupted downloads resume. A thin wrapper over
``vfmkd weights download``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vfmkd.teachers.cli import download_models_main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(download_models_main())
