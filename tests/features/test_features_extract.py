"""Extraction: values, resume after SIGKILL, several ranks, unreadable images, locking."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from toy_feature_teacher import ToyPoolTeacher, write_images
from vfmkd.datasets import build_dataset
from vfmkd.features.extract import cpu_preprocessor, extract_features
from vfmkd.features.format import FeatureStoreError
from vfmkd.features.store import FeatureStore
from vfmkd.features.writer import StoreLock

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _extract(teacher, dataset, root, **options):
    options = {"batch_size": 3, "num_workers": 0, "shard_size": 4, "progress": False, **options}
    return extract_features(teacher, dataset, root, **options)


def assert_same_store(first: FeatureStore, second: FeatureStore) -> None:
    """Same ids, bit-identical arrays and equal frames."""
    assert first.ids == second.ids
    for sample_id in first.ids:
        one, two = first.read(sample_id), second.read(sample_id)
        assert set(one) == set(two)
        for name in one:
            np.testing.assert_array_equal(one[name], two[name], err_msg=f"{sample_id}/{name}")
        assert first.frame(sample_id) == second.frame(sample_id)


def test_extraction_with_workers_matches_the_teacher(teacher, dataset, tmp_path):
    store = _extract(teacher, dataset, tmp_path / "store", dtype="float32", num_workers=2, batch_size=5)
    for index, sample_id in enumerate(dataset.ids):
        pixels, frame = teacher.preprocess_image(dataset.load_raw(index)["image"])
        expected = teacher.extract(pixels[None])
        for name, value in store.read(sample_id).items():
            np.testing.assert_array_equal(value, expected[name][0].numpy())
        assert store.frame(sample_id) == frame


def test_resume_in_steps_equals_one_run(teacher, dataset, tmp_path):
    whole = _extract(teacher, dataset, tmp_path / "whole", batch_size=4)
    root = tmp_path / "steps"
    assert len(_extract(teacher, dataset, root, limit=5, batch_size=2)) == 5
    resumed = _extract(teacher, dataset, root, batch_size=5, shard_size=3)
    assert resumed.manifest["requested_samples"] == len(dataset.ids)
    assert_same_store(whole, resumed)
    again = _extract(teacher, dataset, root)  # nothing left to do
    assert again.num_shards == resumed.num_shards


def test_unreadable_images_are_skipped(teacher, image_folder, tmp_path, caplog):
    dataset = build_dataset({"dataset": str(image_folder), "img_size": 64}, "train", train=False)
    (image_folder / "img004.png").write_bytes(b"not a png any more")
    store = _extract(teacher, dataset, tmp_path / "store")
    assert "img004" not in store and len(store) == len(dataset.ids) - 1
    assert not store.is_complete
    assert "skipped 1 unreadable image" in caplog.text


def test_workers_get_a_preprocessor_without_weights(teacher, dataset):
    image = dataset.load_raw(0)["image"]
    preprocess = cpu_preprocessor(teacher, image)
    light = preprocess.__self__
    assert light is not teacher and not list(light.parameters())
    assert len(list(teacher.parameters())) == 2
    pixels, frame = preprocess(image)
    expected_pixels, expected_frame = teacher.preprocess_image(image)
    assert torch.equal(pixels, expected_pixels) and frame == expected_frame


def test_a_second_writer_is_refused_while_one_writes(teacher, dataset, tmp_path):
    root = tmp_path / "store"
    with StoreLock(root):
        with pytest.raises(FeatureStoreError, match="another extraction is writing"):
            _extract(teacher, dataset, root)
    assert len(_extract(teacher, dataset, root)) == len(dataset.ids)


# --------------------------------------------------------------------------- SIGKILL
def _cli_command(images: Path, out: Path) -> list[str]:
    arguments = [
        "features", "extract", "--teacher", "toy_pool", "--random-init", "--data", str(images),
        "--out", str(out), "--batch-size", "2", "--shard-size", "3", "--num-workers", "2", "--no-progress",
    ]
    code = (
        "import sys, toy_feature_teacher as toy; toy.install(); "
        "from vfmkd.features.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    return [sys.executable, "-c", code, *arguments]


def _environment(delay: float) -> dict[str, str]:
    paths = [str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in paths if path),
            "TOY_TEACHER_DELAY": str(delay), "OMP_NUM_THREADS": "1"}


def _committed(root: Path) -> int:
    return len(list((root / "shards").glob("rank*.json"))) if (root / "shards").exists() else 0


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tmp_path):
    images = tmp_path / "images"
    write_images(images, 30, seed=5)
    reference = tmp_path / "reference"
    done = subprocess.run(_cli_command(images, reference), env=_environment(0.0), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    root = tmp_path / "killed"
    rng = np.random.default_rng(0)
    kills = 0
    for _ in range(3):
        process = subprocess.Popen(_cli_command(images, root), env=_environment(0.1), start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # kill after 0 or 1 newly committed shards plus a random pause: during start-up,
        # mid-shard or between shards
        target = _committed(root) + int(rng.integers(0, 2))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None and _committed(root) < target:
            time.sleep(0.01)
        time.sleep(float(rng.uniform(0.0, 0.25)))
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            kills += 1
        process.wait(timeout=30)
        process.stderr.close()
    assert kills >= 2, "the extraction finished before it could be killed; raise TOY_TEACHER_DELAY"
    partial = FeatureStore.open(root)
    assert len(partial) < 30
    finished = subprocess.run(_cli_command(images, root), env=_environment(0.0), capture_output=True, text=True,
                              timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert_same_store(FeatureStore.open(reference), FeatureStore.open(root, verify=True))
    assert not list((root / "shards").glob(".*"))


# --------------------------------------------------------------------------- torchrun-like
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_worker(rank: int, world_size: int, port: int, images: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    from vfmkd.utils.distributed import cleanup, init_distributed

    init_distributed()
    try:
        dataset = build_dataset({"dataset": images, "img_size": 64}, "train", train=False)
        _extract(ToyPoolTeacher(image_size=32), dataset, out)
    finally:
        cleanup()


@pytest.mark.slow
def test_two_ranks_write_their_own_shards_and_equal_one_process(teacher, dataset, image_folder, tmp_path):
    single = _extract(teacher, dataset, tmp_path / "single")
    out = tmp_path / "ranks"
    _extract(teacher, dataset, out, limit=5)  # ranks resume a partial store
    mp.spawn(_rank_worker, args=(2, _free_port(), str(image_folder), str(out)), nprocs=2, join=True)
    store = FeatureStore.open(out)
    names = {path.name.split("-")[0] for path in (out / "shards").glob("*.json")}
    assert names == {"rank0", "rank1"}
    assert store.manifest["num_samples"] == len(dataset.ids)
    assert_same_store(single, store)
