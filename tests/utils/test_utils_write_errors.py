"""Writes that fail (disk full, no permission) say which file, how many bytes were needed and
are free, and what on disk is intact; training and extraction end with that one line."""

from __future__ import annotations

import contextlib
import errno
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from vfmkd.cli import main
from vfmkd.utils import io as vfmkd_io
from vfmkd.utils.io import WriteError, atomic_write_bytes


@contextlib.contextmanager
def small_disk(tmp_path: Path, kilobytes: int):
    """A ``kilobytes`` tmpfs when this process may mount one (root, as in CI); else None."""
    mount_point = tmp_path / f"disk_{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={kilobytes}k", "tmpfs", str(mount_point)], capture_output=True
    ).returncode == 0
    try:
        yield mount_point if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    """A folder on a 256 KB disk: a real tmpfs where it can be mounted, otherwise a folder
    whose writes past 256 KB raise ENOSPC (the writer patched)."""
    with small_disk(tmp_path, 256) as mount_point:
        if mount_point is not None:
            yield mount_point
            return
        folder = tmp_path / "patched_disk"
        folder.mkdir()
        original = vfmkd_io.os.fdopen

        def limited_fdopen(handle, mode="r", *args, **kwargs):
            file = original(handle, mode, *args, **kwargs)
            if "w" not in mode:
                return file
            write = file.write

            def checked(data):
                if file.tell() + len(data) > 256 * 1024:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return write(data)

            file.write = checked
            return file

        monkeypatch.setattr(vfmkd_io.os, "fdopen", limited_fdopen)
        yield folder


def test_a_full_disk_names_the_file_the_bytes_and_keeps_the_old_version(full_disk):
    target = full_disk / "weights.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(WriteError) as caught:
        atomic_write_bytes(target, bytes(400 * 1024))
    message = str(caught.value)
    assert str(target) in message and "ENOSPC" in message
    assert "409,600 bytes needed" in message and "bytes free on" in message
    assert "unchanged (its previous version is intact)" in message
    assert target.read_bytes() == b"old"
    assert sorted(path.name for path in full_disk.iterdir()) == ["weights.bin"]  # no temporary left


def test_no_permission_is_a_write_error_too(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(vfmkd_io.tempfile, "mkstemp", refuse)
    with pytest.raises(WriteError, match=r"EACCES.*was not created; no permission"):
        atomic_write_bytes(tmp_path / "new.txt", b"x")


def _train_config(tmp_path: Path, data_yaml: Path, output_dir: Path) -> Path:
    config = {
        "experiment_name": "full",
        "model": {"backbone": {"type": "yolov8", "scale": "n"},
                  "heads": {"detection": {"type": "yolo_head", "num_classes": 6}}},
        "data": {"dataset": str(data_yaml), "img_size": 64, "batch_size": 2, "num_workers": 0},
        "train": {"max_steps": 1, "output_dir": str(output_dir), "device": "cpu", "amp": False,
                  "eval_interval": 100, "log_interval": 1},
    }
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_training_onto_a_full_disk_ends_with_one_line(tmp_path, synthetic_data_yaml, full_disk, capsys):
    # The logs fit in 256 KB; YOLOv8n's 12 MB checkpoint does not.
    assert main(["train", "--config", str(_train_config(tmp_path, synthetic_data_yaml, full_disk))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not write ") and "last.pt" in err and "Traceback" not in err
    assert "bytes needed" in err and "was not created" in err


def test_extraction_onto_a_full_disk_ends_with_one_line(synthetic_data_yaml, full_disk, capsys):
    store = full_disk / "store"
    arguments = ["features", "extract", "--teacher", "dinov2_vits14", "--random-init", "--image-size", "112",
                 "--data", str(synthetic_data_yaml), "--out", str(store), "--num-workers", "0", "--no-progress",
                 "--dtype", "float32"]
    assert main(arguments) == 2
    err = capsys.readouterr().err
    assert "could not write " in err and "bytes needed" in err and "Traceback" not in err
