#!/usr/bin/env bash
# Download COCO128 (the first 128 images of COCO train2017, YOLO layout) to datasets/coco128.
#
#   bash scripts/download_datasets.sh            # into <project>/datasets
#   DATASETS_DIR=/data bash scripts/download_datasets.sh
#
# The archive is checked (zip integrity, no paths escaping the target, 128 images) and
# extracted into a temporary folder that is renamed into place, so an interrupted run
# never leaves a half data set. Without network, use the built-in synthetic data set:
#   vfmkd data synth datasets/shapes      (or data.dataset: shapes, generated on first use)
set -euo pipefail

PROJECT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATASETS_DIR="${DATASETS_DIR:-$PROJECT_ROOT/datasets}"
URL="${COCO128_URL:-https://github.com/ultralytics/assets/releases/download/v0.0.0/coco128.zip}"
EXPECTED_IMAGES=128

if [[ -x "$PROJECT_ROOT/.venv/bin/python" ]]; then
    PYTHON="${PYTHON:-$PROJECT_ROOT/.venv/bin/python}"
else
    PYTHON="${PYTHON:-python3}"
fi

count_images() {
    find "$1" -maxdepth 1 -type f \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' \) 2>/dev/null | wc -l | tr -d ' '
}

TARGET="$DATASETS_DIR/coco128"
if [[ "$(count_images "$TARGET/images/train2017")" == "$EXPECTED_IMAGES" ]]; then
    echo "coco128 is already in $TARGET"
    exit 0
fi

mkdir -p "$DATASETS_DIR"
WORK="$(mktemp -d "$DATASETS_DIR/.coco128.download.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

no_network() {
    echo "error: could not download $URL" >&2
    echo "       (no network, or the server refused: see the message above)." >&2
    echo "       Use the built-in synthetic data set instead:" >&2
    echo "           vfmkd data synth datasets/shapes      (or set data.dataset: shapes)" >&2
    exit 1
}

echo "downloading $URL"
if command -v curl >/dev/null 2>&1; then
    curl -fL --retry 3 --retry-delay 2 --connect-timeout 15 --max-time 900 -o "$WORK/coco128.zip" "$URL" || no_network
else
    "$PYTHON" - "$URL" "$WORK/coco128.zip" <<'PY' || no_network
import shutil, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=15) as response, open(sys.argv[2], "wb") as out:
    shutil.copyfileobj(response, out)
PY
fi

"$PYTHON" - "$WORK/coco128.zip" "$WORK/extract" "$EXPECTED_IMAGES" <<'PY'
"""Check the archive and extract it safely (no absolute paths, no '..', no links)."""
import stat
import sys
import zipfile
from pathlib import Path, PurePosixPath

archive, out, expected = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
try:
    bundle = zipfile.ZipFile(archive)
except zipfile.BadZipFile as error:
    sys.exit(f"error: {archive} is not a valid zip file ({error}); run the script again")
with bundle:
    broken = bundle.testzip()
    if broken is not None:
        sys.exit(f"error: {archive} is corrupt (bad CRC in {broken}); run the script again")
    members = bundle.infolist()
    for member in members:
        name = PurePosixPath(member.filename)
        if name.is_absolute() or ".." in name.parts or "\\" in member.filename or ":" in name.parts[0]:
            sys.exit(f"error: unsafe path in the archive: {member.filename!r}; not extracting")
        if stat.S_ISLNK(member.external_attr >> 16):
            sys.exit(f"error: the archive holds a link ({member.filename!r}); not extracting")
    images = [
        member for member in members
        if member.filename.startswith("coco128/images/train2017/") and not member.is_dir()
        and member.filename.lower().endswith((".jpg", ".jpeg", ".png"))
    ]
    if len(images) != expected:
        sys.exit(f"error: expected {expected} images in coco128/images/train2017, the archive has {len(images)}")
    out.mkdir(parents=True)
    root = out.resolve()
    for member in members:
        destination = (out / member.filename).resolve()
        if root not in destination.parents and destination != root:
            sys.exit(f"error: {member.filename!r} would land outside {out}; not extracting")
        bundle.extract(member, out)
print(f"checked and extracted {len(members)} files ({len(images)} images)")
PY

EXTRACTED="$WORK/extract/coco128"
if [[ "$(count_images "$EXTRACTED/images/train2017")" != "$EXPECTED_IMAGES" ]]; then
    echo "error: the extracted data set does not hold $EXPECTED_IMAGES images" >&2
    exit 1
fi
if [[ -e "$TARGET" ]]; then
    # An incomplete earlier copy: move it aside, then put the new one in place.
    mv "$TARGET" "$WORK/previous"
fi
mv "$EXTRACTED" "$TARGET"
echo "coco128 is in $TARGET ($EXPECTED_IMAGES images); use it with data.dataset: coco128"
