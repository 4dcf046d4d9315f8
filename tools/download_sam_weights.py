"""Download an official SAM checkpoint into weights/ (the seed's command).

    python tools/download_sam_weights.py --model vit_h    # vit_b | vit_l | vit_h
    python tools/download_sam_weights.py --model vit_b --dir weights --url MIRROR

A thin wrapper over ``vfmkd weights download sam_vit_*``: resumes an interrupted
download and checks the file's size and SHA-256.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vfmkd.teachers.cli import download_sam_weights_main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(download_sam_weights_main())
