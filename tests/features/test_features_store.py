"""The store on its own: layout, reads, statistics, validation, integrity, resume repair."""

import json
import re
import pickle

import numpy as np
import pytest
import torch

from vfmkd.features.extract import extract_features
from vfmkd.features.format import (
    FeatureStoreError,
    StoreCorruptError,
    StoreHeader,
    StoreMismatchError,
    StoreNotFoundError,
    describe_differences,
)
from vfmkd.features.store import FeatureStore
from vfmkd.features.writer import ShardWriter, finalize_store, prepare_store_for_writing
from vfmkd.geometry import resize_frame


def _extract(teacher, dataset, root, **options):
    options = {"batch_size": 3, "num_workers": 0, "shard_size": 4, "progress": False, **options}
    return extract_features(teacher, dataset, root, **options)


def _reference(teacher, dataset):
    """Per id: float32 features and frame computed directly."""
    result = {}
    for index, sample_id in enumerate(dataset.ids):
        pixels, frame = teacher.preprocess_image(dataset.load_raw(index)["image"])
        features = teacher.extract(pixels[None])
        result[sample_id] = ({name: value[0].numpy() for name, value in features.items()}, frame)
    return result


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "int8"])
def test_round_trip_every_codec(teacher, dataset, tmp_path, dtype):
    store = _extract(teacher, dataset, tmp_path / "store", dtype=dtype)
    reference = _reference(teacher, dataset)
    assert len(store) == len(dataset.ids) and store.ids == sorted(dataset.ids)
    assert set(store.specs) == {"embed", "hires_s8"} and store.specs["embed"].channels == 4
    tolerance = {"float32": 0.0, "float16": 2.0**-10, "bfloat16": 2.0**-7, "int8": 1.0 / 127}[dtype]
    for sample_id, (features, frame) in reference.items():
        assert sample_id in store
        values = store.read(sample_id)
        for name, expected in features.items():
            assert values[name].dtype == np.float32 and values[name].shape == expected.shape
            assert np.abs(values[name] - expected).max() <= tolerance * np.abs(expected).max() + 1e-12
        assert store.frame(sample_id) == frame
    batch = store.read_many(dataset.ids[:5], ["embed"])
    assert list(batch) == ["embed"] and batch["embed"].shape == (5, 4, 2, 2)
    np.testing.assert_array_equal(batch["embed"][2], store.read(dataset.ids[2])["embed"])
    assert "missing" not in store


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "int8"])
def test_float16_reads_match_the_float32_reads_cast(teacher, dataset, tmp_path, dtype):
    store = _extract(teacher, dataset, tmp_path / "store", dtype=dtype)
    ids = store.ids[:5]
    for sample_id in ids:
        half, single = store.read(sample_id, dtype=np.float16), store.read(sample_id)
        explicit = store.read(sample_id, dtype=np.float32)
        for name in store.specs:
            assert half[name].dtype == np.float16 and half[name].shape == single[name].shape
            assert half[name].flags.writeable and half[name].flags.c_contiguous
            # float32 -> float16 is one rounding whichever way the codec gets there
            np.testing.assert_array_equal(half[name], torch.from_numpy(single[name]).half().numpy())
            np.testing.assert_array_equal(explicit[name], single[name])
    batch = store.read_many(ids, ["hires_s8"], dtype="float16")
    assert batch["hires_s8"].dtype == np.float16 and batch["hires_s8"].shape == (5, 3, 4, 4)
    np.testing.assert_array_equal(batch["hires_s8"][3], store.read(ids[3], ["hires_s8"], dtype=np.float16)["hires_s8"])


def test_float16_reads_of_a_float16_store_are_the_stored_bytes(teacher, dataset, tmp_path):
    root = tmp_path / "store"
    store = _extract(teacher, dataset, root, dtype="float16", shard_size=4)
    stored = np.load(root / "shards/rank0-000000.embed.npy")
    record = json.loads((root / "shards/rank0-000000.json").read_text())
    for row, sample_id in enumerate(record["ids"]):
        values = store.read(sample_id, ["embed"], dtype=np.float16)["embed"]
        assert values.tobytes() == stored[row].tobytes()
        values[...] = 0  # a copy: the memory map is untouched
    assert np.load(root / "shards/rank0-000000.embed.npy").tobytes() == stored.tobytes()


def test_float16_reads_of_wider_codecs_saturate_and_other_dtypes_are_refused(teacher, tmp_path):
    header = StoreHeader("toy", teacher.fingerprint_fields(), "float32", dict(teacher.feature_specs))
    prepare_store_for_writing(tmp_path, header)
    writer = ShardWriter(tmp_path, header, rank=0, shard_size=4, start_index=0)
    big = {"embed": np.full((1, 4, 2, 2), 1e6, np.float32), "hires_s8": np.full((1, 3, 4, 4), -1e6, np.float32)}
    writer.add(["a"], [resize_frame((32, 32), (32, 32)).to_dict()], big)
    writer.flush()
    finalize_store(tmp_path, header)
    store = FeatureStore.open(tmp_path)
    half = store.read("a", dtype=np.float16)
    assert np.isposinf(half["embed"]).all() and np.isneginf(half["hires_s8"]).all()
    assert store.read("a")["embed"].max() == 1e6
    for wrong in (np.float64, np.int8, torch.float16, "half precision"):
        with pytest.raises(ValueError, match="decode to float32 or float16"):
            store.read("a", dtype=wrong)


def test_manifest_layout_and_statistics(teacher, dataset, tmp_path):
    root = tmp_path / "store"
    store = _extract(teacher, dataset, root, dtype="float32", data_source="imgs", split="train")
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["teacher"] == "toy_pool" and manifest["codec"] == "float32"
    assert manifest["fingerprint"] == teacher.fingerprint()
    assert manifest["fingerprint_fields"] == json.loads(json.dumps(teacher.fingerprint_fields()))
    assert manifest["random_init"] is True and manifest["num_samples"] == len(dataset.ids)
    assert manifest["split"] == "train" and manifest["data_source"] == "imgs"
    assert manifest["features"]["hires_s8"]["stride"] == 8
    assert {"created", "updated", "content_sha256", "stats"} <= set(manifest)
    shard_files = sorted(path.name for path in (root / "shards").iterdir())
    assert "rank0-000000.json" in shard_files and "rank0-000000.embed.npy" in shard_files
    assert np.load(root / "shards/rank0-000000.embed.npy").shape == (4, 4, 2, 2)
    everything = np.stack([store.read(sample_id)["hires_s8"] for sample_id in store.ids])
    mean, std = store.stats("hires_s8")
    np.testing.assert_allclose(mean, everything.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(std, everything.std(axis=(0, 2, 3)), rtol=1e-4)
    np.testing.assert_allclose(manifest["stats"]["hires_s8"]["mean"], mean, rtol=1e-6)


def test_reads_after_pickle_and_in_loader_workers(teacher, dataset, tmp_path):
    store = _extract(teacher, dataset, tmp_path / "store")
    expected = {sample_id: store.read(sample_id)["embed"] for sample_id in store.ids}
    clone = pickle.loads(pickle.dumps(store))
    assert clone._arrays == {}
    np.testing.assert_array_equal(clone.read(store.ids[3])["embed"], expected[store.ids[3]])

    class Reads(torch.utils.data.Dataset):
        def __len__(self):
            return len(store.ids)

        def __getitem__(self, index):
            return store.read(store.ids[index])["embed"]

    loader = torch.utils.data.DataLoader(Reads(), batch_size=4, num_workers=2)
    loaded = torch.cat(list(loader)).numpy()
    np.testing.assert_array_equal(loaded, np.stack([expected[sample_id] for sample_id in store.ids]))


def test_unknown_ids_and_features_say_what_exists(teacher, dataset, tmp_path):
    store = _extract(teacher, dataset, tmp_path / "store")
    with pytest.raises(KeyError, match=r"sample 'nope' is not in the feature store .*12 samples.*'img000'"):
        store.read("nope")
    with pytest.raises(KeyError, match="no feature `patch`; it holds embed, hires_s8"):
        store.read(store.ids[0], ["patch"])
    with pytest.raises(StoreNotFoundError, match="vfmkd features extract"):
        FeatureStore.open(tmp_path / "elsewhere")


def test_expect_names_each_differing_field(teacher, dataset, tmp_path):
    root = tmp_path / "store"
    _extract(teacher, dataset, root)
    expect = teacher.fingerprint_fields()
    FeatureStore.open(root, expect=expect)
    only_embed = dict(expect, features={"embed": expect["features"]["embed"]})
    FeatureStore.open(root, expect=only_embed)  # a subset of the stored features is fine
    wrong = dict(expect, random_init=False, preprocessing=dict(expect["preprocessing"], image_size=512))
    with pytest.raises(StoreMismatchError) as caught:
        FeatureStore.open(root, expect=wrong)
    assert caught.value.differences == [
        "random_init: store true, asked false",
        "preprocessing.image_size: store 32, asked 512",
    ]
    assert "random_init: store true, asked false" in str(caught.value)
    with pytest.raises(StoreMismatchError, match=r"features.patch: store \(absent\)"):
        FeatureStore.open(root, expect={"features": {"patch": {"channels": 384}}})


def test_describe_differences_both_ways():
    stored = {"a": 1, "b": {"c": [1, 2], "d": "x"}, "extra": True}
    asked = {"a": 1, "b": {"c": (1, 2), "d": "y"}}
    assert describe_differences(stored, asked) == ["b.d: store x, asked y", "extra: store true, asked (absent)"]
    assert describe_differences(stored, asked, both_ways=False) == ["b.d: store x, asked y"]


def test_hand_edited_manifest_is_detected(teacher, dataset, tmp_path):
    root = tmp_path / "store"
    _extract(teacher, dataset, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["fingerprint_fields"]["random_init"] = False
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreCorruptError, match="manifest.json was edited by hand.*re-run the extraction"):
        FeatureStore.open(root)
    # the same extraction command rebuilds the manifest from the shard records
    store = _extract(teacher, dataset, root)
    assert len(store) == len(dataset.ids) and store.manifest["random_init"] is True


def test_truncated_and_damaged_shards_are_detected_and_rebuilt(teacher, dataset, tmp_path):
    root = tmp_path / "store"
    reference = {sample_id: values["embed"] for sample_id, values in
                 ((i, _extract(teacher, dataset, tmp_path / "clean").read(i)) for i in dataset.ids)}
    _extract(teacher, dataset, root)
    truncated = root / "shards/rank0-000001.hires_s8.npy"
    truncated.write_bytes(truncated.read_bytes()[:-10])
    with pytest.raises(StoreCorruptError) as caught:
        FeatureStore.open(root)
    message = str(caught.value)
    assert str(truncated) in message and "truncated" in message and "re-run the extraction" in message
    store = _extract(teacher, dataset, root)  # resume drops the shard and recomputes its samples
    assert len(store) == len(dataset.ids)
    for sample_id in dataset.ids:
        np.testing.assert_array_equal(store.read(sample_id)["embed"], reference[sample_id])

    flipped = root / "shards/rank0-000000.embed.npy"
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 0xFF
    flipped.write_bytes(bytes(data))
    FeatureStore.open(root)  # same size: only the full check sees it
    with pytest.raises(StoreCorruptError, match="does not match the SHA-256"):
        FeatureStore.open(root, verify=True)
    store = _extract(teacher, dataset, root, verify_existing=True)
    FeatureStore.open(root, verify=True)
    for sample_id in dataset.ids:
        np.testing.assert_array_equal(store.read(sample_id)["embed"], reference[sample_id])


def test_uncommitted_leftovers_are_ignored_and_cleaned(teacher, dataset, tmp_path):
    root = tmp_path / "store"
    _extract(teacher, dataset, root, limit=8)
    shards = root / "shards"
    # a writer killed mid-shard: arrays without a record, and temporary files
    (shards / "rank0-000002.embed.npy").write_bytes(b"partial")
    (shards / ".rank0-000002.hires_s8.npy.abc.tmp").write_bytes(b"partial")
    (shards / ".rank0-000002.json.def.tmp").write_bytes(b"{")
    store = FeatureStore.open(root)
    assert len(store) == 8
    store = _extract(teacher, dataset, root)
    assert len(store) == len(dataset.ids)
    assert not list(shards.glob(".*")) and all(
        path.with_name(path.name.split(".")[0] + ".json").exists() for path in shards.glob("*.npy")
    )


def test_reader_derives_counts_and_stats_from_records(teacher, dataset, tmp_path):
    root = tmp_path / "store"
    full = _extract(teacher, dataset, root)
    header = StoreHeader.from_manifest(full.manifest)
    old_manifest = (root / "manifest.json").read_text()
    # a shard committed after the manifest was written (writer killed before its update)
    (root / "shards/rank0-000001.json").rename(tmp_path / "held.json")
    finalize_store(root, header)
    (tmp_path / "held.json").rename(root / "shards/rank0-000001.json")
    store = FeatureStore.open(root)
    assert store.manifest["num_samples"] == len(dataset.ids) - 4 and len(store) == len(dataset.ids)
    for name in store.specs:
        np.testing.assert_allclose(store.stats(name)[0], full.stats(name)[0], rtol=1e-6)
    assert json.loads(old_manifest)["num_samples"] == len(dataset.ids)


def test_writer_refuses_other_teacher_codec_or_features(teacher, dataset, tmp_path):
    from toy_feature_teacher import ToyPoolTeacher

    root = tmp_path / "store"
    _extract(teacher, dataset, root, limit=4)
    with pytest.raises(StoreMismatchError, match="codec: store float16, asked int8"):
        _extract(teacher, dataset, root, dtype="int8")
    with pytest.raises(StoreMismatchError, match=r"fingerprint_fields.preprocessing.image_size: store 32, asked 64"):
        _extract(ToyPoolTeacher(image_size=64), dataset, root)
    with pytest.raises(StoreMismatchError) as caught:
        _extract(ToyPoolTeacher(image_size=32, features=["embed"]), dataset, root)
    assert any(line.startswith("fingerprint_fields.features.hires_s8: store {") for line in caught.value.differences)
    with pytest.raises(StoreMismatchError, match="weights_sha256"):
        _extract(ToyPoolTeacher(image_size=32, seed=1), dataset, root)
    with pytest.raises(StoreMismatchError, match="split: store None, asked val|split: store null, asked val"):
        _extract(teacher, dataset, root, split="val")
    assert len(FeatureStore.open(root)) == 4


def test_writer_rejects_values_it_cannot_store(teacher, tmp_path):
    header = StoreHeader("toy", teacher.fingerprint_fields(), "float16", dict(teacher.feature_specs))
    prepare_store_for_writing(tmp_path, header)
    writer = ShardWriter(tmp_path, header, rank=0, shard_size=4, start_index=0)
    frame = resize_frame((32, 32), (32, 32)).to_dict()
    big = {"embed": np.full((1, 4, 2, 2), 1e6, np.float32), "hires_s8": np.zeros((1, 3, 4, 4), np.float32)}
    with pytest.raises(FeatureStoreError, match="beyond float16.*--dtype bfloat16"):
        writer.add(["a"], [frame], big)
    nan = {"embed": np.full((1, 4, 2, 2), np.nan, np.float32), "hires_s8": np.zeros((1, 3, 4, 4), np.float32)}
    with pytest.raises(FeatureStoreError, match=r"NaN or infinite `embed` values for sample\(s\) \['b'\]"):
        writer.add(["b"], [frame], nan)
    wrong = {"embed": np.zeros((1, 4, 3, 3), np.float32), "hires_s8": np.zeros((1, 3, 4, 4), np.float32)}
    with pytest.raises(FeatureStoreError, match="shape"):
        writer.add(["c"], [frame], wrong)


def test_mapped_shards_are_bounded(teacher, dataset, tmp_path):
    import gc
    import os

    store = _extract(teacher, dataset, tmp_path / "store", shard_size=2)
    expected = {sample_id: store.read(sample_id)["embed"] for sample_id in store.ids}
    assert store.num_shards == 6 and store.max_open_shards >= 4
    del store
    gc.collect()
    bounded = FeatureStore.open(tmp_path / "store", max_open_shards=2)
    descriptors = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    for sample_id in reversed(sorted(expected)):
        np.testing.assert_array_equal(bounded.read(sample_id)["embed"], expected[sample_id])
    assert list(bounded._arrays) == [1, 0]
    if descriptors is not None:
        assert len(os.listdir("/proc/self/fd")) - descriptors <= 2 * 2  # 2 shards x 2 features


def test_dotted_feature_names_round_trip_and_bad_names_are_refused(teacher, tmp_path):
    # A model's named maps (``detection.cls_p3``) are stored under their own names, int8 scale files too.
    specs = {f"detection.{name}": spec for name, spec in teacher.feature_specs.items()}
    header = StoreHeader("toy", teacher.fingerprint_fields(), "int8", specs)
    prepare_store_for_writing(tmp_path, header)
    writer = ShardWriter(tmp_path, header, rank=0, shard_size=4, start_index=0)
    frame = resize_frame((32, 32), (32, 32)).to_dict()
    values = {"detection.embed": np.random.default_rng(0).normal(size=(1, 4, 2, 2)).astype(np.float32),
              "detection.hires_s8": np.zeros((1, 3, 4, 4), np.float32)}
    writer.add(["a"], [frame], values)
    writer.flush()
    finalize_store(tmp_path, header)
    stored = FeatureStore.open(tmp_path).read("a")
    np.testing.assert_allclose(stored["detection.embed"], values["detection.embed"][0], atol=0.02)
    for bad in ("embed.scale", ".embed", "embed..p3", "embed/p3"):
        with pytest.raises(ValueError, match=rf"feature name '{re.escape(bad)}' must be letters, digits and '_'"):
            StoreHeader("toy", teacher.fingerprint_fields(), "int8", {bad: teacher.feature_specs["embed"]})
