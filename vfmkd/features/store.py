"""Reading a feature store: :class:`FeatureStore`, features read back fast during training.

:meth:`FeatureStore.open` validates the store (manifest checksum, each shard file's byte
size, optionally its SHA-256, and the fingerprint fields the caller expects) and
:meth:`FeatureStore.read` returns float32 maps (or float16 ones, ``dtype=np.float16``:
from a float16 store a plain copy of the stored bytes) from memory-mapped arrays that are
opened once per shard and process. The on-disk format is :mod:`vfmkd.features.format`,
the writer :mod:`vfmkd.features.writer`.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from numpy.typing import DTypeLike

from vfmkd.features.codecs import decode_dtype, get_codec
from vfmkd.features.format import (
    MAX_LISTED_PROBLEMS,
    REBUILD_HINT,
    SHARDS_DIR,
    ShardRecord,
    StoreCorruptError,
    StoreHeader,
    StoreMismatchError,
    describe_differences,
    merge_statistics,
    read_manifest,
    read_shard_records,
)
from vfmkd.geometry import Frame
from vfmkd.teachers.base import FeatureSpec

__all__ = ["FeatureStore"]


class FeatureStore:
    """Read access to a feature store. Build it with :meth:`open`.

    Arrays are memory-mapped lazily, once per shard and process, and kept for the next
    reads; a pickled store (e.g. sent to a spawned DataLoader worker) maps them again in
    the new process, a forked worker uses the inherited maps. Each map holds a file
    descriptor, so at most ``max_open_shards`` shards stay mapped (least recently used
    ones are unmapped; default: a quarter of the process's open-file limit).
    """

    def __init__(
        self,
        root: Path,
        manifest: dict[str, Any],
        records: list[ShardRecord],
        *,
        max_open_shards: int | None = None,
    ) -> None:
        self.path = root
        self.manifest = manifest
        self.codec = get_codec(manifest["codec"])
        self.specs = {name: FeatureSpec.from_dict(spec) for name, spec in manifest["features"].items()}
        self._shard_files: list[dict[str, tuple[str, str | None]]] = []
        self._shard_names: list[str] = []
        index: dict[str, tuple[int, int]] = {}
        frame_rows: list[np.ndarray] = []
        for shard_index, record in enumerate(records):
            self._shard_names.append(record.name)
            self._shard_files.append(
                {
                    name: (record.files[name]["data"]["file"], record.files[name].get("scale", {}).get("file"))
                    for name in self.specs
                }
            )
            for row, sample_id in enumerate(record.ids):
                index[sample_id] = (shard_index, row)
            frame_rows.append(_frames_to_rows(record.frames))
        self._index = index
        self.ids = sorted(index)
        self._frames = frame_rows
        self._stats = merge_statistics(records, self.specs)
        files_per_shard = len(self.specs) * (2 if self.codec.has_scale else 1)
        self.max_open_shards = max_open_shards or _default_open_shards(files_per_shard)
        self._arrays: OrderedDict[int, dict[str, tuple[np.ndarray, np.ndarray | None]]] = OrderedDict()

    # ----------------------------------------------------------------- open
    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        expect: Mapping[str, Any] | None = None,
        verify: bool = False,
        max_open_shards: int | None = None,
    ) -> "FeatureStore":
        """Open and validate a store.

        Args:
            path: the store directory.
            expect: fingerprint fields the caller needs (e.g. ``teacher.fingerprint_fields()``
                or a subset built from a config); keys it leaves out are not compared,
                so asking for one feature of a store holding several is fine.
            verify: also check every shard file's SHA-256 (reads the whole store).
            max_open_shards: shards kept memory-mapped at once (default: from the
                open-file limit).

        Raises:
            StoreNotFoundError: no manifest at ``path``.
            StoreMismatchError: a field of ``expect`` differs (each one named).
            StoreCorruptError: the manifest was edited, or a shard file is missing,
                truncated or (with ``verify``) damaged.
        """
        root = Path(path)
        manifest = read_manifest(root)
        if expect is not None:
            differences = describe_differences(manifest["fingerprint_fields"], expect, both_ways=False)
            if differences:
                raise StoreMismatchError(
                    f"the feature store at {root} does not hold the features asked for:\n  "
                    + "\n  ".join(differences)
                    + "\nExtract features with the asked teacher settings into another folder, "
                    "or point the config at a matching store",
                    differences,
                )
        header = StoreHeader.from_manifest(manifest)
        records, problems = read_shard_records(
            root, header.specs, header.codec, manifest["fingerprint"], verify=verify
        )
        if problems:
            listed = "\n  ".join(problem.message for problem in problems[:MAX_LISTED_PROBLEMS])
            more = f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
            raise StoreCorruptError(f"the feature store at {root} is damaged:\n  {listed}{more}\nTo repair: {REBUILD_HINT}")
        return cls(root, manifest, records, max_open_shards=max_open_shards)

    # ----------------------------------------------------------------- queries
    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self._index

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, teacher={self.teacher!r}, samples={len(self)}, codec={self.codec.name})"

    @property
    def teacher(self) -> str:
        """Name of the teacher that computed the features."""
        return str(self.manifest["teacher"])

    @property
    def fingerprint(self) -> str:
        """The teacher fingerprint the store was written with."""
        return str(self.manifest["fingerprint"])

    @property
    def fingerprint_fields(self) -> dict[str, Any]:
        """The fields behind :attr:`fingerprint`."""
        return dict(self.manifest["fingerprint_fields"])

    @property
    def num_shards(self) -> int:
        """Committed shards."""
        return len(self._shard_names)

    @property
    def is_complete(self) -> bool:
        """Whether every sample the extraction was asked for is stored."""
        requested = self.manifest.get("requested_samples")
        return requested is None or len(self) >= int(requested)

    def stats(self, feature: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel statistics of a feature over the whole store.

        Returns:
            ``(mean [C], std [C])`` float32.
        """
        self._check_feature(feature)
        mean, std = self._stats[feature]
        return mean.copy(), std.copy()

    def frame(self, sample_id: str) -> Frame:
        """The teacher frame of a sample (original image -> teacher input)."""
        shard, row = self._locate(sample_id)
        values = self._frames[shard][row]
        return Frame(
            values[:6].reshape(2, 3),
            (int(values[6]), int(values[7])),
            tuple(values[8:12]),
            (int(values[12]), int(values[13])),
        )

    # ----------------------------------------------------------------- reads
    def read(
        self, sample_id: str, features: Sequence[str] | None = None, *, dtype: DTypeLike | None = None
    ) -> dict[str, np.ndarray]:
        """The features of one sample.

        Args:
            sample_id: image path relative to the split's image folder, no extension.
            features: names to read (default: all stored).
            dtype: ``np.float32`` (default) or ``np.float16``. From a ``float16`` store,
                float16 is the stored values copied as they are (no decoding: a reader
                that trains in half precision pays a memcpy); other codecs decode and
                cast to float16 (values beyond +-65504 become +-inf).

        Returns:
            Per feature, a new array ``[C, H, W]`` of ``dtype``.
        """
        names = self._names(features)
        shard, row = self._locate(sample_id)
        arrays = self._shard_arrays(shard)
        outputs = self._allocate(names, 1, dtype)
        for name in names:
            data, scale = arrays[name]
            self.codec.decode_into(data[row], outputs[name][0], None if scale is None else scale[row])
        return {name: outputs[name][0] for name in names}

    def read_many(
        self, sample_ids: Sequence[str], features: Sequence[str] | None = None, *, dtype: DTypeLike | None = None
    ) -> dict[str, np.ndarray]:
        """The features of several samples, stacked (``dtype`` as in :meth:`read`).

        Returns:
            Per feature, a new array ``[B, C, H, W]`` of ``dtype`` in the order of
            ``sample_ids``.
        """
        names = self._names(features)
        outputs = self._allocate(names, len(sample_ids), dtype)
        for position, sample_id in enumerate(sample_ids):
            shard, row = self._locate(sample_id)
            arrays = self._shard_arrays(shard)
            for name in names:
                data, scale = arrays[name]
                self.codec.decode_into(data[row], outputs[name][position], None if scale is None else scale[row])
        return outputs

    # ----------------------------------------------------------------- internals
    def _names(self, features: Sequence[str] | None) -> list[str]:
        names = list(features) if features is not None else list(self.specs)
        for name in names:
            self._check_feature(name)
        return names

    def _allocate(self, names: Sequence[str], count: int, dtype: DTypeLike | None = None) -> dict[str, np.ndarray]:
        """Outputs ``[count, C, H, W]`` per feature (float32 by default), carved from one block.

        NOTE: one block per read instead of one per feature keeps glibc's malloc reusing
        the same heap memory read after read; separate blocks of several MiB each get
        returned to the system and page-faulted in again every time, which made reads
        several times slower.
        """
        sizes = [count * self.specs[name].channels * self.specs[name].height * self.specs[name].width for name in names]
        block = np.empty(sum(sizes), dtype=np.float32 if dtype is None else decode_dtype(dtype))
        outputs, offset = {}, 0
        for name, size in zip(names, sizes):
            spec = self.specs[name]
            outputs[name] = block[offset : offset + size].reshape(count, spec.channels, spec.height, spec.width)
            offset += size
        return outputs

    def _check_feature(self, name: str) -> None:
        if name not in self.specs:
            raise KeyError(
                f"the feature store at {self.path} has no feature `{name}`; it holds {', '.join(self.specs)}"
            )

    def _locate(self, sample_id: str) -> tuple[int, int]:
        try:
            return self._index[sample_id]
        except KeyError:
            examples = ", ".join(repr(sample) for sample in self.ids[:3])
            raise KeyError(
                f"sample '{sample_id}' is not in the feature store at {self.path} ({len(self)} samples, "
                f"e.g. {examples}); extract features for this data set and split, or check the id "
                "(image path relative to the split's image folder, without extension)"
            ) from None

    def _shard_arrays(self, shard: int) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        arrays = self._arrays.get(shard)
        if arrays is not None:
            self._arrays.move_to_end(shard)
            return arrays
        arrays = {}
        for name, (data_file, scale_file) in self._shard_files[shard].items():
            data = self._map(data_file, self.codec.storage_dtype)
            scale = self._map(scale_file, np.dtype(np.float32)) if scale_file else None
            arrays[name] = (data, scale)
        self._arrays[shard] = arrays
        while len(self._arrays) > self.max_open_shards:
            self._arrays.popitem(last=False)
        return arrays

    def _map(self, file_name: str, dtype: np.dtype) -> np.ndarray:
        path = self.path / SHARDS_DIR / file_name
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise StoreCorruptError(f"{path} cannot be read ({error}); {REBUILD_HINT}") from error
        if array.dtype != dtype:
            raise StoreCorruptError(f"{path} holds {array.dtype}, expected {dtype}; {REBUILD_HINT}")
        return array

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = OrderedDict()
        return state


def _default_open_shards(files_per_shard: int) -> int:
    """Shards that may stay mapped: a quarter of the open-file limit (each map holds a descriptor)."""
    limit = 1024
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        limit = 65536 if soft == resource.RLIM_INFINITY or soft <= 0 else soft
    except (ImportError, OSError, ValueError):
        pass  # no resource module (Windows): assume the common 1024
    return int(max(4, min(limit // 4, 16384) // max(files_per_shard, 1)))


def _frames_to_rows(frames: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Frame dicts as ``[N, 14]`` float64 rows: matrix (6), input size (2), valid (4), source size (2)."""
    rows = np.empty((len(frames), 14), dtype=np.float64)
    for row, frame in enumerate(frames):
        rows[row, :6] = np.asarray(frame["matrix"], dtype=np.float64).reshape(6)
        rows[row, 6:8] = frame["input_size"]
        rows[row, 8:12] = frame["valid"]
        rows[row, 12:14] = frame["source_size"]
    return rows
