"""``extract_features(fliplr=True)``: every image also stored mirrored left-right."""

import numpy as np
import pytest

from vfmkd.features.extract import extract_features, verify_against_teacher
from vfmkd.features.format import mirrored_id
from vfmkd.features.info import format_store_info
from vfmkd.geometry import Frame, hflip_matrix


def _extract(teacher, dataset, root, **options):
    options = {"batch_size": 3, "num_workers": 0, "shard_size": 4, "progress": False, "dtype": "float32", **options}
    return extract_features(teacher, dataset, root, **options)


def test_mirrored_records_hold_the_teacher_on_the_mirror_image(teacher, dataset, tmp_path):
    store = _extract(teacher, dataset, tmp_path / "store", fliplr=True, num_workers=2)
    assert len(store) == 2 * len(dataset.ids) == store.manifest["requested_samples"]
    assert store.is_complete
    for index, sample_id in enumerate(dataset.ids):
        image = dataset.load_raw(index)["image"]
        height, width = image.shape[:2]
        pixels, teacher_frame = teacher.preprocess_image(np.ascontiguousarray(image[:, ::-1]))
        expected = teacher.extract(pixels[None])
        for name, value in store.read(mirrored_id(sample_id)).items():
            np.testing.assert_array_equal(value, expected[name][0].numpy())
        frame = store.frame(mirrored_id(sample_id))
        assert frame.mirrored and not store.frame(sample_id).mirrored
        # The frame starts from the unmirrored original: x -> the teacher's x of (width - x).
        points = np.array([[0.5, 1.5], [width - 2.0, height - 1.0]])
        flipped = np.stack([width - points[:, 0], points[:, 1]], axis=1)
        np.testing.assert_allclose(frame.apply_points(points), teacher_frame.apply_points(flipped), atol=1e-9)
        assert frame.valid == teacher_frame.valid
    assert "mirror images" in format_store_info(store)


def test_mirrors_added_to_a_store_without_them_by_a_resume(teacher, dataset, tmp_path):
    whole = _extract(teacher, dataset, tmp_path / "whole", fliplr=True)
    root = tmp_path / "steps"
    plain = _extract(teacher, dataset, root)
    assert len(plain) == len(dataset.ids) and not any(sample_id.endswith("#fliplr") for sample_id in plain.ids)
    resumed = _extract(teacher, dataset, root, fliplr=True, batch_size=5)
    assert sorted(resumed.ids) == sorted(whole.ids)
    for sample_id in whole.ids:
        np.testing.assert_array_equal(resumed.read(sample_id)["embed"], whole.read(sample_id)["embed"])
        assert resumed.frame(sample_id) == whole.frame(sample_id)


def test_verify_recomputes_mirrored_records(teacher, dataset, tmp_path):
    store = _extract(teacher, dataset, tmp_path / "store", fliplr=True)
    report = verify_against_teacher(store, teacher, dataset, num=len(store), batch_size=5)
    assert report["samples"] == len(store) and report["frames_equal"] == len(store)
    assert all(feature["min_cosine"] > 0.9999 for feature in report["features"].values())
    # The check has teeth: a verify that forgot the mirror would compare these two.
    for sample_id in dataset.ids:
        own, mirror = store.read(sample_id)["embed"], store.read(mirrored_id(sample_id))["embed"]
        assert np.abs(own - mirror).max() > 0.01 * np.abs(own).max()


def test_mirrored_frame_property():
    frame = Frame.identity(10, 20)
    assert not frame.mirrored
    flipped = frame.then(hflip_matrix(20), (10, 20))
    assert flipped.mirrored
    assert not flipped.then(hflip_matrix(20), (10, 20)).mirrored
    with pytest.raises(ValueError):
        Frame(np.zeros((2, 3)), (10, 20), (0, 0, 20, 10), (10, 20))
