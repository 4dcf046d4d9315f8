"""Writing a feature store: preparing or resuming it, committing shards, the final manifest.

:func:`prepare_store_for_writing` creates a store or repairs one for resuming (the main
writer only), every rank's :class:`ShardWriter` encodes its batches and commits them as
shards, and :func:`finalize_store` rewrites the manifest from all committed shards.
:class:`StoreLock` keeps a second extraction out while one writes. The format itself is
:mod:`vfmkd.features.format`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import weakref
from pathlib import Path
from typing import IO, Any, Iterable, Mapping, Sequence

import numpy as np

from vfmkd.features.codecs import FLOAT16_MAX, get_codec
from vfmkd.features.format import (
    LOCK_NAME,
    MANIFEST_NAME,
    MAX_LISTED_PROBLEMS,
    RECORD_SUFFIX,
    SHARDS_DIR,
    FeatureStoreError,
    ShardRecord,
    StoreCorruptError,
    StoreHeader,
    StoreMismatchError,
    StoreNotFoundError,
    describe_differences,
    read_manifest,
    read_shard_records,
)
from vfmkd.utils.io import atomic_write, atomic_write_text

__all__ = [
    "ShardWriter",
    "StoreLock",
    "finalize_store",
    "prepare_store_for_writing",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- files
class _HashingFile:
    """Forwards writes to a file and hashes and counts the bytes on the way."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        self.size += view.nbytes
        self.file.write(view)
        return view.nbytes


def _write_npy(path: Path, array: np.ndarray) -> dict[str, Any]:
    """Write ``array`` as ``.npy`` atomically; return its file entry for a record."""
    result: dict[str, Any] = {}

    def write(file: IO[bytes]) -> None:
        hashing = _HashingFile(file)
        np.lib.format.write_array(hashing, np.ascontiguousarray(array), allow_pickle=False)
        result.update(bytes=hashing.size, sha256=hashing.digest.hexdigest())

    atomic_write(path, write, size=array.nbytes)
    return {
        "file": path.name,
        "bytes": result["bytes"],
        "sha256": result["sha256"],
        "shape": list(array.shape),
        "dtype": np.dtype(array.dtype).str,
    }


def _shard_name(rank: int, index: int) -> str:
    return f"rank{rank}-{index:06d}"


# --------------------------------------------------------------------------- store
def _remove_leftovers(shards: Path, records: Sequence[ShardRecord], ranks: Iterable[int] | None) -> int:
    """Remove temporary files and arrays that no committed record names.

    Args:
        ranks: only touch files of these writer ranks (None: all).

    Returns:
        How many files were removed.
    """
    keep = {entry["file"] for record in records for entry in record.file_entries()}
    keep.update(f"{record.name}{RECORD_SUFFIX}" for record in records)
    rank_set = set(ranks) if ranks is not None else None
    removed = 0
    for path in shards.iterdir() if shards.is_dir() else ():
        if path.name in keep or not path.is_file():
            continue
        match = re.match(r"^\.?rank(\d+)-", path.name)
        if match is None or (rank_set is not None and int(match.group(1)) not in rank_set):
            continue
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def prepare_store_for_writing(
    root: str | Path, header: StoreHeader, *, verify_existing: bool = False
) -> list[ShardRecord]:
    """Create a store or make an existing one ready to resume (the main writer only).

    Refuses a store that holds other features (teacher fingerprint, codec, features or
    split differ: :class:`StoreMismatchError` naming each field). Drops damaged shards
    (wrong byte size, or wrong SHA-256 with ``verify_existing``) and shards that repeat
    committed ids, so their samples are computed again; removes uncommitted leftovers;
    writes the manifest.

    Args:
        root: the store directory.
        header: what this extraction writes.
        verify_existing: hash every committed shard file (slow for big stores).

    Returns:
        The committed shard records that stay.
    """
    root = Path(root)
    shards = root / SHARDS_DIR
    shards.mkdir(parents=True, exist_ok=True)
    created = None
    try:
        manifest = read_manifest(root)
    except StoreNotFoundError:
        manifest = None
    except StoreCorruptError as error:
        logger.warning("%s; rebuilding it from the shard records", error)
        manifest = None
    if manifest is not None:
        stored = StoreHeader.from_manifest(manifest)
        differences = describe_differences(stored.identity(), header.identity())
        if differences:
            raise StoreMismatchError(
                f"the feature store at {root} holds other features than this extraction would write:\n  "
                + "\n  ".join(differences)
                + f"\nWrite to another --out folder, or delete {root} to start over",
                differences,
            )
        if stored.data_source != header.data_source:
            logger.warning(
                "%s was extracted from data `%s`, this run reads `%s`; sample ids must name the same images",
                root, stored.data_source, header.data_source,
            )
        created = manifest.get("created")
    records, problems = read_shard_records(
        root, header.specs, header.codec, header.fingerprint, verify=verify_existing
    )
    foreign = [problem.message for problem in problems if problem.foreign]
    if foreign and manifest is None:
        raise StoreMismatchError(
            f"{root} holds shards of another extraction and no valid manifest:\n  "
            + "\n  ".join(foreign[:MAX_LISTED_PROBLEMS])
            + f"\nWrite to another --out folder, or delete {root} to start over",
            foreign,
        )
    for problem in problems:
        logger.warning("dropping shard %s: %s; its samples are computed again", problem.path.stem, problem.message)
        problem.path.unlink(missing_ok=True)
    removed = _remove_leftovers(shards, records, ranks=None)
    if removed:
        logger.info("removed %d uncommitted file(s) left by an interrupted extraction", removed)
    atomic_write_text(root / MANIFEST_NAME, json.dumps(header.manifest(records, created), indent=1))
    return records


def finalize_store(root: str | Path, header: StoreHeader) -> dict[str, Any]:
    """Rewrite the manifest from every committed shard (the main writer, after all ranks).

    Returns:
        The manifest written.
    """
    root = Path(root)
    created = None
    try:
        created = read_manifest(root).get("created")
    except FeatureStoreError:
        pass
    records, problems = read_shard_records(root, header.specs, header.codec, header.fingerprint)
    if problems:
        raise StoreCorruptError(
            "damaged shard(s) after extraction:\n  "
            + "\n  ".join(problem.message for problem in problems[:MAX_LISTED_PROBLEMS])
        )
    manifest = header.manifest(records, created)
    atomic_write_text(root / MANIFEST_NAME, json.dumps(manifest, indent=1))
    return manifest


# --------------------------------------------------------------------------- writer
class ShardWriter:
    """Encodes batches of one writer rank and commits them as shards.

    Not thread-safe: one thread calls :meth:`add` and :meth:`close`.

    Args:
        root: the store directory (prepared by :func:`prepare_store_for_writing`).
        header: what is stored.
        rank: this writer's rank (names its shards ``rank<rank>-<k>``).
        shard_size: samples per shard.
        start_index: the first ``k`` to use (one past this rank's last committed shard).
    """

    def __init__(self, root: str | Path, header: StoreHeader, *, rank: int, shard_size: int, start_index: int) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {shard_size}")
        self.shards = Path(root) / SHARDS_DIR
        self.header = header
        self.codec = get_codec(header.codec)
        self.fingerprint = header.fingerprint
        self.rank = rank
        self.shard_size = shard_size
        self.next_index = start_index
        self.committed_samples = 0
        self.committed_shards = 0
        self._ids: list[str] = []
        self._frames: list[dict[str, Any]] = []
        self._parts: dict[str, list[tuple[np.ndarray, np.ndarray | None]]] = {name: [] for name in header.specs}
        self._sums: dict[str, list[np.ndarray]] = {name: [] for name in header.specs}
        self._squares: dict[str, list[np.ndarray]] = {name: [] for name in header.specs}

    @property
    def pending(self) -> int:
        """Samples added but not yet committed."""
        return len(self._ids)

    def add(self, ids: Sequence[str], frames: Sequence[dict[str, Any]], features: Mapping[str, np.ndarray]) -> None:
        """Encode one batch and commit full shards.

        Args:
            ids: B sample ids.
            frames: B teacher frames as :meth:`Frame.to_dict`.
            features: every stored feature as float32 ``[B, C, H, W]``.

        Raises:
            FeatureStoreError: a value is not finite, or too large for ``float16``.
        """
        checked = {}
        for name, spec in self.header.specs.items():
            values = np.ascontiguousarray(features[name], dtype=np.float32)
            expected = (len(ids), spec.channels, spec.height, spec.width)
            if values.shape != expected:
                raise FeatureStoreError(
                    f"teacher feature `{name}` has shape {tuple(values.shape)}, its spec says {expected}"
                )
            self._check_values(name, values, ids)
            checked[name] = values
        # Nothing is buffered before every feature passed its checks.
        for name, values in checked.items():
            flat = values.reshape(len(ids), values.shape[1], -1)
            self._sums[name].append(flat.sum(axis=2, dtype=np.float64))
            self._squares[name].append(np.square(flat).sum(axis=2, dtype=np.float64))
            self._parts[name].append(self.codec.encode(values))
        self._ids.extend(ids)
        self._frames.extend(frames)
        while len(self._ids) >= self.shard_size:
            self._commit(self.shard_size)

    def _check_values(self, name: str, values: np.ndarray, ids: Sequence[str]) -> None:
        finite = np.isfinite(values).reshape(len(ids), -1).all(axis=1)
        if not finite.all():
            bad = [sample_id for sample_id, ok in zip(ids, finite) if not ok]
            raise FeatureStoreError(
                f"the teacher returned NaN or infinite `{name}` values for sample(s) {bad[:5]}; "
                "check the weights and the images"
            )
        if self.codec.name == "float16":
            largest = float(np.abs(values).max()) if values.size else 0.0
            if largest > FLOAT16_MAX:
                raise FeatureStoreError(
                    f"`{name}` holds values up to {largest:.4g}, beyond float16's {FLOAT16_MAX:.0f} "
                    f"(samples {list(ids)[:5]}); extract with --dtype bfloat16 or float32"
                )

    def flush(self) -> None:
        """Commit every pending sample (a last, smaller shard)."""
        if self._ids:
            self._commit(len(self._ids))

    close = flush

    def _take(self, parts: list[Any], count: int) -> tuple[Any, list[Any]]:
        joined = np.concatenate(parts) if len(parts) > 1 else parts[0]
        rest = [joined[count:]] if len(joined) > count else []
        return joined[:count], rest

    def _commit(self, count: int) -> None:
        name = _shard_name(self.rank, self.next_index)
        files: dict[str, dict[str, dict[str, Any]]] = {}
        stats: dict[str, dict[str, Any]] = {}
        for feature, spec in self.header.specs.items():
            data_parts = [data for data, _ in self._parts[feature]]
            data, data_rest = self._take(data_parts, count)
            entries = {"data": _write_npy(self.shards / f"{name}.{feature}.npy", data)}
            scale_rest: list[Any] = []
            if self.codec.has_scale:
                scale, scale_rest = self._take([scale for _, scale in self._parts[feature]], count)
                entries["scale"] = _write_npy(self.shards / f"{name}.{feature}.scale.npy", scale)
            self._parts[feature] = [
                (rest, scale_rest[0] if scale_rest else None) for rest in data_rest
            ]
            sums, self._sums[feature] = self._take(self._sums[feature], count)
            squares, self._squares[feature] = self._take(self._squares[feature], count)
            stats[feature] = {
                "sum": sums.sum(axis=0).tolist(),
                "sumsq": squares.sum(axis=0).tolist(),
                "count": int(count * spec.height * spec.width),
            }
            files[feature] = entries
        record = ShardRecord(
            name, self.fingerprint, self.codec.name, self._ids[:count], self._frames[:count], files, stats
        )
        # NOTE: the record is written last; its rename is the commit.
        atomic_write_text(self.shards / f"{name}{RECORD_SUFFIX}", json.dumps(record.to_dict()))
        del self._ids[:count], self._frames[:count]
        self.next_index += 1
        self.committed_samples += count
        self.committed_shards += 1
        logger.debug("committed shard %s (%d samples)", name, count)


class StoreLock:
    """An exclusive lock on a store directory while one extraction writes to it.

    Released when the holder exits, even on SIGKILL (``flock``). A process forked while
    the lock is held (a DataLoader worker) closes its inherited copy at once, so the lock
    ends with its holder and not with that holder's last child.
    """

    def __init__(self, root: str | Path) -> None:
        self.path = Path(root) / LOCK_NAME
        self._handle: IO[bytes] | None = None

    def __enter__(self) -> "StoreLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "ab")
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass  # no flock (Windows): one writer per store is the user's duty
        except OSError as error:
            handle.close()
            if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise FeatureStoreError(
                    f"another extraction is writing to {self.path.parent} (it holds {self.path}); "
                    "wait for it to finish or write to another folder"
                ) from error
            raise
        self._handle = handle
        _HELD_LOCKS.add(self)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        _HELD_LOCKS.discard(self)
        if self._handle is not None:
            self._handle.close()
            self._handle = None


_HELD_LOCKS: "weakref.WeakSet[StoreLock]" = weakref.WeakSet()


def _close_inherited_locks() -> None:
    # NOTE: flock belongs to the open file, which a fork shares: a persistent worker that
    # kept the descriptor would keep the store locked after its parent released it.
    for lock in list(_HELD_LOCKS):
        if lock._handle is not None:
            lock._handle.close()
            lock._handle = None
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)
