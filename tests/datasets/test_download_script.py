"""scripts/download_datasets.sh against local archives (file:// URLs, no network)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "download_datasets.sh"

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("curl") is None, reason="needs bash and curl"
)


def _archive(path: Path, images: int = 128, extra: str | None = None) -> str:
    with zipfile.ZipFile(path, "w") as bundle:
        for index in range(images):
            bundle.writestr(f"coco128/images/train2017/{index:012d}.jpg", b"\xff\xd8fake\xff\xd9")
            bundle.writestr(f"coco128/labels/train2017/{index:012d}.txt", "0 0.5 0.5 0.1 0.1\n")
        if extra:
            bundle.writestr(extra, b"x")
    return path.as_uri()


def _run(url: str, datasets: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "COCO128_URL": url, "DATASETS_DIR": str(datasets), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT)], env=environment, capture_output=True, text=True, timeout=60)


def test_download_checks_and_extracts_atomically(tmp_path: Path) -> None:
    result = _run(_archive(tmp_path / "coco128.zip"), tmp_path / "datasets")
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "datasets" / "coco128" / "images" / "train2017").iterdir())) == 128
    assert sorted(path.name for path in (tmp_path / "datasets").iterdir()) == ["coco128"]
    again = _run("file:///nonexistent.zip", tmp_path / "datasets")
    assert again.returncode == 0 and "already" in again.stdout


@pytest.mark.parametrize(
    ("images", "extra", "message"),
    [
        (127, None, "expected 128 images"),
        (128, "../evil.txt", "unsafe path"),
        (128, "/abs/evil.txt", "unsafe path"),
    ],
)
def test_bad_archives_are_refused(tmp_path: Path, images: int, extra: str | None, message: str) -> None:
    result = _run(_archive(tmp_path / "coco128.zip", images, extra), tmp_path / "datasets")
    assert result.returncode != 0 and message in result.stderr
    assert list((tmp_path / "datasets").iterdir()) == []
    assert not (tmp_path / "evil.txt").exists()


def test_unreachable_url_points_to_the_synthetic_set(tmp_path: Path) -> None:
    (tmp_path / "broken.zip").write_bytes(io.BytesIO(b"not a zip").getvalue())
    result = _run((tmp_path / "missing.zip").as_uri(), tmp_path / "datasets")
    assert result.returncode != 0 and "vfmkd data synth datasets/shapes" in result.stderr
    corrupt = _run((tmp_path / "broken.zip").as_uri(), tmp_path / "datasets")
    assert corrupt.returncode != 0 and "not a valid zip" in corrupt.stderr
